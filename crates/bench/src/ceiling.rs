//! The work ceiling: the highest rate at which a fleet could keep up with a workload under any
//! router, so a capacity figure can be read against what is possible, not only against another
//! policy.
//!
//! Why: a goal such as "1.3× the best baseline's capacity" is only meaningful if 1.3× the
//! baseline fits under what the engines can compute. The ceiling is the rate at which the
//! fleet would be busy all the time if routing were perfect in every way a router can make it:
//! - **every reusable prefix is cached wherever it is needed**: a request computes only the
//!   tokens no earlier request sent before it (the longest common token prefix with any
//!   earlier request, in arrival order, counted in whole engine blocks and at most the prompt
//!   less one token, as vLLM recomputes the last one). No eviction, no duplicate prefill on a
//!   second engine;
//! - **work spreads in any proportion**, so engines of different speeds finish together
//!   (a fluid split: the fleet's time is `1 / Σ 1/Tₑ`, `Tₑ` the time engine `e` alone would
//!   take for all of it);
//! - **every step is as full as the engine allows**: the fixed step cost (`β₀`) is paid
//!   once per `max_num_seqs` decode tokens, or per `max_num_batched_tokens` tokens if that
//!   binds, never more.
//!
//! An engine's time for the work is its own step model ([`StepModel::step_us`]'s terms) on
//! those token counts: `β₁·uncached + β₃·attention pairs + β₂·(output − 1) + β₀·steps` (the
//! first output token comes with the last prefill chunk). Requests longer than `max_model_len`
//! are left out, as the engines reject them.
//!
//! Not a capacity: at the ceiling the queues never drain, so TTFT grows for as long as
//! requests arrive. A policy's capacity at an SLO sits below it by whatever its cache misses,
//! imbalance, partly full steps and queueing cost. The gap is what any better router could
//! still win; a capacity above it can only come from a run too short for its queues to grow
//! past the SLO.
//!
//! Synthetic workloads generate more requests at higher rates, so the ceiling is found as a
//! fixed point: the rate `r` at which the workload generated at `r` keeps the fleet exactly
//! busy.

use std::collections::HashMap;

use kvgate_engine::{EngineConfig, attention_pairs};
use serde::Serialize;

use crate::capacity::{arrival_span_us, offered_rps};
use crate::workload::{Segment, Workload};

/// The ceiling of a workload on a fleet (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WorkCeiling {
    /// Rate (trace speed-up or generator rate) at which the fleet is exactly busy.
    pub rate: f64,
    /// Requests per second offered at that rate.
    pub rps: f64,
    /// Prompt tokens cached under the ideal cache ÷ prompt tokens.
    pub ideal_hit_ratio: f64,
    /// Share of the fleet's time spent in prefill at the ceiling (the rest: decode and the
    /// fixed step cost).
    pub prefill_share: f64,
}

impl WorkCeiling {
    /// `rps` as a share of the ceiling's rate; `None` for a zero ceiling.
    pub fn share(&self, rps: f64) -> Option<f64> {
        (self.rps > 0.0).then(|| rps / self.rps)
    }
}

/// Token counts of the workload's servable requests under the ideal cache.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct IdealWork {
    prompt_tokens: f64,
    uncached_tokens: f64,
    attention_pairs: f64,
    decode_tokens: f64,
}

/// A trie of every prompt seen so far, by segment: a node's children are keyed by the whole
/// segment (block id and length); `longest` keeps, per block id, the longest segment of that
/// block seen at this position, which shares `min(lengths)` tokens with any other segment of
/// the same block (a segment is the first `tokens` words of its block).
#[derive(Default)]
struct Node {
    children: HashMap<(u64, u32), usize>,
    longest: HashMap<u64, u32>,
}

#[derive(Default)]
struct PromptTrie {
    nodes: Vec<Node>,
}

impl PromptTrie {
    /// The longest token prefix `segments` shares with any prompt inserted before, then
    /// inserts it.
    fn common_then_insert(&mut self, segments: &[Segment]) -> u64 {
        if self.nodes.is_empty() {
            self.nodes.push(Node::default());
        }
        let mut common = 0u64;
        let mut node = 0usize;
        let mut matching = true;
        for s in segments {
            if matching {
                if self.nodes[node].children.contains_key(&(s.id, s.tokens)) {
                    common += u64::from(s.tokens);
                } else {
                    let seen = self.nodes[node].longest.get(&s.id).copied().unwrap_or(0);
                    common += u64::from(s.tokens.min(seen));
                    matching = false;
                }
            }
            let longest = self.nodes[node].longest.entry(s.id).or_insert(0);
            *longest = (*longest).max(s.tokens);
            let next = self.nodes.len();
            node = *self.nodes[node]
                .children
                .entry((s.id, s.tokens))
                .or_insert(next);
            if node == next {
                self.nodes.push(Node::default());
            }
        }
        common
    }
}

/// The workload's work under the ideal cache, for engines of `block_size` tokens per block
/// that accept at most `max_model_len` tokens.
fn ideal_work(w: &Workload, block_size: u64, max_model_len: u64) -> IdealWork {
    let mut trie = PromptTrie::default();
    let mut out = IdealWork::default();
    let block_size = block_size.max(1);
    for r in &w.requests {
        let prompt = u64::from(r.prompt_tokens());
        let common = trie.common_then_insert(&r.segments);
        if prompt == 0 || prompt + u64::from(r.output_tokens) > max_model_len {
            continue;
        }
        let cached = (common.min(prompt - 1) / block_size) * block_size;
        let uncached = prompt - cached;
        out.prompt_tokens += prompt as f64;
        out.uncached_tokens += uncached as f64;
        out.attention_pairs += attention_pairs(cached, uncached);
        out.decode_tokens += f64::from(r.output_tokens.saturating_sub(1));
    }
    out
}

/// Microseconds engine `e` alone would take for `work`, and of them in prefill.
fn engine_time_us(e: &EngineConfig, work: &IdealWork) -> (f64, f64) {
    let s = &e.step;
    let prefill = s.beta1_us_per_prefill_token * work.uncached_tokens
        + s.beta3_us_per_attention_pair * work.attention_pairs;
    let steps = (work.decode_tokens / e.max_num_seqs.max(1) as f64)
        .max((work.uncached_tokens + work.decode_tokens) / e.max_num_batched_tokens.max(1) as f64);
    (
        prefill + s.beta2_us_per_decode_token * work.decode_tokens + s.beta0_us * steps,
        prefill,
    )
}

/// Wall-clock µs the fleet needs for `work` with a perfect split, and the share of it in
/// prefill.
fn fleet_time_us(engines: &[EngineConfig], work: &IdealWork) -> (f64, f64) {
    let times: Vec<(f64, f64)> = engines.iter().map(|e| engine_time_us(e, work)).collect();
    let rate: f64 = times.iter().filter(|t| t.0 > 0.0).map(|t| 1.0 / t.0).sum();
    if rate <= 0.0 {
        return (0.0, 0.0);
    }
    // Engine e takes the share (1/Tₑ)/Σ(1/T) of the work, so its prefill time is that share
    // of its own prefill time for all of it.
    let prefill_share = times
        .iter()
        .filter(|t| t.0 > 0.0)
        .map(|t| (1.0 / t.0) / rate * (t.1 / t.0))
        .sum();
    (1.0 / rate, prefill_share)
}

/// The ceiling of the workload `make(rate)` on `engines`, searched from `start_rate` (see the
/// module docs); `None` when the workload is empty or has no arrival span.
pub fn work_ceiling(
    engines: &[EngineConfig],
    make: &dyn Fn(f64) -> Workload,
    start_rate: f64,
) -> Option<WorkCeiling> {
    let first = engines.first()?;
    let block_size = first.block_size as u64;
    let max_model_len = engines.iter().map(|e| e.max_model_len).max()? as u64;
    let mut rate = start_rate;
    // The busy fraction grows about linearly with the rate, so a few fixed-point steps settle
    // it to well under a percent.
    for _ in 0..8 {
        let w = make(rate);
        let (busy_us, _) = fleet_time_us(engines, &ideal_work(&w, block_size, max_model_len));
        let span = arrival_span_us(&w) as f64;
        if busy_us <= 0.0 || span <= 0.0 {
            return None;
        }
        let next = rate * span / busy_us;
        let settled = (next / rate - 1.0).abs() < 1e-3;
        rate = next;
        if settled {
            break;
        }
    }
    let w = make(rate);
    let work = ideal_work(&w, block_size, max_model_len);
    let (_, prefill_share) = fleet_time_us(engines, &work);
    Some(WorkCeiling {
        rate,
        rps: offered_rps(&w),
        ideal_hit_ratio: if work.prompt_tokens > 0.0 {
            1.0 - work.uncached_tokens / work.prompt_tokens
        } else {
            0.0
        },
        prefill_share,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::WorkloadRequest;

    fn req(arrival_us: u64, segments: &[(u64, u32)], output_tokens: u32) -> WorkloadRequest {
        WorkloadRequest {
            arrival_us,
            segments: segments
                .iter()
                .map(|&(id, tokens)| Segment { id, tokens })
                .collect(),
            output_tokens,
            session: None,
        }
    }

    fn workload(requests: Vec<WorkloadRequest>) -> Workload {
        Workload {
            name: "test".into(),
            requests,
            ..Default::default()
        }
    }

    #[test]
    fn a_prompt_shares_what_earlier_prompts_sent_in_whole_segments_or_a_block_head() {
        let mut t = PromptTrie::default();
        let seg = |v: &[(u64, u32)]| -> Vec<Segment> {
            v.iter()
                .map(|&(id, tokens)| Segment { id, tokens })
                .collect()
        };
        assert_eq!(t.common_then_insert(&seg(&[(1, 100), (2, 50)])), 0);
        // Same system block, another question.
        assert_eq!(t.common_then_insert(&seg(&[(1, 100), (3, 50)])), 100);
        // The head of block 2 after block 1: 30 of the 50 tokens sent before.
        assert_eq!(
            t.common_then_insert(&seg(&[(1, 100), (2, 30), (4, 9)])),
            130
        );
        // A longer piece of block 1 shares only what was sent of it.
        assert_eq!(t.common_then_insert(&seg(&[(1, 120)])), 100);
        // After the whole (1, 100) and (2, 30) prefix, the next segment differs.
        assert_eq!(
            t.common_then_insert(&seg(&[(1, 100), (2, 30), (5, 9)])),
            130
        );
        // Nothing in common at the root.
        assert_eq!(t.common_then_insert(&seg(&[(6, 10)])), 0);
    }

    #[test]
    fn ideal_work_counts_whole_blocks_and_recomputes_the_last_token() {
        let w = workload(vec![
            req(0, &[(1, 100)], 10),
            // Whole prompt seen: 99 tokens could hit, 96 in whole blocks of 16.
            req(1, &[(1, 100)], 10),
            // Too long for the engine: left out, but its prompt is still remembered.
            req(2, &[(7, 1000)], 20),
            req(3, &[(7, 1000), (8, 10)], 1),
        ]);
        let work = ideal_work(&w, 16, 1015);
        assert_eq!(work.prompt_tokens, 100.0 + 100.0 + 1010.0);
        assert_eq!(work.uncached_tokens, 100.0 + 4.0 + (1010.0 - 992.0));
        assert_eq!(work.decode_tokens, 9.0 + 9.0 + 0.0);
        assert_eq!(
            work.attention_pairs,
            attention_pairs(0, 100) + attention_pairs(96, 4) + attention_pairs(992, 18)
        );
    }

    #[test]
    fn the_fleet_time_is_a_perfect_split_and_steps_are_full() {
        let e = EngineConfig::h100();
        let work = IdealWork {
            prompt_tokens: 1e6,
            uncached_tokens: 1e5,
            attention_pairs: 0.0,
            decode_tokens: 256e3,
        };
        let (one, prefill) = engine_time_us(&e, &work);
        let steps = 256e3 / e.max_num_seqs as f64;
        let expected_prefill = 17.25 * 1e5;
        assert!((prefill - expected_prefill).abs() < 1e-6);
        assert!((one - (expected_prefill + 6.0 * 256e3 + 5752.7 * steps)).abs() < 1e-6);
        // Four equal engines: a quarter of the time each, same prefill share.
        let (four, share) = fleet_time_us(&[e.clone(), e.clone(), e.clone(), e.clone()], &work);
        assert!((four - one / 4.0).abs() < 1e-6);
        assert!((share - prefill / one).abs() < 1e-12);
        // An engine twice as fast beside a plain one: 1 / (1/T + 2/T) = T/3.
        let mut fast = e.clone();
        fast.step.beta0_us /= 2.0;
        fast.step.beta1_us_per_prefill_token /= 2.0;
        fast.step.beta2_us_per_decode_token /= 2.0;
        let (two, _) = fleet_time_us(&[e, fast], &work);
        assert!((two - one / 3.0).abs() < 1e-6);
    }

    #[test]
    fn the_ceiling_keeps_the_fleet_exactly_busy_at_a_fixed_point() {
        // A trace-like workload whose requests do not depend on the rate: 1,000 unshared
        // prompts of 1,000 tokens with 101 output tokens, arriving 1 ms apart at speed-up 1.
        let base: Vec<WorkloadRequest> = (0..1000)
            .map(|i| req(i * 1000, &[(i + 1, 1000)], 101))
            .collect();
        let make = |speedup: f64| {
            let mut w = workload(base.clone());
            for r in &mut w.requests {
                r.arrival_us = (r.arrival_us as f64 / speedup).round() as u64;
            }
            w
        };
        let engines = vec![EngineConfig::h100(); 2];
        let c = work_ceiling(&engines, &make, 1.0).expect("a ceiling");
        let work = ideal_work(&make(1.0), 16, u64::MAX);
        let (busy, _) = fleet_time_us(&engines, &work);
        // At the ceiling the span equals the busy time.
        let span = arrival_span_us(&make(c.rate)) as f64;
        assert!((span / busy - 1.0).abs() < 2e-3, "span {span} busy {busy}");
        assert_eq!(c.ideal_hit_ratio, 0.0);
        assert!(c.prefill_share > 0.5 && c.prefill_share < 1.0);
    }
}
