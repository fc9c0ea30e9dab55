//! Black-box tests of the public API, as the simulator and the benchmark runner use it.

use kvgate_engine::{Engine, EngineConfig, EngineRequest, KvEvent, Output, StepModel};
use proptest::prelude::*;

fn cfg(num_gpu_blocks: usize) -> EngineConfig {
    EngineConfig {
        num_gpu_blocks,
        max_num_seqs: 16,
        max_num_batched_tokens: 512,
        ..EngineConfig::h100()
    }
}

fn prompt(group: u32, unique: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| {
            if i < 96 {
                2000 + group * 1000 + i
            } else {
                90_000 + unique * 1000 + i
            }
        })
        .collect()
}

fn req(id: u64, prompt_tokens: Vec<u32>, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        id,
        prompt_tokens,
        max_tokens,
        lora_name: None,
        cache_salt: None,
        block_hashes: None,
    }
}

/// Replays arrivals `(at_us, request)`, calling `advance` at every step end (`exact`) or only
/// every `poll_us` (a coarse real-clock server loop). Returns outputs and events.
fn replay(
    c: &EngineConfig,
    arrivals: &[(u64, EngineRequest)],
    poll_us: Option<u64>,
) -> (Vec<Output>, Vec<KvEvent>, Engine) {
    let mut e = Engine::new(c.clone()).unwrap();
    let mut out = Vec::new();
    let mut events = Vec::new();
    let mut next = 0;
    let mut now = 0u64;
    loop {
        let arrival = arrivals.get(next).map(|(t, _)| *t);
        let wake = match (e.next_wakeup_us(), poll_us) {
            (Some(w), Some(p)) => Some(w.div_ceil(p) * p),
            (w, _) => w,
        };
        if let Some(a) = arrival
            && wake.is_none_or(|w| a <= w)
        {
            now = now.max(a);
            e.add_request(a, arrivals[next].1.clone()).unwrap();
            next += 1;
        } else if let Some(w) = wake {
            now = now.max(w);
            e.advance(now, &mut out);
            events.extend(e.take_kv_events());
        } else {
            break;
        }
    }
    e.advance(u64::MAX, &mut out);
    events.extend(e.take_kv_events());
    (out, events, e)
}

fn arrivals(specs: &[(u32, u16, u8, u32)]) -> Vec<(u64, EngineRequest)> {
    let mut t = 0;
    specs
        .iter()
        .enumerate()
        .map(|(i, &(group, len, max_tokens, gap_us))| {
            t += u64::from(gap_us);
            (
                t,
                req(
                    i as u64,
                    prompt(group, i as u32, usize::from(len)),
                    u32::from(max_tokens),
                ),
            )
        })
        .collect()
}

fn spec() -> impl Strategy<Value = Vec<(u32, u16, u8, u32)>> {
    prop::collection::vec((0u32..3, 1u16..400, 1u8..30, 0u32..40_000), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A router that applies the published events holds exactly the engine's cached set once the
    /// engine is idle, so its prefix lookups agree with the engine's truth.
    #[test]
    fn an_index_built_from_events_agrees_with_the_engine(specs in spec(), blocks in 30usize..120) {
        let c = cfg(blocks);
        let arr = arrivals(&specs);
        let (_, events, e) = replay(&c, &arr, None);
        // Copies counted, as a router must (vLLM stores and removes each copy of a block).
        let mut index = std::collections::HashMap::<u64, u32>::new();
        for ev in &events {
            match ev {
                KvEvent::BlockStored { block_hashes, .. } => {
                    for k in block_hashes {
                        *index.entry(*k).or_default() += 1;
                    }
                }
                KvEvent::BlockRemoved { block_hashes } => {
                    for k in block_hashes {
                        let n = index.get_mut(k);
                        prop_assert!(n.as_ref().is_some_and(|n| **n > 0));
                        if let Some(n) = n {
                            *n -= 1;
                            if *n == 0 {
                                index.remove(k);
                            }
                        }
                    }
                }
                KvEvent::AllBlocksCleared => index.clear(),
            }
        }
        prop_assert_eq!(index.values().sum::<u32>() as usize, e.cached_blocks());
        let hasher = c.block_hasher();
        for (_, r) in &arr {
            let keys = hasher.keys(&r.prompt_tokens, c.extra_keys(None, None));
            let from_events = keys.iter().take_while(|k| index.contains_key(k)).count() * 16;
            prop_assert_eq!(from_events, e.cached_prefix_tokens(&keys));
        }
    }

    /// Outputs do not depend on how often the caller polls: a server loop that wakes on a coarse
    /// tick sees the same tokens with the same timestamps as an exact discrete-event loop.
    #[test]
    fn outputs_do_not_depend_on_the_polling_pattern(specs in spec(), poll_us in 1u64..20_000) {
        let c = cfg(200);
        let arr = arrivals(&specs);
        let (exact, ev_exact, _) = replay(&c, &arr, None);
        let (polled, ev_polled, _) = replay(&c, &arr, Some(poll_us));
        prop_assert_eq!(exact, polled);
        prop_assert_eq!(ev_exact, ev_polled);
    }
}

#[test]
fn a_slower_gpu_gives_a_slower_first_token() {
    let ttft = |c: EngineConfig| {
        let (out, _, _) = replay(&c, &[(0, req(1, prompt(0, 0, 3000), 4))], None);
        out.iter()
            .find_map(|o| match *o {
                Output::Token {
                    at_us, index: 0, ..
                } => Some(at_us),
                _ => None,
            })
            .unwrap()
    };
    let h = ttft(EngineConfig::h100());
    let a = ttft(EngineConfig::a100());
    // 3000 tokens fit one 8192-token H100 step: TTFT is exactly one prefill step. The A100
    // (vLLM's 2,048-token default there) takes two: 2,048 then 952.
    assert_eq!(h, StepModel::H100_LLAMA31_8B.step_us(3000, 0, 0.0));
    assert_eq!(
        a,
        StepModel::A100_LLAMA31_8B.step_us(2048, 0, 0.0)
            + StepModel::A100_LLAMA31_8B.step_us(952, 0, 0.0)
    );
    assert!(a > 2 * h);
}

#[test]
fn stats_expose_vllm_histograms() {
    let (_, _, e) = replay(
        &cfg(200),
        &arrivals(&[(0, 100, 5, 0), (1, 200, 5, 1000)]),
        None,
    );
    let s = e.stats();
    assert_eq!(s.ttft.bounds_s.len(), 22);
    assert_eq!(s.itl.bounds_s.len(), 19);
    assert_eq!(s.e2e.bounds_s.len(), 21);
    assert_eq!(s.ttft.counts.len(), 23);
    assert_eq!((s.ttft.count, s.itl.count, s.e2e.count), (2, 8, 2));
    assert_eq!(s.ttft.counts.iter().sum::<u64>(), 2);
    assert_eq!(s.generation_tokens_total, 10);
    assert_eq!(s.prompt_tokens_total, 300);
}
