//! SGLang's router `cache_aware` policy (sgl-router `policies/cache_aware.rs`): the system is
//! imbalanced if `max_load − min_load > balance_abs_threshold` **and** `max_load >
//! balance_rel_threshold · min_load`, loads being the router's own in-flight counts; then the
//! least-loaded worker is chosen. Otherwise the approximate tree (the router's own decisions)
//! gives the best-matching worker; if its match ratio exceeds `cache_threshold` it is chosen,
//! else the worker with the smallest tree. Thresholds 0.3 / 64 / 1.5 as this project fixes them
//! (upstream's CLI defaults have varied between releases). Matching is per 64-byte / 16-token
//! block rather than per character, the one deliberate difference.

use rand::RngCore;

use crate::error::RouteError;
use crate::policies::{Candidate, Needs, Pick, PickContext, Picker, argmax_random_ties};
use crate::request::DecisionReason;

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
