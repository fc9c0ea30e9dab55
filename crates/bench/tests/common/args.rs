//! `kvgate bench` flags parsed as the command line would (shared by the test binaries that
//! check flags).

use clap::Parser;
use kvgate_bench::cli::BenchArgs;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

/// The `BenchArgs` of `kvgate bench FLAGS...`.
pub fn args(flags: &[&str]) -> BenchArgs {
    let mut argv = vec!["bench"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).expect("flags parse").bench
}
