//! `kvgate serve`: an OpenAI-compatible HTTP gateway that routes every request with the
//! `kvgate-core` router and streams the engine's answer back untouched.
//!
//! Why it is built this way:
//! - **The data plane only does I/O.** Routing decisions, load estimates and the prefix index
//!   live in the pure core; this crate parses requests ([`openai`]), turns them into routing
//!   requests and applies signal observations ([`control`]), and proxies ([`proxy`]) over its own
//!   hyper accept loop ([`server`]), which is where connection timeouts live. `config`, `control`,
//!   `openai`, `meter` (TTFT, TPOT and usage read off a response) and `lifecycle` (task
//!   ownership, bounded shutdown, config reload) are public so the Envoy endpoint picker reuses
//!   them unchanged and both data planes calibrate the core and end alike.
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

pub mod config;
pub mod control;
pub mod lifecycle;
pub mod meter;
pub mod metrics;
pub mod openai;
pub mod proxy;
pub mod server;
pub mod tokenize;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{GatewayConfig, Overrides};
use crate::control::Control;
use crate::lifecycle::{Tasks, watch_config};
use crate::metrics::GatewayMetrics;
use crate::proxy::App;

/// How long shutdown waits for in-flight requests, ms. Long enough for most generations to
/// finish (a 1,000-token answer at 20 ms per token), short enough for a rolling update.
pub const SHUTDOWN_GRACE_MS: u64 = 30_000;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A configuration value is invalid.
    #[error("invalid gateway config: {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML for the gateway.
    #[error("cannot parse config file {path}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_norway::Error,
    },
    /// The router refused its configuration (unknown policy, bad plugin config).
    #[error("router configuration")]
    Router(#[source] kvgate_core::CoreError),
    /// The configured HuggingFace tokenizer could not be loaded.
    #[error("tokenizer")]
    Tokenizer(#[source] kvgate_tokens::TokenizerError),
    /// A listener could not be bound.
    #[error("cannot bind {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for ctrl-c failed.
    #[error("cannot listen for ctrl-c")]
    Signal(#[source] std::io::Error),
}

/// Flags that `kvgate serve` and `kvgate epp` share: which model servers to route to and how.
/// Flags win over the config file; `--kv-events` and `--kv-replay` pair with `--endpoint` by
/// position.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RoutingFlags {
    /// Model server to route to, as a base URL (http://10.0.0.7:8000) or `ip:port` (repeat for
    /// more).
    #[arg(long = "endpoint")]
    pub endpoints: Vec<String>,
    /// KV-event ZMQ PUB endpoint of the --endpoint at the same position (tcp://host:port).
    #[arg(long = "kv-events")]
    pub kv_events: Vec<String>,
    /// KV-event replay (ZMQ ROUTER) endpoint of the --endpoint at the same position.
    #[arg(long = "kv-replay")]
    pub kv_replay: Vec<String>,
    /// Bind one ZMQ SUB socket here (tcp://host:port) for engines whose KV-event publisher
    /// connects to it (vLLM with a concrete `endpoint` address); each engine's topic
    /// `kv@<host>:<port>@<model>` names its --endpoint.
    #[arg(long = "kv-events-listen")]
    pub kv_events_listen: Option<String>,
    /// The served model's HuggingFace directory (tokenizer.json and its chat template), so
    /// prompts are rendered and tokenised exactly as the engines do [default: a built-in
    /// tokenizer, which only the simulator shares].
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Models served by the --endpoint servers (default: learned from their /v1/models).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Routing policy: kvgate, gie-default, sglang-cache-aware, dynamo, round-robin, random,
    /// least-request, power-of-two [default: kvgate].
    #[arg(long)]
    pub policy: Option<String>,
    /// Metrics scrape interval per endpoint, ms [default: 100].
    #[arg(long)]
    pub scrape_interval_ms: Option<u64>,
    /// Largest request body accepted, bytes [default: 33554432].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
}

impl RoutingFlags {
    /// These flags as config overrides (listener fields left unset).
    pub fn overrides(&self) -> Overrides {
        Overrides {
            endpoints: self.endpoints.clone(),
            kv_events: self.kv_events.clone(),
            kv_replay: self.kv_replay.clone(),
            kv_events_listen: self.kv_events_listen.clone(),
            tokenizer: self.tokenizer.clone(),
            models: self.models.clone(),
            policy: self.policy.clone(),
            scrape_interval_ms: self.scrape_interval_ms,
            max_body_bytes: self.max_body_bytes,
            ..Overrides::default()
        }
    }
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
    tasks: Tasks,
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
    pub async fn start(cfg: GatewayConfig, flags: Overrides) -> Result<Self, GatewayError> {
        let metrics = Arc::new(GatewayMetrics::new());
        let control = Control::start(&cfg, metrics)?;
        control.set_endpoints(&cfg.endpoints);
        let app = App::new(
            control.clone(),
            cfg.limits,
            cfg.max_attempts,
            cfg.inject_stream_usage,
        );
        let bind = |port: u16| {
            let addr = format!("{}:{port}", cfg.host);
            async move {
                TcpListener::bind(&addr)
                    .await
                    .map_err(|source| GatewayError::Bind { addr, source })
            }
        };
        let api = bind(cfg.port).await?;
        let admin = bind(cfg.admin_port).await?;
        let local = |l: &TcpListener| {
            l.local_addr().map_err(|source| GatewayError::Bind {
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
                move || GatewayConfig::load(Some(&path), &flags)
            };
            tasks.spawn(watch_config(path, load, control.clone(), stop));
        }
        tracing::info!(%api_addr, %admin_addr, endpoints = cfg.endpoints.len(), "kvgate gateway listening");
        Ok(Self {
            api_addr,
            admin_addr,
            control,
            tasks,
        })
    }

    /// Stops accepting, lets in-flight requests finish for up to [`SHUTDOWN_GRACE_MS`], then
    /// cuts whatever is left.
    pub async fn shutdown(self) {
        self.tasks
            .shutdown(Duration::from_millis(SHUTDOWN_GRACE_MS))
            .await;
    }
}

/// Runs `kvgate serve` until ctrl-c.
pub async fn run(args: ServeArgs) -> Result<(), GatewayError> {
    let flags = args.overrides();
    let cfg = GatewayConfig::load(args.config.as_deref(), &flags)?;
    if cfg.endpoints.is_empty() {
        tracing::warn!(
            "no endpoints configured: every request will get 503 until the config file lists some"
        );
    }
    let gw = Gateway::start(cfg, flags).await?;
    tokio::signal::ctrl_c()
        .await
        .map_err(GatewayError::Signal)?;
    tracing::info!("shutting down");
    gw.shutdown().await;
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
        let cfg = GatewayConfig::load(None, &cli.serve.overrides()).unwrap();
        assert_eq!((cfg.port, cfg.admin_port), (18080, 19090));
        assert_eq!(cfg.endpoints[1].address, "127.0.0.1:8001");
        assert_eq!(
            cfg.endpoints[1].kv_events.as_deref(),
            Some("tcp://127.0.0.1:5558")
        );
        assert_eq!(
            cfg.policy,
            config::PolicyChoice::Named("round-robin".into())
        );
    }

    #[tokio::test]
    async fn unknown_policy_is_a_typed_error() {
        let cfg = GatewayConfig {
            policy: config::PolicyChoice::Named("no-such-policy".into()),
            ..GatewayConfig::default()
        };
        let err = Gateway::start(cfg, Overrides::default()).await.unwrap_err();
        assert!(matches!(err, GatewayError::Router(_)), "{err}");
    }
}
