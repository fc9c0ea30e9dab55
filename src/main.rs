//! `kvgate`: parses flags, sets up tracing and the runtime, and hands off to the crates.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// jemalloc instead of glibc's malloc: the request path allocates per request (JSON, HTTP
/// frames) and HuggingFace's tokenizer per pre-token, and glibc's allocator took ~40% of
/// tokenising a long unseen prompt (perf). Measured against glibc (README, "Overhead"): a
/// unique 220 KB prompt's picker CPU −18%, the gateway's instructions per small request −5%,
/// the discrete-event benchmark's time and memory unchanged. mimalloc cut the tokenizer more
/// (−25%) but made the benchmark 6-8% slower with a third more memory, and the gateway
/// 13 MB larger.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Inference-aware router for LLM model servers.
#[derive(Parser, Debug)]
#[command(name = "kvgate", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr: `text` (coloured only when stderr is a terminal) or `json` (one
    /// object per line, for log collectors). Levels and targets are chosen with `RUST_LOG`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "KVGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// OpenAI-compatible gateway that routes every request with the core.
    Serve(kvgate_gateway::ServeArgs),
    /// Endpoint picker for Envoy (Gateway API Inference Extension ext_proc protocol).
    Epp(kvgate_epp::EppArgs),
    /// Run simulated vLLM-compatible engines (HTTP + KV events over ZeroMQ).
    Sim(kvgate_sim::SimArgs),
    /// Compare routing policies on a trace or synthetic workload.
    Bench(kvgate_bench::cli::BenchArgs),
    /// One-minute side-by-side comparison of every policy on a built-in workload.
    Demo(kvgate_bench::cli::DemoArgs),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`). Colour codes are written only
/// to a terminal: in a file, journald or a container log they are noise that breaks grep.
///
/// Written by a thread of their own through a bounded buffer (`tracing-appender`'s non-blocking
/// writer, 128k lines): a log reader that stalls (a full pipe to a log shipper) must not stop
/// the request path, which logs (the access log writes a line per request). When the buffer is
/// full, lines are dropped, and the drop is reported (see [`report_dropped_logs`]). The
/// returned guard flushes what is buffered when `main` ends.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    report_dropped_logs(writer.error_counter());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(writer);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    guard
}

/// Says, straight to stderr (blocking this thread only), how many log lines the full buffer
/// dropped since the last report; looks every 10 s.
fn report_dropped_logs(dropped: tracing_appender::non_blocking::ErrorCounter) {
    let _ = std::thread::Builder::new()
        .name("kvgate-log-drops".into())
        .spawn(move || {
            let mut reported = 0;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(10));
                let n = dropped.dropped_lines();
                if n > reported {
                    eprintln!(
                        "kvgate: {} log lines dropped ({n} in all): stderr is not read fast enough",
                        n - reported
                    );
                    reported = n;
                }
            }
        });
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let _logs = init_tracing(cli.log_format);
    match cli.command {
        Command::Serve(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(kvgate_gateway::run(args))?;
        }
        Command::Epp(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(kvgate_epp::run(args))?;
        }
        Command::Sim(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(kvgate_sim::run(args))?;
        }
        Command::Bench(args) => {
            kvgate_bench::cli::bench(&args)?;
        }
        Command::Demo(args) => {
            kvgate_bench::cli::demo(&args)?;
        }
    }
    Ok(())
}
