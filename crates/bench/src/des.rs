//! Discrete-event mode: the engine model and the routing core on a virtual clock.
//!
//! Engines are [`kvgate_engine::Engine`]s; the router is [`kvgate_core::Router`] with the chosen
//! policy, fed the way a real deployment feeds it: metrics are sampled every
//! `scrape_interval_ms` and delivered `metrics_delay_ms` later, KV events are delivered
//! `kv_event_delay_ms` after the engine step that produced them, and the router's own
//! accounting sees first tokens and completions when they happen (a gateway sees every stream).
//! Staleness is therefore part of every experiment. The oracle policy is the one exception: it
//! reads true engine state at decision time, which is what makes it an upper bound.
//!
//! Everything is driven by one event queue ordered by (time, insertion order), so a seed gives
//! the same report bit for bit. Prompt tokens and block hashes are computed when a request
//! arrives and dropped when it finishes, so memory follows the requests in flight, not the
//! trace size.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use kvgate_core::endpoint::{EndpointId, EndpointSpec};
use kvgate_core::observe::{KvEvent as CoreKvEvent, KvEventBatch, MetricsSample};
use kvgate_core::{
    OracleView, Outcome, Policy, PromptKeys, Router, RouterConfig, RoutingRequest, TrueLoad,
};
use kvgate_engine::{Engine, EngineConfig, EngineRequest, FinishReason, KvEvent, Output};
use kvgate_tokens::ExtraKeys;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::BenchError;
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
    /// Seed of the router's randomness.
    pub seed: u64,
    /// Model name every engine serves.
    pub model: String,
}

impl DesConfig {
    /// `n` identical H100 engines with default signal delays.
    pub fn homogeneous(n: usize, engine: EngineConfig) -> Self {
        Self {
            engines: vec![engine; n],
            scrape_interval_ms: 100,
            metrics_delay_ms: 20,
            kv_event_delay_ms: 10,
            seed: 0,
            model: "llama-3.1-8b".to_string(),
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A step of engine `e` ends (stale if the engine's wake time moved).
    Step(usize),
    /// Workload request `i` arrives.
    Arrival(usize),
    /// Sample engine `e`'s metrics.
    Scrape(usize),
    /// Deliver pending observation `k`.
    Deliver(usize),
}

enum Pending {
    Metrics(usize, u64, MetricsSample),
    Kv(usize, KvEventBatch),
}

struct InFlight {
    workload_idx: usize,
    engine: usize,
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
    let router_cfg = RouterConfig::for_preset(policy).map_err(|source| BenchError::Policy {
        policy: policy.to_string(),
        source,
    })?;
    let mut router = Router::new(router_cfg).map_err(|source| BenchError::Policy {
        policy: policy.to_string(),
        source,
    })?;
    let oracle = policy == Policy::Oracle;
    let mut engines = Vec::with_capacity(cfg.engines.len());
    let mut ids = Vec::with_capacity(cfg.engines.len());
    for (i, ec) in cfg.engines.iter().enumerate() {
        engines.push(Engine::new(ec.clone()).map_err(|source| BenchError::Engine { source })?);
        let mut spec = EndpointSpec::new(format!("engine-{i}"), cfg.model.clone());
        spec.hardware_class = if ec.step == kvgate_engine::StepModel::A100_LLAMA31_8B {
            "a100".into()
        } else {
            "h100".into()
        };
        ids.push(router.add_endpoint(0, spec));
    }
    let first = &cfg.engines[0];
    // The engines' own hashes (passed to them precomputed, and read by the oracle) and the
    // router's keys are different things: the router keys by its own chain over the same tokens
    // and learns the engines' hashes from their `BlockStored` events, as in production.
    let hasher = first.block_hasher();
    let router_block_size = first.block_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);

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
        for e in 0..n {
            push(&mut queue, 0, Ev::Scrape(e));
        }
    }

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
    let delay_kv = if oracle {
        0
    } else {
        cfg.kv_event_delay_ms * 1000
    };

    while let Some(Reverse((now, _, ev))) = queue.pop() {
        let touched: Option<usize> = match ev {
            Ev::Arrival(i) => {
                let w = &workload.requests[i];
                let req_id = i as u64;
                let tokens = w.tokens();
                let hashes: Arc<[kvgate_tokens::BlockHash]> =
                    hasher.hashes(&tokens, ExtraKeys::default()).into();
                let keys: Vec<u64> = hashes.iter().map(|h| h.key()).collect();
                let req = RoutingRequest {
                    id: req_id,
                    model: cfg.model.clone(),
                    lora: None,
                    prompt_tokens: tokens.len() as u32,
                    keys: PromptKeys::from_tokens(
                        &tokens,
                        router_block_size,
                        kvgate_core::KeyScope::default(),
                    ),
                    max_tokens: Some(w.output_tokens),
                    priority: 0,
                    session_id: w.session.map(|s| s.to_string()),
                    subset: None,
                    phase: Default::default(),
                };
                if oracle {
                    oracle_keys.insert(req_id, keys);
                }
                let picked = {
                    let fleet = Fleet {
                        engines: &engines,
                        keys: &oracle_keys,
                    };
                    router.pick(
                        now,
                        &req,
                        &mut rng,
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
                                run.requests_per_engine[e] += 1;
                                inflight.insert(
                                    req_id,
                                    InFlight {
                                        workload_idx: i,
                                        engine: e,
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
            Ev::Scrape(e) => {
                if done < total {
                    let slot = Pending::Metrics(e, now, sample_of(&engines[e]));
                    let k = stash(&mut pending, &mut free_pending, slot);
                    push(
                        &mut queue,
                        now + cfg.metrics_delay_ms * 1000,
                        Ev::Deliver(k),
                    );
                    push(
                        &mut queue,
                        now + cfg.scrape_interval_ms.max(1) * 1000,
                        Ev::Scrape(e),
                    );
                }
                None
            }
            Ev::Deliver(k) => {
                match pending[k].take() {
                    Some(Pending::Metrics(e, taken_at, sample)) => {
                        router.observe_metrics(ids[e], taken_at, &sample);
                    }
                    Some(Pending::Kv(e, batch)) => {
                        router.observe_kv_batch(ids[e], now, &batch);
                    }
                    None => {}
                }
                free_pending.push(k);
                None
            }
        };

        // Outputs of whatever engine moved: feed the router's own accounting and the records.
        for out in outputs.drain(..) {
            match out {
                Output::Token {
                    id, at_us, index, ..
                } => {
                    if index == 0 {
                        if let Some(f) = inflight.get(&id) {
                            run.requests[f.workload_idx].first_token_us = at_us;
                        }
                        router.on_first_token(id, at_us);
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
                        router.on_finish(
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
                let batch = KvEventBatch {
                    seq: kv_seq[e],
                    ts: now as f64 / 1e6,
                    events: events.into_iter().map(to_core_event).collect(),
                    data_parallel_rank: None,
                };
                kv_seq[e] += 1;
                if delay_kv == 0 {
                    router.observe_kv_batch(ids[e], now, &batch);
                } else {
                    let k = stash(&mut pending, &mut free_pending, Pending::Kv(e, batch));
                    push(&mut queue, now + delay_kv, Ev::Deliver(k));
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
