//! llm-d's 2026 default scheduler, "sticky until saturated" (llm-d/llm-d-router,
//! `pkg/epp/framework/plugins/scheduling/filter/prefixcacheaffinity` — the
//! `prefix-cache-affinity-filter` — followed by the `token-load-scorer`, as the
//! `optimized-baseline` and `pd-disaggregation` guides configure them).
//!
//! What the sources say, and how it is rendered here:
//! - **Affinity filter.** An endpoint is *sticky* when its prefix-cache match ratio (matched
//!   blocks ÷ prompt blocks, from the approximate prefix producer, i.e. the router's own past
//!   decisions) is at least `affinityThreshold` (0.80). With probability
//!   `explorationProbability` the gate is skipped. Otherwise candidates narrow to the sticky set
//!   unless the best sticky endpoint's estimated TTFT exceeds the best non-sticky one's by more
//!   than `maxTTFTPenaltyMs` (5,000 ms): that is the "until saturated" part.
//! - **TTFT estimate** (`ttftSource: prefillThroughput`, the default): in-flight uncached tokens
//!   plus this request's projected uncached tokens, divided by `peakPrefillThroughput`, in ms.
//!   The in-flight load is the router's own dispatched, not yet prefilled work (the
//!   `inflight-load-producer`), so the holder's gate opens when its queued uncached prefill
//!   exceeds the others' by τ = peak prefill throughput × max TTFT penalty.
//! - **Token-load scorer.** Among the survivors, the least `uncached in flight + prompt × (1 −
//!   hit ratio)` wins (the max-score picker over the scorer's normalised score, ties at random).
//!
//! `peakPrefillThroughput` is hardware-specific (upstream's default, 15,928 tokens/s, is a
//! Qwen-32B/TP2 calibration, and its guides tell users to measure their own). This preset uses
//! what that calibration would measure on the fleet's hardware prior: 1 / β1 of the default
//! hardware class (≈ 58,000 tokens/s for Llama-3.1-8B on H100). llm-d treats metrics older than
//! 200 ms as saturation; this profile reads no scraped metric, so that rule has nothing to act on.

use rand::{Rng, RngCore};

use crate::error::RouteError;
use crate::policies::{Candidate, Needs, Pick, PickContext, Picker, argmax_random_ties};
use crate::request::DecisionReason;

/// llm-d's `prefix-cache-affinity-filter` plus `token-load-scorer` and max-score picker.
#[derive(Debug)]
pub struct LlmdPicker {
    /// `affinityThreshold`: match ratio at or above which an endpoint is sticky.
    pub affinity_threshold: f64,
    /// `explorationProbability`: chance of skipping the affinity gate.
    pub exploration_probability: f64,
    /// `maxTTFTPenaltyMs`: TTFT excess of the best sticky endpoint that breaks stickiness; 0
    /// disables the load gate.
    pub max_ttft_penalty_ms: f64,
    /// `peakPrefillThroughput`, tokens/s; `None`: 1/β1 of the default hardware class.
    pub peak_prefill_tokens_per_s: Option<f64>,
}

impl LlmdPicker {
    /// Uncached tokens of this request on `c` (prompt × (1 − hit ratio)).
    fn uncached_tokens(ctx: &PickContext<'_>, c: &Candidate<'_>) -> f64 {
        let bs = f64::from(ctx.req.keys.block_size.max(1));
        let prompt = f64::from(ctx.req.prompt_tokens);
        (prompt - f64::from(c.approx_matched_blocks) * bs).max(0.0)
    }

    /// The token load the scorer ranks by: own in-flight uncached prefill plus this request's
    /// projected uncached tokens.
    pub fn token_load(ctx: &PickContext<'_>, c: &Candidate<'_>) -> f64 {
        c.own_prefill_tokens as f64 + Self::uncached_tokens(ctx, c)
    }

    /// Match ratio on the approximate index.
    pub fn affinity(ctx: &PickContext<'_>, c: &Candidate<'_>) -> f64 {
        let bs = ctx.req.keys.block_size.max(1);
        let blocks = ctx.req.prompt_tokens.div_ceil(bs).max(1);
        f64::from(c.approx_matched_blocks) / f64::from(blocks)
    }

    fn peak(&self, ctx: &PickContext<'_>) -> f64 {
        self.peak_prefill_tokens_per_s.unwrap_or_else(|| {
            let t = ctx.tuning;
            1e6 / t.prior(&t.default_hardware_class).prefill_us_per_token
        })
    }
}

impl Picker for LlmdPicker {
    fn name(&self) -> &str {
        "llm-d-picker"
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
        let load: Vec<f64> = cands.iter().map(|c| Self::token_load(ctx, c)).collect();
        let sticky: Vec<bool> = cands
            .iter()
            .map(|c| {
                self.affinity_threshold > 0.0 && Self::affinity(ctx, c) >= self.affinity_threshold
            })
            .collect();
        let n_sticky = sticky.iter().filter(|s| **s).count();
        let explore = rng.random::<f64>() < self.exploration_probability;
        let mut narrowed = false;
        let keep: Vec<bool> = if n_sticky == 0 || n_sticky == cands.len() || explore {
            vec![true; cands.len()]
        } else {
            let ms_per_token = 1000.0 / self.peak(ctx).max(f64::MIN_POSITIVE);
            let best = |want: bool| {
                (0..cands.len())
                    .filter(|&i| sticky[i] == want)
                    .map(|i| load[i] * ms_per_token)
                    .fold(f64::INFINITY, f64::min)
            };
            let penalty = best(true) - best(false);
            if self.max_ttft_penalty_ms > 0.0 && penalty > self.max_ttft_penalty_ms {
                vec![true; cands.len()]
            } else {
                narrowed = true;
                sticky.clone()
            }
        };
        let index = argmax_random_ties((0..cands.len()).filter(|&i| keep[i]), |i| -load[i], rng)
            .unwrap_or(0);
        let reason = if narrowed {
            DecisionReason::CacheAffinity
        } else {
            DecisionReason::MaxScore
        };
        Ok(Pick { index, reason })
    }
}
