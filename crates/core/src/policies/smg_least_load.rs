//! SGLang's model gateway ("SMG", lightseekorg/smg, formerly sgl-router) `least_load` policy as
//! ../shared/DESIGN.md ("The field in late 2026") records it: each worker's load is
//! `(queued + in-flight tokens) / throughput + λ·k/(1−k)`, `k` its KV-cache usage, from the
//! gateway's periodic load poll corrected by the gateway's own dispatches since that poll; the
//! least loaded worker wins (ties at random). No prefix cache is consulted.
//!
//! Rendered on kvgate's estimator, which is exactly "last poll + own dispatches since": queued
//! tokens are the estimate's queued prefill tokens, in-flight tokens the KV blocks the estimate
//! holds (× block size: prompts and generated tokens resident on the worker), throughput the
//! endpoint's calibrated prefill rate (1 / β1 of its learnt coefficients ÷ its speed factor), and
//! `k` the estimated KV usage, capped at 0.99 so a full worker costs a finite, large amount.
//! λ is not a published default; 1 s makes a worker at 50% KV cost one extra second, at 90%
//! nine: the steep rise near a full cache the `k/(1−k)` term is for.

use rand::RngCore;

use crate::error::RouteError;
use crate::policies::{Candidate, Needs, Pick, PickContext, Picker, argmax_random_ties};
use crate::request::DecisionReason;

/// KV usage at which the `k/(1−k)` term is capped.
const MAX_KV_USAGE: f64 = 0.99;

/// SMG's `least_load` picker.
#[derive(Debug)]
pub struct SmgLeastLoadPicker {
    /// Weight of the KV-pressure term, seconds.
    pub kv_pressure_weight_s: f64,
}

impl SmgLeastLoadPicker {
    /// The load of one candidate, seconds (lower is better).
    pub fn load_s(&self, ctx: &PickContext<'_>, c: &Candidate<'_>) -> f64 {
        let bs = f64::from(ctx.req.keys.block_size.max(1));
        let tokens = c.estimate.queued_prefill_tokens as f64 + c.estimate.kv_blocks as f64 * bs;
        let tokens_per_s =
            1e6 / c.step.prefill_us_per_token.max(f64::MIN_POSITIVE) / c.prefill_speed.max(1e-3);
        let k = c.estimate.kv_usage().clamp(0.0, MAX_KV_USAGE);
        tokens / tokens_per_s + self.kv_pressure_weight_s * k / (1.0 - k)
    }
}

impl Picker for SmgLeastLoadPicker {
    fn name(&self) -> &str {
        "smg-least-load-picker"
    }
    fn needs(&self) -> Needs {
        Needs::default()
    }
    fn pick(
        &self,
        ctx: &PickContext<'_>,
        cands: &[Candidate<'_>],
        _: &[f64],
        rng: &mut dyn RngCore,
    ) -> Result<Pick, RouteError> {
        let index =
            argmax_random_ties(0..cands.len(), |i| -self.load_s(ctx, &cands[i]), rng).unwrap_or(0);
        Ok(Pick {
            index,
            reason: DecisionReason::LeastRequest,
        })
    }
}
