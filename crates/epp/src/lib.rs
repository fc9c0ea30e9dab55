//! `kvgate epp`: an Envoy `ext_proc` server that picks the model-server pod for every request with
//! the `kvgate-core` router, speaking the Gateway API Inference Extension endpoint-picker protocol
//! so it drops in where the reference picker runs (Envoy Gateway, kgateway, Istio, GKE Gateway).
//!
//! Why it is built this way:
//! - **One routing brain, two data planes.** The picker shares everything but the wire with
//!   `kvgate serve`, through `kvgate-runtime` (it does not depend on the HTTP gateway): the YAML
//!   config ([`kvgate_runtime::config`], with `EndpointPickerConfig` accepted), OpenAI parsing
//!   and errors ([`kvgate_runtime::openai`]), the routing state and its signal tasks
//!   ([`kvgate_runtime::control`]), and the response measurements ([`kvgate_runtime::meter`])
//!   that calibrate the core. A policy measured behind the gateway or in simulation is the
//!   policy Envoy gets.
//! - **Envoy moves the bytes, the picker decides.** [`extproc`] holds one small synchronous state
//!   machine per ext_proc stream; the gRPC task only shuttles messages, so the protocol logic is
//!   tested message by message without sockets. Request bodies are buffered only until the
//!   decision (the protocol needs the body before answering the headers); responses stream
//!   through chunk by chunk.
//! - **Membership through one door.** Static endpoints (config or `--endpoint`) and Kubernetes
//!   discovery ([`k8s`]: an `InferencePool` and its pods, watched with kube-rs) both end in
//!   [`kvgate_runtime::control::Control::set_endpoints`], so a terminating pod drains exactly like an endpoint
//!   removed from the config: no new requests unless nothing else can serve, in-flight ones finish.
//! - **Three listeners, as the reference picker has them**: ext_proc gRPC (9002, plaintext or
//!   TLS with `--secure-serving`, health served there too), gRPC health
//!   `grpc.health.v1` (9003, SERVING once the endpoint set is known and usable), Prometheus metrics
//!   (9090).
#![deny(missing_docs)]

pub mod extproc;
pub mod k8s;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use kvgate_runtime::RuntimeError;
use kvgate_runtime::accept::Acceptor;
use kvgate_runtime::config::RoutingFlags;
use kvgate_runtime::config::{DataPlaneConfig, Overrides, PolicyChoice};
use kvgate_runtime::lifecycle::{Tasks, watch_config};
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::extproc::{Picker, PickerSettings};
use crate::metrics::EppMetrics;
use kvgate_runtime::control::Control;

/// Default ext_proc port: the reference endpoint picker's `--grpc-port`.
pub const DEFAULT_GRPC_PORT: u16 = 9002;
/// Default gRPC health port: the reference picker's `--grpc-health-port`.
pub const DEFAULT_GRPC_HEALTH_PORT: u16 = 9003;
/// Default Prometheus port: the reference picker's `--metrics-port`.
pub const DEFAULT_METRICS_PORT: u16 = 9090;

/// How often readiness is re-checked until the picker first reports SERVING, ms: endpoint
/// discovery (`/v1/models`) answers within milliseconds, so 50 ms adds little to start-up and
/// costs nothing once SERVING.
const READY_POLL_MS: u64 = 50;

/// The ext_proc service name, as health checks (Envoy's `grpc_health_check`) ask for it.
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// Why the picker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EppError {
    /// The configuration (file or flags) is invalid, or the router refused it.
    #[error("configuration")]
    Config(#[source] RuntimeError),
    /// Flags that contradict each other.
    #[error("invalid flags: {0}")]
    Flags(&'static str),
    /// A listener could not be bound.
    #[error("cannot bind {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes client could not be configured.
    #[error("kubernetes client")]
    Kube(#[source] k8s::DiscoveryError),
    /// The TLS certificate could not be read or generated, or was refused.
    #[error("TLS for the ext_proc port: {reason}")]
    Tls {
        /// What went wrong.
        reason: String,
    },
    /// The SIGTERM / ctrl-c handlers could not be installed.
    #[error("cannot listen for SIGTERM / ctrl-c")]
    Signal(#[source] std::io::Error),
}

/// Flags of `kvgate epp`. Flags win over the config file.
#[derive(Clone, Debug, clap::Args)]
pub struct EppArgs {
    /// YAML config file: the same format as `kvgate serve`, or a bare `EndpointPickerConfig`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address the three listeners (ext_proc gRPC, gRPC health, metrics) bind [default:
    /// 0.0.0.0, every interface: in Kubernetes, Envoy and the kubelet's probes reach the
    /// picker on its pod IP. Give 127.0.0.1 when the proxy runs beside it].
    #[arg(long)]
    pub host: Option<String>,
    /// ext_proc gRPC port (Envoy connects here).
    #[arg(long, default_value_t = DEFAULT_GRPC_PORT)]
    pub grpc_port: u16,
    /// gRPC health (`grpc.health.v1`) port.
    #[arg(long, default_value_t = DEFAULT_GRPC_HEALTH_PORT)]
    pub grpc_health_port: u16,
    /// Prometheus metrics port (`/metrics`).
    #[arg(long, default_value_t = DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,
    /// The fleet and how to route it, as `kvgate serve` takes it. Static `--endpoint`s and
    /// `--pool-name` are exclusive.
    #[command(flatten)]
    pub routing: RoutingFlags,
    /// Fallback endpoints written after the primary in x-gateway-destination-endpoint. Keep 0
    /// with an ORIGINAL_DST cluster (it parses one address only).
    #[arg(long, default_value_t = 0)]
    pub fallbacks: usize,
    /// Name of the InferencePool to serve (Kubernetes discovery).
    #[arg(long)]
    pub pool_name: Option<String>,
    /// Namespace of the InferencePool [default: $NAMESPACE, else "default"].
    #[arg(long)]
    pub pool_namespace: Option<String>,
    /// API group of the InferencePool.
    #[arg(long, default_value = k8s::DEFAULT_POOL_GROUP)]
    pub pool_group: String,
    /// kubeconfig file (default: in-cluster config, else $KUBECONFIG / ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Port of each pod's KV-event ZMQ publisher (Kubernetes discovery; optional).
    #[arg(long)]
    pub pod_kv_events_port: Option<u16>,
    /// Port of each pod's KV-event replay socket (Kubernetes discovery; optional).
    #[arg(long)]
    pub pod_kv_replay_port: Option<u16>,
    /// Serve ext_proc over TLS, as the reference picker does by default (gateways that connect
    /// to the picker with TLS need it). Self-signed unless --cert-path is given.
    #[arg(long)]
    pub secure_serving: bool,
    /// Directory with `tls.crt` and `tls.key` (PEM) for --secure-serving.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// How long a routed request's booking waits for the response headers before it is
    /// released (no penalty, WARN logged), ms: bounds what streams that never continue can hold.
    #[arg(long, default_value_t = extproc::DEFAULT_RESPONSE_TIMEOUT_MS)]
    pub response_timeout_ms: u64,
}

impl Default for EppArgs {
    fn default() -> Self {
        Self {
            config: None,
            host: None,
            grpc_port: DEFAULT_GRPC_PORT,
            grpc_health_port: DEFAULT_GRPC_HEALTH_PORT,
            metrics_port: DEFAULT_METRICS_PORT,
            routing: RoutingFlags::default(),
            fallbacks: 0,
            pool_name: None,
            pool_namespace: None,
            pool_group: k8s::DEFAULT_POOL_GROUP.to_owned(),
            kubeconfig: None,
            pod_kv_events_port: None,
            pod_kv_replay_port: None,
            secure_serving: false,
            cert_path: None,
            response_timeout_ms: extproc::DEFAULT_RESPONSE_TIMEOUT_MS,
        }
    }
}

impl EppArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            host: self.host.clone(),
            ..self.routing.overrides()
        }
    }

    /// The gateway configuration these flags (and the file) describe. A file whose top-level
    /// `kind` is `EndpointPickerConfig` is taken as the routing policy, everything else from flags.
    pub fn load_config(&self) -> Result<DataPlaneConfig, EppError> {
        let flags = self.overrides();
        let Some(path) = &self.config else {
            return DataPlaneConfig::load(None, &flags).map_err(EppError::Config);
        };
        let text = std::fs::read_to_string(path).map_err(|source| {
            EppError::Config(RuntimeError::ReadConfig {
                path: path.clone(),
                source,
            })
        })?;
        let bare_picker_config = serde_norway::from_str::<serde_norway::Value>(&text)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str().map(str::to_owned)))
            .is_some_and(|k| k == "EndpointPickerConfig");
        if bare_picker_config {
            let mut cfg = DataPlaneConfig::load(None, &flags).map_err(EppError::Config)?;
            if flags.policy.is_none() {
                cfg.policy = PolicyChoice::Yaml(text);
            }
            return Ok(cfg);
        }
        DataPlaneConfig::load(Some(path), &flags).map_err(EppError::Config)
    }
}

/// A running endpoint picker.
pub struct Epp {
    /// ext_proc gRPC address.
    pub grpc_addr: SocketAddr,
    /// gRPC health address.
    pub health_addr: SocketAddr,
    /// Prometheus metrics address.
    pub metrics_addr: SocketAddr,
    /// Routing state (for embedding and tests).
    pub control: Arc<Control>,
    /// Metrics.
    pub metrics: Arc<EppMetrics>,
    health: tonic_health::server::HealthReporter,
    shutdown_times: kvgate_runtime::config::ShutdownTimes,
    tasks: Tasks,
    /// Request records, written out after the drain.
    recorder: Option<Arc<kvgate_runtime::decision_log::Recorder>>,
}

impl std::fmt::Debug for Epp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epp")
            .field("grpc_addr", &self.grpc_addr)
            .field("health_addr", &self.health_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

async fn bind(host: &str, port: u16) -> Result<TcpListener, EppError> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr)
        .await
        .map_err(|source| EppError::Bind { addr, source })
}

fn local(l: &TcpListener) -> Result<SocketAddr, EppError> {
    l.local_addr().map_err(|source| EppError::Bind {
        addr: "listener".into(),
        source,
    })
}

impl Epp {
    /// Binds the three listeners, starts discovery (static endpoints or the InferencePool) and
    /// serves until dropped or shut down.
    pub async fn start(args: &EppArgs) -> Result<Self, EppError> {
        let cfg = args.load_config()?;
        // A pod's replay socket serves its KV events, read from its publisher or from engines
        // that connect to --kv-events-listen; with neither it would be silently unused (as the
        // static config's kv_replay without kv_events is refused).
        if args.pod_kv_replay_port.is_some()
            && args.pod_kv_events_port.is_none()
            && cfg.kv_events_listen.is_none()
        {
            return Err(EppError::Flags(
                "--pod-kv-replay-port needs --pod-kv-events-port or --kv-events-listen",
            ));
        }
        let pool = match (&args.pool_name, cfg.endpoints.is_empty()) {
            (Some(_), false) => {
                return Err(EppError::Flags(
                    "give either static endpoints (--endpoint or the config file) or --pool-name, not both",
                ));
            }
            (Some(name), true) => Some(k8s::PoolRef {
                name: name.clone(),
                namespace: args
                    .pool_namespace
                    .clone()
                    .or_else(|| std::env::var("NAMESPACE").ok())
                    .unwrap_or_else(|| "default".into()),
                group: args.pool_group.clone(),
            }),
            (None, _) => None,
        };
        let metrics = Arc::new(EppMetrics::new());
        let control = Control::start(&cfg, metrics.gateway.clone()).map_err(EppError::Config)?;
        let grpc = bind(&cfg.host, args.grpc_port).await?;
        let health = bind(&cfg.host, args.grpc_health_port).await?;
        let prom = bind(&cfg.host, args.metrics_port).await?;
        let (grpc_addr, health_addr, metrics_addr) =
            (local(&grpc)?, local(&health)?, local(&prom)?);
        let mut tasks = Tasks::new();
        let stop = tasks.stop_token();

        let (reporter, health_service) = tonic_health::server::health_reporter();
        // Health is served on the ext_proc port too (as the reference picker does), so a proxy
        // can health-check the very connection it uses, TLS included.
        let ext_proc_health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        reporter
            .set_service_status("liveness", ServingStatus::Serving)
            .await;
        for name in ["", "readiness", EXT_PROC_SERVICE] {
            reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        // SERVING once the endpoint set is known (static list applied, or the first complete
        // pod list) and, unless it is empty, one endpoint knows its models: before that every
        // request would get 503. It never goes back: later outages are answered per request.
        let (synced_tx, mut synced_rx) = tokio::sync::watch::channel(false);
        {
            let control = control.clone();
            let stop = stop.clone();
            let reporter = reporter.clone();
            tasks.spawn(async move {
                if synced_rx.wait_for(|s| *s).await.is_err() {
                    return;
                }
                let mut tick =
                    tokio::time::interval(std::time::Duration::from_millis(READY_POLL_MS));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if control.is_shutting_down() {
                        return;
                    }
                    if control.ready_endpoints() > 0 || control.endpoint_addresses().is_empty() {
                        break;
                    }
                }
                for name in ["", "readiness", EXT_PROC_SERVICE] {
                    reporter
                        .set_service_status(name, ServingStatus::Serving)
                        .await;
                }
                tracing::info!("serving: endpoint set known");
            });
        }
        match pool {
            None => {
                if cfg.endpoints.is_empty() {
                    tracing::warn!("no endpoints configured: every request will get 503");
                }
                control.set_endpoints(&cfg.endpoints);
                synced_tx.send_replace(true);
                if let Some(path) = args.config.clone() {
                    let args = args.clone();
                    tasks.spawn(watch_config(
                        path,
                        move || args.load_config(),
                        control.clone(),
                        stop.clone(),
                    ));
                }
            }
            Some(pool) => {
                let client = k8s::client(args.kubeconfig.as_deref())
                    .await
                    .map_err(EppError::Kube)?;
                let template = k8s::PodEndpointTemplate {
                    models: args.routing.models.clone(),
                    kv_events_port: args.pod_kv_events_port,
                    kv_replay_port: args.pod_kv_replay_port,
                };
                tasks.spawn(k8s::run_discovery(
                    client,
                    pool,
                    template,
                    control.clone(),
                    synced_tx,
                    stop.clone(),
                ));
            }
        }

        let policy = control.with_router(|r| r.policy().to_owned());
        let recorder =
            kvgate_runtime::decision_log::Recorder::start(&cfg.logs, &policy, &metrics.gateway)
                .map_err(EppError::Config)?;
        let picker = Picker::new(
            control.clone(),
            metrics.clone(),
            PickerSettings {
                max_body_bytes: cfg.limits.max_body_bytes,
                fallbacks: args.fallbacks,
            },
        )
        .with_response_timeout_ms(args.response_timeout_ms)
        .with_recorder(recorder.clone());
        let mut builder = tonic::transport::Server::builder();
        if args.secure_serving {
            builder = builder
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tls_identity(args.cert_path.as_deref())?),
                )
                .map_err(|e| EppError::Tls {
                    reason: e.to_string(),
                })?;
        }
        let s = stop.clone();
        tasks.spawn(async move {
            let incoming = Acceptor::new(grpc).into_stream();
            if let Err(e) = builder
                .add_service(ext_proc_health)
                .add_service(ExternalProcessorServer::new(picker))
                .serve_with_incoming_shutdown(incoming, s.cancelled())
                .await
            {
                tracing::error!(error = %e, "ext_proc server failed");
            }
        });
        let s = stop.clone();
        tasks.spawn(async move {
            let incoming = Acceptor::new(health).into_stream();
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(incoming, s.cancelled())
                .await
            {
                tracing::error!(error = %e, "health server failed");
            }
        });
        let s = stop.clone();
        let app = metrics_router(control.clone());
        tasks.spawn(async move {
            if let Err(e) = axum::serve(Acceptor::new(prom), app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
        tracing::info!(%grpc_addr, %health_addr, %metrics_addr, "kvgate endpoint picker listening");
        Ok(Self {
            grpc_addr,
            health_addr,
            metrics_addr,
            control,
            metrics,
            health: reporter,
            shutdown_times: cfg.shutdown,
            tasks,
            recorder,
        })
    }

    /// What a shutdown signal starts: gRPC health turns `NOT_SERVING` first (for the proxy
    /// and the kubelet; liveness stays `SERVING`), then the shared drain sequence
    /// (`kvgate_runtime::lifecycle::drain`) as `kvgate serve` runs it: listeners keep accepting
    /// for the grace period, then open ext_proc streams get the drain timeout to finish.
    pub async fn drain(self, signal: &str) {
        for name in ["", "readiness", EXT_PROC_SERVICE] {
            self.health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        kvgate_runtime::lifecycle::drain(&self.control, self.tasks, self.shutdown_times, signal)
            .await;
        close_records(self.recorder.as_ref()).await;
    }

    /// Stops the listeners and lets open ext_proc streams (requests in flight) finish for up to
    /// [`kvgate_runtime::lifecycle::SHUTDOWN_GRACE_MS`], as `kvgate serve` does, then cuts whatever is left.
    pub async fn shutdown(self) {
        self.tasks
            .shutdown(std::time::Duration::from_millis(
                kvgate_runtime::lifecycle::SHUTDOWN_GRACE_MS,
            ))
            .await;
        close_records(self.recorder.as_ref()).await;
    }
}

/// Writes out the request records still queued (receipts, the captured trace's tail) before
/// the process exits; waits up to 5 s for the writers.
async fn close_records(recorder: Option<&Arc<kvgate_runtime::decision_log::Recorder>>) {
    if let Some(r) = recorder {
        r.close(std::time::Duration::from_millis(5_000)).await;
    }
}

/// The ext_proc server's TLS identity: `tls.crt`/`tls.key` from `cert_path`, else a fresh
/// self-signed certificate (the reference picker's default; proxies connect without verifying).
fn tls_identity(
    cert_path: Option<&std::path::Path>,
) -> Result<tonic::transport::Identity, EppError> {
    match cert_path {
        Some(dir) => {
            let read = |f: &str| {
                std::fs::read(dir.join(f)).map_err(|e| EppError::Tls {
                    reason: format!("cannot read {}: {e}", dir.join(f).display()),
                })
            };
            Ok(tonic::transport::Identity::from_pem(
                read("tls.crt")?,
                read("tls.key")?,
            ))
        }
        None => {
            let ck =
                rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).map_err(|e| {
                    EppError::Tls {
                        reason: format!("cannot generate a self-signed certificate: {e}"),
                    }
                })?;
            Ok(tonic::transport::Identity::from_pem(
                ck.cert.pem(),
                ck.signing_key.serialize_pem(),
            ))
        }
    }
}

fn metrics_router(control: Arc<Control>) -> axum::Router {
    kvgate_runtime::metrics::router(control).route("/health", axum::routing::get(|| async { "ok" }))
}

/// Runs `kvgate epp` until SIGTERM or ctrl-c, then drains (see [`Epp::drain`]).
pub async fn run(args: EppArgs) -> Result<(), EppError> {
    let epp = Epp::start(&args).await?;
    let signal = kvgate_runtime::lifecycle::shutdown_signal()
        .await
        .map_err(EppError::Signal)?;
    epp.drain(signal).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        epp: EppArgs,
    }

    #[test]
    fn cli_contract_parses() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "kvgate-epp",
            "--grpc-port",
            "19002",
            "--grpc-health-port",
            "19003",
            "--metrics-port",
            "19090",
            "--endpoint",
            "127.0.0.1:8000",
            "--endpoint",
            "127.0.0.1:8001",
        ])
        .unwrap();
        assert_eq!(
            (c.epp.grpc_port, c.epp.grpc_health_port, c.epp.metrics_port),
            (19002, 19003, 19090)
        );
        assert_eq!(
            c.epp.routing.endpoints,
            vec!["127.0.0.1:8000", "127.0.0.1:8001"]
        );
        let d = Cli::try_parse_from(["kvgate-epp", "--pool-name", "p", "--pool-namespace", "ns"])
            .unwrap();
        assert_eq!(
            (d.epp.grpc_port, d.epp.grpc_health_port, d.epp.metrics_port),
            (
                DEFAULT_GRPC_PORT,
                DEFAULT_GRPC_HEALTH_PORT,
                DEFAULT_METRICS_PORT
            )
        );
        assert_eq!(d.epp.pool_group, k8s::DEFAULT_POOL_GROUP);
        assert_eq!(d.epp.pool_namespace.as_deref(), Some("ns"));
        assert_eq!(d.epp.fallbacks, 0);
        assert!(!d.epp.secure_serving);
    }
}
