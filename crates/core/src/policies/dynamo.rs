//! Dynamo's KV router (ai-dynamo `lib/kv-router`, `DefaultWorkerSelector`; docs "KV cache
//! routing"): `logit = overlap_weight · potential_prefill_blocks + potential_active_blocks`, where
//! prefill blocks are the worker's tracked active prefill tokens plus this request's uncached
//! tokens, divided by the block size, and active blocks are the worker's tracked active blocks
//! plus this request's new blocks; both from the router's own accounting, the overlap from KV
//! events (approximate index when events are not trusted). Temperature 0 (the default) takes
//! the lowest logit, ties at random; > 0 samples a softmax over min–max normalised logits.

use rand::RngCore;

use crate::error::RouteError;
use crate::policies::{
    Candidate, Needs, Pick, PickContext, Picker, Scorer, argmax_random_ties, prefix_or_cost,
    sample_weighted,
};

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
