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
//! Everything is driven by one event queue ordered by (time, insertion order), so a seed gives
//! the same report bit for bit. Prompt tokens and block hashes are computed when a request
//! arrives and dropped when it finishes, so memory follows the requests in flight, not the
//! trace size — except for workloads small enough to cache them across runs
//! ([`crate::prepared`]), which a demo or capacity search runs dozens of times.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use kvgate_core::cost::HardwarePrior;
use kvgate_core::endpoint::{EndpointId, EndpointSpec};
use kvgate_core::observe::{KvEvent as CoreKvEvent, KvEventBatch, MetricsSample};
use kvgate_core::{OracleView, Outcome, Policy, Router, RouterConfig, RoutingRequest, TrueLoad};
use kvgate_engine::{Engine, EngineConfig, EngineRequest, FinishReason, KvEvent, Output};
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
            engines: vec![engine; n],
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
    if cfg.engines.is_empty() {
        return Err(BenchError::NoEngines);
    }
    if cfg.router_replicas == 0 {
        return Err(BenchError::InvalidArgument(
            "router replicas must be at least 1",
        ));
    }
    let policy_err = |source| BenchError::Policy {
        policy: policy.to_string(),
        source,
    };
    if !cfg.declared.is_empty() && cfg.declared.len() != cfg.engines.len() {
        return Err(BenchError::InvalidArgument(
            "declared hardware must name every engine or none",
        ));
    }
    let mut router_cfg = RouterConfig::for_preset(policy).map_err(policy_err)?;
    if cfg.static_priors {
        router_cfg.tuning.learn_step_model = false;
    }
    for d in &cfg.declared {
        if let Some(prior) = d.prior {
            router_cfg.tuning.hardware.insert(d.class.clone(), prior);
        }
    }
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
        policy: policy.as_str().to_string(),
        requests: workload
            .requests
            .iter()
            .map(|r| RequestRecord {
                arrival_us: r.arrival_us,
                prompt_tokens: r.prompt_tokens(),
                engine: u32::MAX,
                ..Default::default()
            })
            .collect(),
        prefill_tokens_per_engine: vec![0; n],
        requests_per_engine: vec![0; n],
        router_replicas: replicas,
        ..Default::default()
    };
    let mut wake: Vec<Option<u64>> = vec![None; n];
    let mut kv_seq = vec![0u64; n];
    let mut pending: Vec<Option<Pending>> = Vec::new();
    let mut free_pending: Vec<usize> = Vec::new();
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let mut oracle_keys: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut outputs = Vec::new();
    let mut done = 0usize;
    let total = workload.requests.len();

    while let Some(Reverse((now, _, ev))) = queue.pop() {
        let touched: Option<usize> = match ev {
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
                    router.pick(
                        now,
                        &req,
                        &mut rngs[replica],
                        if oracle {
                            Some(&fleet as &dyn OracleView)
                        } else {
                            None
                        },
                    )
                };
                oracle_keys.remove(&req_id);
                match picked {
                    Ok(decision) => {
                        router.book(now, &req, &decision);
                        let e = ids
                            .iter()
                            .position(|&id| id == decision.primary)
                            .ok_or(BenchError::UnknownEndpoint)?;
                        engines[e].advance(now, &mut outputs);
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
                        match admitted {
                            Ok(()) => {
                                run.requests[i].engine = e as u32;
                                run.requests[i].predicted_ttft_us = decision.predicted_ttft_us;
                                run.requests_per_engine[e] += 1;
                                inflight.insert(
                                    req_id,
                                    InFlight {
                                        workload_idx: i,
                                        engine: e,
                                        replica,
                                    },
                                );
                            }
                            // The request itself is invalid for the engine (longer than
                            // max_model_len, or larger than its whole cache): vLLM answers 400
                            // and the engine is not at fault, so the router's booking ends as an
                            // answered request and the run goes on with it counted as rejected.
                            Err(source) if !source.is_retryable() => {
                                router.on_finish(req_id, now, &Outcome::default());
                                run.requests[i].rejected = true;
                                run.requests[i].invalid = true;
                                done += 1;
                            }
                            Err(source) => return Err(BenchError::Engine { source }),
                        }
                        Some(e)
                    }
                    Err(_) => {
                        run.requests[i].rejected = true;
                        done += 1;
                        None
                    }
                }
            }
            Ev::Step(e) => {
                if wake[e] != Some(now) {
                    None // superseded
                } else {
                    wake[e] = None;
                    engines[e].advance(now, &mut outputs);
                    Some(e)
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
                None
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
                None
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
                None
            }
        };

        // Outputs of whatever engine moved: feed the booking replica's own accounting (it
        // proxies the stream) and the records.
        for out in outputs.drain(..) {
            match out {
                Output::Token {
                    id, at_us, index, ..
                } => {
                    if index == 0
                        && let Some(f) = inflight.get(&id)
                    {
                        run.requests[f.workload_idx].first_token_us = at_us;
                        routers[f.replica].on_first_token(id, at_us);
                    }
                }
                Output::Finished {
                    id,
                    at_us,
                    reason,
                    usage,
                } => {
                    if let Some(f) = inflight.remove(&id) {
                        let rec = &mut run.requests[f.workload_idx];
                        rec.finish_us = at_us;
                        rec.cached_tokens = usage.cached_tokens;
                        rec.output_tokens = usage.completion_tokens;
                        run.prefill_tokens_per_engine[f.engine] +=
                            u64::from(usage.prompt_tokens.saturating_sub(usage.cached_tokens));
                        run.makespan_us = run.makespan_us.max(at_us);
                        debug_assert_eq!(reason, FinishReason::Length);
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
                        done += 1;
                        if let Some(p) = progress {
                            p(done as u64);
                        }
                    }
                }
            }
        }

        if let Some(e) = touched {
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
    run.step_models = vec![StepFit::default(); n];
    for view in routers[0].endpoints() {
        if let Some(e) = ids.iter().position(|&id| id == view.id) {
            let c = view.step_coefficients;
            run.step_models[e] = StepFit {
                step_base_us: c.step_base_us,
                prefill_us_per_token: c.prefill_us_per_token,
                decode_us_per_token: c.decode_us_per_token,
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
