//! `kvgate`: parses flags, sets up tracing and the runtime, and hands off to the crates.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Inference-aware router for LLM model servers.
#[derive(Parser, Debug)]
#[command(name = "kvgate", version, about, long_about = None)]
struct Cli {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
