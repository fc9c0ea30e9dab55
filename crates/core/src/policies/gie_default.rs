//! The Gateway API Inference Extension default profile (gateway-api-inference-extension,
//! `pkg/epp/scheduling/framework/plugins` and its default `EndpointPickerConfig`), as llm-d's
//! endpoint picker still ships it:
//! * `queue-scorer` weight 2 = `(max − q)/(max − min)` over the *scraped* waiting-queue sizes
//!   (1 when all equal);
//! * `kv-cache-utilization-scorer` weight 2 = `1 − scraped KV usage`;
//! * `prefix-cache-scorer` weight 3 = matched blocks / prompt blocks on the picker's own
//!   approximate index, filled from its decisions, LRU per server (`lruCapacityPerServer`
//!   31,250, no TTL), at most `maxPrefixBlocksToMatch` (256) blocks;
//! * `max-score-picker` = highest weighted sum, ties broken at random.
//!
//! Also here, as the reference picker defines them: `lora-affinity-scorer` (1 active, 0.8 room to
//! load, 0.6 already waiting, 0 otherwise) and the `weighted-random-picker` (probability
//! proportional to the summed score).

use rand::RngCore;

use crate::error::RouteError;
use crate::policies::{
    Candidate, Needs, Pick, PickContext, Picker, Scorer, adapter_active, adapter_room,
    adapter_waiting, argmax_random_ties, sample_weighted,
};
use crate::request::DecisionReason;

/// GIE queue-scorer.
#[derive(Debug)]
pub struct QueueScorer;
impl Scorer for QueueScorer {
    fn name(&self) -> &str {
        "queue-scorer"
    }
    fn needs(&self) -> Needs {
        Needs {
            raw_metrics: true,
            ..Needs::default()
        }
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
    fn needs(&self) -> Needs {
        Needs {
            raw_metrics: true,
            ..Needs::default()
        }
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
