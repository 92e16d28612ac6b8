//! `sana`: the command-line entry point (generate, serve, bench).

mod bench;
mod generate;
mod memory;
mod model;
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
    /// Edit an image with a prompt (image-to-image, or inpainting with --mask) and write the
    /// results to files.
    Edit(generate::EditArgs),
    /// Serve the OpenAI-style image API over HTTP.
    Serve(sana_server::ServeArgs),
    /// Time parts of the model beside the Python reference and print the ratios.
    Bench(bench::BenchArgs),
    /// Exit 0 when a local server answers `/health` (a container HEALTHCHECK without curl).
    Health {
        /// The health URL; default: port `$SANA_PORT` (8080) on the loopback.
        #[arg(long)]
        url: Option<String>,
    },
}

fn health(url: Option<String>) -> anyhow::Result<()> {
    let url = url.unwrap_or_else(|| {
        let port = std::env::var("SANA_PORT").unwrap_or_else(|_| "8080".into());
        format!("http://127.0.0.1:{port}/health")
    });
    let resp = ureq::get(&url)
        .timeout(std::time::Duration::from_secs(5))
        .call()
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    println!("{url}: {}", resp.status());
    Ok(())
}

/// `sana serve --config FILE` (or `SANA_CONFIG`): the file's settings become environment
/// variables where none is set, so flags > environment > file when clap parses.
fn apply_serve_config() -> Result<(), String> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) != Some("serve") {
        return Ok(());
    }
    let from_flag = argv.iter().enumerate().find_map(|(i, a)| {
        if a == "--config" {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(str::to_string)
        }
    });
    let Some(path) = from_flag.or_else(|| std::env::var("SANA_CONFIG").ok()) else {
        return Ok(());
    };
    for (key, value) in sana_server::config::read_env_file(std::path::Path::new(&path))? {
        if std::env::var_os(&key).is_none() {
            // Single-threaded here: nothing else reads the environment yet.
            std::env::set_var(key, value);
        }
    }
    Ok(())
}

/// candle sizes its CPU thread pools from `RAYON_NUM_THREADS`, and without it re-reads
/// `/proc/cpuinfo` on every matmul (≈25% of a small model's time). Set it once, from the CPUs this
/// process may use (cgroup quotas included), unless the user did.
///
/// oneDNN (CPU bf16 matmuls) runs on OpenMP's threads, beside rayon's: the same count
/// (`OMP_NUM_THREADS`; OpenMP's own default ignores a container's CPU quota), and threads that
/// sleep between matmuls instead of spinning on the cores rayon's elementwise work needs next
/// (`OMP_WAIT_POLICY=PASSIVE`: the bf16 DiT forward of Sana-0.6B at 1024², batch 2, took 15.6 s
/// instead of 18.7 s on 2 AVX512-BF16 cores). Each is left alone when set; those set here are listed in
/// [`DEFAULTED_ENV`].
fn pin_thread_count() {
    let mut defaulted = Vec::new();
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (key, value) in [
        ("RAYON_NUM_THREADS", n.to_string()),
        ("OMP_NUM_THREADS", n.to_string()),
        ("OMP_WAIT_POLICY", "PASSIVE".to_string()),
    ] {
        if std::env::var_os(key).is_none() {
            // Single-threaded here: nothing else reads the environment yet.
            std::env::set_var(key, value);
            defaulted.push(key);
        }
    }
    let _ = DEFAULTED_ENV.set(defaulted);
}

/// The environment variables [`pin_thread_count`] set (the user had not): removed again for the
/// programs `sana` runs, such as `sana bench`'s Python reference, whose own threads they are not
/// meant for.
pub(crate) static DEFAULTED_ENV: std::sync::OnceLock<Vec<&'static str>> =
    std::sync::OnceLock::new();

fn main() {
    memory::keep_freed_pages();
    pin_thread_count();
    if let Err(e) = apply_serve_config() {
        eprintln!("error: --config {e}");
        std::process::exit(1);
    }
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
        Command::Edit(args) => generate::run_edit(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Health { url } => health(url),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
