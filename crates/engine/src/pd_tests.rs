//! Unit tests of prefill/decode disaggregation: holds on the prefill side, loads on the decode
//! side, the failure policies, and a property test that no block ever leaks.

use proptest::prelude::*;

use crate::tests::{prompt, req, small_cfg as cfg};
use crate::*;

fn run_until_idle(e: &mut Engine, now: &mut u64) -> Vec<Output> {
    let mut out = Vec::new();
    e.advance(*now, &mut out);
    while let Some(t) = e.inflight_end() {
        *now = t;
        e.advance(t, &mut out);
        e.check_invariants().unwrap();
    }
    out
}

fn finished(out: &[Output], id: RequestId) -> Option<(u64, FinishReason, Usage)> {
    out.iter().find_map(|o| match *o {
        Output::Finished {
            id: i,
            at_us,
            reason,
            usage,
        } if i == id => Some((at_us, reason, usage)),
        _ => None,
    })
}

fn stored_keys(events: &[KvEvent]) -> Vec<u64> {
    events
        .iter()
        .flat_map(|e| match e {
            KvEvent::BlockStored { block_hashes, .. } => block_hashes.clone(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn transfer_time_is_latency_plus_bytes_over_bandwidth() {
    let t = KvTransferConfig::default();
    assert_eq!(t.kv_bytes_per_token, 128 * 1024);
    assert_eq!(t.abort_request_timeout_us, 480_000_000);
    assert_eq!(t.kv_load_failure_policy, KvLoadFailurePolicy::Fail);
    // 16 tokens = 2 MiB; at 50 GB/s that is 41.94 µs, rounded up, plus 200 µs.
    assert_eq!(t.transfer_bytes(16), 2_097_152);
    assert_eq!(t.transfer_us(16), 200 + 42);
    assert_eq!(t.transfer_us(0), 200);
    let slow = KvTransferConfig {
        link_bandwidth_bytes_per_s: 1e9,
        link_latency_us: 0,
        ..t.clone()
    };
    assert_eq!(slow.transfer_us(1000), 131_072);
    let mut c = EngineConfig::h100();
    c.kv_transfer.link_bandwidth_bytes_per_s = 0.0;
    assert!(matches!(
        Engine::new(c),
        Err(EngineError::InvalidConfig {
            field: "kv_transfer.link_bandwidth_bytes_per_s",
            ..
        })
    ));
    assert_eq!(
        "recompute".parse::<KvLoadFailurePolicy>().unwrap(),
        KvLoadFailurePolicy::Recompute
    );
    assert!("retry".parse::<KvLoadFailurePolicy>().is_err());
    let c: EngineConfig = serde_json::from_str(
        r#"{"kv_transfer": {"link_latency_us": 5, "kv_load_failure_policy": "recompute"}}"#,
    )
    .unwrap();
    assert_eq!(c.kv_transfer.link_latency_us, 5);
    assert_eq!(c.kv_transfer.kv_bytes_per_token, 131_072);
    assert_eq!(
        c.kv_transfer.kv_load_failure_policy,
        KvLoadFailurePolicy::Recompute
    );
}

#[test]
fn remote_decode_holds_the_prompt_blocks_until_released() {
    let c = cfg(64);
    let usable = c.num_gpu_blocks - 1;
    let mut e = Engine::new(c).unwrap();
    let mut now = 0;
    e.add_remote_decode(now, req(1, prompt(1, 40), 1)).unwrap();
    let out = run_until_idle(&mut e, &mut now);
    let (at, reason, usage) = finished(&out, 1).expect("the prefill finishes");
    assert_eq!(reason, FinishReason::Length);
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (40, 1));
    let hold = e.kv_hold(1).expect("blocks held").clone();
    assert_eq!(
        hold.block_ids.len(),
        3,
        "two full blocks and the partial one"
    );
    assert_eq!(hold.num_tokens, 40);
    assert_eq!(hold.expires_at_us, at + 480_000_000);
    assert_eq!(e.free_blocks(), usable - 3, "held blocks are not free");
    assert_eq!(e.next_wakeup_us(), Some(hold.expires_at_us));
    let s = e.stats();
    assert_eq!((s.kv_holds, s.kv_hold_blocks), (1, 3));
    assert_eq!((s.prompt_tokens_total, s.generation_tokens_total), (40, 1));
    assert!(s.kv_usage > 3.0 / 64.0, "held blocks count as used");
    // The id stays taken while its blocks are held.
    assert_eq!(
        e.add_request(now, req(1, prompt(2, 8), 1)),
        Err(EngineError::DuplicateRequest { id: 1 })
    );
    assert!(e.release_kv_hold(now + 10, 1));
    assert!(!e.release_kv_hold(now + 10, 1), "released once");
    assert!(e.kv_hold(1).is_none());
    assert_eq!(e.free_blocks(), usable, "every block free again");
    assert_eq!(e.next_wakeup_us(), None);
    e.check_invariants().unwrap();
    // The full blocks stay cached: the decode engine read them, the prefix is still warm.
    assert_eq!(e.cached_blocks(), 2);
}

#[test]
fn an_unread_hold_expires_after_the_abort_timeout() {
    let mut c = cfg(64);
    c.kv_transfer.abort_request_timeout_us = 1_000_000;
    let usable = c.num_gpu_blocks - 1;
    let mut e = Engine::new(c).unwrap();
    let mut now = 0;
    e.add_remote_decode(now, req(1, prompt(1, 40), 1)).unwrap();
    let out = run_until_idle(&mut e, &mut now);
    let (at, _, _) = finished(&out, 1).unwrap();
    let deadline = at + 1_000_000;
    assert_eq!(e.next_wakeup_us(), Some(deadline));
    let mut sink = Vec::new();
    e.advance(deadline - 1, &mut sink);
    assert!(e.kv_hold(1).is_some(), "held until the deadline");
    e.advance(deadline, &mut sink);
    assert!(e.kv_hold(1).is_none());
    assert!(sink.is_empty(), "an expiry is not an output");
    assert_eq!(e.free_blocks(), usable);
    assert_eq!(e.stats().kv_holds_expired, 1);
    assert!(
        !e.release_kv_hold(deadline + 1, 1),
        "nothing left to release"
    );
    e.check_invariants().unwrap();
}

#[test]
fn an_aborted_remote_decode_frees_its_blocks_at_once() {
    let c = cfg(64);
    let usable = c.num_gpu_blocks - 1;
    let mut e = Engine::new(c).unwrap();
    e.add_remote_decode(0, req(1, prompt(1, 40), 1)).unwrap();
    assert!(e.abort(1, 1));
    let mut out = Vec::new();
    e.advance(u64::MAX / 2, &mut out);
    assert_eq!(finished(&out, 1).unwrap().1, FinishReason::Abort);
    assert!(e.kv_hold(1).is_none());
    assert_eq!(e.free_blocks(), usable);
    e.check_invariants().unwrap();
}

#[test]
fn remote_prefill_waits_for_its_kv_without_a_slot_then_recomputes_only_the_last_token() {
    let c = cfg(64);
    let usable = c.num_gpu_blocks - 1;
    let m = c.step;
    let hasher = c.block_hasher();
    let p = prompt(3, 40);
    let mut e = Engine::new(c).unwrap();
    e.add_remote_prefill(100, req(9, p.clone(), 4)).unwrap();
    let loads = e.take_kv_loads();
    assert_eq!(loads.len(), 1);
    let load = &loads[0];
    assert_eq!((load.id, load.at_us), (9, 100));
    assert_eq!((load.local_cached_tokens, load.load_tokens), (0, 40));
    assert_eq!(load.block_ids.len(), 3);
    assert!(e.take_kv_loads().is_empty(), "taken once");
    // Parked: no slot, no step, counted as waiting, nothing published before the KV arrives.
    assert_eq!(e.next_wakeup_us(), None);
    let s = e.stats();
    assert_eq!((s.running, s.waiting, s.waiting_for_remote_kv), (0, 1, 1));
    assert_eq!(
        e.queued_prefill_tokens(),
        1,
        "only the last token is computed here"
    );
    assert_eq!(e.free_blocks(), usable - 3);
    assert!(e.take_kv_events().is_empty());
    e.check_invariants().unwrap();

    assert!(e.remote_kv_ready(5_000, 9));
    assert!(!e.remote_kv_ready(5_000, 9), "ready once");
    // One prefill token in the first step, then decodes.
    let t1 = 5_000 + m.step_us(1, 0, 0.0);
    assert_eq!(e.next_wakeup_us(), Some(t1));
    let mut now = 5_000;
    let out = run_until_idle(&mut e, &mut now);
    let first = out
        .iter()
        .find_map(|o| match *o {
            Output::Token {
                at_us, index: 0, ..
            } => Some(at_us),
            _ => None,
        })
        .unwrap();
    assert_eq!(first, t1);
    let (_, reason, usage) = finished(&out, 9).unwrap();
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 40,
            completion_tokens: 4,
            cached_tokens: 39,
        }
    );
    // The loaded full blocks are published as this engine's own, with the engine's hashes.
    let expected: Vec<u64> = hasher
        .hashes(&p, kvgate_tokens::ExtraKeys::default())
        .iter()
        .map(|h| h.key())
        .collect();
    assert_eq!(expected.len(), 2);
    let events = e.take_kv_events();
    assert_eq!(&stored_keys(&events)[..2], &expected[..]);
    assert_eq!(e.cached_prefix_tokens(&expected), 32);
    let s = e.stats();
    assert_eq!((s.prompt_tokens_total, s.generation_tokens_total), (40, 4));
    assert_eq!(s.prompt_tokens_external_kv_transfer, 40);
    assert_eq!(s.prompt_tokens_local_compute, 1);
    assert_eq!(s.prompt_tokens_local_cache_hit, 0);
    assert_eq!(
        (s.prompt_tokens_cached, s.prompt_tokens_recomputed),
        (39, 1)
    );
    assert_eq!(
        (
            s.external_prefix_cache_queries_tokens,
            s.external_prefix_cache_hits_tokens
        ),
        (40, 40)
    );
    assert_eq!(
        (s.prefix_cache_queries_tokens, s.prefix_cache_hits_tokens),
        (40, 0)
    );
    assert_eq!(e.free_blocks(), usable, "every block free again");
    e.check_invariants().unwrap();
}

#[test]
fn remote_prefill_keeps_its_local_prefix_and_loads_only_the_rest() {
    let c = cfg(64);
    let mut e = Engine::new(c).unwrap();
    let mut now = 0;
    let shared = prompt(4, 32);
    e.add_request(now, req(1, shared.clone(), 1)).unwrap();
    run_until_idle(&mut e, &mut now);
    let _ = e.take_kv_events();
    let mut p = shared.clone();
    p.extend(prompt(5, 18));
    e.add_remote_prefill(now, req(2, p, 2)).unwrap();
    let load = e.take_kv_loads().pop().unwrap();
    assert_eq!((load.local_cached_tokens, load.load_tokens), (32, 18));
    assert_eq!(
        load.block_ids.len(),
        2,
        "50 tokens are 4 blocks, 2 of them hit locally"
    );
    assert!(e.remote_kv_ready(now + 300, 2));
    now += 300;
    let out = run_until_idle(&mut e, &mut now);
    assert_eq!(finished(&out, 2).unwrap().2.cached_tokens, 49);
    // Only the one newly loaded full block (tokens 32..48) is published.
    assert_eq!(stored_keys(&e.take_kv_events()).len(), 1);
    let s = e.stats();
    assert_eq!(s.prompt_tokens_local_cache_hit, 32);
    assert_eq!(s.prompt_tokens_external_kv_transfer, 18);
    assert_eq!(s.external_prefix_cache_hits_tokens, 18);
    assert_eq!(s.prefix_cache_hits_tokens, 32);
}

#[test]
fn a_failed_load_fails_the_request_by_default() {
    let c = cfg(64);
    let usable = c.num_gpu_blocks - 1;
    let mut e = Engine::new(c).unwrap();
    e.add_remote_prefill(0, req(3, prompt(6, 40), 4)).unwrap();
    assert_eq!(e.take_kv_loads().len(), 1);
    assert!(e.remote_kv_failed(700, 3));
    assert!(!e.remote_kv_failed(700, 3), "failed once");
    assert!(!e.remote_kv_ready(700, 3), "a failed request is gone");
    let mut out = Vec::new();
    e.advance(700, &mut out);
    let (at, reason, usage) = finished(&out, 3).unwrap();
    assert_eq!((at, reason), (700, FinishReason::Error));
    assert_eq!(usage.completion_tokens, 0);
    assert_eq!(e.free_blocks(), usable);
    assert!(
        stored_keys(&e.take_kv_events()).is_empty(),
        "blocks that never got their KV are never published"
    );
    let s = e.stats();
    assert_eq!(
        (s.finished_error, s.waiting, s.prompt_tokens_total),
        (1, 0, 0)
    );
    assert_eq!(e.queued_prefill_tokens(), 0);
    e.check_invariants().unwrap();
}

#[test]
fn a_failed_load_is_prefilled_locally_under_the_recompute_policy() {
    let mut c = cfg(64);
    c.kv_transfer.kv_load_failure_policy = KvLoadFailurePolicy::Recompute;
    let usable = c.num_gpu_blocks - 1;
    let m = c.step;
    let mut e = Engine::new(c).unwrap();
    e.add_remote_prefill(0, req(3, prompt(6, 40), 2)).unwrap();
    e.take_kv_loads();
    assert!(e.remote_kv_failed(700, 3));
    assert_eq!(
        e.queued_prefill_tokens(),
        40,
        "the whole prompt is computed here now"
    );
    assert_eq!(e.next_wakeup_us(), Some(700 + m.step_us(40, 0, 0.0)));
    let mut now = 700;
    let out = run_until_idle(&mut e, &mut now);
    let (_, reason, usage) = finished(&out, 3).unwrap();
    assert_eq!(reason, FinishReason::Length);
    assert_eq!((usage.cached_tokens, usage.completion_tokens), (0, 2));
    assert_eq!(
        stored_keys(&e.take_kv_events()).len(),
        2,
        "computed here, published once"
    );
    let s = e.stats();
    assert_eq!(s.prompt_tokens_local_compute, 40);
    assert_eq!(s.prompt_tokens_external_kv_transfer, 0);
    assert_eq!(e.free_blocks(), usable);
}

#[test]
fn a_request_blocked_by_held_blocks_waits_idle_and_runs_once_they_are_freed() {
    // 9 usable blocks: a 100-token hold (7 blocks) leaves too few for a 60-token request.
    let c = cfg(10);
    let m = c.step;
    let mut e = Engine::new(c).unwrap();
    let mut now = 0;
    e.add_remote_decode(now, req(1, prompt(1, 100), 1)).unwrap();
    run_until_idle(&mut e, &mut now);
    assert_eq!(e.free_blocks(), 2);
    e.add_request(now, req(2, prompt(2, 60), 1)).unwrap();
    assert_eq!(
        e.next_wakeup_us(),
        Some(now + 480_000_000),
        "idle until the hold expires"
    );
    assert_eq!(e.num_waiting(), 1);
    e.check_invariants().unwrap();
    now += 50;
    assert!(e.release_kv_hold(now, 1));
    assert_eq!(e.next_wakeup_us(), Some(now + m.step_us(60, 0, 0.0)));
    let out = run_until_idle(&mut e, &mut now);
    assert_eq!(finished(&out, 2).unwrap().1, FinishReason::Length);
    assert_eq!(e.free_blocks(), 9);
}

#[test]
fn loads_that_fill_the_cache_block_the_queue_until_they_arrive() {
    let c = cfg(10);
    let mut e = Engine::new(c).unwrap();
    let mut now = 0;
    e.add_remote_prefill(now, req(1, prompt(1, 100), 1))
        .unwrap();
    e.add_remote_prefill(now, req(2, prompt(2, 60), 1)).unwrap();
    let loads = e.take_kv_loads();
    assert_eq!(loads.len(), 1, "the second does not fit beside the first");
    assert_eq!(e.next_wakeup_us(), None);
    assert!(e.remote_kv_ready(10, 1));
    now = 10;
    let out = run_until_idle(&mut e, &mut now);
    assert!(finished(&out, 1).is_some());
    let loads = e.take_kv_loads();
    assert_eq!(
        loads.len(),
        1,
        "the second got its blocks when the first finished"
    );
    assert_eq!(loads[0].id, 2);
    assert!(e.remote_kv_ready(now, 2));
    let out = run_until_idle(&mut e, &mut now);
    assert!(finished(&out, 2).is_some());
    assert_eq!(e.free_blocks(), 9);
    e.check_invariants().unwrap();
}

#[test]
fn a_prefill_and_a_decode_engine_hand_a_request_over() {
    let c = cfg(64);
    let (mut p, mut d) = (
        Engine::new(c.clone()).unwrap(),
        Engine::new(c.clone()).unwrap(),
    );
    let tokens = prompt(8, 70);
    let mut now = 0;
    p.add_remote_decode(now, req(1, tokens.clone(), 1)).unwrap();
    run_until_idle(&mut p, &mut now);
    let hold = p.kv_hold(1).unwrap().clone();
    d.add_remote_prefill(now, req(1, tokens, 3)).unwrap();
    let load = d.take_kv_loads().pop().unwrap();
    assert_eq!(load.load_tokens, hold.num_tokens);
    assert_eq!(load.block_ids.len(), hold.block_ids.len());
    now += c.kv_transfer.transfer_us(u64::from(load.load_tokens));
    assert!(d.remote_kv_ready(now, 1));
    assert!(p.release_kv_hold(now, 1));
    let out = run_until_idle(&mut d, &mut now);
    assert_eq!(finished(&out, 1).unwrap().2.completion_tokens, 3);
    // Same config, same tokens: the decode engine publishes the prefill engine's keys.
    let pk = stored_keys(&p.take_kv_events());
    let dk = stored_keys(&d.take_kv_events());
    assert_eq!(pk[..4], dk[..4]);
    assert_eq!(p.free_blocks(), 63);
    assert_eq!(d.free_blocks(), 63);
}

#[test]
fn aborting_a_loading_request_frees_its_blocks() {
    let c = cfg(64);
    let mut e = Engine::new(c).unwrap();
    e.add_remote_prefill(0, req(4, prompt(4, 40), 2)).unwrap();
    e.take_kv_loads();
    assert!(e.abort(5, 4));
    assert!(!e.remote_kv_ready(6, 4));
    assert_eq!(e.free_blocks(), 63);
    assert_eq!(e.num_loading(), 0);
    e.check_invariants().unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Add {
        kind: u8,
        seed: u8,
        len: u16,
        max_tokens: u8,
        dt_us: u32,
    },
    Ready {
        pick: u8,
        dt_us: u32,
    },
    Fail {
        pick: u8,
        dt_us: u32,
    },
    Release {
        pick: u8,
        dt_us: u32,
    },
    Abort {
        back: u8,
        dt_us: u32,
    },
    Advance {
        dt_us: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..3, 1u16..200, 1u8..20, 0u32..20_000).prop_map(
            |(kind, seed, len, max_tokens, dt_us)| Op::Add { kind, seed, len, max_tokens, dt_us }
        ),
        2 => (any::<u8>(), 0u32..20_000).prop_map(|(pick, dt_us)| Op::Ready { pick, dt_us }),
        1 => (any::<u8>(), 0u32..20_000).prop_map(|(pick, dt_us)| Op::Fail { pick, dt_us }),
        2 => (any::<u8>(), 0u32..20_000).prop_map(|(pick, dt_us)| Op::Release { pick, dt_us }),
        1 => (0u8..8, 0u32..20_000).prop_map(|(back, dt_us)| Op::Abort { back, dt_us }),
        2 => (0u32..2_000_000).prop_map(|dt_us| Op::Advance { dt_us }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Any mix of local, remote-decode and remote-prefill requests, loads that succeed or fail,
    /// releases, timeouts and aborts keeps the invariants, and once every load is answered and
    /// every hold released or expired, every block is free.
    #[test]
    fn no_block_leaks_through_holds_loads_failures_and_timeouts(
        ops in prop::collection::vec(op(), 1..60),
        blocks in 20usize..60,
        recompute in any::<bool>(),
    ) {
        let mut c = cfg(blocks);
        c.kv_transfer.abort_request_timeout_us = 3_000_000;
        if recompute {
            c.kv_transfer.kv_load_failure_policy = KvLoadFailurePolicy::Recompute;
        }
        let usable = c.num_gpu_blocks - 1;
        let mut e = Engine::new(c).unwrap();
        let (mut now, mut next_id) = (0u64, 0u64);
        let mut out = Vec::new();
        let mut loading: Vec<RequestId> = Vec::new();
        let mut decodes: Vec<RequestId> = Vec::new();
        let pick = |v: &[RequestId], k: u8| (!v.is_empty()).then(|| v[usize::from(k) % v.len()]);
        for op in ops {
            let dt = match op {
                Op::Add { dt_us, .. } | Op::Ready { dt_us, .. } | Op::Fail { dt_us, .. }
                | Op::Release { dt_us, .. } | Op::Abort { dt_us, .. } | Op::Advance { dt_us } => dt_us,
            };
            now += u64::from(dt);
            e.advance(now, &mut out);
            loading.extend(e.take_kv_loads().into_iter().map(|l| l.id));
            match op {
                Op::Add { kind, seed, len, max_tokens, .. } => {
                    let r = req(next_id, prompt(u32::from(seed), usize::from(len)), u32::from(max_tokens));
                    let res = match kind {
                        0 => e.add_request(now, r),
                        1 => e.add_remote_decode(now, r),
                        _ => e.add_remote_prefill(now, r),
                    };
                    if res.is_ok() && kind == 1 {
                        decodes.push(next_id);
                    }
                    next_id += 1;
                }
                Op::Ready { pick: k, .. } => {
                    if let Some(id) = pick(&loading, k) {
                        prop_assert!(e.remote_kv_ready(now, id));
                        loading.retain(|&l| l != id);
                    }
                }
                Op::Fail { pick: k, .. } => {
                    if let Some(id) = pick(&loading, k) {
                        prop_assert!(e.remote_kv_failed(now, id));
                        loading.retain(|&l| l != id);
                    }
                }
                Op::Release { pick: k, .. } => {
                    if let Some(id) = pick(&decodes, k) {
                        e.release_kv_hold(now, id);
                    }
                }
                Op::Abort { back, .. } => {
                    let id = next_id.saturating_sub(u64::from(back) + 1);
                    if e.abort(now, id) {
                        loading.retain(|&l| l != id);
                    }
                }
                Op::Advance { .. } => {}
            }
            loading.extend(e.take_kv_loads().into_iter().map(|l| l.id));
            e.check_invariants().unwrap();
            let _ = e.take_kv_events();
        }
        // Answer every load (as they keep coming) and let everything finish and expire.
        let mut guard = 0;
        loop {
            loading.extend(e.take_kv_loads().into_iter().map(|l| l.id));
            for id in loading.drain(..) {
                prop_assert!(e.remote_kv_ready(now, id));
            }
            let Some(t) = e.next_wakeup_us() else { break };
            now = t;
            e.advance(now, &mut out);
            e.check_invariants().unwrap();
            guard += 1;
            prop_assert!(guard < 100_000, "engine does not converge");
        }
        prop_assert_eq!(e.num_running() + e.num_waiting(), 0);
        prop_assert_eq!(e.stats().kv_holds, 0);
        prop_assert_eq!(e.free_blocks(), usable, "every block free at the end");
    }
}
