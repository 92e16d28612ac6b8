//! `sana`: the command-line entry point (generate, serve, bench).

mod bench;
mod generate;
mod serve;

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
    /// Generate images from prompts and write them to files.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-style image API over HTTP.
    Serve(sana_server::ServeArgs),
    /// Time parts of the model beside the Python reference and print the ratios.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    // A server logs its requests; the one-shot commands only warnings. RUST_LOG overrides.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
