//! `sana`: the command-line entry point (generate, serve, bench).

mod bench;

use clap::{Parser, Subcommand};

/// mimalloc keeps freed pages for reuse: candle allocates a fresh tensor per op, and with the system
/// allocator every large one is a new mmap whose pages fault in one by one (≈10% of a CPU forward).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "sana", version, about = "Sana text-to-image inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time parts of the model beside the Python reference and print the ratios.
    Bench(bench::BenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
