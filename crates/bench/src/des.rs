//! Discrete-event mode: the engine model and the routing core on a virtual clock.
//!
//! Engines are [`kvgate_engine::Engine`]s; the router is [`kvgate_core::Router`] with the chosen
//! policy, fed the way a real deployment feeds it: metrics are sampled every
//! `scrape_interval_ms` and delivered `metrics_delay_ms` later, KV events are delivered
//! `kv_event_delay_ms` after the engine step that produced them, and the router's own
//! accounting sees first tokens and completions when they happen (a gateway sees every stream).
//! Staleness is therefore part of every experiment. The oracle policy is the one exception: it
//! reads true engine state at decision time (kvgate's cost on true, undelayed state — not an
//! upper bound: it removes staleness, not the cost model's errors).
//!
//! ## Router replicas
//! A production gateway runs several replicas behind a Kubernetes Service, each deciding alone
//! on its own stale view. With `router_replicas` = R, R independent [`Router`]s run side by
//! side: each has its own bookings and randomness, its own scrape phase (replica `i` samples at
//! offset `interval · i / R`), its own scrape interval, metrics delay and KV-event delay (spread
//! evenly over the configured `[min, max]` ranges: replica `i` takes `min + (max − min) · (i +
//! ½) / R`), and every engine's KV events reach every replica, each after its own delay. Requests
//! are spread over replicas as a Service spreads connections ([`ReplicaSpread`]); only the
//! replica that booked a request sees its first token and finish (it proxies that stream). Every
//! policy runs under the same replicas and delays. The true waiting queue of every engine is
//! sampled every `queue_sample_interval_ms` so reports can measure herding.
//!
//! ## What the engines are, and what the routers are told
//! By default each engine is declared as the hardware class of its own preset, so the cost
//! model's priors are exact. [`DesConfig::declared`] tells the routers something else
//! ([`crate::truth`] builds the scenarios: A100s declared as H100s, CPU-like engines, a fleet of
//! three speeds), and [`DesConfig::static_priors`] stops them learning. Each request records the
//! TTFT its router predicted when booking it, so reports measure the prediction error.
//!
//! ## Prefill/decode fleets
//! A run is an [`Arm`]: a routing policy on the engines aggregated, or a prefill/decode decider
//! on the same engines given the roles of [`DesConfig::roles`], so every comparison is on the
//! same GPUs. A split request's two legs run as vLLM's NixlConnector runs them (see
//! [`run_arm`]); the engines do the bookkeeping of held and loaded blocks, the runner moves the
//! KV over a timed link and tells both sides when it has arrived.
//!
//! Everything is driven by one event queue ordered by (time, insertion order), so a seed gives
//! the same report bit for bit. Prompt tokens and block hashes are computed when a request
//! arrives and dropped when it finishes, so memory follows the requests in flight, not the
//! trace size — except for workloads small enough to cache them across runs
//! ([`crate::prepared`]), which a demo or capacity search runs dozens of times.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use kvgate_core::cost::HardwarePrior;
use kvgate_core::endpoint::{EndpointId, EndpointSpec, Role};
use kvgate_core::observe::{KvEvent as CoreKvEvent, KvEventBatch, MetricsSample};
use kvgate_core::request::{Decision, DecisionReason, Phase};
use kvgate_core::{
    OracleView, Outcome, PdDecider, PdTuning, Policy, Router, RouterConfig, RoutingRequest,
    TrueLoad,
};
use kvgate_engine::{Engine, EngineConfig, EngineRequest, FinishReason, KvEvent, Output};
use kvgate_tokens::BlockHash;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::BenchError;
use crate::prepared::{CACHE_MAX_PROMPT_TOKENS, PrepareKey, prepare};
use crate::workload::Workload;

/// Fleet and signal settings of a discrete-event run.
#[derive(Clone, Debug, PartialEq)]
pub struct DesConfig {
    /// One config per engine (heterogeneous fleets mix presets).
    pub engines: Vec<EngineConfig>,
    /// How often each engine's metrics are sampled. 100 ms: the gateway's default scrape interval.
    pub scrape_interval_ms: u64,
    /// Delay between sampling and the router seeing a sample: scrape round trip and parse.
    /// 20 ms: a loaded vLLM answers `/metrics` in tens of milliseconds.
    pub metrics_delay_ms: u64,
    /// Delay between an engine step and the router applying its KV events (ZMQ hop, batching).
    /// 10 ms by default.
    pub kv_event_delay_ms: u64,
    /// Upper end of the metrics-sampling intervals over replicas, ms (`scrape_interval_ms` is
    /// the lower end). Equal to it by default.
    pub scrape_interval_max_ms: u64,
    /// Upper end of the metrics delays over replicas, ms.
    pub metrics_delay_max_ms: u64,
    /// Upper end of the KV-event delays over replicas, ms.
    pub kv_event_delay_max_ms: u64,
    /// Independent router replicas (≥ 1).
    pub router_replicas: usize,
    /// How requests are spread over replicas.
    pub replica_spread: ReplicaSpread,
    /// Interval of the per-endpoint waiting-queue samples, ms. 100: a scrape interval, fine
    /// enough to see a herd form and dissolve.
    pub queue_sample_interval_ms: u64,
    /// Seed of the router's randomness.
    pub seed: u64,
    /// Model name every engine serves.
    pub model: String,
    /// What the routers are told each engine is, one per engine; empty: the class of the
    /// engine's own preset (`a100` for A100 coefficients, else `h100`), so the priors are exact.
    /// [`crate::truth`] sets it apart from the engines' true coefficients.
    pub declared: Vec<DeclaredHardware>,
    /// Learning off for every router (`learn_step_model: false`): the declared prior and one
    /// speed factor per endpoint, kvgate as it was before it learnt step times.
    pub static_priors: bool,
    /// Role of each engine when a P/D arm runs ([`Arm::Pd`]); empty: every engine serves both
    /// phases. Every other arm runs the same engines aggregated (all [`Role::Both`]), so a
    /// comparison is always on the same GPUs.
    pub roles: Vec<Role>,
    /// The routers' P/D decider knobs and transfer model (the arm sets the decider). By default
    /// the transfer model is the engines' own link ([`pd_tuning_for`]), so the routers' belief
    /// about transfers is exact, as the priors are.
    pub pd: PdTuning,
}

/// The routers' P/D tuning whose transfer model is `engine`'s link (bytes per token, bandwidth,
/// latency): what an operator who configured both from the same fabric figures would run.
pub fn pd_tuning_for(engine: &EngineConfig) -> PdTuning {
    let link = &engine.kv_transfer;
    PdTuning {
        kv_bytes_per_token: link.kv_bytes_per_token,
        transfer_bandwidth_bytes_per_s: link.link_bandwidth_bytes_per_s,
        transfer_latency_us: link.link_latency_us,
        ..PdTuning::default()
    }
}

/// What one run compares: a routing policy on the aggregated fleet, or a prefill/decode decider
/// on the fleet split by [`DesConfig::roles`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    /// A routing policy, every engine aggregated.
    Policy(Policy),
    /// The P/D comparison's baseline: the same engines all aggregated, routed by kvgate.
    Aggregated,
    /// The P/D fleet with kvgate's routing and this decider.
    Pd(PdDecider),
}

impl From<Policy> for Arm {
    fn from(p: Policy) -> Self {
        Self::Policy(p)
    }
}

impl Arm {
    /// Every P/D decider, in the order reports show them.
    pub const PD_DECIDERS: [PdDecider; 4] = [
        PdDecider::Aggregated,
        PdDecider::Always,
        PdDecider::Threshold,
        PdDecider::Cost,
    ];

    /// The name reports use: the policy's, `aggregated`, or `pd-<decider>`.
    pub fn name(self) -> String {
        match self {
            Self::Policy(p) => p.as_str().to_string(),
            Self::Aggregated => "aggregated".to_string(),
            Self::Pd(d) => format!("pd-{}", d.as_str()),
        }
    }

    /// The routing policy the routers run.
    pub fn policy(self) -> Policy {
        match self {
            Self::Policy(p) => p,
            Self::Aggregated | Self::Pd(_) => Policy::Kvgate,
        }
    }

    /// The decider, for a P/D arm.
    pub fn decider(self) -> Option<PdDecider> {
        match self {
            Self::Pd(d) => Some(d),
            _ => None,
        }
    }
}

/// The hardware class a router is told an engine is.
#[derive(Clone, Debug, PartialEq)]
pub struct DeclaredHardware {
    /// Class name, a key of the router's `Tuning::hardware`.
    pub class: String,
    /// That class's prior, registered in every router's hardware map; `None`: the router's own
    /// (`h100`, `a100`).
    pub prior: Option<HardwarePrior>,
}

/// How a Kubernetes Service spreads requests over router replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaSpread {
    /// Round-robin (kube-proxy IPVS `rr`, most L7 proxies).
    #[default]
    RoundRobin,
    /// Uniformly random (kube-proxy iptables mode).
    Random,
}

impl DesConfig {
    /// Scrape interval, metrics delay and KV-event delay of replica `i`, µs.
    pub fn replica_delays_us(&self, i: usize) -> (u64, u64, u64) {
        let r = self.router_replicas.max(1) as f64;
        let at = |lo: u64, hi: u64| {
            let hi = hi.max(lo);
            let ms = lo as f64 + (hi - lo) as f64 * (i as f64 + 0.5) / r;
            if hi == lo {
                lo * 1000
            } else {
                (ms * 1000.0).round() as u64
            }
        };
        (
            at(self.scrape_interval_ms.max(1), self.scrape_interval_max_ms),
            at(self.metrics_delay_ms, self.metrics_delay_max_ms),
            at(self.kv_event_delay_ms, self.kv_event_delay_max_ms),
        )
    }
}

impl DesConfig {
    /// `n` identical H100 engines with default signal delays.
    pub fn homogeneous(n: usize, engine: EngineConfig) -> Self {
        Self {
            engines: vec![engine.clone(); n],
            scrape_interval_ms: 100,
            metrics_delay_ms: 20,
            kv_event_delay_ms: 10,
            scrape_interval_max_ms: 100,
            metrics_delay_max_ms: 20,
            kv_event_delay_max_ms: 10,
            router_replicas: 1,
            replica_spread: ReplicaSpread::RoundRobin,
            queue_sample_interval_ms: 100,
            seed: 0,
            model: "llama-3.1-8b".to_string(),
            declared: Vec::new(),
            static_priors: false,
            roles: Vec::new(),
            pd: pd_tuning_for(&engine),
        }
    }
}

/// What happened to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestRecord {
    /// Arrival, µs.
    pub arrival_us: u64,
    /// First token, µs (0 if none).
    pub first_token_us: u64,
    /// Completion, µs (0 if not completed).
    pub finish_us: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Engine index that served it (`u32::MAX` if rejected).
    pub engine: u32,
    /// Rejected by the router (shed or no endpoint).
    pub rejected: bool,
    /// Rejected by the engine as invalid for any engine of the fleet (longer than
    /// `max_model_len` or its whole cache): no routing could have served it.
    pub invalid: bool,
    /// Router replica that decided it.
    pub replica: u32,
    /// The TTFT the deciding router predicted when it booked the request, µs
    /// (`Decision::predicted_ttft_us`; `None` for policies that do not predict).
    pub predicted_ttft_us: Option<u64>,
    /// Why the deciding router chose its engine (`None`: not routed, or a live run, whose
    /// gateway decides out of the benchmark's sight).
    pub reason: Option<DecisionReason>,
    /// Prompt tokens the deciding router's index matched on the chosen engine
    /// (`Decision::matched_blocks` × its block size, at most the prompt; `None` as for
    /// `reason`): against `cached_tokens`, what it expected the engine to hold.
    pub matched_tokens: Option<u32>,
    /// Split by the P/D decider: prefilled on `prefill_engine`, its KV moved to `engine`.
    pub split: bool,
    /// Engine that prefilled a split request (`u32::MAX` otherwise).
    pub prefill_engine: u32,
    /// Prompt tokens whose KV the decode engine loaded from the prefill engine.
    pub transfer_tokens: u32,
    /// From the decode engine allocating the blocks to the transfer completing, µs.
    pub transfer_us: u64,
    /// The longest wait between two of its output tokens, µs: a decode stalled by a prefill
    /// sharing its engine's steps shows here, where the mean TPOT dilutes it.
    pub max_itl_us: u64,
    /// Where in its engine's step cycle it arrived, `(wait, step)` µs
    /// ([`kvgate_engine::Engine::arrival_phase_us`]), read at its first token; `None` without
    /// one.
    pub arrival_phase_us: Option<(u64, u64)>,
}

impl RequestRecord {
    /// Records what the deciding router said about the engine it chose: its predicted TTFT,
    /// its reason and how much of the prompt its index matched there (`block_size`: the
    /// router's).
    fn note_decision(&mut self, d: &Decision, block_size: u32) {
        self.predicted_ttft_us = d.predicted_ttft_us;
        self.reason = Some(d.reason);
        self.matched_tokens = Some(
            d.matched_blocks
                .saturating_mul(block_size)
                .min(self.prompt_tokens),
        );
    }
}

/// The true waiting queue of every engine at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSample {
    /// Virtual time, µs.
    pub t_us: u64,
    /// Waiting requests per engine.
    pub waiting: Vec<u32>,
}

/// Everything measured in one policy's run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyRun {
    /// Policy name.
    pub policy: String,
    /// One record per workload request, in workload order.
    pub requests: Vec<RequestRecord>,
    /// Uncached prompt tokens each engine prefilled.
    pub prefill_tokens_per_engine: Vec<u64>,
    /// Requests each engine received.
    pub requests_per_engine: Vec<u64>,
    /// Preemptions summed over engines.
    pub preemptions: u64,
    /// Virtual time at which the last request finished, µs.
    pub makespan_us: u64,
    /// Router replicas that decided.
    pub router_replicas: usize,
    /// Per-engine waiting queues over time (every `queue_sample_interval_ms` while requests are
    /// outstanding).
    pub queue_samples: Vec<QueueSample>,
    /// The step-time coefficients router replica 0 priced each engine with at the end of the
    /// run, in engine order: what it learnt (`EndpointView::step_coefficients`).
    pub step_models: Vec<StepFit>,
    /// Each engine's role in this run, in engine order.
    pub roles: Vec<Role>,
    /// Where each engine's prompt tokens came from, in engine order (its own counters).
    pub prompt_sources: Vec<PromptSources>,
}

/// One engine's prompt tokens by source, as vLLM counts them
/// (`vllm:prompt_tokens_by_source_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PromptSources {
    /// Prefilled by this engine.
    pub local_compute: u64,
    /// Found in this engine's prefix cache.
    pub local_cache_hit: u64,
    /// Loaded from a prefill engine.
    pub external_kv_transfer: u64,
}

/// The step-time coefficients a router prices one endpoint with, and what they rest on.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct StepFit {
    /// β0, µs per step.
    pub step_base_us: f64,
    /// β1, µs per prefill token.
    pub prefill_us_per_token: f64,
    /// β2, µs per running sequence per step.
    pub decode_us_per_token: f64,
    /// β3, µs per attention pair of a prefill token and an earlier token of its sequence.
    pub attention_us_per_pair: f64,
    /// First tokens they were learnt from (0: the declared prior).
    pub observations: u64,
    /// The prefill speed factor on top (1 = as learnt).
    pub prefill_speed: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A step of engine `e` ends (stale if the engine's wake time moved).
    Step(usize),
    /// Workload request `i` arrives.
    Arrival(usize),
    /// Replica `r` samples engine `e`'s metrics.
    Scrape(usize, usize),
    /// Record every engine's waiting queue.
    QueueSample,
    /// Deliver pending observation `k`.
    Deliver(usize),
    /// The KV of decode-side request `id` has arrived at engine `e`.
    TransferDone(usize, u64),
}

enum Pending {
    /// Replica, engine, sampling time, sample.
    Metrics(usize, usize, u64, Box<MetricsSample>),
    /// Replica, engine, batch.
    Kv(usize, usize, Arc<KvEventBatch>),
}

struct InFlight {
    workload_idx: usize,
    engine: usize,
    replica: usize,
    leg: Leg,
    /// Its latest output token, µs.
    last_token_us: u64,
}

/// Which part of a request an engine request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leg {
    /// The whole request on one engine.
    Whole,
    /// The prefill leg of a split request (one token, blocks held for the decode engine).
    Prefill,
    /// The decode leg of a split request (loads the prompt's KV, then generates).
    Decode,
}

/// Engine and router id of a split request's prefill leg: the workload index with this bit set,
/// so the two legs never share an id in any engine or router.
const PREFILL_LEG: u64 = 1 << 62;

/// A split request between its arrival and its decode leg's admission.
struct Handoff {
    prefill_engine: usize,
    decode_engine: usize,
    tokens: Vec<u32>,
    hashes: Arc<[BlockHash]>,
}

struct Fleet<'a> {
    engines: &'a [Engine],
    keys: &'a HashMap<u64, Vec<u64>>,
}

impl OracleView for Fleet<'_> {
    fn true_load(&self, id: EndpointId, req: &RoutingRequest) -> TrueLoad {
        let e = &self.engines[id.0 as usize];
        let stats = e.stats();
        TrueLoad {
            queued_prefill_tokens: e.queued_prefill_tokens(),
            queued_prefill_pairs: e.queued_prefill_pairs(),
            running: e.num_running() as u32,
            waiting: e.num_waiting() as u32,
            kv_usage: stats.kv_usage,
            cached_prefix_tokens: self
                .keys
                .get(&req.id)
                .map_or(0, |k| e.cached_prefix_tokens(k) as u32),
        }
    }
}

fn sample_of(e: &Engine) -> MetricsSample {
    let s = e.stats();
    MetricsSample {
        running: s.running,
        waiting: s.waiting,
        kv_usage: Some(s.kv_usage),
        block_size: Some(s.block_size),
        kv_capacity_blocks: Some(s.num_gpu_blocks),
        prefix_cache_queries_tokens: Some(s.prefix_cache_queries_tokens as f64),
        prefix_cache_hits_tokens: Some(s.prefix_cache_hits_tokens as f64),
        first_tokens_total: Some(s.ttft.count as f64),
        preemptions_total: Some(s.preemptions_total as f64),
        prompt_tokens_total: Some(s.prompt_tokens_total as f64),
        generation_tokens_total: Some(s.generation_tokens_total as f64),
        ..MetricsSample::default()
    }
}

fn to_core_event(ev: KvEvent) -> CoreKvEvent {
    match ev {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_name,
            extra_keys,
        } => CoreKvEvent::BlockStored {
            extra_keys: extra_keys
                .iter()
                .enumerate()
                .map(|(i, values)| {
                    kvgate_core::BlockExtra::from_untagged(
                        values.as_deref().unwrap_or_default(),
                        i == 0 && parent_block_hash.is_none(),
                        lora_name.as_deref(),
                    )
                })
                .collect(),
            block_hashes,
            parent: parent_block_hash,
            token_ids,
            block_size,
            lora_name,
            tier: Default::default(),
        },
        KvEvent::BlockRemoved { block_hashes } => CoreKvEvent::BlockRemoved {
            block_hashes,
            tier: Default::default(),
        },
        KvEvent::AllBlocksCleared => CoreKvEvent::AllBlocksCleared,
    }
}

/// Progress callback: called with the number of finished requests so far.
pub type Progress<'a> = &'a dyn Fn(u64);

/// Runs `workload` through the fleet with `policy` and returns what happened.
pub fn run_policy(
    workload: &Workload,
    policy: Policy,
    cfg: &DesConfig,
    progress: Option<Progress<'_>>,
) -> Result<PolicyRun, BenchError> {
    run_arm(workload, Arm::Policy(policy), cfg, progress)
}

/// Runs `workload` through the fleet as `arm` says and returns what happened.
///
/// A P/D arm ([`Arm::Pd`]) gives each engine its role from [`DesConfig::roles`] and decides
/// each request with [`Router::pick_pd`]. A request kept whole runs as under any policy. A split
/// request runs as vLLM's NixlConnector behind llm-d's sidecar runs it: the prefill leg (one
/// token, `do_remote_decode`) goes to the prefill engine, which keeps its blocks when it
/// finishes; then the decode leg (`do_remote_prefill`, the client's `max_tokens`) goes to the
/// decode engine, which allocates blocks for the prompt it lacks when its scheduler reaches the
/// request; the transfer of those tokens takes the decode engine's link time
/// ([`kvgate_engine::KvTransferConfig::transfer_us`]) from that moment; on arrival the decode
/// engine computes the last prompt token and generates, and the prefill engine frees the held
/// blocks. Transfers do not contend for the link (one transfer of a long prompt is a few percent
/// of a 400 Gb/s link's second; a prefill engine cannot produce KV faster than its link drains
/// it). Each leg is reported to the booking router under its own id; the client's first token is
/// the decode engine's.
pub fn run_arm(
    workload: &Workload,
    arm: Arm,
    cfg: &DesConfig,
    progress: Option<Progress<'_>>,
) -> Result<PolicyRun, BenchError> {
    if cfg.engines.is_empty() {
        return Err(BenchError::NoEngines);
    }
    if cfg.router_replicas == 0 {
        return Err(BenchError::InvalidArgument(
            "router replicas must be at least 1",
        ));
    }
    let policy = arm.policy();
    let decider = arm.decider();
    let policy_err = |source| BenchError::Policy {
        policy: arm.name(),
        source,
    };
    if !cfg.declared.is_empty() && cfg.declared.len() != cfg.engines.len() {
        return Err(BenchError::InvalidArgument(
            "declared hardware must name every engine or none",
        ));
    }
    let roles: Vec<Role> = match decider {
        Some(_) if !cfg.roles.is_empty() => {
            if cfg.roles.len() != cfg.engines.len() {
                return Err(BenchError::InvalidArgument(
                    "P/D roles must name every engine or none",
                ));
            }
            cfg.roles.clone()
        }
        _ => vec![Role::Both; cfg.engines.len()],
    };
    let mut router_cfg = RouterConfig::for_preset(policy).map_err(policy_err)?;
    if cfg.static_priors {
        router_cfg.tuning.learn_step_model = false;
    }
    for d in &cfg.declared {
        if let Some(prior) = d.prior {
            router_cfg.tuning.hardware.insert(d.class.clone(), prior);
        }
    }
    router_cfg.tuning.pd = PdTuning {
        decider: decider.unwrap_or_default(),
        ..cfg.pd
    };
    let replicas = cfg.router_replicas;
    let mut routers = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        routers.push(Router::new(router_cfg.clone()).map_err(policy_err)?);
    }
    let oracle = policy == Policy::Oracle;
    let mut engines = Vec::with_capacity(cfg.engines.len());
    // Every replica adds the endpoints in the same order, so ids agree across replicas.
    let mut ids = Vec::with_capacity(cfg.engines.len());
    for (i, ec) in cfg.engines.iter().enumerate() {
        engines.push(Engine::new(ec.clone()).map_err(|source| BenchError::Engine { source })?);
        let mut spec = EndpointSpec::new(format!("engine-{i}"), cfg.model.clone());
        spec.hardware_class = match cfg.declared.get(i) {
            Some(d) => d.class.clone(),
            None if ec.step == kvgate_engine::StepModel::A100_LLAMA31_8B => "a100".into(),
            None => "h100".into(),
        };
        spec.role = roles[i];
        let mut id = None;
        for router in &mut routers {
            id = Some(router.add_endpoint(0, spec.clone()));
        }
        ids.push(id.expect("at least one replica"));
    }
    let first = &cfg.engines[0];
    // The engines' own hashes (passed to them precomputed, and read by the oracle) and the
    // router's keys are different things: the router keys by its own chain over the same tokens
    // and learns the engines' hashes from their `BlockStored` events, as in production.
    let hasher = first.block_hasher();
    let router_block_size = first.block_size as u32;
    let cached = workload.total_prompt_tokens() <= CACHE_MAX_PROMPT_TOKENS;
    let slots = cached.then(|| {
        let key = PrepareKey {
            engine_block_size: first.block_size,
            engine_hash: (
                format!("{:?}", first.prefix_caching_hash_algo),
                first.hash_seed.clone(),
                first.sha256_secret,
            ),
            router_block_size,
        };
        workload.cache.slots(&key, workload.requests.len())
    });
    // Replica 0 keeps the run's seed, so a one-replica run is the run it always was.
    let mut rngs: Vec<ChaCha8Rng> = (0..replicas as u64)
        .map(|r| ChaCha8Rng::seed_from_u64(cfg.seed ^ r.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect();
    let mut spread_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5E2F_1CE5);
    let delays: Vec<(u64, u64, u64)> = (0..replicas).map(|r| cfg.replica_delays_us(r)).collect();

    let n = cfg.engines.len();
    let mut queue: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut push = |q: &mut BinaryHeap<Reverse<(u64, u64, Ev)>>, t: u64, ev: Ev| {
        order += 1;
        q.push(Reverse((t, order, ev)));
    };
    for (i, r) in workload.requests.iter().enumerate() {
        push(&mut queue, r.arrival_us, Ev::Arrival(i));
    }
    if !oracle {
        for (r, &(interval_us, _, _)) in delays.iter().enumerate() {
            let phase = interval_us * r as u64 / replicas as u64;
            for e in 0..n {
                push(&mut queue, phase, Ev::Scrape(r, e));
            }
        }
    }
    let sample_every_us = cfg.queue_sample_interval_ms.max(1) * 1000;
    push(&mut queue, 0, Ev::QueueSample);

    let mut run = PolicyRun {
        policy: arm.name(),
        requests: workload
            .requests
            .iter()
            .map(|r| RequestRecord {
                arrival_us: r.arrival_us,
                prompt_tokens: r.prompt_tokens(),
                engine: u32::MAX,
                prefill_engine: u32::MAX,
                ..Default::default()
            })
            .collect(),
        prefill_tokens_per_engine: vec![0; n],
        requests_per_engine: vec![0; n],
        router_replicas: replicas,
        roles: roles.clone(),
        ..Default::default()
    };
    let mut wake: Vec<Option<u64>> = vec![None; n];
    let mut kv_seq = vec![0u64; n];
    let mut pending: Vec<Option<Pending>> = Vec::new();
    let mut free_pending: Vec<usize> = Vec::new();
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let mut handoffs: HashMap<usize, Handoff> = HashMap::new();
    // Decode-side request id → (prefill engine, when its blocks were allocated).
    let mut transfers: HashMap<u64, (usize, u64)> = HashMap::new();
    let mut oracle_keys: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut outputs = Vec::new();
    // Split requests whose prefill leg just finished, waiting to be sent to their decode engine.
    let mut ready_for_decode: Vec<usize> = Vec::new();
    let mut touched: Vec<usize> = Vec::new();
    let mut done = 0usize;
    let total = workload.requests.len();

    while let Some(Reverse((now, _, ev))) = queue.pop() {
        touched.clear();
        match ev {
            Ev::Arrival(i) => {
                let w = &workload.requests[i];
                let req_id = i as u64;
                let replica = match cfg.replica_spread {
                    _ if replicas == 1 => 0,
                    ReplicaSpread::RoundRobin => i % replicas,
                    ReplicaSpread::Random => spread_rng.random_range(0..replicas),
                };
                run.requests[i].replica = replica as u32;
                let router = &mut routers[replica];
                let derive = || Arc::new(prepare(w.tokens(), &hasher, router_block_size));
                let prompt = match &slots {
                    Some(slots) => Arc::clone(slots[i].get_or_init(derive)),
                    None => derive(),
                };
                let tokens = prompt.tokens.to_vec();
                let hashes = Arc::clone(&prompt.hashes);
                let req = RoutingRequest {
                    id: req_id,
                    model: cfg.model.clone(),
                    lora: None,
                    prompt_tokens: tokens.len() as u32,
                    keys: prompt.keys.clone(),
                    max_tokens: Some(w.output_tokens),
                    priority: 0,
                    session_id: w.session.map(|s| s.to_string()),
                    subset: None,
                    phase: Default::default(),
                    explain: false,
                };
                if oracle {
                    oracle_keys.insert(req_id, hashes.iter().map(|h| h.key()).collect());
                }
                let picked = {
                    let fleet = Fleet {
                        engines: &engines,
                        keys: &oracle_keys,
                    };
                    let view = if oracle {
                        Some(&fleet as &dyn OracleView)
                    } else {
                        None
                    };
                    match decider {
                        None => router
                            .pick(now, &req, &mut rngs[replica], view)
                            .map(|d| (d, None)),
                        Some(_) => router
                            .pick_pd(now, &req, &mut rngs[replica], view)
                            .map(|pd| (pd.decode, pd.prefill)),
                    }
                };
                oracle_keys.remove(&req_id);
                let engine_of = |d: &Decision| {
                    ids.iter()
                        .position(|&id| id == d.primary)
                        .ok_or(BenchError::UnknownEndpoint)
                };
                let admitted = match picked {
                    Ok((decision, None)) => {
                        router.book(now, &req, &decision);
                        let e = engine_of(&decision)?;
                        engines[e].advance(now, &mut outputs);
                        touched.push(e);
                        let admitted = engines[e].add_request(
                            now,
                            EngineRequest {
                                id: req_id,
                                prompt_tokens: tokens,
                                max_tokens: w.output_tokens,
                                lora_name: None,
                                cache_salt: None,
                                block_hashes: Some(hashes),
                            },
                        );
                        if admitted.is_ok() {
                            run.requests[i].engine = e as u32;
                            run.requests[i].note_decision(&decision, router_block_size);
                            run.requests_per_engine[e] += 1;
                            inflight.insert(
                                req_id,
                                InFlight {
                                    workload_idx: i,
                                    engine: e,
                                    replica,
                                    leg: Leg::Whole,
                                    last_token_us: 0,
                                },
                            );
                        }
                        Some(admitted.map_err(|e| (e, vec![req_id])))
                    }
                    Ok((decode, Some(prefill))) => {
                        let prefill_id = req_id | PREFILL_LEG;
                        router.book(now, &req.leg(Phase::Decode, req_id), &decode);
                        router.book(now, &req.leg(Phase::Prefill, prefill_id), &prefill);
                        let (d, p) = (engine_of(&decode)?, engine_of(&prefill)?);
                        engines[p].advance(now, &mut outputs);
                        touched.push(p);
                        // The prefill leg as llm-d's sidecar sends it: `do_remote_decode`, one
                        // token.
                        let admitted = engines[p].add_remote_decode(
                            now,
                            EngineRequest {
                                id: prefill_id,
                                prompt_tokens: tokens.clone(),
                                max_tokens: 1,
                                lora_name: None,
                                cache_salt: None,
                                block_hashes: Some(Arc::clone(&hashes)),
                            },
                        );
                        if admitted.is_ok() {
                            let rec = &mut run.requests[i];
                            rec.engine = d as u32;
                            rec.prefill_engine = p as u32;
                            rec.split = true;
                            rec.note_decision(&decode, router_block_size);
                            run.requests_per_engine[p] += 1;
                            inflight.insert(
                                prefill_id,
                                InFlight {
                                    workload_idx: i,
                                    engine: p,
                                    replica,
                                    leg: Leg::Prefill,
                                    last_token_us: 0,
                                },
                            );
                            handoffs.insert(
                                i,
                                Handoff {
                                    prefill_engine: p,
                                    decode_engine: d,
                                    tokens,
                                    hashes,
                                },
                            );
                        }
                        Some(admitted.map_err(|e| (e, vec![prefill_id, req_id])))
                    }
                    Err(_) => None,
                };
                match admitted {
                    Some(Ok(())) => {}
                    // The request itself is invalid for the engine (longer than
                    // max_model_len, or larger than its whole cache): vLLM answers 400
                    // and the engine is not at fault, so the router's booking ends as an
                    // answered request and the run goes on with it counted as rejected.
                    Some(Err((source, booked))) if !source.is_retryable() => {
                        for id in booked {
                            router.on_finish(id, now, &Outcome::default());
                        }
                        run.requests[i].rejected = true;
                        run.requests[i].invalid = true;
                        done += 1;
                    }
                    Some(Err((source, _))) => return Err(BenchError::Engine { source }),
                    None => {
                        run.requests[i].rejected = true;
                        done += 1;
                    }
                }
            }
            Ev::Step(e) => {
                if wake[e] == Some(now) {
                    wake[e] = None;
                    engines[e].advance(now, &mut outputs);
                    touched.push(e);
                }
                // else superseded
            }
            Ev::TransferDone(d, id) => {
                if let Some((p, started)) = transfers.remove(&id) {
                    run.requests[id as usize].transfer_us = now - started;
                    engines[d].advance(now, &mut outputs);
                    let loaded = engines[d].remote_kv_ready(now, id);
                    assert!(loaded, "a transfer completes only for a loading request");
                    touched.push(d);
                    // NIXL's completion notification: the prefill engine frees the blocks.
                    engines[p].advance(now, &mut outputs);
                    engines[p].release_kv_hold(now, id | PREFILL_LEG);
                    touched.push(p);
                }
            }
            Ev::Scrape(r, e) => {
                if done < total {
                    let (interval_us, metrics_delay_us, _) = delays[r];
                    let slot = Pending::Metrics(r, e, now, Box::new(sample_of(&engines[e])));
                    let k = stash(&mut pending, &mut free_pending, slot);
                    push(&mut queue, now + metrics_delay_us, Ev::Deliver(k));
                    push(&mut queue, now + interval_us, Ev::Scrape(r, e));
                }
            }
            Ev::QueueSample => {
                if done < total {
                    run.queue_samples.push(QueueSample {
                        t_us: now,
                        waiting: engines.iter().map(|e| e.num_waiting() as u32).collect(),
                    });
                    // Sampling goes on while work drains, so the tail is seen too.
                    push(&mut queue, now + sample_every_us, Ev::QueueSample);
                }
            }
            Ev::Deliver(k) => {
                match pending[k].take() {
                    Some(Pending::Metrics(r, e, taken_at, sample)) => {
                        routers[r].observe_metrics(ids[e], taken_at, &sample);
                    }
                    Some(Pending::Kv(r, e, batch)) => {
                        routers[r].observe_kv_batch(ids[e], now, &batch);
                    }
                    None => {}
                }
                free_pending.push(k);
            }
        }

        // Outputs of whatever engine moved: feed the booking replica's own accounting (it
        // proxies the stream) and the records. Handing a finished prefill leg to its decode
        // engine moves that engine too, so this runs until nothing is left.
        loop {
            for out in outputs.drain(..) {
                match out {
                    Output::Token {
                        id, at_us, index, ..
                    } => {
                        let Some(f) = inflight.get_mut(&id) else {
                            continue;
                        };
                        let rec = &mut run.requests[f.workload_idx];
                        if index == 0 {
                            if f.leg != Leg::Prefill {
                                rec.first_token_us = at_us;
                                rec.arrival_phase_us = engines[f.engine].arrival_phase_us(id);
                            }
                            routers[f.replica].on_first_token(id, at_us);
                        } else {
                            rec.max_itl_us = rec.max_itl_us.max(at_us - f.last_token_us);
                        }
                        f.last_token_us = at_us;
                    }
                    Output::Finished {
                        id,
                        at_us,
                        reason,
                        usage,
                    } => {
                        let Some(f) = inflight.remove(&id) else {
                            continue;
                        };
                        debug_assert_eq!(reason, FinishReason::Length);
                        run.prefill_tokens_per_engine[f.engine] +=
                            u64::from(usage.prompt_tokens.saturating_sub(usage.cached_tokens));
                        routers[f.replica].on_finish(
                            id,
                            at_us,
                            &Outcome {
                                output_tokens: usage.completion_tokens,
                                prompt_tokens: Some(usage.prompt_tokens),
                                cached_tokens: Some(usage.cached_tokens),
                                ..Default::default()
                            },
                        );
                        let rec = &mut run.requests[f.workload_idx];
                        match f.leg {
                            Leg::Prefill => {
                                // What the fleet found cached is the prefill engine's hit; the
                                // decode engine counts the transferred prompt as cached too.
                                rec.cached_tokens = usage.cached_tokens;
                                ready_for_decode.push(f.workload_idx);
                                continue;
                            }
                            Leg::Whole => rec.cached_tokens = usage.cached_tokens,
                            Leg::Decode => {}
                        }
                        rec.finish_us = at_us;
                        rec.output_tokens = usage.completion_tokens;
                        run.makespan_us = run.makespan_us.max(at_us);
                        done += 1;
                        if let Some(p) = progress {
                            p(done as u64);
                        }
                    }
                }
            }
            if ready_for_decode.is_empty() {
                break;
            }
            for i in ready_for_decode.drain(..) {
                let h = handoffs.remove(&i).expect("a split request has a handoff");
                let d = h.decode_engine;
                let w = &workload.requests[i];
                engines[d].advance(now, &mut outputs);
                touched.push(d);
                // The decode leg as the sidecar sends it: `do_remote_prefill`, the client's
                // `max_tokens`, the whole prompt.
                engines[d]
                    .add_remote_prefill(
                        now,
                        EngineRequest {
                            id: i as u64,
                            prompt_tokens: h.tokens,
                            max_tokens: w.output_tokens,
                            lora_name: None,
                            cache_salt: None,
                            block_hashes: Some(h.hashes),
                        },
                    )
                    .map_err(|source| BenchError::Engine { source })?;
                run.requests_per_engine[d] += 1;
                transfers.insert(i as u64, (h.prefill_engine, u64::MAX));
                inflight.insert(
                    i as u64,
                    InFlight {
                        workload_idx: i,
                        engine: d,
                        replica: run.requests[i].replica as usize,
                        leg: Leg::Decode,
                        last_token_us: 0,
                    },
                );
            }
        }

        touched.sort_unstable();
        touched.dedup();
        for &e in &touched {
            for load in engines[e].take_kv_loads() {
                // The decode engine has allocated the blocks: the read starts now.
                if let Some(t) = transfers.get_mut(&load.id) {
                    t.1 = load.at_us;
                    run.requests[load.id as usize].transfer_tokens = load.load_tokens;
                    let arrives = load.at_us
                        + cfg.engines[e]
                            .kv_transfer
                            .transfer_us(u64::from(load.load_tokens));
                    push(&mut queue, arrives.max(now), Ev::TransferDone(e, load.id));
                }
            }
            let events = engines[e].take_kv_events();
            if !events.is_empty() {
                let batch = Arc::new(KvEventBatch {
                    seq: kv_seq[e],
                    ts: now as f64 / 1e6,
                    events: events.into_iter().map(to_core_event).collect(),
                    data_parallel_rank: None,
                });
                kv_seq[e] += 1;
                for (r, &(_, _, kv_delay_us)) in delays.iter().enumerate() {
                    if oracle || kv_delay_us == 0 {
                        routers[r].observe_kv_batch(ids[e], now, &batch);
                    } else {
                        let slot = Pending::Kv(r, e, Arc::clone(&batch));
                        let k = stash(&mut pending, &mut free_pending, slot);
                        push(&mut queue, now + kv_delay_us, Ev::Deliver(k));
                    }
                }
            }
            let next = engines[e].next_wakeup_us();
            if next != wake[e] {
                wake[e] = next;
                if let Some(t) = next {
                    push(&mut queue, t.max(now), Ev::Step(e));
                }
            }
        }
    }

    run.preemptions = engines.iter().map(|e| e.stats().preemptions_total).sum();
    run.prompt_sources = engines
        .iter()
        .map(|e| {
            let s = e.stats();
            PromptSources {
                local_compute: s.prompt_tokens_local_compute,
                local_cache_hit: s.prompt_tokens_local_cache_hit,
                external_kv_transfer: s.prompt_tokens_external_kv_transfer,
            }
        })
        .collect();
    run.step_models = vec![StepFit::default(); n];
    for view in routers[0].endpoints() {
        if let Some(e) = ids.iter().position(|&id| id == view.id) {
            let c = view.step_coefficients;
            run.step_models[e] = StepFit {
                step_base_us: c.step_base_us,
                prefill_us_per_token: c.prefill_us_per_token,
                decode_us_per_token: c.decode_us_per_token,
                attention_us_per_pair: c.attention_us_per_pair,
                observations: view.step_observations,
                prefill_speed: view.prefill_speed,
            };
        }
    }
    Ok(run)
}

fn stash(pending: &mut Vec<Option<Pending>>, free: &mut Vec<usize>, p: Pending) -> usize {
    if let Some(k) = free.pop() {
        pending[k] = Some(p);
        k
    } else {
        pending.push(Some(p));
        pending.len() - 1
    }
}
