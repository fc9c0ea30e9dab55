//! Data-plane configuration: the YAML file and command-line flags, parsed raw (serde), merged (flags
//! win), then validated into a typed [`DataPlaneConfig`] (ripgrep's low-args/high-args split).
//!
//! ```yaml
//! port: 8080              # OpenAI API
//! admin_port: 9090        # /metrics, /health, /ready
//! policy: kvgate          # a kvgate-core policy name, or give `router:` instead
//! # router: { ... }       # inline kvgate router config or an EndpointPickerConfig (plugins/schedulingProfiles)
//! endpoints:
//!   - url: http://10.0.0.7:8000
//!     kv_events: tcp://10.0.0.7:5557     # optional: precise prefix tracking
//!     kv_replay: tcp://10.0.0.7:5558     # optional: fill sequence gaps
//!     models: [meta-llama/Llama-3.1-8B-Instruct]   # optional: otherwise learned from /v1/models
//! scrape: { interval_ms: 100, max_interval_ms: 1000, timeout_ms: 1000 }
//! kv_events: { block_size: 16, listen: tcp://0.0.0.0:5557 }
//! limits: { max_body_bytes: 33554432, header_read_timeout_ms: 10000, body_read_timeout_ms: 30000,
//!           idle_timeout_ms: 60000, upstream_connect_timeout_ms: 2000,
//!           upstream_idle_timeout_ms: 4000, first_byte_timeout_ms: null }
//! retry: { max_attempts: 3 }
//! priority: { objectives: { premium: 10, batch: -1 } }
//! tokenizer: { model_dir: /models/llama }   # the model's tokenizer.json + chat template
//! inject_stream_usage: true   # ask engines for usage on every stream, strip it for clients
//! shutdown: { accept_grace_ms: 5000, drain_timeout_ms: 25000 }   # on SIGTERM / ctrl-c
//! logs: { decision_log: /var/log/kvgate/decisions.jsonl, decision_log_max_bytes: 104857600,
//!         decision_log_files: 5, capture_trace: /var/log/kvgate/trace.jsonl, access_log: false }
//! ```
//!
//! Only `endpoints` is re-read when the file changes (see [`crate::control`]); everything else
//! needs a restart, because listeners, timeouts and the policy are fixed at start-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kvgate_core::endpoint::{EngineKind, Role};
use kvgate_core::{PdDecider, Policy};
use serde::Deserialize;

use crate::RuntimeError;

/// Default OpenAI API port: the conventional alternative HTTP port, clear of vLLM's 8000 (and of
/// `kvgate sim`'s default engine ports) so a gateway and engines can share a host.
pub const DEFAULT_PORT: u16 = 8080;

/// Default admin port (metrics, health): Prometheus' customary exporter range, apart from the
/// API port so scraping and probes never compete with client traffic or get exposed with it.
pub const DEFAULT_ADMIN_PORT: u16 = 9090;

/// Largest request body accepted, in bytes. A 128k-token prompt is about 0.5 MiB of JSON; 32 MiB
/// leaves room for base64 images in chat content while bounding the memory one client can pin.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Time a client has to send the complete request head, in ms. Real clients send it in one
/// packet; 10 s tolerates a congested mobile link and defeats slowloris (dribbled headers).
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;

/// Time a client has to send the complete body once the head arrived, in ms. 30 s is enough for
/// 32 MiB at ~1 MB/s; a client slower than that is holding a body buffer hostage.
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30_000;

/// A keep-alive connection with no request in flight is closed after this long, in ms. 60 s is
/// longer than common client pool idle times (the OpenAI SDK's httpx uses 5 s), so well-behaved
/// clients close first, and short enough that idle sockets do not accumulate.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;

/// Budget for a TCP connect to an engine, in ms. In-cluster connects take well under 1 ms and a
/// refused port fails at once; 2 s only catches black-holed pods, after which the retry goes on.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 2_000;

/// An idle pooled connection to an engine is closed after this long, in ms. Below uvicorn's
/// default keep-alive (5 s, what vLLM and SGLang serve with), so the gateway drops a connection
/// before the engine does instead of sending a request into one it is closing; and an engine
/// that gets no traffic holds none of the gateway's sockets (they were kept forever: 1,399
/// after one burst, 12 minutes later).
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS: u64 = 4_000;

/// Attempts per request (first try plus retries on other endpoints) when an engine refuses the
/// connection or answers 5xx/429 before the first byte. Three: a second pod usually succeeds,
/// and more attempts mostly multiply load during a fleet-wide overload.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// How often the config file's modification time is checked for changes, in ms. Endpoint lists
/// change at human (or controller) pace; one second keeps reloads prompt at negligible cost.
pub const CONFIG_POLL_INTERVAL_MS: u64 = 1_000;

/// vLLM's default KV block size in tokens, used until an engine reports its own via
/// `vllm:cache_config_info{block_size}`.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;

/// After SIGTERM or ctrl-c, how long the listeners keep accepting (with `/ready` already 503),
/// ms: load balancers and Kubernetes endpoints controllers take a probe period or two to stop
/// sending new connections, and a request sent in that window must still be served. 5 s covers
/// a 1-2 s probe period twice over.
pub const DEFAULT_SHUTDOWN_ACCEPT_GRACE_MS: u64 = 5_000;

/// After the accept grace period, how long in-flight requests get to finish before they are
/// cut, ms. With the grace period it fits Kubernetes' default 30 s termination grace period,
/// after which the kubelet sends SIGKILL anyway; 25 s finishes a 1,000-token answer at 20 ms
/// per token.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 25_000;

/// Default policy: kvgate's own cost-based scheduler.
pub const DEFAULT_POLICY: Policy = Policy::Kvgate;

/// The `--policy` values: every policy a live data plane can run, with its aliases, straight
/// from [`Policy::ALL`] (so `--help` lists them and no name is written here).
fn live_policy_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        Policy::ALL
            .into_iter()
            .filter(|p| p.is_live_capable())
            .map(|p| clap::builder::PossibleValue::new(p.as_str()).aliases(p.alias())),
    )
}

/// Header clients use to name their inference objective (priority), as in the Gateway API
/// Inference Extension.
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";

/// llm-d's twin of [`OBJECTIVE_HEADER`]; both spellings are accepted (the first one wins when a
/// request carries both).
pub const LLMD_OBJECTIVE_HEADER: &str = "x-llm-d-inference-objective";

/// Header carrying a conversation id; a tie-breaker for routing, never an override.
pub const SESSION_HEADER: &str = "x-session-id";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    host: Option<String>,
    port: Option<u16>,
    admin_port: Option<u16>,
    policy: Option<String>,
    router: Option<serde_norway::Value>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    scrape: RawScrape,
    #[serde(default)]
    kv_events: RawKvEvents,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    priority: RawPriority,
    #[serde(default)]
    tokenizer: RawTokenizer,
    inject_stream_usage: Option<bool>,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    logs: RawLogs,
    pd_decider: Option<PdDecider>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    decision_log: Option<PathBuf>,
    decision_log_max_bytes: Option<u64>,
    decision_log_files: Option<u32>,
    capture_trace: Option<PathBuf>,
    access_log: Option<bool>,
}

/// A decision log file is rotated when the next line would take it past this many bytes. 100 MiB
/// holds about 100,000 receipts of a 16-endpoint fleet (~1 KiB each): a day of moderate traffic,
/// small enough to open in an editor or `jq`.
pub const DEFAULT_DECISION_LOG_MAX_BYTES: u64 = 100 * 1024 * 1024;

/// Rotated decision log files kept (`FILE.1` newest … `FILE.N` oldest) besides the live one:
/// with the default size, at most 600 MiB of receipts on disk.
pub const DEFAULT_DECISION_LOG_FILES: u32 = 5;

/// Smallest size bound accepted for a decision log: one receipt of a large fleet is tens of KiB,
/// and a bound below one line would rotate on every request.
pub const MIN_DECISION_LOG_MAX_BYTES: u64 = 64 * 1024;

/// Per-request records (see `crate::decision_log` and `crate::capture`): route receipts, a
/// captured Mooncake trace of the traffic, and the access log. All off by default.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestLogConfig {
    /// Write one JSON receipt per request here (`--decision-log`).
    pub decision_log: Option<PathBuf>,
    /// Rotate the decision log when it would grow past this, bytes.
    pub decision_log_max_bytes: u64,
    /// Rotated decision log files kept besides the live one.
    pub decision_log_files: u32,
    /// Write the traffic as a Mooncake-format trace here (`--capture-trace`).
    pub capture_trace: Option<PathBuf>,
    /// Log one structured line per request at INFO (target `kvgate::access`).
    pub access_log: bool,
}

impl Default for RequestLogConfig {
    fn default() -> Self {
        Self {
            decision_log: None,
            decision_log_max_bytes: DEFAULT_DECISION_LOG_MAX_BYTES,
            decision_log_files: DEFAULT_DECISION_LOG_FILES,
            capture_trace: None,
            access_log: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    accept_grace_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    url: String,
    kv_events: Option<String>,
    kv_replay: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    lora_adapters: Vec<String>,
    #[serde(default)]
    role: Role,
    engine: Option<EngineKind>,
    #[serde(default)]
    hardware_class: String,
    relative_cost: Option<f64>,
    pd_protocol: Option<PdProtocol>,
    bootstrap_port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScrape {
    interval_ms: Option<u64>,
    max_interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKvEvents {
    block_size: Option<u32>,
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    upstream_connect_timeout_ms: Option<u64>,
    upstream_idle_timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    client_half_close: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPriority {
    #[serde(default)]
    objectives: BTreeMap<String, i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenizer {
    hf_tokenizer_json: Option<PathBuf>,
    model_dir: Option<PathBuf>,
}

/// Which routing policy to run.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyChoice {
    /// A kvgate-core policy with its defaults.
    Preset(Policy),
    /// A YAML router config (kvgate's own or an `EndpointPickerConfig`), as text.
    Yaml(String),
}

/// One model server to route to.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointConfig {
    /// `host:port`: the endpoint's identity in the router and what the gateway connects to.
    pub address: String,
    /// ZMQ PUB endpoint of its KV events, if subscribed.
    pub kv_events: Option<String>,
    /// ZMQ ROUTER endpoint for replaying lost KV-event batches.
    pub kv_replay: Option<String>,
    /// Base models it serves; empty = learn from `/v1/models`.
    pub models: Vec<String>,
    /// LoRA adapters it serves, besides those listed by `/v1/models`.
    pub lora_adapters: Vec<String>,
    /// Phases served.
    pub role: Role,
    /// Engine kind (metric names), when configured; `None` detects it from the metric families
    /// the endpoint serves (a configured kind always wins).
    pub engine: Option<EngineKind>,
    /// Hardware class label shared with the router's calibration.
    pub hardware_class: String,
    /// Relative cost of work on this endpoint.
    pub relative_cost: f64,
    /// The HTTP version the gateway speaks to it for requests (`h2c://` URLs: HTTP/2).
    pub protocol: UpstreamProtocol,
    /// How a disaggregated request's KV cache moves to or from it (prefill and decode pods).
    pub pd_protocol: PdProtocol,
    /// SGLang prefill pods: the port of their bootstrap server (`--disaggregation-bootstrap-port`,
    /// SGLang's default 8998), sent to both legs as `bootstrap_port`.
    pub bootstrap_port: Option<u16>,
}

/// How a disaggregated request's KV cache moves from its prefill pod to its decode pod, which
/// decides what the gateway sends each (../shared/DESIGN.md, "Prefill/decode disaggregation").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PdProtocol {
    /// vLLM's NixlConnector: the prefill pod is asked for one token with
    /// `kv_transfer_params.do_remote_decode`, and its answer's `kv_transfer_params` go with the
    /// original request to the decode pod, which pulls the blocks.
    #[default]
    VllmNixl,
    /// SGLang: both legs carry `bootstrap_host/port/room` and are sent at once; the decode pod
    /// waits for the prefill pod to push the room's KV.
    SglangBootstrap,
}

impl PdProtocol {
    /// The name used in configuration and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VllmNixl => "vllm-nixl",
            Self::SglangBootstrap => "sglang-bootstrap",
        }
    }
}

/// SGLang's default `--disaggregation-bootstrap-port`.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;

/// How `kvgate serve` talks to an endpoint. Metrics scrapes, model discovery and the tokenizer
/// probe stay HTTP/1.1 whatever this says (servers that offer h2c, hyper's and Envoy's, serve
/// both on one port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (`http://`), what vLLM's uvicorn speaks.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (`h2c://`, Kubernetes'
    /// `appProtocol: kubernetes.io/h2c`): one multiplexed connection per engine.
    H2c,
}

impl UpstreamProtocol {
    /// Kubernetes' `appProtocol` value meaning HTTP/2 prior knowledge over cleartext.
    pub const K8S_H2C: &'static str = "kubernetes.io/h2c";

    /// The protocol an endpoint URL asks for (`h2c://` or anything else).
    pub fn of_url(url: &str) -> Self {
        if url.starts_with("h2c://") {
            Self::H2c
        } else {
            Self::Http1
        }
    }
}

impl EndpointConfig {
    /// `http://host:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// Listener, body and connection limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request body, bytes (larger → 413).
    pub max_body_bytes: usize,
    /// Budget for the request head, ms.
    pub header_read_timeout_ms: u64,
    /// Budget for the request body, ms (exceeded → 408).
    pub body_read_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this, ms.
    pub idle_timeout_ms: u64,
    /// Budget for connecting to an engine, ms.
    pub upstream_connect_timeout_ms: u64,
    /// Idle pooled connections to engines are closed after this, ms.
    pub upstream_idle_timeout_ms: u64,
    /// Budget from sending a request to an engine until the first byte of its response body,
    /// ms; `None` (the default) waits as long as the engine takes, since long prefills and
    /// non-streaming generations are legitimate. When set, an engine that hangs is given up
    /// on (and penalised) and the request retried elsewhere while nothing has reached the
    /// client.
    pub first_byte_timeout_ms: Option<u64>,
    /// Serve clients that half-close (shut down their sending side) after a complete request,
    /// as `printf ... | nc` and some HTTP/1.0 clients do. Off by default, because on TCP a
    /// half-close and a full close look the same until the server writes: with it on, a client
    /// that went away is noticed only when its response is written (its first streamed frame),
    /// so an abandoned request keeps its engine busy through the whole prefill. With it off, a
    /// client's end of input cancels its request at once.
    pub client_half_close: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            body_read_timeout_ms: DEFAULT_BODY_READ_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            upstream_connect_timeout_ms: DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS,
            upstream_idle_timeout_ms: DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS,
            first_byte_timeout_ms: None,
            client_half_close: false,
        }
    }
}

/// What a data plane does after SIGTERM or ctrl-c: `/ready` (and the picker's gRPC health)
/// turns unready at once, listeners keep accepting for `accept_grace_ms`, then stop, and
/// in-flight requests get `drain_timeout_ms` to finish before they are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownTimes {
    /// Time still accepting after the signal, ms.
    pub accept_grace_ms: u64,
    /// Time in-flight requests get after that, ms.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownTimes {
    fn default() -> Self {
        Self {
            accept_grace_ms: DEFAULT_SHUTDOWN_ACCEPT_GRACE_MS,
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
        }
    }
}

/// The validated configuration of a data plane (`kvgate serve`, and what `kvgate epp` shares of
/// it: endpoints, signals, limits, logs).
#[derive(Clone, Debug, PartialEq)]
pub struct DataPlaneConfig {
    /// Address both listeners bind to.
    pub host: String,
    /// OpenAI API port (0 = ephemeral).
    pub port: u16,
    /// Admin port (0 = ephemeral).
    pub admin_port: u16,
    /// Routing policy.
    pub policy: PolicyChoice,
    /// Static endpoint list.
    pub endpoints: Vec<EndpointConfig>,
    /// Metrics scrape period, ms.
    pub scrape_interval_ms: u64,
    /// Longest scrape period, ms, reached while an endpoint's samples hold only this gateway's
    /// requests (see [`kvgate_signals::ScrapePace`]); at or below `scrape_interval_ms` the
    /// period stays fixed.
    pub scrape_max_interval_ms: u64,
    /// Budget of one scrape, ms.
    pub scrape_timeout_ms: u64,
    /// Block size used for prompt keys until engines report theirs.
    pub block_size: u32,
    /// Where to bind the SUB socket that engines' KV-event publishers connect to
    /// (`kv_events.listen` / `--kv-events-listen`); endpoints are told apart by topic.
    pub kv_events_listen: Option<String>,
    /// Connection and body limits.
    pub limits: Limits,
    /// The prefill/decode decider (`pd_decider` / `--pd-decider`), overriding the router
    /// config's `tuning.pd.decider` when given.
    pub pd_decider: Option<PdDecider>,
    /// Attempts per request (≥ 1).
    pub max_attempts: u32,
    /// Objective name → priority.
    pub objectives: BTreeMap<String, i32>,
    /// HuggingFace `tokenizer.json` to tokenise with instead of the built-in tokenizer.
    pub hf_tokenizer_json: Option<PathBuf>,
    /// HuggingFace model directory (`tokenizer.json` and the chat template) to render and
    /// tokenise requests exactly as the engines do (`--tokenizer`, `tokenizer.model_dir`).
    pub model_dir: Option<PathBuf>,
    /// Request `stream_options.include_usage` upstream for streams whose client did not, and
    /// strip the usage chunk from what the client receives (so TPOT and the prefix hit ratio are
    /// measured for every stream). Streams whose client asked are never touched.
    pub inject_stream_usage: bool,
    /// What happens on SIGTERM / ctrl-c.
    pub shutdown: ShutdownTimes,
    /// Per-request records: decision log, captured trace, access log.
    pub logs: RequestLogConfig,
    /// The file this came from, if any (watched for endpoint changes).
    pub source: Option<PathBuf>,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: DEFAULT_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            policy: PolicyChoice::Preset(DEFAULT_POLICY),
            endpoints: Vec::new(),
            scrape_interval_ms: kvgate_signals::scrape::DEFAULT_SCRAPE_INTERVAL_MS,
            scrape_max_interval_ms: kvgate_signals::scrape::DEFAULT_SCRAPE_MAX_INTERVAL_MS,
            scrape_timeout_ms: kvgate_signals::scrape::DEFAULT_SCRAPE_TIMEOUT_MS,
            block_size: DEFAULT_BLOCK_SIZE,
            kv_events_listen: None,
            limits: Limits::default(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            objectives: BTreeMap::new(),
            hf_tokenizer_json: None,
            model_dir: None,
            inject_stream_usage: true,
            shutdown: ShutdownTimes::default(),
            logs: RequestLogConfig::default(),
            pd_decider: None,
            source: None,
        }
    }
}

/// Values given on the command line; `None`/empty = not given (the file or the default applies).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--host`.
    pub host: Option<String>,
    /// `--port`.
    pub port: Option<u16>,
    /// `--admin-port`.
    pub admin_port: Option<u16>,
    /// `--endpoint` (replaces the file's list when non-empty).
    pub endpoints: Vec<String>,
    /// `--kv-events`, paired with `endpoints` by position.
    pub kv_events: Vec<String>,
    /// `--kv-replay`, paired with `endpoints` by position.
    pub kv_replay: Vec<String>,
    /// `--kv-events-listen`.
    pub kv_events_listen: Option<String>,
    /// `--tokenizer`.
    pub tokenizer: Option<PathBuf>,
    /// `--model`: models every flag-given endpoint serves (else learned).
    pub models: Vec<String>,
    /// `--policy`.
    pub policy: Option<String>,
    /// `--scrape-interval-ms`.
    pub scrape_interval_ms: Option<u64>,
    /// `--scrape-max-interval-ms`.
    pub scrape_max_interval_ms: Option<u64>,
    /// `--max-body-bytes`.
    pub max_body_bytes: Option<usize>,
    /// `--shutdown-grace-ms`.
    pub shutdown_accept_grace_ms: Option<u64>,
    /// `--drain-timeout-ms`.
    pub drain_timeout_ms: Option<u64>,
    /// `--first-byte-timeout-ms`.
    pub first_byte_timeout_ms: Option<u64>,
    /// `--client-half-close`.
    pub client_half_close: Option<bool>,
    /// `--decision-log`.
    pub decision_log: Option<PathBuf>,
    /// `--decision-log-max-bytes`.
    pub decision_log_max_bytes: Option<u64>,
    /// `--decision-log-files`.
    pub decision_log_files: Option<u32>,
    /// `--capture-trace`.
    pub capture_trace: Option<PathBuf>,
    /// `--access-log`.
    pub access_log: Option<bool>,
    /// `--prefill`: prefill pods (added to `endpoints`' list).
    pub prefill: Vec<String>,
    /// `--decode`: decode pods (added to `endpoints`' list).
    pub decode: Vec<String>,
    /// `--pd-protocol`, for the flag-given prefill and decode pods.
    pub pd_protocol: Option<PdProtocol>,
    /// `--bootstrap-port`, for the flag-given SGLang prefill pods.
    pub bootstrap_port: Option<u16>,
    /// `--pd-decider`.
    pub pd_decider: Option<PdDecider>,
}

/// Flags that `kvgate serve` and `kvgate epp` share: which model servers to route to and how.
/// Flags win over the config file; `--kv-events` and `--kv-replay` pair with `--endpoint` by
/// position.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RoutingFlags {
    /// Model server to route to, as a base URL (http://10.0.0.7:8000; h2c://10.0.0.7:8000 to
    /// send it requests over HTTP/2 prior knowledge) or `ip:port` (repeat for more).
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
    /// Routing policy [default: the config file's `policy`, else kvgate's cost scheduler].
    #[arg(long, value_parser = live_policy_parser())]
    pub policy: Option<String>,
    /// Metrics scrape interval per endpoint, ms [default: 100].
    #[arg(long)]
    pub scrape_interval_ms: Option<u64>,
    /// Longest scrape interval, ms: an endpoint whose samples hold only this gateway's requests
    /// is scraped half as often after each such sample, up to this; any other work there (or a
    /// failed scrape) restores --scrape-interval-ms. At or below it: never slowed
    /// [default: 1000].
    #[arg(long)]
    pub scrape_max_interval_ms: Option<u64>,
    /// Largest request body accepted, bytes [default: 33554432].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// After SIGTERM or ctrl-c: how long listeners keep accepting while readiness already
    /// says 503, ms [default: 5000].
    #[arg(long = "shutdown-grace-ms")]
    pub shutdown_accept_grace_ms: Option<u64>,
    /// After that grace period: how long in-flight requests get to finish before they are
    /// cut, ms [default: 25000].
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
    /// Give up on an engine that has not started its response body this long after the
    /// request was sent, ms, and retry elsewhere (off by default: long prefills and
    /// non-streaming generations are legitimate).
    #[arg(long)]
    pub first_byte_timeout_ms: Option<u64>,
    /// Write one JSON line per request: every candidate with its prefix match, load estimate,
    /// signal ages and predicted TTFT and cost, the choice and why, and the outcome (no prompt
    /// text). Written off the request path; lines are dropped (and counted) rather than wait.
    #[arg(long)]
    pub decision_log: Option<std::path::PathBuf>,
    /// Rotate the decision log when it would grow past this many bytes [default: 104857600].
    #[arg(long)]
    pub decision_log_max_bytes: Option<u64>,
    /// Rotated decision log files kept (FILE.1 … FILE.N) [default: 5].
    #[arg(long)]
    pub decision_log_files: Option<u32>,
    /// Write the traffic as a Mooncake-format trace (timestamp, lengths, ids of 512-token prefix
    /// blocks; no content) that `kvgate bench --trace FILE` replays.
    #[arg(long)]
    pub capture_trace: Option<std::path::PathBuf>,
    /// Log one structured line per request (target `kvgate::access`, INFO).
    #[arg(long)]
    pub access_log: bool,
    /// A disaggregated prefill pod, as a base URL (repeat for more; with --decode).
    #[arg(long = "prefill")]
    pub prefill: Vec<String>,
    /// A disaggregated decode pod, as a base URL (repeat for more; it also serves whole the
    /// requests the decider keeps aggregated).
    #[arg(long = "decode")]
    pub decode: Vec<String>,
    /// How --prefill and --decode pods move a request's KV cache [default: vllm-nixl].
    #[arg(long, value_enum)]
    pub pd_protocol: Option<PdProtocol>,
    /// Bootstrap port of the --prefill pods (sglang-bootstrap) [default: 8998].
    #[arg(long)]
    pub bootstrap_port: Option<u16>,
    /// When to split a request into prefill and decode legs: `cost` (kvgate's cost model),
    /// `threshold` (llm-d's: more than `tuning.pd.threshold_tokens` uncached on the decode
    /// pod), `always`, `aggregated` (never) [default: the router config's, else cost].
    #[arg(long, value_parser = pd_decider_parser())]
    pub pd_decider: Option<PdDecider>,
}

fn pd_decider_parser() -> impl clap::builder::TypedValueParser<Value = PdDecider> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["cost", "threshold", "always", "aggregated"]).map(
        |s| match s.as_str() {
            "threshold" => PdDecider::Threshold,
            "always" => PdDecider::Always,
            "aggregated" => PdDecider::Aggregated,
            _ => PdDecider::Cost,
        },
    )
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
            scrape_max_interval_ms: self.scrape_max_interval_ms,
            max_body_bytes: self.max_body_bytes,
            shutdown_accept_grace_ms: self.shutdown_accept_grace_ms,
            drain_timeout_ms: self.drain_timeout_ms,
            first_byte_timeout_ms: self.first_byte_timeout_ms,
            decision_log: self.decision_log.clone(),
            decision_log_max_bytes: self.decision_log_max_bytes,
            decision_log_files: self.decision_log_files,
            capture_trace: self.capture_trace.clone(),
            access_log: self.access_log.then_some(true),
            prefill: self.prefill.clone(),
            decode: self.decode.clone(),
            pd_protocol: self.pd_protocol,
            bootstrap_port: self.bootstrap_port,
            pd_decider: self.pd_decider,
            ..Overrides::default()
        }
    }
}

/// Whether `capture` is the decision log at `decision` or one of its rotated files
/// (`decision.1` … `decision.{files}`), compared after making both absolute and resolving `.`
/// and `..` lexically (`./a` and `a` are one file; the files may not exist yet).
fn log_files_clash(decision: &Path, files: u32, capture: &Path) -> bool {
    fn lexical(p: &Path) -> PathBuf {
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let mut out = PathBuf::new();
        for c in abs.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    }
    let (d, c) = (lexical(decision), lexical(capture));
    if d == c {
        return true;
    }
    (1..=files).any(|i| {
        let mut rotated = d.clone().into_os_string();
        rotated.push(format!(".{i}"));
        c.as_os_str() == rotated
    })
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

/// `host:port` from `http://host:port[/]`, `h2c://host:port[/]` (or a bare `host:port`).
pub fn endpoint_address(url: &str) -> Result<String, RuntimeError> {
    let rest = if let Some(r) = url.strip_prefix("http://").or(url.strip_prefix("h2c://")) {
        r
    } else if url.contains("://") {
        return Err(invalid(
            "endpoints.url",
            format!("{url:?}: only http:// and h2c:// endpoints are supported"),
        ));
    } else {
        url
    };
    let addr = rest.trim_end_matches('/');
    if addr.contains('/') {
        return Err(invalid(
            "endpoints.url",
            format!("{url:?}: give the server's base URL without a path"),
        ));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(invalid("endpoints.url", format!("{url:?}: missing port")));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(
            "endpoints.url",
            format!("{url:?}: expected host:port"),
        ));
    }
    Ok(addr.to_owned())
}

impl DataPlaneConfig {
    /// Reads the file (if any), applies the flags, validates.
    pub fn load(path: Option<&Path>, flags: &Overrides) -> Result<Self, RuntimeError> {
        let raw = match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|source| RuntimeError::ReadConfig {
                        path: p.to_owned(),
                        source,
                    })?;
                parse_raw(&text, p)?
            }
            None => RawConfig::default(),
        };
        let mut cfg = Self::from_raw(raw, flags)?;
        cfg.source = path.map(Path::to_owned);
        Ok(cfg)
    }

    /// Parses a YAML document (no flags applied); for tests and embedders.
    pub fn from_yaml(text: &str) -> Result<Self, RuntimeError> {
        Self::from_raw(
            parse_raw(text, Path::new("<inline>"))?,
            &Overrides::default(),
        )
    }

    fn from_raw(raw: RawConfig, flags: &Overrides) -> Result<Self, RuntimeError> {
        let d = Self::default();
        let preset = |name: String| {
            name.parse::<Policy>()
                .map(PolicyChoice::Preset)
                .map_err(|e| invalid("policy", e.to_string()))
        };
        let policy = match (flags.policy.clone(), raw.policy, raw.router) {
            (Some(name), _, _) => preset(name)?,
            (None, Some(_), Some(_)) => {
                return Err(invalid(
                    "policy",
                    "give either `policy` or `router`, not both",
                ));
            }
            (None, Some(name), None) => preset(name)?,
            (None, None, Some(v)) => PolicyChoice::Yaml(
                serde_norway::to_string(&v).map_err(|e| invalid("router", e.to_string()))?,
            ),
            (None, None, None) => d.policy,
        };
        // A policy that needs the simulator's true engine state would fail every live request.
        if let PolicyChoice::Preset(p) = &policy
            && !p.is_live_capable()
        {
            return Err(invalid(
                "policy",
                format!(
                    "{p} reads the simulator's true engine state: it runs only in `kvgate bench`"
                ),
            ));
        }
        let endpoints =
            if flags.endpoints.is_empty() && flags.prefill.is_empty() && flags.decode.is_empty() {
                if !flags.kv_events.is_empty() || !flags.kv_replay.is_empty() {
                    return Err(invalid(
                        "kv_events",
                        "--kv-events/--kv-replay need --endpoint",
                    ));
                }
                raw.endpoints
                    .into_iter()
                    .map(endpoint_from_raw)
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                // They pair by position, so a count that differs (2 --endpoint, 1 --kv-events)
                // would silently leave endpoints without events; '' marks one that has none.
                for (flag, given) in [
                    ("--kv-events", flags.kv_events.len()),
                    ("--kv-replay", flags.kv_replay.len()),
                ] {
                    if given != 0 && given != flags.endpoints.len() {
                        return Err(invalid(
                            "kv_events",
                            format!(
                                "{given} {flag} for {} --endpoint: they pair by position, give one \
                             per --endpoint ('' for an endpoint without)",
                                flags.endpoints.len()
                            ),
                        ));
                    }
                }
                flags
                    .endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, url)| {
                        endpoint_from_raw(RawEndpoint {
                            url: url.clone(),
                            kv_events: flags.kv_events.get(i).cloned().filter(|s| !s.is_empty()),
                            kv_replay: flags.kv_replay.get(i).cloned().filter(|s| !s.is_empty()),
                            models: flags.models.clone(),
                            ..RawEndpoint::default()
                        })
                    })
                    .chain(
                        (flags.prefill.iter().map(|u| (u, Role::Prefill)))
                            .chain(flags.decode.iter().map(|u| (u, Role::Decode)))
                            .map(|(url, role)| {
                                endpoint_from_raw(RawEndpoint {
                                    url: url.clone(),
                                    models: flags.models.clone(),
                                    role,
                                    pd_protocol: flags.pd_protocol,
                                    bootstrap_port: (role == Role::Prefill)
                                        .then_some(flags.bootstrap_port)
                                        .flatten(),
                                    ..RawEndpoint::default()
                                })
                            }),
                    )
                    .collect::<Result<Vec<_>, _>>()?
            };
        let mut seen = std::collections::HashSet::new();
        for e in &endpoints {
            if !seen.insert(e.address.clone()) {
                return Err(invalid(
                    "endpoints",
                    format!("{} is listed twice", e.address),
                ));
            }
        }
        let limits = Limits {
            max_body_bytes: flags
                .max_body_bytes
                .or(raw.limits.max_body_bytes)
                .unwrap_or(d.limits.max_body_bytes),
            header_read_timeout_ms: raw
                .limits
                .header_read_timeout_ms
                .unwrap_or(d.limits.header_read_timeout_ms),
            body_read_timeout_ms: raw
                .limits
                .body_read_timeout_ms
                .unwrap_or(d.limits.body_read_timeout_ms),
            idle_timeout_ms: raw
                .limits
                .idle_timeout_ms
                .unwrap_or(d.limits.idle_timeout_ms),
            upstream_connect_timeout_ms: raw
                .limits
                .upstream_connect_timeout_ms
                .unwrap_or(d.limits.upstream_connect_timeout_ms),
            upstream_idle_timeout_ms: raw
                .limits
                .upstream_idle_timeout_ms
                .unwrap_or(d.limits.upstream_idle_timeout_ms),
            first_byte_timeout_ms: flags
                .first_byte_timeout_ms
                .or(raw.limits.first_byte_timeout_ms),
            client_half_close: flags
                .client_half_close
                .or(raw.limits.client_half_close)
                .unwrap_or(d.limits.client_half_close),
        };
        for (field, v) in [
            (
                "limits.header_read_timeout_ms",
                limits.header_read_timeout_ms,
            ),
            ("limits.body_read_timeout_ms", limits.body_read_timeout_ms),
            ("limits.idle_timeout_ms", limits.idle_timeout_ms),
            (
                "limits.upstream_connect_timeout_ms",
                limits.upstream_connect_timeout_ms,
            ),
            (
                "limits.upstream_idle_timeout_ms",
                limits.upstream_idle_timeout_ms,
            ),
            (
                "limits.first_byte_timeout_ms",
                limits.first_byte_timeout_ms.unwrap_or(1),
            ),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        if limits.max_body_bytes == 0 {
            return Err(invalid("limits.max_body_bytes", "must be positive"));
        }
        let scrape_interval_ms = flags
            .scrape_interval_ms
            .or(raw.scrape.interval_ms)
            .unwrap_or(d.scrape_interval_ms);
        if scrape_interval_ms == 0 {
            return Err(invalid("scrape.interval_ms", "must be positive"));
        }
        let scrape_max_interval_ms = flags
            .scrape_max_interval_ms
            .or(raw.scrape.max_interval_ms)
            .unwrap_or(d.scrape_max_interval_ms);
        let scrape_timeout_ms = raw.scrape.timeout_ms.unwrap_or(d.scrape_timeout_ms);
        if scrape_timeout_ms == 0 {
            return Err(invalid("scrape.timeout_ms", "must be positive"));
        }
        let block_size = raw.kv_events.block_size.unwrap_or(d.block_size);
        if block_size == 0 {
            return Err(invalid("kv_events.block_size", "must be positive"));
        }
        let kv_events_listen = flags.kv_events_listen.clone().or(raw.kv_events.listen);
        if let Some(l) = &kv_events_listen
            && !l.starts_with("tcp://")
        {
            return Err(invalid(
                "kv_events.listen",
                format!("{l:?}: expected tcp://host:port"),
            ));
        }
        if kv_events_listen.is_none()
            && let Some(e) = endpoints
                .iter()
                .find(|e| e.kv_replay.is_some() && e.kv_events.is_none())
        {
            return Err(invalid(
                "endpoints.kv_replay",
                format!(
                    "{}: kv_replay needs kv_events, or kv_events.listen (--kv-events-listen) for engines that connect",
                    e.address
                ),
            ));
        }
        let logs = RequestLogConfig {
            decision_log: flags.decision_log.clone().or(raw.logs.decision_log),
            decision_log_max_bytes: flags
                .decision_log_max_bytes
                .or(raw.logs.decision_log_max_bytes)
                .unwrap_or(d.logs.decision_log_max_bytes),
            decision_log_files: flags
                .decision_log_files
                .or(raw.logs.decision_log_files)
                .unwrap_or(d.logs.decision_log_files),
            capture_trace: flags.capture_trace.clone().or(raw.logs.capture_trace),
            access_log: flags
                .access_log
                .or(raw.logs.access_log)
                .unwrap_or(d.logs.access_log),
        };
        if logs.decision_log_max_bytes < MIN_DECISION_LOG_MAX_BYTES {
            return Err(invalid(
                "logs.decision_log_max_bytes",
                format!("must be at least {MIN_DECISION_LOG_MAX_BYTES}"),
            ));
        }
        if let (Some(d), Some(c)) = (&logs.decision_log, &logs.capture_trace)
            && log_files_clash(d, logs.decision_log_files, c)
        {
            return Err(invalid(
                "logs.capture_trace",
                format!(
                    "the captured trace {} is the decision log or one of its rotated files",
                    c.display()
                ),
            ));
        }
        let max_attempts = raw.retry.max_attempts.unwrap_or(d.max_attempts);
        if max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        Ok(Self {
            host: flags.host.clone().or(raw.host).unwrap_or(d.host),
            port: flags.port.or(raw.port).unwrap_or(d.port),
            admin_port: flags.admin_port.or(raw.admin_port).unwrap_or(d.admin_port),
            policy,
            endpoints,
            scrape_interval_ms,
            scrape_max_interval_ms,
            scrape_timeout_ms,
            block_size,
            kv_events_listen,
            limits,
            max_attempts,
            objectives: raw.priority.objectives,
            model_dir: flags.tokenizer.clone().or(raw.tokenizer.model_dir),
            hf_tokenizer_json: raw.tokenizer.hf_tokenizer_json,
            inject_stream_usage: raw.inject_stream_usage.unwrap_or(d.inject_stream_usage),
            logs,
            shutdown: ShutdownTimes {
                accept_grace_ms: flags
                    .shutdown_accept_grace_ms
                    .or(raw.shutdown.accept_grace_ms)
                    .unwrap_or(d.shutdown.accept_grace_ms),
                drain_timeout_ms: flags
                    .drain_timeout_ms
                    .or(raw.shutdown.drain_timeout_ms)
                    .unwrap_or(d.shutdown.drain_timeout_ms),
            },
            pd_decider: flags.pd_decider.or(raw.pd_decider),
            source: None,
        })
    }
}

fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, RuntimeError> {
    if text.trim().is_empty() {
        return Ok(RawConfig::default());
    }
    serde_norway::from_str(text).map_err(|source| RuntimeError::ParseConfig {
        path: path.to_owned(),
        source,
    })
}

fn endpoint_from_raw(r: RawEndpoint) -> Result<EndpointConfig, RuntimeError> {
    let address = endpoint_address(&r.url)?;
    for (field, v) in [
        ("endpoints.kv_events", &r.kv_events),
        ("endpoints.kv_replay", &r.kv_replay),
    ] {
        if let Some(v) = v
            && !v.starts_with("tcp://")
        {
            return Err(invalid(field, format!("{v:?}: expected tcp://host:port")));
        }
    }
    let relative_cost = r.relative_cost.unwrap_or(1.0);
    if !(relative_cost.is_finite() && relative_cost > 0.0) {
        return Err(invalid(
            "endpoints.relative_cost",
            "must be a positive number",
        ));
    }
    Ok(EndpointConfig {
        address,
        kv_events: r.kv_events,
        kv_replay: r.kv_replay,
        models: r.models,
        lora_adapters: r.lora_adapters,
        role: r.role,
        engine: r.engine,
        hardware_class: r.hardware_class,
        relative_cost,
        protocol: UpstreamProtocol::of_url(&r.url),
        pd_protocol: r.pd_protocol.unwrap_or_default(),
        bootstrap_port: r.bootstrap_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let c = DataPlaneConfig::from_yaml(
            r#"
port: 1234
admin_port: 0
policy: round-robin
endpoints:
  - url: http://127.0.0.1:8000/
    kv_events: tcp://127.0.0.1:5557
    kv_replay: tcp://127.0.0.1:5558
  - url: 127.0.0.1:8001
    models: [m]
    engine: sglang
scrape: { interval_ms: 50, max_interval_ms: 800 }
retry: { max_attempts: 2 }
priority: { objectives: { batch: -1 } }
"#,
        )
        .unwrap();
        assert_eq!(c.port, 1234);
        assert_eq!(c.endpoints[0].address, "127.0.0.1:8000");
        assert_eq!(
            c.endpoints[0].kv_replay.as_deref(),
            Some("tcp://127.0.0.1:5558")
        );
        assert_eq!(c.endpoints[1].engine, Some(EngineKind::Sglang));
        assert_eq!(c.endpoints[0].engine, None, "not configured: detected");
        assert_eq!(c.scrape_interval_ms, 50);
        assert_eq!(c.scrape_max_interval_ms, 800);
        assert_eq!(c.objectives["batch"], -1);
        assert_eq!(c.policy, PolicyChoice::Preset(Policy::RoundRobin));
    }

    #[test]
    fn flags_win_and_pair_kv_events_by_position() {
        let flags = Overrides {
            port: Some(7),
            endpoints: vec!["http://a:1".into(), "http://b:2".into()],
            kv_events: vec!["tcp://a:9".into(), String::new()],
            ..Overrides::default()
        };
        let raw: RawConfig =
            serde_norway::from_str("port: 5\nendpoints: [{url: 'http://c:3'}]").unwrap();
        let c = DataPlaneConfig::from_raw(raw, &flags).unwrap();
        assert_eq!(c.port, 7);
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.endpoints[0].kv_events.as_deref(), Some("tcp://a:9"));
        assert_eq!(c.endpoints[1].kv_events, None);
    }

    #[test]
    fn two_endpoints_with_one_kv_events_were_silently_accepted() {
        let flags = Overrides {
            endpoints: vec!["http://a:1".into(), "http://b:2".into()],
            kv_events: vec!["tcp://a:9".into()],
            ..Overrides::default()
        };
        let err = DataPlaneConfig::from_raw(RawConfig::default(), &flags).unwrap_err();
        assert!(err.to_string().contains("pair by position"), "{err}");
        let replay = Overrides {
            kv_replay: vec!["tcp://a:8".into(), "tcp://b:8".into(), "tcp://c:8".into()],
            kv_events: Vec::new(),
            ..flags
        };
        assert!(DataPlaneConfig::from_raw(RawConfig::default(), &replay).is_err());
    }

    #[test]
    fn serve_with_the_oracle_policy_started_and_failed_every_request() {
        let flags = Overrides {
            policy: Some("oracle".into()),
            ..Overrides::default()
        };
        let err = DataPlaneConfig::from_raw(RawConfig::default(), &flags).unwrap_err();
        assert!(
            matches!(
                &err,
                RuntimeError::InvalidConfig {
                    field: "policy",
                    ..
                }
            ),
            "{err}"
        );
        assert!(DataPlaneConfig::from_yaml("policy: oracle").is_err());
        assert!(DataPlaneConfig::from_yaml("policy: gie-default").is_ok());
    }

    #[test]
    fn bad_values_are_typed_errors() {
        for bad in [
            "endpoints: [{url: 'https://a:1'}]",
            "endpoints: [{url: 'http://a'}]",
            "endpoints: [{url: 'http://a:1'}, {url: 'a:1'}]",
            "endpoints: [{url: 'http://a:1', kv_events: 'a:2'}]",
            "retry: { max_attempts: 0 }",
            "scrape: { interval_ms: 0 }",
            "nonsense: 1",
            "policy: x\nrouter: {}",
            "logs: { decision_log_max_bytes: 100 }",
            "logs: { decision_log: /tmp/x, capture_trace: /tmp/x }",
            "logs: { decision_logs: /tmp/x }",
        ] {
            assert!(
                DataPlaneConfig::from_yaml(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn request_logs_come_from_the_file_and_flags_win() {
        let text = "logs: { decision_log: /var/d.jsonl, decision_log_max_bytes: 1048576, \
                    decision_log_files: 2, capture_trace: /var/t.jsonl }\n";
        let cfg = DataPlaneConfig::from_yaml(text).unwrap();
        assert_eq!(
            cfg.logs.decision_log.as_deref(),
            Some(Path::new("/var/d.jsonl"))
        );
        assert_eq!(cfg.logs.decision_log_max_bytes, 1_048_576);
        assert_eq!(cfg.logs.decision_log_files, 2);
        assert_eq!(
            cfg.logs.capture_trace.as_deref(),
            Some(Path::new("/var/t.jsonl"))
        );
        assert!(!cfg.logs.access_log);
        let flags = RoutingFlags {
            decision_log: Some("/flag.jsonl".into()),
            access_log: true,
            ..RoutingFlags::default()
        }
        .overrides();
        let cfg =
            DataPlaneConfig::from_raw(parse_raw(text, Path::new("f")).unwrap(), &flags).unwrap();
        assert_eq!(
            cfg.logs.decision_log.as_deref(),
            Some(Path::new("/flag.jsonl"))
        );
        assert_eq!(cfg.logs.decision_log_files, 2);
        assert!(cfg.logs.access_log);
        let d = DataPlaneConfig::from_yaml("").unwrap().logs;
        assert_eq!(d, RequestLogConfig::default());
        assert_eq!(d.decision_log_max_bytes, DEFAULT_DECISION_LOG_MAX_BYTES);
    }

    /// Review finding: only identical path strings were refused, so `./d.jsonl` against
    /// `d.jsonl`, or a trace written to a rotated decision-log file, slipped through (rotation
    /// would then rename the trace writer's file away).
    #[test]
    fn the_trace_cannot_share_a_file_with_the_decision_log_or_its_rotations() {
        let cfg = |d: &str, c: &str| {
            DataPlaneConfig::from_yaml(&format!(
                "logs: {{decision_log: '{d}', capture_trace: '{c}', decision_log_files: 3}}"
            ))
        };
        assert!(cfg("d.jsonl", "./d.jsonl").is_err());
        assert!(cfg("/x/d.jsonl", "/x/y/../d.jsonl").is_err());
        assert!(cfg("d.jsonl", "d.jsonl.3").is_err());
        assert!(
            cfg("d.jsonl", "d.jsonl.4").is_ok(),
            "beyond the kept rotations"
        );
        assert!(cfg("d.jsonl", "t.jsonl").is_ok());
    }
}
