//! The scheduling pipeline's roles, the built-in plugins (one file per policy) and the
//! [`Policy`] names.
//!
//! A profile is `filters → scorers → picker`, as in the Gateway API Inference Extension (GIE)
//! and Dynamo. Each plugin states the inputs it [`Needs`] so the host computes only those (a
//! round-robin pick never walks the prefix index). Scorers return one finite number per
//! candidate, higher is better; the host rejects NaN and infinities with
//! [`RouteError::NonFiniteScore`] and sums weighted scores. Pickers choose an index.
//!
//! Every policy, the baselines included, lives in its own module whose docs cite the public
//! source it follows: [`kvgate`] (kvgate's cost and softmax picker), [`gie_default`] (the GIE
//! default scorers and max-score picker), [`sglang_cache_aware`] (SGLang's `cache_aware`),
//! [`dynamo`] (Dynamo's KV cost), [`dynamo_softmax`] (the same with the softmax temperature it
//! is deployed with), [`llm_d`] (llm-d's 2026 "sticky until saturated" scheduler),
//! [`smg_least_load`] (SGLang model gateway's `least_load`), [`round_robin`], [`random`],
//! [`least_request`], [`power_of_two`] and [`oracle`] (simulation only: kvgate's cost on true,
//! undelayed state). [`filters`] holds the host filters any
//! profile may name. Their presets (which plugins, which weights) are in [`crate::config`].

use std::fmt;
use std::str::FromStr;

use rand::{Rng, RngCore};

use crate::config::{FilterKind, PickerKind, ScorerKind, Tuning};
use crate::cost::{CostBreakdown, HardwarePrior};
use crate::endpoint::{EndpointId, EndpointSpec, EndpointState, Role};
use crate::error::{CoreError, RouteError};
use crate::estimate::LoadEstimate;
use crate::observe::MetricsSample;
use crate::request::{DecisionReason, Phase, RoutingRequest, TrueLoad};

pub mod dynamo;
pub mod dynamo_softmax;
pub mod filters;
pub mod gie_default;
pub mod kvgate;
pub mod least_request;
pub mod llm_d;
pub mod oracle;
pub mod power_of_two;
pub mod random;
pub mod round_robin;
pub mod sglang_cache_aware;
pub mod smg_least_load;

pub use dynamo::{DynamoCostScorer, DynamoPicker};
pub use filters::{DrainingFilter, LoraAffinityFilter, RoleFilter, SubsetFilter};
pub use gie_default::{
    KvCacheUtilizationScorer, LoraAffinityScorer, MaxScorePicker, PrefixCacheScorer, QueueScorer,
    WeightedRandomPicker,
};
pub use kvgate::{KvgateCostScorer, SoftmaxPicker};
pub use least_request::LeastRequestPicker;
pub use llm_d::LlmdPicker;
pub use oracle::{OracleScorer, oracle_prediction_us, oracle_routing_cost_us, oracle_ttft_us};
pub use power_of_two::PowerOfTwoPicker;
pub use random::RandomPicker;
pub use round_robin::RoundRobinPicker;
pub use sglang_cache_aware::SglangCacheAwarePicker;
pub use smg_least_load::SmgLeastLoadPicker;

/// A built-in policy: the one place its name is written. Parse names with [`FromStr`], print
/// them with [`Policy::as_str`] (CLI values, report rows, metrics labels), iterate
/// [`Policy::ALL`]; the preset behind each is [`crate::RouterConfig::for_preset`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    /// kvgate's cost model and softmax picker ([`kvgate`]).
    Kvgate,
    /// The Gateway API Inference Extension default profile ([`gie_default`]).
    GieDefault,
    /// SGLang's `cache_aware` ([`sglang_cache_aware`]).
    SglangCacheAware,
    /// Dynamo's KV cost ([`dynamo`]).
    Dynamo,
    /// Round-robin in address order ([`round_robin`]).
    RoundRobin,
    /// Uniformly random ([`random`]).
    Random,
    /// Fewest requests ([`least_request`]).
    LeastRequest,
    /// Power of two choices ([`power_of_two`]).
    PowerOfTwo,
    /// kvgate's cost computed on the simulator's true, undelayed engine state ([`oracle`]).
    /// Simulation only. Not an upper bound: it removes staleness, not the cost model's errors.
    Oracle,
    /// llm-d's 2026 default: prefix affinity until saturated, then token load ([`llm_d`]).
    LlmD,
    /// SGLang model gateway's `least_load` ([`smg_least_load`]).
    SmgLeastLoad,
    /// Dynamo's KV cost with softmax sampling at its deployed temperature ([`dynamo_softmax`]).
    DynamoSoftmax,
}

impl Policy {
    /// Every built-in policy, in report order.
    pub const ALL: [Policy; 12] = [
        Self::Kvgate,
        Self::GieDefault,
        Self::SglangCacheAware,
        Self::Dynamo,
        Self::RoundRobin,
        Self::Random,
        Self::LeastRequest,
        Self::PowerOfTwo,
        Self::Oracle,
        Self::LlmD,
        Self::SmgLeastLoad,
        Self::DynamoSoftmax,
    ];

    /// Its name (CLI value, report row, metrics label).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kvgate => "kvgate",
            Self::GieDefault => "gie-default",
            Self::SglangCacheAware => "sglang-cache-aware",
            Self::Dynamo => "dynamo",
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
            Self::LeastRequest => "least-request",
            Self::PowerOfTwo => "power-of-two",
            Self::Oracle => "oracle",
            Self::LlmD => "llm-d",
            Self::SmgLeastLoad => "smg-least-load",
            Self::DynamoSoftmax => "dynamo-softmax",
        }
    }

    /// Short names accepted besides [`Policy::as_str`] (kept for existing configs).
    pub const fn alias(self) -> Option<&'static str> {
        match self {
            Self::GieDefault => Some("gie"),
            Self::SglangCacheAware => Some("sglang"),
            _ => None,
        }
    }

    /// Whether a live data plane can run it. The oracle reads the simulator's true engine
    /// state, which no live deployment has: every pick would fail, so `serve`/`epp` must refuse
    /// it at start-up.
    pub const fn is_live_capable(self) -> bool {
        !matches!(self, Self::Oracle)
    }

    /// Every name, comma-separated (for help texts and errors).
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = CoreError;

    fn from_str(name: &str) -> Result<Self, CoreError> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == name || p.alias() == Some(name))
            .ok_or_else(|| CoreError::UnknownPolicy {
                name: name.to_string(),
                known: Self::names(),
            })
    }
}

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
    /// The last metrics sample's raw values (e.g. [`crate::LoadEstimate::scraped_waiting`]),
    /// which dead reckoning does not keep current: the data plane then scrapes at its base
    /// interval (see [`crate::Router::sample_accounted`]). A plugin that reads them must say so.
    pub raw_metrics: bool,
}

impl Needs {
    /// Union.
    pub fn union(self, o: Self) -> Self {
        Self {
            prefix: self.prefix || o.prefix || o.cost || self.cost,
            approx_prefix: self.approx_prefix || o.approx_prefix,
            cost: self.cost || o.cost,
            oracle: self.oracle || o.oracle,
            raw_metrics: self.raw_metrics || o.raw_metrics,
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
    /// Hardware prior of its class, as declared.
    pub prior: &'a HardwarePrior,
    /// Step-time coefficients learnt from its first tokens ([`crate::learn`]; the prior until
    /// then): what kvgate's cost prices it with.
    pub step: &'a HardwarePrior,
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
    /// Oldest signal age among candidates, µs: the age of each one's last metrics sample, 0 for
    /// one whose last sample held only this router's requests (dead reckoning keeps it current),
    /// and never-scraped endpoints count from their addition.
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

/// Whether an endpoint role serves a phase. A decode pod also serves whole requests: vLLM and
/// SGLang decode pods compute a prompt themselves when a request comes without transfer
/// parameters, which is how a disaggregated fleet serves what the decider keeps aggregated
/// ([`crate::pd`]). A prefill pod serves prefill legs only: whatever it generated would have
/// to be sent on anyway.
pub fn role_serves(role: Role, phase: Phase) -> bool {
    matches!(
        (role, phase),
        (Role::Both, _)
            | (Role::Prefill, Phase::Prefill)
            | (Role::Decode, Phase::Decode | Phase::Aggregated)
    )
}

pub(crate) fn adapter_active(c: &Candidate<'_>, lora: &str) -> bool {
    c.sample
        .is_some_and(|s| s.running_lora_adapters.iter().any(|a| a == lora))
}

pub(crate) fn adapter_waiting(c: &Candidate<'_>, lora: &str) -> bool {
    c.sample
        .is_some_and(|s| s.waiting_lora_adapters.iter().any(|a| a == lora))
}

pub(crate) fn adapter_room(c: &Candidate<'_>) -> bool {
    c.sample.is_none_or(|s| {
        s.max_lora.is_none_or(|m| {
            (s.running_lora_adapters.len() + s.waiting_lora_adapters.len()) < m as usize
        })
    })
}

/// Argmax of `key` among `idx`, ties broken uniformly at random.
pub(crate) fn argmax_random_ties(
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
pub(crate) fn sample_weighted(w: &[f64], rng: &mut dyn RngCore) -> usize {
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

pub(crate) fn load(c: &Candidate<'_>) -> u32 {
    c.estimate.waiting + c.estimate.running
}

/// Why a cost-driven picker chose `c`: for its cached prefix if it holds any of the prompt,
/// otherwise for its cost alone.
pub(crate) fn prefix_or_cost(c: &Candidate<'_>) -> DecisionReason {
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
        PickerKind::LlmD {
            affinity_threshold,
            exploration_probability,
            max_ttft_penalty_ms,
            peak_prefill_tokens_per_s,
        } => Box::new(LlmdPicker {
            affinity_threshold: *affinity_threshold,
            exploration_probability: *exploration_probability,
            max_ttft_penalty_ms: *max_ttft_penalty_ms,
            peak_prefill_tokens_per_s: *peak_prefill_tokens_per_s,
        }),
        PickerKind::SmgLeastLoad {
            kv_pressure_weight_s,
        } => Box::new(SmgLeastLoadPicker {
            kv_pressure_weight_s: *kv_pressure_weight_s,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_round_trip_and_unknown_names_are_typed_errors() {
        for p in Policy::ALL {
            assert_eq!(p.as_str().parse::<Policy>().unwrap(), p);
            assert_eq!(p.to_string(), p.as_str());
        }
        assert_eq!("gie".parse::<Policy>().unwrap(), Policy::GieDefault);
        assert_eq!(
            "sglang".parse::<Policy>().unwrap(),
            Policy::SglangCacheAware
        );
        match "foo".parse::<Policy>() {
            Err(CoreError::UnknownPolicy { name, known }) => {
                assert_eq!(name, "foo");
                assert!(known.starts_with("kvgate, gie-default"), "{known}");
            }
            other => panic!("{other:?}"),
        }
        let live: Vec<Policy> = Policy::ALL
            .into_iter()
            .filter(|p| !p.is_live_capable())
            .collect();
        assert_eq!(live, vec![Policy::Oracle]);
    }
}
