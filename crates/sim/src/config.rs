//! Fleet configuration: command-line flags and the optional YAML file, parsed raw, then validated
//! into a typed [`FleetConfig`] (ripgrep's low-args/high-args split).
//!
//! Precedence, highest first: entry `i` of the YAML file's `engines:` list (for engine `i`
//! only), then the flags, then the file's top-level settings, then the defaults. An entry's
//! `faults:` map replaces the flag-given faults of that engine as a whole (fields it omits are
//! off), so a per-engine fault profile never inherits surprises from the flags.
//!
//! Defaults follow `vllm serve` 0.32 wherever the simulator models the setting: block hashes use
//! `sha256` (the stand-in described in `kvgate_tokens`' hash module, keyed with a random secret
//! drawn once per process, so no router can compute them) seeded with `"vllm-none-hash"` (vLLM's
//! seed when `PYTHONHASHSEED` is unset), KV events are msgpack maps and replay answers in
//! four frames, and usage carries `prompt_tokens_details` only with
//! `--enable-prompt-tokens-details`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use kvgate_engine::{EngineConfig, HashAlgo, KvLoadFailurePolicy, StepModel};
use kvgate_tokens::{HfTokenizer, Tokenizer};
use serde::Deserialize;

use crate::SimError;
use crate::fault::FaultConfig;
use crate::kv::{KvEncoding, ReplayFormat, publisher_binds, tcp_endpoint};

/// The KV-event topic when none is configured: llm-d's convention `kv@<host>:<port>@<model>`,
/// with the engine's HTTP address, so a router that binds one SUB socket for many engines maps
/// each message to the endpoint that sent it.
pub const DEFAULT_KV_TOPIC: &str = "kv@{host}:{port}@{model}";

/// Model name served when none is given: the model the default step coefficients were fitted on.
pub const DEFAULT_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// Batches each engine keeps for ZMQ replay. vLLM keeps 10,000 steps; a simulated fleet runs up
/// to dozens of engines in one process, and a batch with a long prompt's `BlockStored` is several
/// KiB, so 2,048 (about 10 s of back-to-back steps at H100 speed) bounds memory at a few MiB per
/// engine while still covering any realistic subscriber reconnect.
pub const DEFAULT_REPLAY_BUFFER_BATCHES: usize = 2_048;

/// GPU preset for an engine's step-time coefficients and KV-cache size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GpuPreset {
    /// H100 80GB, Llama-3.1-8B, TP1.
    H100,
    /// A100 80GB, Llama-3.1-8B, TP1.
    A100,
}

impl GpuPreset {
    /// The engine configuration of this preset.
    pub fn engine_config(self) -> EngineConfig {
        match self {
            GpuPreset::H100 => EngineConfig::h100(),
            GpuPreset::A100 => EngineConfig::a100(),
        }
    }
}

/// An engine's part in prefill/decode disaggregation, as vLLM's `kv_role` (`kv_producer`,
/// `kv_consumer`, `kv_both`) and SGLang's `--disaggregation-mode` (`prefill`, `decode`) set it.
/// What each role does with a request's transfer fields is in the `pd` module docs.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Computes prompts for decode engines: holds their KV for NIXL reads
    /// (`do_remote_decode`) and serves SGLang bootstrap rooms.
    Prefill,
    /// Generates from KV computed elsewhere: pulls it (`do_remote_prefill`, or an SGLang
    /// bootstrap room).
    Decode,
    /// Both NIXL ends (vLLM's `kv_both`); SGLang bootstrap fields are ignored.
    #[default]
    Both,
}

impl Role {
    /// Every role, in declaration order.
    pub const ALL: [Role; 3] = [Role::Prefill, Role::Decode, Role::Both];

    /// The flag and config-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
        }
    }

    /// Whether this engine holds KV for decode engines (and so runs a side channel).
    pub fn serves_kv(self) -> bool {
        matches!(self, Role::Prefill | Role::Both)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| SimError::InvalidConfig {
                field: "role",
                reason: format!("{s:?} is not prefill, decode or both"),
            })
    }
}

/// SGLang's default `--disaggregation-bootstrap-port`.
pub const DEFAULT_BOOTSTRAP_PORT: u16 = 8998;

/// One simulated engine: its engine-model configuration, KV-event socket and injected faults.
#[derive(Clone, Debug, Default)]
pub struct EngineSpec {
    /// Engine model configuration (block size, KV size, batching limits, step model, hash
    /// algorithm and seed).
    pub engine: EngineConfig,
    /// This engine's KV-event endpoint (vLLM's `kv_events_config.endpoint`), used as given and
    /// bound or connected by vLLM's rule ([`crate::kv::publisher_binds`]); overrides
    /// [`FleetConfig::kv_events_endpoint`].
    pub kv_events_endpoint: Option<String>,
    /// This engine's topic template; overrides [`FleetConfig::kv_topic`].
    pub kv_topic: Option<String>,
    /// Faults this engine injects.
    pub faults: FaultConfig,
    /// Its part in prefill/decode disaggregation.
    pub role: Role,
}

/// A whole simulated fleet; buildable in code (tests, the benchmark) or from [`SimArgs`].
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// One entry per engine.
    pub engines: Vec<EngineSpec>,
    /// Base model name served by every engine.
    pub model: String,
    /// LoRA adapter names every engine serves besides the base model.
    pub lora_adapters: Vec<String>,
    /// Adapter name → path (vLLM `--lora-modules name=path`): hashed into the adapter's blocks
    /// and shown as its `root` in `/v1/models`. An adapter not listed uses its name as its path.
    pub lora_paths: BTreeMap<String, String>,
    /// Address every socket binds to.
    pub host: IpAddr,
    /// First HTTP port (engine `i` uses `http_port + i`); 0 = ephemeral ports for all.
    pub http_port: u16,
    /// First ZMQ port. Without [`Self::kv_events_endpoint`], engine `i` binds its PUB socket on
    /// `zmq_port + i` and its replay ROUTER on `zmq_port + n + i` (vLLM's wildcard `tcp://*:P`
    /// case); with a connecting endpoint, the replay ROUTERs bind `zmq_port + i` unless
    /// [`Self::kv_replay_port`] is set. 0 = ephemeral ports for all.
    pub zmq_port: u16,
    /// Fleet-wide KV-event endpoint (vLLM's `kv_events_config.endpoint`). A concrete address
    /// (`tcp://H:P`) makes every engine's PUB socket *connect* to it, where one subscriber binds;
    /// a wildcard or `::` address (or `ipc://`) makes engine `i` bind it, with the port (or
    /// name) offset by `i` as vLLM offsets it per data-parallel rank. `None`: bind on
    /// `host:(zmq_port + i)`.
    pub kv_events_endpoint: Option<String>,
    /// First port of the replay ROUTER sockets (engine `i` binds `kv_replay_port + i`); see
    /// [`Self::zmq_port`] for the default.
    pub kv_replay_port: Option<u16>,
    /// Topic template of every engine's KV events (vLLM's `kv_events_config.topic`):
    /// `{host}`, `{port}` (the engine's HTTP address), `{model}` and `{index}` are substituted.
    /// `None` is [`DEFAULT_KV_TOPIC`].
    pub kv_topic: Option<String>,
    /// How replay answers: vLLM 0.32's four frames or the older three.
    pub replay_format: ReplayFormat,
    /// Simulated time runs this many times faster than real time.
    pub time_scale: f64,
    /// KV-event msgpack encoding.
    pub kv_encoding: KvEncoding,
    /// Batches kept per engine for replay.
    pub replay_buffer_batches: usize,
    /// Whether usage carries `prompt_tokens_details: {cached_tokens}` (vLLM
    /// `--enable-prompt-tokens-details`). vLLM's default, and `kvgate sim`'s, is off; this
    /// struct's default is on, so Rust callers written before the flag existed keep reading
    /// `cached_tokens`.
    pub enable_prompt_tokens_details: bool,
    /// Tokenizer shared by all engines (built-in by default).
    pub tokenizer: Arc<Tokenizer>,
    /// Seed of the fault-injection draws (error rate, KV drop rate).
    pub fault_seed: u64,
    /// First port of the KV side channels (the NIXL reads and SGLang bootstrap rooms the
    /// simulator serves instead of RDMA): prefill-role engine `i` binds `bootstrap_port + i`,
    /// as SGLang's bootstrap server binds `--disaggregation-bootstrap-port`. 0 = ephemeral.
    /// `both`-role engines always bind an ephemeral port: they are reached only through the
    /// `remote_port` they hand out.
    pub bootstrap_port: u16,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            engines: vec![EngineSpec::default()],
            model: DEFAULT_MODEL.to_owned(),
            lora_adapters: Vec::new(),
            lora_paths: BTreeMap::new(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            http_port: 0,
            zmq_port: 0,
            kv_events_endpoint: None,
            kv_replay_port: None,
            kv_topic: None,
            replay_format: ReplayFormat::V0_32,
            time_scale: 1.0,
            kv_encoding: KvEncoding::Map,
            replay_buffer_batches: DEFAULT_REPLAY_BUFFER_BATCHES,
            enable_prompt_tokens_details: true,
            tokenizer: Arc::new(Tokenizer::default()),
            fault_seed: 0,
            bootstrap_port: 0,
        }
    }
}

impl FleetConfig {
    /// `n` identical engines with `engine` configuration and no faults, on ephemeral ports.
    pub fn homogeneous(n: usize, engine: EngineConfig) -> Self {
        Self {
            engines: vec![
                EngineSpec {
                    engine,
                    ..EngineSpec::default()
                };
                n
            ],
            ..Self::default()
        }
    }

    /// Checks everything that would otherwise fail later, inside a running fleet.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.engines.is_empty() {
            return Err(SimError::InvalidConfig {
                field: "engines",
                reason: "at least one engine is required".into(),
            });
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(SimError::InvalidConfig {
                field: "time_scale",
                reason: format!("must be a positive finite number, got {}", self.time_scale),
            });
        }
        if self.replay_buffer_batches == 0 {
            return Err(SimError::InvalidConfig {
                field: "replay_buffer_batches",
                reason: "must be positive".into(),
            });
        }
        if self.model.is_empty() {
            return Err(SimError::InvalidConfig {
                field: "model",
                reason: "must not be empty".into(),
            });
        }
        if let Some(a) = self
            .lora_adapters
            .iter()
            .find(|a| a.is_empty() || **a == self.model)
        {
            return Err(SimError::InvalidConfig {
                field: "lora_adapters",
                reason: format!("adapter name {a:?} is empty or equals the base model"),
            });
        }
        if let Some(a) = self
            .lora_paths
            .keys()
            .find(|a| !self.lora_adapters.contains(a))
        {
            return Err(SimError::InvalidConfig {
                field: "lora_paths",
                reason: format!("{a:?} is not one of the served adapters"),
            });
        }
        let n = self.engines.len();
        let connects = |i: usize| {
            self.pub_endpoint(i)
                .is_some_and(|(ep, _)| !publisher_binds(&ep))
        };
        let zmq_span = match (self.kv_replay_port, (0..n).all(connects)) {
            (Some(_), true) => 0,
            (Some(_), false) | (None, true) => n,
            (None, false) => 2 * n,
        };
        for (base, span, what) in [
            (self.bootstrap_port, n, "bootstrap_port"),
            (self.http_port, n, "http_port"),
            (self.zmq_port, zmq_span, "zmq_port"),
            (self.kv_replay_port.unwrap_or(0), n, "kv_replay_port"),
        ] {
            if base != 0 && span > 0 && usize::from(base) + span - 1 > usize::from(u16::MAX) {
                return Err(SimError::InvalidConfig {
                    field: what,
                    reason: format!("{base} + {span} ports runs past 65535"),
                });
            }
        }
        for i in 0..n {
            if let Some((ep, _)) = self.pub_endpoint(i)
                && !(ep.starts_with("tcp://") || ep.starts_with("ipc://"))
            {
                return Err(SimError::InvalidConfig {
                    field: "kv_events_endpoint",
                    reason: format!(
                        "engine {i}: {ep:?} is neither tcp:// nor ipc:// (an engine's ZMQ \
                         context is private, so inproc:// would reach no one)"
                    ),
                });
            }
        }
        for (i, e) in self.engines.iter().enumerate() {
            e.engine
                .validate()
                .map_err(|source| SimError::InvalidEngineConfig { index: i, source })?;
            e.faults
                .validate()
                .map_err(|reason| SimError::InvalidConfig {
                    field: "faults",
                    reason: format!("engine {i}: {reason}"),
                })?;
        }
        Ok(())
    }
}

impl FleetConfig {
    /// Engine `i`'s configured KV-event endpoint and whether it came from the engine's own
    /// setting; `None` when neither the engine nor the fleet sets one.
    fn pub_endpoint(&self, i: usize) -> Option<(String, bool)> {
        match (
            &self.engines[i].kv_events_endpoint,
            &self.kv_events_endpoint,
        ) {
            (Some(ep), _) => Some((ep.clone(), true)),
            (None, Some(ep)) => Some((ep.clone(), false)),
            (None, None) => None,
        }
    }

    /// Where engine `i`'s PUB socket goes, and whether it must bind regardless of vLLM's rule
    /// (the default per-engine port on `host`, which is vLLM's `tcp://*:P` case).
    pub(crate) fn pub_plan(&self, i: usize) -> (String, bool) {
        match self.pub_endpoint(i) {
            None => (tcp_endpoint(self.host, port_for(self.zmq_port, i)), true),
            Some((ep, true)) => (ep, false),
            Some((ep, false)) if publisher_binds(&ep) => (offset_endpoint(&ep, i), false),
            Some((ep, false)) => (ep, false),
        }
    }

    /// Where engine `i`'s replay ROUTER binds.
    pub(crate) fn replay_bind(&self, i: usize) -> String {
        let n = self.engines.len();
        let (ep, _) = self.pub_plan(i);
        let pub_binds = self.pub_endpoint(i).is_none() || publisher_binds(&ep);
        let port = match (self.kv_replay_port, pub_binds) {
            (Some(base), _) => port_for(base, i),
            (None, true) => port_for(self.zmq_port, n + i),
            (None, false) => port_for(self.zmq_port, i),
        };
        tcp_endpoint(self.host, port)
    }

    /// Engine `i`'s topic, given its HTTP address.
    pub(crate) fn topic(&self, i: usize, http: SocketAddr) -> String {
        let template = self.engines[i]
            .kv_topic
            .as_deref()
            .or(self.kv_topic.as_deref())
            .unwrap_or(DEFAULT_KV_TOPIC);
        template
            .replace("{host}", &http.ip().to_string())
            .replace("{port}", &http.port().to_string())
            .replace("{model}", &self.model)
            .replace("{index}", &i.to_string())
    }
}

/// `base + offset`, or 0 (ephemeral) when `base` is 0.
pub(crate) fn port_for(base: u16, offset: usize) -> u16 {
    if base == 0 {
        0
    } else {
        // FleetConfig::validate guarantees the sum fits.
        base.saturating_add(u16::try_from(offset).unwrap_or(u16::MAX))
    }
}

/// A fleet-wide bind endpoint for engine `i`, offset as vLLM offsets it per data-parallel rank
/// (`ZmqEventPublisher.offset_endpoint_port`): a TCP port `P` becomes `P + i` (0 and `*` stay
/// ephemeral), other endpoints get a `_dp{i}` suffix.
fn offset_endpoint(ep: &str, i: usize) -> String {
    if i == 0 {
        return ep.to_owned();
    }
    if ep.starts_with("tcp://")
        && let Some((base, port)) = ep.rsplit_once(':')
        && let Ok(port) = port.parse::<u16>()
    {
        return format!("{base}:{}", port_for(port, i));
    }
    if ep.starts_with("tcp://") {
        return ep.to_owned();
    }
    format!("{ep}_dp{i}")
}

/// Default of `--shutdown-accept-grace-ms`. The simulator stands in for engine pods in tests
/// and benchmarks, where nobody waits for a load balancer to notice; one second still shows
/// a router the 503 before the listener goes.
pub const DEFAULT_SHUTDOWN_ACCEPT_GRACE_MS: u64 = 1_000;

/// Default of `--shutdown-drain-timeout-ms`: long enough for a simulated stream of a few
/// thousand tokens, short enough that ctrl-c on a wedged fleet returns promptly.
pub const DEFAULT_SHUTDOWN_DRAIN_TIMEOUT_MS: u64 = 30_000;

/// Flags of `kvgate sim`.
#[derive(Clone, Debug, clap::Args)]
pub struct SimArgs {
    /// Number of engines to run in this process.
    #[arg(long, default_value_t = 1)]
    pub engines: usize,
    /// First HTTP port: engine i serves on 127.0.0.1:(port+i). 0 = ephemeral ports.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// First ZMQ port: engine i binds its KV-event PUB socket on tcp://127.0.0.1:(zmq-port+i)
    /// and its replay ROUTER on tcp://127.0.0.1:(zmq-port+engines+i). With a connecting
    /// --kv-events-endpoint, the replay ROUTERs bind (zmq-port+i). 0 = ephemeral ports.
    #[arg(long, default_value_t = 5557)]
    pub zmq_port: u16,
    /// vLLM's kv-events `endpoint` for every engine. A concrete address (tcp://H:P) makes each
    /// engine's PUB socket connect to it (one subscriber binds there and tells engines apart by
    /// topic); an address with `*` or `::` makes engine i bind it, port offset by i.
    #[arg(long)]
    pub kv_events_endpoint: Option<String>,
    /// First port of the replay ROUTER sockets: engine i binds tcp://127.0.0.1:(port+i).
    #[arg(long)]
    pub kv_replay_port: Option<u16>,
    /// KV-event topic template; {host}, {port} (the engine's HTTP address), {model} and {index}
    /// are substituted. Default: kv@{host}:{port}@{model}.
    #[arg(long)]
    pub kv_topic: Option<String>,
    /// How replay answers: v0_32 ([b"", topic, seq, payload]) or legacy ([b"", seq, payload]).
    /// Default: v0_32.
    #[arg(long, value_enum)]
    pub kv_replay_format: Option<ReplayFormat>,
    /// Served model name (also the KV-event topic suffix).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Block-hash algorithm, sha256 or sha256_cbor (vLLM's --prefix-caching-hash-algo). The
    /// default, sha256, is keyed with a secret drawn at random per process: like vLLM's
    /// pickle-based sha256, no router can compute it. sha256_cbor is vLLM's reproducible chain.
    #[arg(long)]
    pub prefix_caching_hash_algo: Option<HashAlgo>,
    /// PYTHONHASHSEED equivalent: the seed string of the block-hash chain. Unset, as in vLLM,
    /// is "vllm-none-hash".
    #[arg(long)]
    pub hash_seed: Option<String>,
    /// Tokens per KV block.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// GPU preset for step-time coefficients and KV size.
    #[arg(long, value_enum, default_value_t = GpuPreset::H100)]
    pub gpu: GpuPreset,
    /// KV blocks per engine (overrides the GPU preset).
    #[arg(long)]
    pub num_gpu_blocks: Option<usize>,
    /// Maximum concurrently running sequences per engine.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Token budget of one engine step.
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Longest prompt + completion, in tokens.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Simulated time runs this many times faster than real time.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// KV-event msgpack encoding: map (vLLM 0.32, default) or array (older vLLM, SGLang).
    #[arg(long, value_enum)]
    pub kv_encoding: Option<KvEncoding>,
    /// Batches kept per engine for ZMQ replay.
    #[arg(long, default_value_t = DEFAULT_REPLAY_BUFFER_BATCHES)]
    pub kv_replay_buffer_batches: usize,
    /// Report usage.prompt_tokens_details.cached_tokens, as vLLM does only with this flag.
    #[arg(long)]
    pub enable_prompt_tokens_details: bool,
    /// Comma-separated LoRA adapters served besides the base model, each `name` or
    /// `name=path` (vLLM's --lora-modules); the path is hashed into the adapter's blocks and
    /// defaults to the name.
    #[arg(long, value_delimiter = ',')]
    pub lora_adapters: Vec<String>,
    /// HuggingFace tokenizer.json to use instead of the built-in tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// YAML file with per-engine overrides (see the crate docs).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print one JSON line with every engine's addresses instead of human-readable lines.
    #[arg(long)]
    pub print_json: bool,
    /// On SIGTERM or ctrl-c: how long every engine keeps accepting (with `/health` already
    /// 503, so load balancers stop sending) before it closes its listener, ms.
    #[arg(long, default_value_t = DEFAULT_SHUTDOWN_ACCEPT_GRACE_MS)]
    pub shutdown_accept_grace_ms: u64,
    /// After the grace period: how long in-flight requests get to finish before they are
    /// cut, ms.
    #[arg(long, default_value_t = DEFAULT_SHUTDOWN_DRAIN_TIMEOUT_MS)]
    pub shutdown_drain_timeout_ms: u64,
    /// Seed of the fault-injection draws.
    #[arg(long, default_value_t = 0)]
    pub fault_seed: u64,
    /// Fraction of requests (all engines) answered with `--error-status` before any byte.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Status of injected errors: 500 or 429.
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,
    /// Extra delay before the first byte of every response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub added_latency_ms: u64,
    /// Each engine crashes when request number N+1 arrives.
    #[arg(long)]
    pub crash_after_requests: Option<u64>,
    /// Each engine crashes this many (wall-clock) seconds after start.
    #[arg(long)]
    pub crash_at_s: Option<f64>,
    /// `/metrics` answers 500.
    #[arg(long)]
    pub metrics_unavailable: bool,
    /// Delay before `/metrics` answers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub metrics_delay_ms: u64,
    /// Fraction of KV-event batches not published (sequence numbers still advance).
    #[arg(long, default_value_t = 0.0)]
    pub kv_drop_rate: f64,
    /// Seconds after start during which `/health` and requests answer 503.
    #[arg(long, default_value_t = 0.0)]
    pub slow_start_s: f64,
    /// Fraction of KV transfers this engine serves (as a prefill engine) that fail.
    #[arg(long, default_value_t = 0.0)]
    pub transfer_failure_rate: f64,
    /// Every engine's part in prefill/decode disaggregation: prefill, decode or both (vLLM's
    /// kv_producer / kv_consumer / kv_both).
    #[arg(long, value_enum, default_value_t = Role::Both)]
    pub role: Role,
    /// First port of the prefill engines' KV side channels (SGLang's bootstrap server port;
    /// also where NIXL reads go): prefill engine i binds (bootstrap-port+i). 0 = ephemeral.
    #[arg(long, default_value_t = DEFAULT_BOOTSTRAP_PORT)]
    pub bootstrap_port: u16,
    /// KV-cache bytes per token moved between prefill and decode engines (default: 131072,
    /// Llama-3.1-8B in bf16).
    #[arg(long)]
    pub kv_bytes_per_token: Option<u64>,
    /// Prefill-to-decode link bandwidth, GB/s (default 50: one 400 Gb/s NIC per GPU).
    #[arg(long)]
    pub kv_link_gbytes_per_s: Option<f64>,
    /// Fixed cost of one KV transfer, µs (default 200).
    #[arg(long)]
    pub kv_link_latency_us: Option<u64>,
    /// How long a prefill engine holds KV that no decode engine reads, seconds (vLLM's
    /// VLLM_NIXL_ABORT_REQUEST_TIMEOUT, default 480).
    #[arg(long)]
    pub kv_hold_timeout_s: Option<f64>,
    /// What a decode engine does when loading remote KV fails: fail (vLLM's default) or
    /// recompute.
    #[arg(long)]
    pub kv_load_failure_policy: Option<KvLoadFailurePolicy>,
}

/// The YAML file: fleet-wide settings (below the flags) and per-engine overrides.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    kv_events_endpoint: Option<String>,
    kv_replay_port: Option<u16>,
    kv_topic: Option<String>,
    replay_format: Option<ReplayFormat>,
    kv_encoding: Option<KvEncoding>,
    enable_prompt_tokens_details: Option<bool>,
    prefix_caching_hash_algo: Option<HashAlgo>,
    hash_seed: Option<String>,
    #[serde(default)]
    engines: Vec<RawEngine>,
}

/// Per-engine overrides; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    gpu: Option<GpuPreset>,
    /// `[beta0_us, beta1_us_per_prefill_token, beta2_us_per_decode_token]`.
    betas: Option<[f64; 3]>,
    num_gpu_blocks: Option<usize>,
    block_size: Option<usize>,
    max_num_seqs: Option<usize>,
    max_num_batched_tokens: Option<usize>,
    max_model_len: Option<usize>,
    prefix_caching_hash_algo: Option<HashAlgo>,
    hash_seed: Option<String>,
    kv_events_endpoint: Option<String>,
    kv_topic: Option<String>,
    faults: Option<FaultConfig>,
    role: Option<Role>,
    /// Partial `kvgate_engine::KvTransferConfig`, over the flags.
    kv_transfer: Option<serde_json::Value>,
}

impl SimArgs {
    /// Fault settings the flags give every engine.
    fn faults(&self) -> FaultConfig {
        FaultConfig {
            error_rate: self.error_rate,
            error_status: self.error_status,
            added_latency_ms: self.added_latency_ms,
            crash_after_requests: self.crash_after_requests,
            crash_at_s: self.crash_at_s,
            metrics_unavailable: self.metrics_unavailable,
            metrics_delay_ms: self.metrics_delay_ms,
            kv_drop_rate: self.kv_drop_rate,
            slow_start_s: self.slow_start_s,
            transfer_failure_rate: self.transfer_failure_rate,
        }
    }

    fn engine_config(&self, file: &RawFile, raw: &RawEngine) -> EngineConfig {
        let mut c = raw.gpu.unwrap_or(self.gpu).engine_config();
        if let Some(seed) = raw
            .hash_seed
            .as_ref()
            .or(self.hash_seed.as_ref())
            .or(file.hash_seed.as_ref())
        {
            c.hash_seed = seed.clone();
        }
        if let Some(a) = raw
            .prefix_caching_hash_algo
            .or(self.prefix_caching_hash_algo)
            .or(file.prefix_caching_hash_algo)
        {
            c.prefix_caching_hash_algo = a;
        }
        let pick = |file: Option<usize>, flag: Option<usize>, preset: usize| {
            file.or(flag).unwrap_or(preset)
        };
        c.block_size = pick(raw.block_size, self.block_size, c.block_size);
        c.num_gpu_blocks = pick(raw.num_gpu_blocks, self.num_gpu_blocks, c.num_gpu_blocks);
        c.max_num_seqs = pick(raw.max_num_seqs, self.max_num_seqs, c.max_num_seqs);
        c.max_num_batched_tokens = pick(
            raw.max_num_batched_tokens,
            self.max_num_batched_tokens,
            c.max_num_batched_tokens,
        );
        c.max_model_len = pick(raw.max_model_len, self.max_model_len, c.max_model_len);
        if let Some([b0, b1, b2]) = raw.betas {
            c.step = StepModel {
                beta0_us: b0,
                beta1_us_per_prefill_token: b1,
                beta2_us_per_decode_token: b2,
                // Three betas are BLIS's linear fit: no attention term.
                beta3_us_per_attention_pair: 0.0,
            };
        }
        let t = &mut c.kv_transfer;
        if let Some(b) = self.kv_bytes_per_token {
            t.kv_bytes_per_token = b;
        }
        if let Some(g) = self.kv_link_gbytes_per_s {
            t.link_bandwidth_bytes_per_s = g * 1e9;
        }
        if let Some(l) = self.kv_link_latency_us {
            t.link_latency_us = l;
        }
        if let Some(s) = self.kv_hold_timeout_s {
            t.abort_request_timeout_us = (s.max(0.0) * 1e6) as u64;
        }
        if let Some(p) = self.kv_load_failure_policy {
            t.kv_load_failure_policy = p;
        }
        c
    }

    /// The file entry's `kv_transfer` map over the flag-given transfer settings.
    fn kv_transfer(
        base: &kvgate_engine::KvTransferConfig,
        over: Option<&serde_json::Value>,
        i: usize,
    ) -> Result<kvgate_engine::KvTransferConfig, SimError> {
        let Some(over) = over else {
            return Ok(base.clone());
        };
        let mut v = serde_json::to_value(base).expect("a config serializes");
        if let (Some(into), Some(from)) = (v.as_object_mut(), over.as_object()) {
            for (k, x) in from {
                into.insert(k.clone(), x.clone());
            }
        } else {
            return Err(SimError::InvalidConfig {
                field: "kv_transfer",
                reason: format!("engine {i}: not a map"),
            });
        }
        serde_json::from_value(v).map_err(|e| SimError::InvalidConfig {
            field: "kv_transfer",
            reason: format!("engine {i}: {e}"),
        })
    }

    /// Reads the files the flags name and builds the validated fleet configuration.
    pub fn to_fleet_config(&self) -> Result<FleetConfig, SimError> {
        let file = match &self.config {
            None => RawFile::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| SimError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
                serde_norway::from_str(&text).map_err(|source| SimError::ParseConfig {
                    path: path.clone(),
                    source,
                })?
            }
        };
        if file.engines.len() > self.engines {
            return Err(SimError::InvalidConfig {
                field: "engines",
                reason: format!(
                    "the config file describes {} engines but --engines is {}",
                    file.engines.len(),
                    self.engines
                ),
            });
        }
        let tokenizer = match &self.tokenizer {
            None => Tokenizer::default(),
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| SimError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
                Tokenizer::Hf(Box::new(HfTokenizer::from_bytes(&bytes)?))
            }
        };
        let none = RawEngine::default();
        let engines = (0..self.engines)
            .map(|i| {
                let raw = file.engines.get(i).unwrap_or(&none);
                let mut engine = self.engine_config(&file, raw);
                engine.kv_transfer =
                    Self::kv_transfer(&engine.kv_transfer, raw.kv_transfer.as_ref(), i)?;
                Ok(EngineSpec {
                    engine,
                    kv_events_endpoint: raw.kv_events_endpoint.clone(),
                    kv_topic: raw.kv_topic.clone(),
                    faults: raw.faults.clone().unwrap_or_else(|| self.faults()),
                    role: raw.role.unwrap_or(self.role),
                })
            })
            .collect::<Result<Vec<_>, SimError>>()?;
        let mut lora_adapters = Vec::new();
        let mut lora_paths = BTreeMap::new();
        for spec in self.lora_adapters.iter().map(|s| s.trim()) {
            match spec.split_once('=') {
                Some((name, path)) => {
                    lora_adapters.push(name.trim().to_owned());
                    lora_paths.insert(name.trim().to_owned(), path.trim().to_owned());
                }
                None if spec.is_empty() => {}
                None => lora_adapters.push(spec.to_owned()),
            }
        }
        let cfg = FleetConfig {
            engines,
            model: self.model.clone(),
            lora_adapters,
            lora_paths,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            http_port: self.port,
            zmq_port: self.zmq_port,
            kv_events_endpoint: self
                .kv_events_endpoint
                .clone()
                .or(file.kv_events_endpoint.clone()),
            kv_replay_port: self.kv_replay_port.or(file.kv_replay_port),
            kv_topic: self.kv_topic.clone().or(file.kv_topic.clone()),
            replay_format: self
                .kv_replay_format
                .or(file.replay_format)
                .unwrap_or_default(),
            time_scale: self.time_scale,
            kv_encoding: self.kv_encoding.or(file.kv_encoding).unwrap_or_default(),
            replay_buffer_batches: self.kv_replay_buffer_batches,
            enable_prompt_tokens_details: self.enable_prompt_tokens_details
                || file.enable_prompt_tokens_details.unwrap_or(false),
            tokenizer: Arc::new(tokenizer),
            fault_seed: self.fault_seed,
            bootstrap_port: self.bootstrap_port,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn args(extra: &[&str]) -> SimArgs {
        Cli::try_parse_from(["kvgate-sim"].iter().chain(extra))
            .expect("flags parse")
            .sim
    }

    #[test]
    fn flags_set_fleet_defaults_and_the_file_overrides_per_engine() {
        let dir = std::env::temp_dir().join(format!("kvgate-sim-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sim.yaml");
        std::fs::write(
            &file,
            r#"
kv_events_endpoint: tcp://127.0.0.1:7000
replay_format: legacy
hash_seed: file
prefix_caching_hash_algo: sha256_cbor
enable_prompt_tokens_details: true
engines:
  - {}
  - gpu: a100
    betas: [1.0, 2.0, 3.0]
    num_gpu_blocks: 64
    hash_seed: own
    prefix_caching_hash_algo: sha256
    kv_events_endpoint: "tcp://*:6000"
    kv_topic: "t{index}"
    faults: { error_rate: 0.5, error_status: 429 }
"#,
        )
        .unwrap();
        let a = args(&[
            "--engines",
            "3",
            "--port",
            "0",
            "--zmq-port",
            "0",
            "--hash-seed",
            "42",
            "--max-num-seqs",
            "8",
            "--lora-adapters",
            "a,b=/adapters/b",
            "--kv-encoding",
            "array",
            "--error-rate",
            "0.1",
            "--config",
            file.to_str().unwrap(),
        ]);
        let cfg = a.to_fleet_config().unwrap();
        assert_eq!(cfg.engines.len(), 3);
        assert_eq!(cfg.lora_adapters, ["a", "b"]);
        assert_eq!(
            cfg.lora_paths,
            BTreeMap::from([("b".to_owned(), "/adapters/b".to_owned())])
        );
        assert_eq!(
            cfg.kv_encoding,
            KvEncoding::Array,
            "the flag beats the default"
        );
        assert_eq!(cfg.replay_format, ReplayFormat::Legacy, "from the file");
        assert!(cfg.enable_prompt_tokens_details, "from the file");
        assert_eq!(
            cfg.kv_events_endpoint.as_deref(),
            Some("tcp://127.0.0.1:7000")
        );
        // The flag beats the file's top level; the file's engine entry beats the flag.
        assert_eq!(cfg.engines[0].engine.hash_seed, "42");
        assert_eq!(cfg.engines[2].engine.hash_seed, "42");
        assert_eq!(cfg.engines[1].engine.hash_seed, "own");
        assert_eq!(
            cfg.engines[0].engine.prefix_caching_hash_algo,
            HashAlgo::Sha256Cbor
        );
        assert_eq!(
            cfg.engines[1].engine.prefix_caching_hash_algo,
            HashAlgo::Sha256
        );
        // Engines 0 and 2 connect to the fleet endpoint; engine 1 binds its own.
        assert_eq!(cfg.pub_plan(0), ("tcp://127.0.0.1:7000".to_owned(), false));
        assert_eq!(cfg.pub_plan(2), ("tcp://127.0.0.1:7000".to_owned(), false));
        assert_eq!(cfg.pub_plan(1), ("tcp://*:6000".to_owned(), false));
        let http: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        assert_eq!(cfg.topic(1, http), "t1");
        assert_eq!(
            cfg.topic(0, http),
            format!("kv@127.0.0.1:8001@{DEFAULT_MODEL}")
        );
        assert!(cfg.engines.iter().all(|e| e.engine.max_num_seqs == 8));
        assert_eq!(cfg.engines[0].engine.step, StepModel::H100_LLAMA31_8B);
        assert_eq!(cfg.engines[0].faults.error_rate, 0.1);
        assert_eq!(cfg.engines[1].engine.num_gpu_blocks, 64);
        assert_eq!(cfg.engines[1].engine.step.beta1_us_per_prefill_token, 2.0);
        assert_eq!(cfg.engines[1].faults.error_status, 429);
        assert_eq!(cfg.engines[1].faults.error_rate, 0.5);
        assert_eq!(cfg.engines[2].faults.error_rate, 0.1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn roles_and_transfer_settings_come_from_flags_and_the_file() {
        let dir = std::env::temp_dir().join(format!("kvgate-sim-pd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sim.yaml");
        std::fs::write(
            &file,
            r#"
engines:
  - role: decode
    kv_transfer: { link_latency_us: 7, kv_load_failure_policy: recompute }
    faults: { transfer_failure_rate: 0.25 }
"#,
        )
        .unwrap();
        let cfg = args(&[
            "--engines",
            "2",
            "--role",
            "prefill",
            "--bootstrap-port",
            "9100",
            "--kv-link-gbytes-per-s",
            "25",
            "--kv-hold-timeout-s",
            "3",
            "--transfer-failure-rate",
            "0.5",
            "--config",
            file.to_str().unwrap(),
        ])
        .to_fleet_config()
        .unwrap();
        assert_eq!(cfg.bootstrap_port, 9100);
        assert_eq!(cfg.engines[0].role, Role::Decode, "the file's entry wins");
        assert_eq!(cfg.engines[1].role, Role::Prefill, "the flag");
        let (t0, t1) = (
            &cfg.engines[0].engine.kv_transfer,
            &cfg.engines[1].engine.kv_transfer,
        );
        assert_eq!(t0.link_latency_us, 7);
        assert_eq!(t0.kv_load_failure_policy, KvLoadFailurePolicy::Recompute);
        assert_eq!(
            t0.link_bandwidth_bytes_per_s, 25e9,
            "flags under the file's map"
        );
        assert_eq!(t1.link_latency_us, 200, "the engine default");
        assert_eq!(t1.abort_request_timeout_us, 3_000_000);
        assert_eq!(t1.kv_load_failure_policy, KvLoadFailurePolicy::Fail);
        assert_eq!(cfg.engines[0].faults.transfer_failure_rate, 0.25);
        assert_eq!(cfg.engines[1].faults.transfer_failure_rate, 0.5);
        let d = args(&[]).to_fleet_config().unwrap();
        assert_eq!(d.engines[0].role, Role::Both);
        assert_eq!(d.bootstrap_port, DEFAULT_BOOTSTRAP_PORT);
        assert!("decode".parse::<Role>().is_ok() && "router".parse::<Role>().is_err());
        assert!(
            Role::ALL
                .iter()
                .all(|r| r.as_str().parse::<Role>().ok() == Some(*r))
        );
        std::fs::write(&file, "engines:\n  - kv_transfer: { link_speed: 1 }\n").unwrap();
        assert!(matches!(
            args(&["--config", file.to_str().unwrap()]).to_fleet_config(),
            Err(SimError::InvalidConfig {
                field: "kv_transfer",
                ..
            })
        ));
        assert!(matches!(
            args(&["--transfer-failure-rate", "2"]).to_fleet_config(),
            Err(SimError::InvalidConfig {
                field: "faults",
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        let bad = |extra: &[&str]| args(extra).to_fleet_config().unwrap_err();
        assert!(matches!(
            bad(&["--time-scale", "0"]),
            SimError::InvalidConfig {
                field: "time_scale",
                ..
            }
        ));
        assert!(matches!(
            bad(&["--error-status", "418"]),
            SimError::InvalidConfig {
                field: "faults",
                ..
            }
        ));
        assert!(matches!(
            bad(&["--engines", "10", "--port", "65530"]),
            SimError::InvalidConfig {
                field: "http_port",
                ..
            }
        ));
        assert!(matches!(
            bad(&["--config", "/nonexistent/sim.yaml"]),
            SimError::ReadFile { .. }
        ));
        assert!(matches!(
            bad(&["--block-size", "0"]),
            SimError::InvalidEngineConfig { index: 0, .. }
        ));
        assert!(matches!(
            bad(&["--kv-events-endpoint", "inproc://kv"]),
            SimError::InvalidConfig {
                field: "kv_events_endpoint",
                ..
            }
        ));
        assert!(matches!(
            bad(&["--engines", "4", "--zmq-port", "65530"]),
            SimError::InvalidConfig {
                field: "zmq_port",
                ..
            }
        ));
        assert!(
            Cli::try_parse_from(["s", "--prefix-caching-hash-algo", "xxhash"]).is_err(),
            "only the algorithms the engine models"
        );
    }

    #[test]
    fn cli_defaults_are_vllm_defaults() {
        let cfg = args(&["--engines", "2"]).to_fleet_config().unwrap();
        for e in &cfg.engines {
            assert_eq!(e.engine.prefix_caching_hash_algo, HashAlgo::Sha256);
            assert_eq!(e.engine.hash_seed, "vllm-none-hash");
        }
        assert!(!cfg.enable_prompt_tokens_details);
        assert_eq!(cfg.kv_encoding, KvEncoding::Map);
        assert_eq!(cfg.replay_format, ReplayFormat::V0_32);
        // `--zmq-port Z` keeps its meaning: engine i binds PUB Z+i and replay Z+N+i.
        assert_eq!(cfg.pub_plan(1), ("tcp://127.0.0.1:5558".to_owned(), true));
        assert_eq!(cfg.replay_bind(1), "tcp://127.0.0.1:5560");
    }

    #[test]
    fn a_concrete_endpoint_makes_every_engine_connect() {
        let cfg = args(&[
            "--engines",
            "2",
            "--kv-events-endpoint",
            "tcp://127.0.0.1:7000",
        ])
        .to_fleet_config()
        .unwrap();
        for i in 0..2 {
            assert_eq!(cfg.pub_plan(i), ("tcp://127.0.0.1:7000".to_owned(), false));
        }
        assert_eq!(cfg.replay_bind(1), "tcp://127.0.0.1:5558", "Z + i");
        let cfg = args(&[
            "--engines",
            "2",
            "--kv-events-endpoint",
            "tcp://127.0.0.1:7000",
            "--kv-replay-port",
            "9000",
        ])
        .to_fleet_config()
        .unwrap();
        assert_eq!(cfg.replay_bind(1), "tcp://127.0.0.1:9001");
        // A wildcard endpoint binds, offset per engine as vLLM offsets per DP rank.
        let cfg = args(&["--engines", "2", "--kv-events-endpoint", "tcp://*:7000"])
            .to_fleet_config()
            .unwrap();
        assert_eq!(cfg.pub_plan(1), ("tcp://*:7001".to_owned(), false));
        assert_eq!(cfg.replay_bind(1), "tcp://127.0.0.1:5560");
    }
}
