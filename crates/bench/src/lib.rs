//! Workloads, the discrete-event policy comparison, and reports: how kvgate shows what each
//! routing policy buys on identical work.
//!
//! Discrete-event mode runs the production routing core against the pure engine model on a
//! virtual clock, so a full hour of real traffic replays in seconds, deterministically for a
//! seed, with signal staleness modelled explicitly ([`des`]). Workloads ([`workload`]) map trace
//! block ids to token ids that the built-in tokenizer reproduces from text, so the same workload
//! can also be sent over HTTP. Reports ([`report`]) are exact (percentiles over every sample).
#![deny(missing_docs)]

pub mod capacity;
pub mod ceiling;
pub mod cli;
pub mod des;
pub mod live;
pub mod prepared;
pub mod report;
pub mod stats;
pub mod trace;
pub mod truth;
pub mod workload;

use std::path::PathBuf;

/// Everything that can go wrong in a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A trace line is not valid JSON of the expected shape.
    #[error("trace line {line}: {source}")]
    TraceLine {
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A trace line parsed but breaks a rule.
    #[error("trace line {line}: {reason}")]
    TraceInvalid {
        /// 1-based line number.
        line: usize,
        /// The broken rule.
        reason: &'static str,
    },
    /// Reading the trace failed.
    #[error("trace line {line}: read failed: {source}")]
    TraceIo {
        /// 1-based line number.
        line: usize,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An output file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A chart could not be drawn.
    #[error("cannot draw chart {path}: {message}")]
    Chart {
        /// The file.
        path: PathBuf,
        /// What the plotting library reported.
        message: String,
    },
    /// The policy name or config is invalid.
    #[error("policy {policy}: {source}")]
    Policy {
        /// The policy.
        policy: String,
        /// The core's error.
        #[source]
        source: kvgate_core::CoreError,
    },
    /// The engine model rejected its config or a request.
    #[error("engine model: {source}")]
    Engine {
        /// The engine's error.
        #[source]
        source: kvgate_engine::EngineError,
    },
    /// The fleet is empty.
    #[error("the fleet needs at least one engine")]
    NoEngines,
    /// The router picked an endpoint the benchmark does not know.
    #[error("router picked an endpoint outside the fleet")]
    UnknownEndpoint,
    /// A command-line value is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// Live mode: not one request succeeded.
    #[error("all {requests} live requests failed; the first: {first_error}")]
    AllFailed {
        /// Requests sent.
        requests: usize,
        /// The first failure reported.
        first_error: String,
    },
    /// The workload is empty.
    #[error("the workload has no requests")]
    EmptyWorkload,
    /// Live mode without `--model`: the target's `/v1/models` did not name a model.
    #[error("no --model given and {url}/v1/models named none: {reason}")]
    NoModel {
        /// The live base URL.
        url: String,
        /// What went wrong asking it.
        reason: String,
    },
}

/// `f` over every item, one thread per core (at most one per item), results in the items'
/// order. Each benchmark run is deterministic and independent of the others, so running them
/// side by side changes no result, only the wall time. Hand-written over `std::thread::scope`
/// rather than a thread-pool crate: a work queue of a dozen long runs needs nothing more.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    results.lock().expect("no panics while holding it")[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("no panics while holding it")
        .into_iter()
        .map(|r| r.expect("every item was run"))
        .collect()
}
