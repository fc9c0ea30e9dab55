//! The oracle (simulation only): kvgate's cost on true, undelayed state. It minimises kvgate's
//! routing cost (predicted TTFT plus the load-scaled charge for new prefill work, see
//! [`crate::cost`]) computed from the simulator's *true* queue, running set, KV use and cached
//! prefix, read through an [`crate::OracleView`]; without one a pick fails with
//! [`crate::RouteError::NoOracle`]. It is **not** an upper bound on routing quality: it removes
//! staleness, not the cost model's own errors, and other policies can beat it (it shows what
//! fresher signals would buy this cost model). It cannot run live
//! ([`crate::Policy::is_live_capable`]).

use crate::policies::{Candidate, Needs, PickContext, Scorer};
use crate::request::TrueLoad;

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
        let best_cached = cands
            .iter()
            .filter_map(|c| c.oracle.map(|t| t.cached_prefix_tokens))
            .max()
            .unwrap_or(0);
        for (c, o) in cands.iter().zip(out) {
            *o = match c.oracle {
                Some(t) => -oracle_routing_cost_us(ctx, c, &t, best_cached) / 1000.0,
                None => f64::NAN,
            };
        }
    }
}

/// The cost model's TTFT on true state (the endpoint's learnt coefficients at speed 1, true
/// cached prefix, true KV use).
pub fn oracle_ttft_us(ctx: &PickContext<'_>, c: &Candidate<'_>, t: &TrueLoad) -> f64 {
    let uncached = f64::from(ctx.req.prompt_tokens.saturating_sub(t.cached_prefix_tokens)).max(1.0);
    let base = oracle_prediction_us(ctx, c, t);
    let cap = c.estimate.kv_capacity_blocks.max(1) as f64;
    let new_blocks = crate::cost::new_kv_blocks(
        uncached,
        ctx.req.max_tokens,
        ctx.req.keys.block_size,
        ctx.tuning,
    );
    let kv_after = t.kv_usage + new_blocks as f64 / cap;
    let over = crate::cost::cliff_overshoot(t.kv_usage, kv_after, ctx.tuning);
    base * (1.0 + ctx.tuning.kv_cliff_steepness * over)
        + ctx.tuning.kv_cliff_preemption_cost_us as f64 * over
}

/// Attention pairs of computing the `uncached` last tokens of the request's prompt.
fn own_pairs(ctx: &PickContext<'_>, uncached: f64) -> f64 {
    crate::cost::attention_pairs(f64::from(ctx.req.prompt_tokens) - uncached, uncached)
}

/// The bare TTFT the oracle predicts on true state: the queue and the request's own prefill,
/// without the cliff's avoidance penalty (what a decision reports as its prediction, held
/// against the measured TTFT, like kvgate's).
pub fn oracle_prediction_us(ctx: &PickContext<'_>, c: &Candidate<'_>, t: &TrueLoad) -> f64 {
    let uncached = f64::from(ctx.req.prompt_tokens.saturating_sub(t.cached_prefix_tokens)).max(1.0);
    c.step.prefill_time_us(
        t.queued_prefill_tokens as f64 + uncached,
        t.queued_prefill_pairs as f64 + own_pairs(ctx, uncached),
        f64::from(t.running),
    )
}

/// The kvgate routing cost on true state: [`oracle_ttft_us`] plus the load-scaled charge for the
/// request's own prefill work and the charge for recomputing prefix another candidate truly
/// holds (`best_cached_tokens`, the most any candidate has cached; see [`crate::cost`]), so the
/// oracle differs from kvgate only in what it knows, not in what it optimises.
pub fn oracle_routing_cost_us(
    ctx: &PickContext<'_>,
    c: &Candidate<'_>,
    t: &TrueLoad,
    best_cached_tokens: u32,
) -> f64 {
    let prompt = ctx.req.prompt_tokens;
    let uncached = f64::from(prompt.saturating_sub(t.cached_prefix_tokens)).max(1.0);
    let queued = t.queued_prefill_tokens as f64;
    let queued_pairs = t.queued_prefill_pairs as f64;
    let running = f64::from(t.running);
    let own = c.step.prefill_time_us(
        queued + uncached,
        queued_pairs + own_pairs(ctx, uncached),
        running,
    ) - c.step.prefill_time_us(queued, queued_pairs, running);
    let duplicate = f64::from(
        best_cached_tokens
            .min(prompt)
            .saturating_sub(t.cached_prefix_tokens.min(prompt)),
    );
    let share = crate::cost::duplicate_share(duplicate, uncached, ctx.tuning);
    oracle_ttft_us(ctx, c, t)
        + crate::cost::externality_weight_for_queue(t.waiting, ctx.tuning) * own
        + ctx.tuning.duplicate_prefix_weight * own * share
}
