//! The scheduling pipeline's roles and every built-in plugin, baselines included.
//!
//! A profile is `filters → scorers → picker`, as in the Gateway API Inference Extension (GIE)
//! and Dynamo. Each plugin states the inputs it [`Needs`] so the host computes only those (a
//! round-robin pick never walks the prefix index). Scorers return one finite number per
//! candidate, higher is better; the host rejects NaN and infinities with
//! [`RouteError::NonFiniteScore`] and sums weighted scores. Pickers choose an index.
//!
//! ## Baselines and what they follow
//! * **GIE default** (gateway-api-inference-extension, `pkg/epp/scheduling/framework/plugins`
//!   and its default `EndpointPickerConfig`): `queue-scorer` weight 2 = `(max − q)/(max − min)`
//!   over the scraped waiting-queue sizes (1 when all equal); `kv-cache-utilization-scorer`
//!   weight 2 = `1 − KV usage`; `prefix-cache-scorer` weight 3 = matched blocks / prompt blocks
//!   on the picker's own approximate index, filled from its decisions, LRU per server
//!   (`lruCapacityPerServer` 31,250, no TTL, at most `maxPrefixBlocksToMatch` 256 blocks);
//!   `max-score-picker` = highest weighted sum, ties broken at random.
//!   `lora-affinity-scorer`: 1 active, 0.8 room to load, 0.6 already waiting, 0 otherwise.
//! * **SGLang cache_aware** (sgl-router `policies/cache_aware.rs`): the system is imbalanced if
//!   `max_load − min_load > balance_abs_threshold` **and** `max_load > balance_rel_threshold ·
//!   min_load`, loads being the router's own in-flight counts; then the least-loaded worker is
//!   chosen. Otherwise the approximate tree (the router's own decisions) gives the best-matching
//!   worker; if its match ratio exceeds `cache_threshold` it is chosen, else the worker with the
//!   smallest tree. Thresholds 0.3 / 64 / 1.5 as this project fixes them (upstream's CLI defaults
//!   have varied between releases). Matching is per 64-byte / 16-token block rather than per
//!   character, the one deliberate difference.
//! * **Dynamo KV router** (`lib/kv-router` `DefaultWorkerSelector`, docs "KV cache routing"):
//!   `logit = overlap_weight · potential_prefill_blocks + potential_active_blocks`, where
//!   prefill blocks are the worker's tracked active prefill tokens plus this request's
//!   uncached tokens, divided by the block size, and active blocks are the worker's tracked
//!   active blocks plus this request's new blocks; both from the router's own accounting, the
//!   overlap from KV events (approximate index when events are not trusted). Temperature 0
//!   (default) takes the lowest logit, ties at random; > 0 samples a softmax over min–max
//!   normalised logits.
//! * **Round-robin, random, least-request, power-of-two**: textbook; least-request and
//!   power-of-two count load as estimated waiting + running (own dispatches + scraped).
//! * **Oracle**: minimises kvgate's routing cost (predicted TTFT plus the load-scaled charge
//!   for new prefill work, see [`crate::cost`]) computed from the simulator's true queue,
//!   running set, KV use and cached prefix; errors without an [`crate::OracleView`]. It thus
//!   bounds what better signals could buy this cost model.
//!
//! ## kvgate's own picker: staleness widens choice
//! The softmax picker samples candidate `i` with probability `∝ exp(−(best − sᵢ) / (|best| · T))`:
//! score gaps are relative to the best score so the temperature is unit-free. `T` starts at
//! `softmax_base_temperature` and grows by `softmax_temperature_per_s` for every second the
//! oldest candidate signal is older than `signal_fresh_us`, capped at `softmax_max_temperature`.
//! With fresh signals it is nearly argmin; as signals age, near-best candidates share the load
//! instead of every router replica piling onto the one that last looked idle. Its hot-prefix
//! rule: if the best prefix holder's predicted queue wait exceeds `hot_prefix_wait_us`, a
//! `hot_prefix_spill_fraction` of requests go to the best-scoring endpoint holding less of the
//! prefix whose own queue wait is below `hot_prefix_target_wait_fraction` of the holder's; it
//! then becomes a holder (bookings record approximate entries). Under uniform overload no
//! endpoint qualifies, so the rule never adds recompute work to an equally long queue.

use rand::{Rng, RngCore};

use crate::config::{FilterKind, PickerKind, ScorerKind, Tuning};
use crate::cost::{CostBreakdown, HardwarePrior};
use crate::endpoint::{EndpointId, EndpointSpec, EndpointState, Role};
use crate::error::RouteError;
use crate::estimate::LoadEstimate;
use crate::observe::MetricsSample;
use crate::request::{DecisionReason, Phase, RoutingRequest, TrueLoad};

/// Inputs a plugin needs the host to compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Prefix match from the best source per endpoint (precise if trusted).
    pub prefix: bool,
    /// Prefix match from approximate entries only.
    pub approx_prefix: bool,
    /// The kvgate cost breakdown (implies `prefix`).
    pub cost: bool,
    /// True state from an oracle.
    pub oracle: bool,
}

impl Needs {
    /// Union.
    pub fn union(self, o: Self) -> Self {
        Self {
            prefix: self.prefix || o.prefix || o.cost || self.cost,
            approx_prefix: self.approx_prefix || o.approx_prefix,
            cost: self.cost || o.cost,
            oracle: self.oracle || o.oracle,
        }
    }
}

/// Everything the host computed about one candidate.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    /// Endpoint id.
    pub id: EndpointId,
    /// Static description.
    pub spec: &'a EndpointSpec,
    /// Lifecycle state.
    pub state: EndpointState,
    /// Last scraped sample, if any.
    pub sample: Option<&'a MetricsSample>,
    /// Load estimate now.
    pub estimate: LoadEstimate,
    /// This router's own queued prefill tokens there (Dynamo's tracked prefill).
    pub own_prefill_tokens: u64,
    /// This router's own active KV blocks there (Dynamo's tracked active blocks).
    pub own_kv_blocks: u64,
    /// Hardware prior.
    pub prior: &'a HardwarePrior,
    /// Calibrated prefill speed factor.
    pub prefill_speed: f64,
    /// Matched prefix blocks, best source (0 unless `Needs::prefix`).
    pub matched_blocks: u32,
    /// Of those, consecutive GPU blocks.
    pub matched_gpu_blocks: u32,
    /// Matched prefix blocks on approximate entries only (0 unless `Needs::approx_prefix`).
    pub approx_matched_blocks: u32,
    /// Live approximate entries of the endpoint (SGLang's tree size).
    pub approx_tree_blocks: usize,
    /// kvgate cost (when `Needs::cost`).
    pub cost: Option<CostBreakdown>,
    /// True state (when `Needs::oracle`).
    pub oracle: Option<TrueLoad>,
}

/// Request-wide context of one pick.
#[derive(Clone, Copy, Debug)]
pub struct PickContext<'a> {
    /// Decision time.
    pub now_us: u64,
    /// The request.
    pub req: &'a RoutingRequest,
    /// Tuning.
    pub tuning: &'a Tuning,
    /// Oldest signal age among candidates, µs (never-scraped endpoints count from their
    /// addition).
    pub max_signal_age_us: u64,
    /// Bookings so far (round-robin position).
    pub rotation: u64,
}

/// What a picker chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    /// Index into the candidate slice.
    pub index: usize,
    /// Why.
    pub reason: DecisionReason,
}

/// Keeps or drops candidates.
pub trait Filter: std::fmt::Debug + Send + Sync {
    /// Plugin name, for errors and metrics.
    fn name(&self) -> &str;
    /// Inputs needed.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Sets `keep[i] = false` for candidates to drop (entries already false stay false).
    fn filter(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]);
}

/// Scores candidates, higher is better; must be finite.
pub trait Scorer: std::fmt::Debug + Send + Sync {
    /// Plugin name.
    fn name(&self) -> &str;
    /// Inputs needed.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Writes one score per candidate into `out` (same length as `cands`).
    fn score(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], out: &mut [f64]);
}

/// Chooses one candidate.
pub trait Picker: std::fmt::Debug + Send + Sync {
    /// Plugin name.
    fn name(&self) -> &str;
    /// Inputs needed.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Chooses among `cands` (non-empty) given total scores.
    fn pick(
        &self,
        ctx: &PickContext<'_>,
        cands: &[Candidate<'_>],
        scores: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError>;
}

/// Whether an endpoint role serves a phase.
pub fn role_serves(role: Role, phase: Phase) -> bool {
    matches!(
        (role, phase),
        (Role::Both, _) | (Role::Prefill, Phase::Prefill) | (Role::Decode, Phase::Decode)
    )
}

fn adapter_active(c: &Candidate<'_>, lora: &str) -> bool {
    c.sample
        .is_some_and(|s| s.running_lora_adapters.iter().any(|a| a == lora))
}

fn adapter_waiting(c: &Candidate<'_>, lora: &str) -> bool {
    c.sample
        .is_some_and(|s| s.waiting_lora_adapters.iter().any(|a| a == lora))
}

fn adapter_room(c: &Candidate<'_>) -> bool {
    c.sample.is_none_or(|s| {
        s.max_lora.is_none_or(|m| {
            (s.running_lora_adapters.len() + s.waiting_lora_adapters.len()) < m as usize
        })
    })
}

/// Argmax of `key` among `idx`, ties broken uniformly at random.
fn argmax_random_ties(
    idx: impl Iterator<Item = usize>,
    key: impl Fn(usize) -> f64,
    rng: &mut dyn RngCore,
) -> Option<usize> {
    let mut best = f64::NEG_INFINITY;
    let mut ties: Vec<usize> = Vec::new();
    for i in idx {
        let k = key(i);
        if k > best {
            best = k;
            ties.clear();
            ties.push(i);
        } else if k == best {
            ties.push(i);
        }
    }
    match ties.len() {
        0 => None,
        1 => Some(ties[0]),
        n => Some(ties[rng.random_range(0..n)]),
    }
}

/// Samples index `i` with weight `w[i]` (non-negative; all zero → uniform).
fn sample_weighted(w: &[f64], rng: &mut dyn RngCore) -> usize {
    let total: f64 = w.iter().sum();
    if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || !total.is_finite() {
        return rng.random_range(0..w.len());
    }
    let mut x = rng.random::<f64>() * total;
    for (i, wi) in w.iter().enumerate() {
        if x < *wi {
            return i;
        }
        x -= wi;
    }
    w.iter().rposition(|v| *v > 0.0).unwrap_or(w.len() - 1)
}

fn load(c: &Candidate<'_>) -> u32 {
    c.estimate.waiting + c.estimate.running
}

/// Why a cost-driven picker chose `c`: for its cached prefix if it holds any of the prompt,
/// otherwise for its cost alone.
fn prefix_or_cost(c: &Candidate<'_>) -> DecisionReason {
    if c.matched_blocks > 0 {
        DecisionReason::PrefixHit
    } else {
        DecisionReason::LeastCost
    }
}

/// Builds a filter from its kind.
pub fn build_filter(k: &FilterKind) -> Box<dyn Filter> {
    match k {
        FilterKind::Role => Box::new(RoleFilter),
        FilterKind::LoraAffinity => Box::new(LoraAffinityFilter),
        FilterKind::Draining => Box::new(DrainingFilter),
        FilterKind::Subset => Box::new(SubsetFilter),
    }
}

/// Builds a scorer from its kind.
pub fn build_scorer(k: &ScorerKind) -> Box<dyn Scorer> {
    match k {
        ScorerKind::Queue => Box::new(QueueScorer),
        ScorerKind::KvCacheUtilization => Box::new(KvCacheUtilizationScorer),
        ScorerKind::PrefixCache { max_prefix_blocks } => Box::new(PrefixCacheScorer {
            max_prefix_blocks: *max_prefix_blocks,
        }),
        ScorerKind::LoraAffinity => Box::new(LoraAffinityScorer),
        ScorerKind::KvgateCost => Box::new(KvgateCostScorer),
        ScorerKind::DynamoCost { overlap_weight } => Box::new(DynamoCostScorer {
            overlap_weight: *overlap_weight,
        }),
        ScorerKind::Oracle => Box::new(OracleScorer),
    }
}

/// Builds a picker from its kind.
pub fn build_picker(k: &PickerKind) -> Box<dyn Picker> {
    match k {
        PickerKind::MaxScore => Box::new(MaxScorePicker),
        PickerKind::Random => Box::new(RandomPicker),
        PickerKind::WeightedRandom => Box::new(WeightedRandomPicker),
        PickerKind::Softmax => Box::new(SoftmaxPicker),
        PickerKind::Dynamo { temperature } => Box::new(DynamoPicker {
            temperature: *temperature,
        }),
        PickerKind::RoundRobin => Box::new(RoundRobinPicker),
        PickerKind::PowerOfTwo => Box::new(PowerOfTwoPicker),
        PickerKind::LeastRequest => Box::new(LeastRequestPicker),
        PickerKind::SglangCacheAware {
            cache_threshold,
            balance_abs_threshold,
            balance_rel_threshold,
        } => Box::new(SglangCacheAwarePicker {
            cache_threshold: *cache_threshold,
            balance_abs_threshold: *balance_abs_threshold,
            balance_rel_threshold: *balance_rel_threshold,
        }),
    }
}

// ---------------------------------------------------------------- filters

/// Keeps endpoints whose role serves the request's phase.
#[derive(Debug)]
pub struct RoleFilter;
impl Filter for RoleFilter {
    fn name(&self) -> &str {
        "role-filter"
    }
    fn filter(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]) {
        for (c, k) in cands.iter().zip(keep) {
            *k &= role_serves(c.spec.role, ctx.req.phase);
        }
    }
}

/// Prefers endpoints with the adapter active or waiting, then ones with room to load it.
#[derive(Debug)]
pub struct LoraAffinityFilter;
impl Filter for LoraAffinityFilter {
    fn name(&self) -> &str {
        "lora-affinity-filter"
    }
    fn filter(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]) {
        let Some(lora) = ctx.req.lora.as_deref() else {
            return;
        };
        let tiers: [&dyn Fn(&Candidate<'_>) -> bool; 2] = [
            &|c| adapter_active(c, lora) || adapter_waiting(c, lora),
            &|c| adapter_room(c),
        ];
        for pred in tiers {
            if cands.iter().zip(keep.iter()).any(|(c, k)| *k && pred(c)) {
                for (c, k) in cands.iter().zip(keep.iter_mut()) {
                    *k &= pred(c);
                }
                return;
            }
        }
    }
}

/// Keeps draining endpoints only when nothing else is left.
#[derive(Debug)]
pub struct DrainingFilter;
impl Filter for DrainingFilter {
    fn name(&self) -> &str {
        "draining-filter"
    }
    fn filter(&self, _: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]) {
        let ready = |c: &Candidate<'_>| c.state == EndpointState::Ready;
        if cands.iter().zip(keep.iter()).any(|(c, k)| *k && ready(c)) {
            for (c, k) in cands.iter().zip(keep.iter_mut()) {
                *k &= ready(c);
            }
        }
    }
}

/// Keeps only the request's subset.
#[derive(Debug)]
pub struct SubsetFilter;
impl Filter for SubsetFilter {
    fn name(&self) -> &str {
        "subset-filter"
    }
    fn filter(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], keep: &mut [bool]) {
        if let Some(subset) = &ctx.req.subset {
            for (c, k) in cands.iter().zip(keep) {
                *k &= subset.contains(&c.id);
            }
        }
    }
}

// ---------------------------------------------------------------- scorers

/// GIE queue-scorer.
#[derive(Debug)]
pub struct QueueScorer;
impl Scorer for QueueScorer {
    fn name(&self) -> &str {
        "queue-scorer"
    }
    fn score(&self, _: &PickContext<'_>, cands: &[Candidate<'_>], out: &mut [f64]) {
        let q = |c: &Candidate<'_>| f64::from(c.estimate.scraped_waiting);
        let min = cands.iter().map(q).fold(f64::INFINITY, f64::min);
        let max = cands.iter().map(q).fold(f64::NEG_INFINITY, f64::max);
        for (c, o) in cands.iter().zip(out) {
            *o = if max > min {
                (max - q(c)) / (max - min)
            } else {
                1.0
            };
        }
    }
}

/// GIE kv-cache-utilization-scorer.
#[derive(Debug)]
pub struct KvCacheUtilizationScorer;
impl Scorer for KvCacheUtilizationScorer {
    fn name(&self) -> &str {
        "kv-cache-utilization-scorer"
    }
    fn score(&self, _: &PickContext<'_>, cands: &[Candidate<'_>], out: &mut [f64]) {
        for (c, o) in cands.iter().zip(out) {
            *o = 1.0 - c.estimate.scraped_kv_usage.unwrap_or(0.0).clamp(0.0, 1.0);
        }
    }
}

/// GIE prefix-cache-scorer on the approximate index.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    /// `maxPrefixBlocksToMatch`.
    pub max_prefix_blocks: u32,
}
impl Scorer for PrefixCacheScorer {
    fn name(&self) -> &str {
        "prefix-cache-scorer"
    }
    fn needs(&self) -> Needs {
        Needs {
            approx_prefix: true,
            ..Needs::default()
        }
    }
    fn score(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], out: &mut [f64]) {
        let total = (ctx.req.keys.keys.len() as u32).min(self.max_prefix_blocks);
        for (c, o) in cands.iter().zip(out) {
            *o = if total == 0 {
                0.0
            } else {
                f64::from(c.approx_matched_blocks.min(total)) / f64::from(total)
            };
        }
    }
}

/// GIE lora-affinity-scorer.
#[derive(Debug)]
pub struct LoraAffinityScorer;
impl Scorer for LoraAffinityScorer {
    fn name(&self) -> &str {
        "lora-affinity-scorer"
    }
    fn score(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], out: &mut [f64]) {
        for (c, o) in cands.iter().zip(out) {
            *o = match ctx.req.lora.as_deref() {
                None => 1.0,
                Some(l) if adapter_active(c, l) => 1.0,
                Some(l) if adapter_waiting(c, l) => 0.6,
                Some(_) if adapter_room(c) => 0.8,
                Some(_) => 0.0,
            };
        }
    }
}

/// kvgate: −predicted TTFT in ms.
#[derive(Debug)]
pub struct KvgateCostScorer;
impl Scorer for KvgateCostScorer {
    fn name(&self) -> &str {
        "kvgate-cost-scorer"
    }
    fn needs(&self) -> Needs {
        Needs {
            cost: true,
            prefix: true,
            ..Needs::default()
        }
    }
    fn score(&self, _: &PickContext<'_>, cands: &[Candidate<'_>], out: &mut [f64]) {
        for (c, o) in cands.iter().zip(out) {
            *o = -c.cost.map_or(f64::NAN, |k| k.routing_cost_us) / 1000.0;
        }
    }
}

/// Dynamo's KV cost, negated.
#[derive(Debug)]
pub struct DynamoCostScorer {
    /// `--kv-overlap-score-weight`.
    pub overlap_weight: f64,
}
impl DynamoCostScorer {
    /// Dynamo's logit (lower is better).
    pub fn logit(&self, ctx: &PickContext<'_>, c: &Candidate<'_>) -> f64 {
        let bs = f64::from(ctx.req.keys.block_size.max(1));
        let isl = f64::from(ctx.req.prompt_tokens);
        let overlap_tokens = (f64::from(c.matched_blocks) * bs).min(isl);
        let prefill_tokens = c.own_prefill_tokens as f64 + (isl - overlap_tokens);
        let request_blocks = (isl / bs).ceil();
        let new_blocks = (request_blocks - f64::from(c.matched_blocks)).max(0.0);
        let decode_blocks = c.own_kv_blocks as f64 + new_blocks;
        self.overlap_weight * (prefill_tokens / bs) + decode_blocks
    }
}
impl Scorer for DynamoCostScorer {
    fn name(&self) -> &str {
        "dynamo-cost-scorer"
    }
    fn needs(&self) -> Needs {
        Needs {
            prefix: true,
            ..Needs::default()
        }
    }
    fn score(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], out: &mut [f64]) {
        for (c, o) in cands.iter().zip(out) {
            *o = -self.logit(ctx, c);
        }
    }
}

/// Oracle: −TTFT (ms) from true state.
#[derive(Debug)]
pub struct OracleScorer;
impl Scorer for OracleScorer {
    fn name(&self) -> &str {
        "oracle-scorer"
    }
    fn needs(&self) -> Needs {
        Needs {
            oracle: true,
            ..Needs::default()
        }
    }
    fn score(&self, ctx: &PickContext<'_>, cands: &[Candidate<'_>], out: &mut [f64]) {
        for (c, o) in cands.iter().zip(out) {
            *o = match c.oracle {
                Some(t) => -oracle_routing_cost_us(ctx, c, &t) / 1000.0,
                None => f64::NAN,
            };
        }
    }
}

/// The cost model's TTFT on true state (speed 1, true cached prefix, true KV use).
pub fn oracle_ttft_us(ctx: &PickContext<'_>, c: &Candidate<'_>, t: &TrueLoad) -> f64 {
    let uncached = f64::from(ctx.req.prompt_tokens.saturating_sub(t.cached_prefix_tokens)).max(1.0);
    let base = c.prior.prefill_time_us(
        t.queued_prefill_tokens as f64 + uncached,
        f64::from(t.running),
    );
    let cap = c.estimate.kv_capacity_blocks.max(1) as f64;
    let new_blocks = crate::cost::new_kv_blocks(
        uncached,
        ctx.req.max_tokens,
        ctx.req.keys.block_size,
        ctx.tuning,
    );
    let kv_after = t.kv_usage + new_blocks as f64 / cap;
    let cliff = ctx.tuning.kv_cliff_fraction;
    let over = ((kv_after - cliff) / (1.0 - cliff)).max(0.0);
    base * (1.0 + ctx.tuning.kv_cliff_steepness * over)
        + ctx.tuning.kv_cliff_preemption_cost_us as f64 * over
}

/// The kvgate routing cost on true state: [`oracle_ttft_us`] plus the load-scaled charge for the
/// request's own prefill work (see [`crate::cost`]), so the oracle differs from kvgate only in
/// what it knows, not in what it optimises.
pub fn oracle_routing_cost_us(ctx: &PickContext<'_>, c: &Candidate<'_>, t: &TrueLoad) -> f64 {
    let uncached = f64::from(ctx.req.prompt_tokens.saturating_sub(t.cached_prefix_tokens)).max(1.0);
    let queued = t.queued_prefill_tokens as f64;
    let running = f64::from(t.running);
    let own = c.prior.prefill_time_us(queued + uncached, running)
        - c.prior.prefill_time_us(queued, running);
    oracle_ttft_us(ctx, c, t)
        + crate::cost::externality_weight_for_queue(t.waiting, ctx.tuning) * own
}

// ---------------------------------------------------------------- pickers

/// Highest total score, random ties.
#[derive(Debug)]
pub struct MaxScorePicker;
impl Picker for MaxScorePicker {
    fn name(&self) -> &str {
        "max-score-picker"
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        _: &[Candidate<'_>],
        scores: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let index = argmax_random_ties(0..scores.len(), |i| scores[i], rng).unwrap_or(0);
        Ok(Pick {
            index,
            reason: DecisionReason::MaxScore,
        })
    }
}

/// Uniformly random.
#[derive(Debug)]
pub struct RandomPicker;
impl Picker for RandomPicker {
    fn name(&self) -> &str {
        "random-picker"
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        Ok(Pick {
            index: rng.random_range(0..cands.len()),
            reason: DecisionReason::Random,
        })
    }
}

/// Probability proportional to (non-negative) total score.
#[derive(Debug)]
pub struct WeightedRandomPicker;
impl Picker for WeightedRandomPicker {
    fn name(&self) -> &str {
        "weighted-random-picker"
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        _: &[Candidate<'_>],
        scores: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let w: Vec<f64> = scores.iter().map(|s| s.max(0.0)).collect();
        Ok(Pick {
            index: sample_weighted(&w, rng),
            reason: DecisionReason::WeightedRandom,
        })
    }
}

/// kvgate's softmax picker with age-widened temperature and the hot-prefix rule.
#[derive(Debug)]
pub struct SoftmaxPicker;

impl SoftmaxPicker {
    /// Relative temperature for a given oldest signal age.
    pub fn temperature(t: &Tuning, max_signal_age_us: u64) -> f64 {
        let stale_s = max_signal_age_us.saturating_sub(t.signal_fresh_us) as f64 / 1e6;
        (t.softmax_base_temperature + t.softmax_temperature_per_s * stale_s)
            .min(t.softmax_max_temperature)
    }
}

impl Picker for SoftmaxPicker {
    fn name(&self) -> &str {
        "softmax-picker"
    }
    fn needs(&self) -> Needs {
        Needs {
            prefix: true,
            ..Needs::default()
        }
    }
    fn pick(
        &self,
        ctx: &PickContext<'_>,
        cands: &[Candidate<'_>],
        scores: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let t = ctx.tuning;
        let reason_of = |i: usize| prefix_or_cost(&cands[i]);
        // Hot-prefix rule.
        // The best holder: most matched blocks, best score among equals.
        let holder = (0..cands.len()).fold(None, |best: Option<usize>, i| match best {
            Some(b)
                if (cands[b].matched_blocks, scores[b]) >= (cands[i].matched_blocks, scores[i]) =>
            {
                Some(b)
            }
            _ => Some(i),
        });
        if let Some(h) = holder {
            let held = cands[h].matched_blocks;
            let wait = cands[h].cost.map_or(0.0, |c| c.queue_wait_us);
            if held > 0
                && wait > t.hot_prefix_wait_us as f64
                && cands.iter().any(|c| c.matched_blocks < held)
                && rng.random::<f64>() < t.hot_prefix_spill_fraction
            {
                // Only to endpoints with clearly shorter queues: under uniform overload a spill
                // would just add a recompute to an equally long queue.
                let max_wait = wait * t.hot_prefix_target_wait_fraction;
                let others = (0..cands.len()).filter(|&i| {
                    cands[i].matched_blocks < held
                        && cands[i].cost.is_some_and(|c| c.queue_wait_us < max_wait)
                });
                if let Some(index) = argmax_random_ties(others, |i| scores[i], rng) {
                    return Ok(Pick {
                        index,
                        reason: DecisionReason::HotPrefixSpill,
                    });
                }
            }
        }
        let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let temp = Self::temperature(t, ctx.max_signal_age_us);
        if temp <= 0.0 || cands.len() == 1 {
            let index = argmax_random_ties(0..cands.len(), |i| scores[i], rng).unwrap_or(0);
            return Ok(Pick {
                index,
                reason: reason_of(index),
            });
        }
        // Gaps relative to the best score; 1 ms floor keeps near-zero costs from exploding.
        let scale = best.abs().max(1.0) * temp;
        // Weights below e⁻⁴⁰ are zero for any practical purpose; skipping their `exp` keeps a
        // thousand-candidate pick cheap.
        let w: Vec<f64> = scores
            .iter()
            .map(|s| {
                let x = (s - best) / scale;
                if x < -40.0 { 0.0 } else { x.exp() }
            })
            .collect();
        let index = sample_weighted(&w, rng);
        Ok(Pick {
            index,
            reason: reason_of(index),
        })
    }
}

/// Dynamo's selector.
#[derive(Debug)]
pub struct DynamoPicker {
    /// `--router-temperature`.
    pub temperature: f64,
}
impl Picker for DynamoPicker {
    fn name(&self) -> &str {
        "dynamo-picker"
    }
    fn needs(&self) -> Needs {
        Needs {
            prefix: true,
            ..Needs::default()
        }
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        cands: &[Candidate<'_>],
        scores: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let index = if self.temperature <= 0.0 {
            argmax_random_ties(0..scores.len(), |i| scores[i], rng).unwrap_or(0)
        } else {
            // Logits are −scores; normalise to [0, 1] by their range, then softmax(−x / T).
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
            let range = (max - min).max(f64::MIN_POSITIVE);
            let w: Vec<f64> = scores
                .iter()
                .map(|s| (-((max - s) / range) / self.temperature).exp())
                .collect();
            sample_weighted(&w, rng)
        };
        Ok(Pick {
            index,
            reason: prefix_or_cost(&cands[index]),
        })
    }
}

/// Rotation in address order.
#[derive(Debug)]
pub struct RoundRobinPicker;
impl Picker for RoundRobinPicker {
    fn name(&self) -> &str {
        "round-robin-picker"
    }
    fn pick(
        &self,
        ctx: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        _: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        Ok(Pick {
            index: (ctx.rotation % cands.len() as u64) as usize,
            reason: DecisionReason::RoundRobin,
        })
    }
}

/// Power of two choices on estimated load.
#[derive(Debug)]
pub struct PowerOfTwoPicker;
impl Picker for PowerOfTwoPicker {
    fn name(&self) -> &str {
        "power-of-two-picker"
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let n = cands.len();
        let index = if n == 1 {
            0
        } else {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            if load(&cands[b]) < load(&cands[a]) {
                b
            } else {
                a
            }
        };
        Ok(Pick {
            index,
            reason: DecisionReason::PowerOfTwo,
        })
    }
}

/// Fewest requests (estimated waiting + running), random ties.
#[derive(Debug)]
pub struct LeastRequestPicker;
impl Picker for LeastRequestPicker {
    fn name(&self) -> &str {
        "least-request-picker"
    }
    fn pick(
        &self,
        _: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let index =
            argmax_random_ties(0..cands.len(), |i| -f64::from(load(&cands[i])), rng).unwrap_or(0);
        Ok(Pick {
            index,
            reason: DecisionReason::LeastRequest,
        })
    }
}

/// SGLang's cache_aware policy.
#[derive(Debug)]
pub struct SglangCacheAwarePicker {
    /// Match ratio above which the cache is followed.
    pub cache_threshold: f64,
    /// Absolute imbalance threshold (requests).
    pub balance_abs_threshold: u32,
    /// Relative imbalance threshold.
    pub balance_rel_threshold: f64,
}
impl Picker for SglangCacheAwarePicker {
    fn name(&self) -> &str {
        "sglang-cache-aware-picker"
    }
    fn needs(&self) -> Needs {
        Needs {
            approx_prefix: true,
            ..Needs::default()
        }
    }
    fn pick(
        &self,
        ctx: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let load = |i: usize| cands[i].estimate.own_in_flight;
        let max = (0..cands.len()).map(load).max().unwrap_or(0);
        let min = (0..cands.len()).map(load).min().unwrap_or(0);
        let imbalanced = max.saturating_sub(min) > self.balance_abs_threshold
            && f64::from(max) > self.balance_rel_threshold * f64::from(min);
        if imbalanced {
            let index =
                argmax_random_ties(0..cands.len(), |i| -f64::from(load(i)), rng).unwrap_or(0);
            return Ok(Pick {
                index,
                reason: DecisionReason::Balance,
            });
        }
        let total = ctx.req.keys.keys.len();
        let best = argmax_random_ties(
            0..cands.len(),
            |i| f64::from(cands[i].approx_matched_blocks),
            rng,
        )
        .unwrap_or(0);
        let ratio = if total == 0 {
            0.0
        } else {
            f64::from(cands[best].approx_matched_blocks) / total as f64
        };
        if ratio > self.cache_threshold {
            return Ok(Pick {
                index: best,
                reason: DecisionReason::CacheAffinity,
            });
        }
        let index = argmax_random_ties(
            0..cands.len(),
            |i| -(cands[i].approx_tree_blocks as f64),
            rng,
        )
        .unwrap_or(0);
        Ok(Pick {
            index,
            reason: DecisionReason::SmallestCache,
        })
    }
}
