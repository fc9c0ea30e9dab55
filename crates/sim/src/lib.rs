//! A vLLM-compatible engine simulator: N simulated engines in one process, each serving the
//! OpenAI API over HTTP, vLLM's `/metrics`, and vLLM's KV-cache events over ZeroMQ, so a router
//! can be developed, tested and benchmarked against a fleet without GPUs.
//!
//! Design decisions:
//! - **One actor per engine.** Each engine's [`kvgate_engine::Engine`] (a pure, deterministic
//!   state machine) is owned by one tokio task. HTTP handlers talk to it only through a command
//!   channel (submit, abort, snapshot, reset), so the engine needs no lock, and per-request output
//!   channels carry tokens back. The actor sleeps until the engine's next step ends, completes
//!   due steps one at a time, and publishes each step's KV events as one batch, as vLLM does.
//! - **Time scale.** Simulated µs = real elapsed µs × `time_scale`: at 10, a 5.75 ms H100
//!   decode step takes 0.575 ms of wall time. Latencies reported by the engine (`/metrics`
//!   histograms) are in simulated seconds; what an HTTP client measures is wall time. Tokio's
//!   timer has millisecond resolution, so at high scales several steps complete per wake-up
//!   (each still its own KV-event batch).
//! - **Crash = drop everything.** Killing an engine (or a crash fault) cancels one token that
//!   the accept loop, every connection task, the actor and the two ZMQ socket threads all watch:
//!   the listener closes, in-flight streams are cut mid-body, engine state is lost, the ZMQ
//!   context is terminated (sockets closed, ports released). Connections are served by our own
//!   accept loop (hyper-util) rather than `axum::serve`, because the latter drains connections
//!   gracefully and a crash must not.
//! - **vLLM 0.32 is the reference** wherever a router can observe the difference, so simulated
//!   and real runs take the same router code paths: who binds the KV-event socket, the event
//!   and replay frames ([`kv`] module), block hashes a router cannot compute by default and
//!   tagged extra keys (`kvgate_engine`, `kvgate_tokens`), `prompt_tokens_details` only on
//!   request, `POST /reset_prefix_cache` (the private `http` module). Older wire shapes stay
//!   available as options ([`KvEncoding::Array`], [`ReplayFormat::Legacy`]).
//! - **KV events** go over libzmq (the `zmq` crate, which enforces `ZMQ_MAXMSGSIZE` before
//!   allocating), one OS thread per socket, with a bounded replay ring buffer of
//!   [`config::DEFAULT_REPLAY_BUFFER_BATCHES`] batches per engine by default (vLLM keeps 10,000;
//!   a smaller ring bounds memory when dozens of engines share a process).
//! - **Faults** ([`fault`] module) are deterministic given a seed and request order.
//! - **Ports.** Engine `i` of `N` serves HTTP on `port + i`. By default it binds its KV-event
//!   PUB socket on `tcp://127.0.0.1:(zmq_port + i)` (vLLM's `tcp://*:P` case) and its replay
//!   ROUTER on `tcp://127.0.0.1:(zmq_port + N + i)`. With `--kv-events-endpoint tcp://H:P` every
//!   engine's PUB socket *connects* to `H:P`, where the router binds one SUB socket and tells
//!   engines apart by topic (`kv@<host>:<http port>@<model>` by default), and the replay
//!   ROUTERs bind `kv_replay_port + i` (default `zmq_port + i`). A base port of 0 gives every
//!   socket an ephemeral port.
//! - **Stopping.** SIGTERM (what Kubernetes, systemd and docker send) and ctrl-c both stop the
//!   fleet as a terminating pod should: `/health` answers 503 at once, listeners keep accepting
//!   for `--shutdown-accept-grace-ms` so a router or load balancer notices, then close, and
//!   streams in flight get `--shutdown-drain-timeout-ms` to finish; then the process exits 0.
//!   [`Fleet::kill`] and crash faults stay abrupt on purpose.
//! - **Prefill/decode disaggregation** (`pd` module): `--role prefill|decode|both` (or
//!   `role:` per engine) makes engines act as vLLM NixlConnector producers/consumers and as
//!   SGLang prefill/decode servers. KV moves over a loopback side channel per prefill-capable
//!   engine, the simulator's stand-in for NIXL and SGLang's bootstrap server (not a wire format
//!   of either), in latency + bytes ÷ bandwidth of simulated time; the decode engine then
//!   publishes the blocks as its own KV events.
//! - **Output text.** Generated token ids come from `kvgate_engine::default_output_vocab()`; each
//!   maps to one word of `default_output_words()`, a single built-in-tokenizer token, so
//!   re-tokenizing the output text reproduces the ids.
//!
//! The YAML file given by `--config` sets fleet-wide values below the flags and overrides them
//! per engine:
//!
//! ```yaml
//! kv_events_endpoint: tcp://127.0.0.1:5557   # every engine connects (vLLM's rule)
//! kv_replay_port: 5600                        # engine i binds replay on 5600 + i
//! kv_topic: "kv@{host}:{port}@{model}"
//! replay_format: v0_32                        # or legacy
//! kv_encoding: map                            # or array
//! enable_prompt_tokens_details: true
//! prefix_caching_hash_algo: sha256_cbor       # or sha256 (default)
//! hash_seed: "0"                              # default "vllm-none-hash"
//! engines:            # entry i applies to engine i; missing entries use the flags
//!   - gpu: a100       # h100 | a100 preset
//!     betas: [16441.5, 47.84, 18.21]   # step µs = b0 + b1·prefill tokens + b2·decode tokens
//!     num_gpu_blocks: 4096
//!     max_num_seqs: 128
//!     kv_events_endpoint: "tcp://*:6000"      # this engine binds instead
//!     prefix_caching_hash_algo: sha256
//!     faults: { error_rate: 0.1, error_status: 429, kv_drop_rate: 0.05 }
//!   - role: prefill     # prefill | decode | both (default: --role)
//!     kv_transfer: { link_bandwidth_bytes_per_s: 25.0e9, link_latency_us: 500,
//!                    abort_request_timeout_us: 480000000, kv_load_failure_policy: fail }
//!     faults: { transfer_failure_rate: 0.01 }
//! ```
#![deny(missing_docs)]

mod actor;
pub mod config;
pub mod fault;
mod fleet;
mod http;
pub mod kv;
mod metrics;
mod pd;

use std::path::PathBuf;

pub use config::{
    DEFAULT_BOOTSTRAP_PORT, DEFAULT_KV_TOPIC, EngineSpec, FleetConfig, GpuPreset, Role, SimArgs,
};
pub use fault::FaultConfig;
pub use fleet::{EngineInfo, Fleet, start_fleet};
pub use http::{DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETION_MAX_TOKENS};
pub use kv::{KvEncoding, ReplayFormat, SocketRole, publisher_binds};
pub use kvgate_engine::{EngineStats, HashAlgo};
pub use metrics::restrict as restrict_metrics;

/// Why the simulator could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A configuration value is out of range.
    #[error("invalid simulator config: {field}: {reason}")]
    InvalidConfig {
        /// The offending setting.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An engine's model configuration was refused by the engine model.
    #[error("invalid configuration for engine {index}")]
    InvalidEngineConfig {
        /// Engine index.
        index: usize,
        /// The engine model's complaint.
        #[source]
        source: kvgate_engine::EngineError,
    },
    /// A file named by a flag could not be read.
    #[error("cannot read {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML config file is malformed.
    #[error("cannot parse config file {path}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_norway::Error,
    },
    /// The tokenizer file is not a valid HuggingFace tokenizer.
    #[error("cannot load tokenizer")]
    Tokenizer(#[from] kvgate_tokens::TokenizerError),
    /// An HTTP port could not be bound.
    #[error("cannot bind HTTP listener on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A ZMQ socket could not be created, configured, bound or connected.
    #[error("cannot {what} ZMQ endpoint {endpoint}")]
    Zmq {
        /// What failed (`"bind"`, `"connect"`, `"set ZMQ_LINGER on"`, ...).
        what: &'static str,
        /// The endpoint.
        endpoint: String,
        /// libzmq's error.
        #[source]
        source: zmq::Error,
    },
    /// A KV-event socket thread could not be started.
    #[error("cannot start a KV-event socket thread")]
    SpawnThread {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No engine has this index.
    #[error("no engine {index} (the fleet has {engines})")]
    NoSuchEngine {
        /// The index asked for.
        index: usize,
        /// Fleet size.
        engines: usize,
    },
    /// The engine was killed or crashed.
    #[error("engine {index} is not running")]
    EngineDown {
        /// Engine index.
        index: usize,
    },
    /// Waiting for ctrl-c or SIGTERM failed.
    #[error("cannot listen for ctrl-c or SIGTERM")]
    Signal(#[source] std::io::Error),
}

/// Runs `kvgate sim`: starts the fleet, prints every engine's addresses, serves until SIGTERM
/// or ctrl-c, then drains (see the crate docs).
pub async fn run(args: SimArgs) -> Result<(), SimError> {
    let cfg = args.to_fleet_config()?;
    let fleet = start_fleet(cfg).await?;
    if args.print_json {
        println!("{}", fleet.addresses_json());
    } else {
        for (i, e) in fleet.engines.iter().enumerate() {
            let side = e
                .kv_side_channel
                .map(|a| format!(" kv-side-channel {a}"))
                .unwrap_or_default();
            println!(
                "engine {i}: http://{} kv-events {} ({}) replay {} topic {} role {}{side}",
                e.http_addr,
                e.kv_pub_endpoint,
                e.kv_pub_role.as_str(),
                e.kv_replay_endpoint,
                e.kv_topic,
                e.role.as_str(),
            );
        }
    }
    let signal = shutdown_signal().await?;
    let grace = std::time::Duration::from_millis(args.shutdown_accept_grace_ms);
    let timeout = std::time::Duration::from_millis(args.shutdown_drain_timeout_ms);
    tracing::info!(
        signal,
        accept_grace_ms = args.shutdown_accept_grace_ms,
        drain_timeout_ms = args.shutdown_drain_timeout_ms,
        "shutting down: /health is 503 now; still accepting during the grace period"
    );
    if fleet.drain(grace, timeout).await {
        tracing::info!("every engine drained; exiting");
    } else {
        tracing::warn!(
            drain_timeout_ms = args.shutdown_drain_timeout_ms,
            "requests still in flight after the drain timeout were cut"
        );
    }
    Ok(())
}

/// Waits for SIGTERM or ctrl-c (SIGINT); returns which arrived.
async fn shutdown_signal() -> Result<&'static str, SimError> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(SimError::Signal)?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map(|()| "ctrl-c").map_err(SimError::Signal),
            _ = term.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(SimError::Signal)?;
        Ok("ctrl-c")
    }
}
