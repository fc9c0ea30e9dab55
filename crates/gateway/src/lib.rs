//! `kvgate serve`: an OpenAI-compatible HTTP gateway that routes every request with the
//! `kvgate-core` router and streams the engine's answer back untouched.
//!
//! Why it is built this way:
//! - **Only the HTTP protocol lives here.** Membership, signal tasks, the router handle,
//!   metering, metrics, config and lifecycle are `kvgate-runtime`'s, shared with the Envoy
//!   endpoint picker (`kvgate epp`), which this crate does not know about. What is left is
//!   HTTP: the proxy ([`proxy`]) and our own hyper accept loop ([`server`]), which is where
//!   connection timeouts live.
//! - **Bytes pass through.** Request bodies are forwarded as received and response frames are
//!   relayed as they arrive; the gateway reads what it needs (usage, timing) on the side, so a
//!   stream through the gateway is byte-for-byte the engine's stream.
//! - **Failures are decided before the first byte.** Refused connections, 5xx and 429 are retried
//!   on the core's fallbacks while nothing has been sent to the client; after that, a broken
//!   stream ends with an OpenAI error event (see [`proxy`] for the policy and bounds).
//! - **Signals age, endpoints are not dropped.** A pod whose metrics or events stop keeps its
//!   place; the core discounts its stale view. Endpoints leave only through membership (config
//!   reload), and then drain.
#![deny(missing_docs)]

mod access;
pub mod h2;
pub mod passthrough;
mod pd;
pub mod proxy;
pub mod server;
pub mod stamp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use kvgate_runtime::RuntimeError;
use kvgate_runtime::config::{DataPlaneConfig, Overrides, RoutingFlags, ShutdownTimes};
use kvgate_runtime::control::Control;
use kvgate_runtime::decision_log::Recorder;
use kvgate_runtime::lifecycle::{SHUTDOWN_GRACE_MS, Tasks, shutdown_signal, watch_config};
use kvgate_runtime::metrics::DataPlaneMetrics;

use crate::proxy::App;

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is invalid, the router refused it, or a listener could not be bound.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The SIGTERM / ctrl-c handlers could not be installed.
    #[error("cannot listen for SIGTERM / ctrl-c")]
    Signal(#[source] std::io::Error),
}

/// Flags of `kvgate serve`. Flags win over the config file; `--kv-events` and `--kv-replay`
/// pair with `--endpoint` by position.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// YAML config file (endpoints are reloaded when it changes).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to bind both listeners to [default: 0.0.0.0].
    #[arg(long)]
    pub host: Option<String>,
    /// OpenAI API port [default: 8080].
    #[arg(long)]
    pub port: Option<u16>,
    /// Admin port: /metrics, /health, /ready [default: 9090].
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// Answer clients that half-close after sending a complete request (`printf ... | nc`).
    /// Off by default: with it, a client that disconnects is noticed only when its response
    /// is written, not at once (see `limits.client_half_close`).
    #[arg(long)]
    pub client_half_close: bool,
    /// The fleet and how to route it (shared with `kvgate epp`).
    #[command(flatten)]
    pub routing: RoutingFlags,
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            host: self.host.clone(),
            port: self.port,
            admin_port: self.admin_port,
            client_half_close: self.client_half_close.then_some(true),
            ..self.routing.overrides()
        }
    }
}

/// A running gateway.
pub struct Gateway {
    /// Where the OpenAI API listens.
    pub api_addr: SocketAddr,
    /// Where `/metrics`, `/health`, `/ready` listen.
    pub admin_addr: SocketAddr,
    /// Routing state (for embedding and tests).
    pub control: Arc<Control>,
    shutdown_times: ShutdownTimes,
    tasks: Tasks,
    /// Request records, written out after the drain.
    recorder: Option<Arc<Recorder>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("api_addr", &self.api_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Binds both listeners, adds the configured endpoints and starts serving. `flags` are
    /// re-applied on every config reload (so flag-given endpoints stay fixed).
    pub async fn start(cfg: DataPlaneConfig, flags: Overrides) -> Result<Self, GatewayError> {
        let metrics = Arc::new(DataPlaneMetrics::new());
        let control = Control::start(&cfg, metrics.clone())?;
        control.set_endpoints(&cfg.endpoints);
        let policy = control.with_router(|r| r.policy().to_owned());
        let recorder = Recorder::start(&cfg.logs, &policy, &metrics)?;
        let app = App::new(
            control.clone(),
            cfg.limits,
            cfg.max_attempts,
            cfg.inject_stream_usage,
            recorder.clone(),
        );
        let bind = |port: u16| {
            let addr = format!("{}:{port}", cfg.host);
            async move {
                TcpListener::bind(&addr)
                    .await
                    .map_err(|source| RuntimeError::Bind { addr, source })
            }
        };
        let api = bind(cfg.port).await?;
        let admin = bind(cfg.admin_port).await?;
        let local = |l: &TcpListener| {
            l.local_addr().map_err(|source| RuntimeError::Bind {
                addr: cfg.host.clone(),
                source,
            })
        };
        let (api_addr, admin_addr) = (local(&api)?, local(&admin)?);
        let mut tasks = Tasks::new();
        let stop = tasks.stop_token();
        tasks.spawn(server::serve(
            api,
            proxy::api_router(app.clone()),
            cfg.limits,
            stop.clone(),
        ));
        tasks.spawn(server::serve(
            admin,
            proxy::admin_router(app),
            cfg.limits,
            stop.clone(),
        ));
        if let Some(path) = cfg.source.clone() {
            let load = {
                let path = path.clone();
                move || DataPlaneConfig::load(Some(&path), &flags)
            };
            tasks.spawn(watch_config(path, load, control.clone(), stop));
        }
        tracing::info!(%api_addr, %admin_addr, endpoints = cfg.endpoints.len(), "kvgate gateway listening");
        Ok(Self {
            api_addr,
            admin_addr,
            control,
            shutdown_times: cfg.shutdown,
            tasks,
            recorder,
        })
    }

    /// Stops accepting, lets in-flight requests finish for up to [`SHUTDOWN_GRACE_MS`], then
    /// cuts whatever is left.
    pub async fn shutdown(self) {
        self.tasks
            .shutdown(Duration::from_millis(SHUTDOWN_GRACE_MS))
            .await;
        close_records(self.recorder.as_ref()).await;
    }

    /// What a shutdown signal starts (`kvgate_runtime::lifecycle::drain`): `/ready` answers
    /// 503 at once, both listeners keep accepting for the configured grace period, then stop,
    /// and in-flight requests get the configured drain timeout to finish.
    pub async fn drain(self, signal: &str) {
        kvgate_runtime::lifecycle::drain(&self.control, self.tasks, self.shutdown_times, signal)
            .await;
        close_records(self.recorder.as_ref()).await;
    }
}

/// Writes out the request records still queued (receipts, the captured trace's tail) before
/// the process exits.
async fn close_records(recorder: Option<&Arc<Recorder>>) {
    if let Some(r) = recorder {
        r.close(Duration::from_millis(RECORDS_CLOSE_TIMEOUT_MS))
            .await;
    }
}

/// How long the exit waits for the record writers (a few thousand queued lines on a slow disk).
const RECORDS_CLOSE_TIMEOUT_MS: u64 = 5_000;

/// Runs `kvgate serve` until SIGTERM or ctrl-c, then drains (see [`Gateway::drain`]).
pub async fn run(args: ServeArgs) -> Result<(), GatewayError> {
    let flags = args.overrides();
    let cfg = DataPlaneConfig::load(args.config.as_deref(), &flags)?;
    if cfg.endpoints.is_empty() {
        tracing::warn!(
            "no endpoints configured: every request will get 503 until the config file lists some"
        );
    }
    let gw = Gateway::start(cfg, flags).await?;
    let signal = shutdown_signal().await.map_err(GatewayError::Signal)?;
    gw.drain(signal).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn cli_contract_flags_parse_and_pair_by_position() {
        let cli = Cli::try_parse_from([
            "kvgate",
            "--port",
            "18080",
            "--admin-port",
            "19090",
            "--endpoint",
            "http://127.0.0.1:8000",
            "--endpoint",
            "http://127.0.0.1:8001",
            "--kv-events",
            "tcp://127.0.0.1:5557",
            "--kv-events",
            "tcp://127.0.0.1:5558",
            "--policy",
            "round-robin",
        ])
        .unwrap();
        let cfg = DataPlaneConfig::load(None, &cli.serve.overrides()).unwrap();
        assert_eq!((cfg.port, cfg.admin_port), (18080, 19090));
        assert_eq!(cfg.endpoints[1].address, "127.0.0.1:8001");
        assert_eq!(
            cfg.endpoints[1].kv_events.as_deref(),
            Some("tcp://127.0.0.1:5558")
        );
        assert_eq!(
            cfg.policy,
            kvgate_runtime::config::PolicyChoice::Preset(kvgate_core::Policy::RoundRobin)
        );
    }

    #[tokio::test]
    async fn unknown_policy_is_a_typed_error() {
        let err = DataPlaneConfig::from_yaml("policy: no-such-policy").unwrap_err();
        assert!(
            matches!(
                err,
                RuntimeError::InvalidConfig {
                    field: "policy",
                    ..
                }
            ),
            "{err}"
        );
        // The message lists the policies that exist.
        assert!(err.to_string().contains("round-robin"), "{err}");
        // And the flag refuses it before any config is read.
        assert!(Cli::try_parse_from(["kvgate", "--policy", "no-such-policy"]).is_err());
        assert!(Cli::try_parse_from(["kvgate", "--policy", "oracle"]).is_err());
        assert!(Cli::try_parse_from(["kvgate", "--policy", "gie"]).is_ok());
    }
}
