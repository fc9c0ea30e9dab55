//! kvgate's own policy: the cost scorer (negated routing cost of [`crate::cost`]: predicted TTFT
//! from the step-time model, the KV cliff, and the load-scaled charge for new prefill work) and
//! the softmax picker.
//!
//! ## Staleness widens choice
//! The softmax picker samples candidate `i` with probability `∝ exp(−(best − sᵢ) / (|best| · T))`:
//! score gaps are relative to the best score so the temperature is unit-free. `T` starts at
//! `softmax_base_temperature` and grows by `softmax_temperature_per_s` for every second the
//! oldest candidate signal is older than `signal_fresh_us`, capped at `softmax_max_temperature`.
//! With fresh signals it is nearly argmin; as signals age, near-best candidates share the load
//! instead of every router replica piling onto the one that last looked idle (power-of-d and
//! softmax selection as in Dynamo's `router_temperature`, with the temperature driven by age).
//!
//! ## The pool
//! The softmax, and the hot-prefix rule's choice of where to spill, range over the
//! `softmax_top_k` best-scoring candidates (16, and any tied with the 16th), not the whole
//! fleet: [`top_k`]. Near-best choice needs a handful of candidates; over a thousand, a
//! softmax put most of its mass on the middling many (on the routing benchmark's fleet of
//! 1,000 endpoints with fresh signals, the best 16 drew 46% of the picks, the other 984 the
//! rest). Fleets of at most 16 eligible endpoints are unaffected, and `softmax_top_k: 0`
//! samples among all. The pool also lets the router prove most endpoints out of it without
//! scoring them (`Router::pick_kvgate`).
//!
//! A consequence, accepted: when 16 or more endpoints hold the whole of a hot prefix and
//! score best, the pool holds no endpoint to spill to and the hot-prefix rule does not
//! fire. A spill target relieves a wait above `hot_prefix_wait_us` with a recompute of at
//! most a quarter of it (at the default ratio), so it usually scores better than such holders
//! and is in the pool; when none does, sixteen holders already share the prefix.
//!
//! ## Hot prefixes
//! If the best prefix holder's predicted queue wait exceeds `hot_prefix_wait_us`, a
//! `hot_prefix_spill_fraction` of requests go to the best-scoring endpoint holding less of the
//! prefix whose own queue wait is below `hot_prefix_target_wait_fraction` of the holder's and
//! whose recompute of the held prefix (on its learnt coefficients) is at most the holder's wait
//! divided by `hot_prefix_recompute_ratio`; it then becomes a holder (bookings record
//! approximate entries). Under uniform overload no endpoint qualifies, so the rule never adds
//! recompute work to an equally long queue; on engines where recomputing costs about as much as
//! waiting (a CPU backend), it does not spill at all.

use rand::{Rng, RngCore};

use crate::config::Tuning;
use crate::error::RouteError;
use crate::policies::{
    Candidate, Needs, Pick, PickContext, Picker, Scorer, argmax_random_ties, sample_weighted,
};
use crate::request::DecisionReason;

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
        Ok(softmax_pick(
            ctx,
            &SoftmaxInputs {
                len: cands.len(),
                matched_blocks: |i: usize| cands[i].matched_blocks,
                queue_wait_us: |i: usize| cands[i].cost.map(|c| c.queue_wait_us),
                recompute_us: |i: usize, missing: f64, pairs: f64| {
                    let c = &cands[i];
                    c.step
                        .prefill_time_us(missing, pairs, f64::from(c.estimate.running))
                        * c.prefill_speed
                },
            },
            scores,
            rng,
        ))
    }
}

/// What [`softmax_pick`] reads of candidate `i`: the host's [`Candidate`]s, or the router's
/// leaner per-pick records for the same quantities (one picker, whichever the host holds).
pub(crate) struct SoftmaxInputs<M, W, R> {
    /// Number of candidates.
    pub len: usize,
    /// Matched prefix blocks, best source.
    pub matched_blocks: M,
    /// The cost model's predicted queue wait, µs, when the cost was computed.
    pub queue_wait_us: W,
    /// Time to recompute `missing` prefix tokens with `pairs` attention pairs there (its
    /// coefficients, running sequences and prefill speed), µs.
    pub recompute_us: R,
}

/// [`SoftmaxPicker`]'s choice among `inputs.len` candidates with total `scores`.
pub(crate) fn softmax_pick<M, W, R>(
    ctx: &PickContext<'_>,
    inputs: &SoftmaxInputs<M, W, R>,
    scores: &[f64],
    rng: &mut dyn RngCore,
) -> Pick
where
    M: Fn(usize) -> u32,
    W: Fn(usize) -> Option<f64>,
    R: Fn(usize, f64, f64) -> f64,
{
    let t = ctx.tuning;
    let n = inputs.len;
    let matched = &inputs.matched_blocks;
    let reason_of = |i: usize| {
        if matched(i) > 0 {
            DecisionReason::PrefixHit
        } else {
            DecisionReason::LeastCost
        }
    };
    // The pool sampled from: the `softmax_top_k` best scores (see "The pool").
    let narrowed = top_k(scores, t.softmax_top_k);
    let pool = Pool {
        narrowed: narrowed.as_deref(),
        n,
    };
    // Hot-prefix rule.
    // The best holder: most matched blocks, best score among equals.
    let holder = (0..n).fold(None, |best: Option<usize>, i| match best {
        Some(b) if (matched(b), scores[b]) >= (matched(i), scores[i]) => Some(b),
        _ => Some(i),
    });
    if let Some(h) = holder {
        let held = matched(h);
        let wait = (inputs.queue_wait_us)(h).unwrap_or(0.0);
        if held > 0
            && wait > t.hot_prefix_wait_us as f64
            && pool.iter().any(|i| matched(i) < held)
            && rng.random::<f64>() < t.hot_prefix_spill_fraction
        {
            // Only to endpoints with clearly shorter queues (under uniform overload a spill
            // would just add a recompute to an equally long queue), and only where that
            // recompute is small against the wait it relieves.
            let max_wait = wait * t.hot_prefix_target_wait_fraction;
            let block = f64::from(ctx.req.keys.block_size);
            let recompute = |i: usize| {
                let missing = f64::from(held.saturating_sub(matched(i))) * block;
                let context = f64::from(matched(i)) * block;
                (inputs.recompute_us)(i, missing, crate::cost::attention_pairs(context, missing))
            };
            let others = pool.iter().filter(|&i| {
                matched(i) < held
                    && (inputs.queue_wait_us)(i).is_some_and(|w| w < max_wait)
                    && recompute(i) * t.hot_prefix_recompute_ratio <= wait
            });
            if let Some(index) = argmax_random_ties(others, |i| scores[i], rng) {
                return Pick {
                    index,
                    reason: DecisionReason::HotPrefixSpill,
                };
            }
        }
    }
    let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let temp = SoftmaxPicker::temperature(t, ctx.max_signal_age_us);
    if temp <= 0.0 || pool.len() == 1 {
        let index = argmax_random_ties(pool.iter(), |i| scores[i], rng).unwrap_or(0);
        return Pick {
            index,
            reason: reason_of(index),
        };
    }
    // Gaps relative to the best score; 1 ms floor keeps near-zero costs from exploding.
    let scale = best.abs().max(1.0) * temp;
    // Weights below e⁻⁴⁰ are zero for any practical purpose; skipping their `exp` keeps a
    // wide pool cheap.
    let w: Vec<f64> = pool
        .iter()
        .map(|i| {
            let x = (scores[i] - best) / scale;
            if x < -40.0 { 0.0 } else { x.exp() }
        })
        .collect();
    let index = pool.get(sample_weighted(&w, rng));
    Pick {
        index,
        reason: reason_of(index),
    }
}

/// The candidates [`softmax_pick`] samples among: the first `n`, or those `narrowed` to.
#[derive(Clone, Copy)]
struct Pool<'a> {
    narrowed: Option<&'a [usize]>,
    n: usize,
}

impl Pool<'_> {
    fn len(&self) -> usize {
        self.narrowed.map_or(self.n, <[usize]>::len)
    }

    /// The `j`th candidate of the pool.
    fn get(&self, j: usize) -> usize {
        self.narrowed.map_or(j, |p| p[j])
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len()).map(|j| self.get(j))
    }
}

/// The indices, in ascending order, of the `k` best `scores` and of every other one equal to
/// the `k`th best; `None` meaning all of them (when `k` is 0 or there are at most `k`). Ties
/// at the edge are all kept: a fleet of identical idle endpoints would otherwise send every
/// router replica to the same first `k` addresses. The set depends only on the scores at or
/// above the `k`th best, so a host that omits candidates it has proven strictly worse than
/// the `k`th best gets the same set (`Router::pick_kvgate` relies on this).
pub(crate) fn top_k(scores: &[f64], k: usize) -> Option<Vec<usize>> {
    if k == 0 || scores.len() <= k {
        return None;
    }
    let order = |a: &f64, b: &f64| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal);
    // The `k`th best score; the pool is every one at least as good.
    let mut sorted = scores.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, order);
    let kth = *kth;
    Some(
        (0..scores.len())
            .filter(|&i| order(&scores[i], &kth).is_le())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::top_k;

    proptest::proptest! {
        /// The pool is the `k` best scores and every other one equal to the `k`th, in index
        /// order, as a sort would find them; scores from a small set, so ties at the edge are
        /// common.
        #[test]
        fn top_k_takes_the_best_and_their_ties(
            scores in proptest::collection::vec(0u8..6, 0..40),
            k in 0usize..12,
        ) {
            let scores: Vec<f64> = scores.into_iter().map(|s| -f64::from(s)).collect();
            let mut sorted = scores.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let want: Vec<usize> = match sorted.get(k.wrapping_sub(1)) {
                Some(&kth) if k > 0 => {
                    (0..scores.len()).filter(|&i| scores[i] >= kth).collect()
                }
                _ => (0..scores.len()).collect(),
            };
            let got = top_k(&scores, k).unwrap_or_else(|| (0..scores.len()).collect());
            proptest::prop_assert_eq!(got, want);
        }
    }
}
