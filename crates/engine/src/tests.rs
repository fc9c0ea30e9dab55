//! Unit tests of the engine's rules, one scenario per rule, plus property tests over random
//! request streams that check the internal invariants after every operation.

use std::sync::Arc;

use kvgate_tokens::{BuiltinTokenizer, ExtraKeys};
use proptest::prelude::*;

use crate::*;

/// A small engine with round step-time coefficients (shared with the P/D tests).
pub(crate) fn small_cfg(num_gpu_blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_gpu_blocks,
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        max_model_len: 4096,
        step: StepModel {
            beta0_us: 1000.0,
            beta1_us_per_prefill_token: 10.0,
            beta2_us_per_decode_token: 5.0,
            beta3_us_per_attention_pair: 0.0,
        },
        ..EngineConfig::h100()
    }
}

pub(crate) fn req(id: RequestId, prompt: Vec<u32>, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        id,
        prompt_tokens: prompt,
        max_tokens,
        lora_name: None,
        cache_salt: None,
        block_hashes: None,
    }
}

pub(crate) fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 1000 + seed * 100_000 + i).collect()
}

/// Runs until idle, checking invariants after every step; returns all outputs.
fn drain(e: &mut Engine) -> Vec<Output> {
    let mut out = Vec::new();
    let mut guard = 0;
    while let Some(t) = e.next_wakeup_us() {
        e.advance(t, &mut out);
        e.check_invariants().unwrap();
        guard += 1;
        assert!(guard < 1_000_000, "engine does not converge");
    }
    e.advance(u64::MAX, &mut out);
    out
}

fn finished(out: &[Output], id: RequestId) -> (u64, FinishReason, Usage) {
    out.iter()
        .find_map(|o| match *o {
            Output::Finished {
                id: i,
                at_us,
                reason,
                usage,
            } if i == id => Some((at_us, reason, usage)),
            _ => None,
        })
        .expect("request finished")
}

fn first_token_at(out: &[Output], id: RequestId) -> u64 {
    out.iter()
        .find_map(|o| match *o {
            Output::Token {
                id: i,
                at_us,
                index: 0,
                ..
            } if i == id => Some(at_us),
            _ => None,
        })
        .expect("first token")
}

#[test]
fn config_presets_and_validation() {
    let h = EngineConfig::default();
    assert_eq!(h, EngineConfig::h100());
    // vLLM 0.32's online-serving defaults (EngineArgs.get_batch_defaults): 1,024 sequences
    // and 8,192-token steps on the H100; 256 and 2,048 on the A100.
    assert_eq!(
        (h.block_size, h.num_gpu_blocks, h.max_num_seqs),
        (16, 29_205, 1024)
    );
    assert_eq!(h.max_num_batched_tokens, 8192);
    assert_eq!(h.step, StepModel::H100_LLAMA31_8B);
    let a = EngineConfig::a100();
    assert_eq!(a.step, StepModel::A100_LLAMA31_8B);
    assert_eq!((a.max_num_seqs, a.max_num_batched_tokens), (256, 2048));
    h.validate().unwrap();
    type Mutation = Box<dyn Fn(&mut EngineConfig)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("block_size", Box::new(|c| c.block_size = 0)),
        ("num_gpu_blocks", Box::new(|c| c.num_gpu_blocks = 1)),
        ("max_num_seqs", Box::new(|c| c.max_num_seqs = 0)),
        (
            "max_num_batched_tokens",
            Box::new(|c| c.max_num_batched_tokens = 0),
        ),
        ("max_model_len", Box::new(|c| c.max_model_len = 1)),
        ("step.beta0_us", Box::new(|c| c.step.beta0_us = f64::NAN)),
        (
            "step.beta3_us_per_attention_pair",
            Box::new(|c| c.step.beta3_us_per_attention_pair = -1e-9),
        ),
        (
            "step.beta3_us_per_attention_pair",
            Box::new(|c| c.step.beta3_us_per_attention_pair = f64::INFINITY),
        ),
        (
            "step.beta2_us_per_decode_token",
            Box::new(|c| c.step.beta2_us_per_decode_token = -1.0),
        ),
        ("output_vocab", Box::new(|c| c.output_vocab.clear())),
    ];
    for (field, f) in cases {
        let mut c = EngineConfig::h100();
        f(&mut c);
        match Engine::new(c) {
            Err(EngineError::InvalidConfig { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[test]
fn step_model_is_linear_and_rounded() {
    let m = StepModel::H100_LLAMA31_8B;
    assert_eq!(m.step_us(0, 0, 0.0), 5753);
    assert_eq!(
        m.step_us(1000, 0, 0.0),
        (5752.7f64 + 17_250.0).round() as u64
    );
    assert_eq!(m.step_us(0, 100, 0.0), (5752.7f64 + 600.0).round() as u64);
    let zero = StepModel {
        beta0_us: 0.0,
        beta1_us_per_prefill_token: 0.0,
        beta2_us_per_decode_token: 0.0,
        beta3_us_per_attention_pair: 0.0,
    };
    assert_eq!(zero.step_us(0, 0, 0.0), 1, "a step always takes time");
}

#[test]
fn step_model_without_beta3_ignores_attention_pairs_bit_for_bit() {
    for m in [StepModel::H100_LLAMA31_8B, StepModel::A100_LLAMA31_8B] {
        assert_eq!(
            m.beta3_us_per_attention_pair, 0.0,
            "the BLIS fits are linear"
        );
        for (p, d) in [
            (0u64, 0u64),
            (1, 0),
            (8192, 0),
            (4000, 255),
            (0, 256),
            (17, 3),
        ] {
            let linear = m.beta0_us
                + m.beta1_us_per_prefill_token * p as f64
                + m.beta2_us_per_decode_token * d as f64;
            let linear = (linear.round() as u64).max(1);
            for pairs in [0.0, 0.5, attention_pairs(100_000, p), 3.3e9] {
                assert_eq!(m.step_us(p, d, pairs), linear, "p={p} d={d} pairs={pairs}");
            }
        }
    }
}

#[test]
fn step_model_adds_beta3_per_attention_pair() {
    assert_eq!(attention_pairs(0, 0), 0.0);
    assert_eq!(attention_pairs(0, 1), 0.5);
    assert_eq!(attention_pairs(512, 100), 100.0 * 512.0 + 5000.0);
    assert_eq!(attention_pairs(7, 0), 0.0, "no new tokens, no pairs");
    let m = StepModel {
        beta0_us: 1000.0,
        beta1_us_per_prefill_token: 10.0,
        beta2_us_per_decode_token: 5.0,
        beta3_us_per_attention_pair: 0.25,
    };
    assert_eq!(m.step_us(100, 2, 56_200.0), 1000 + 1000 + 10 + 14_050);
    // Rounded once, after the sum: 0.5 pair at 0.25 µs is 0.125 µs.
    assert_eq!(m.step_us(1, 0, 0.5), 1010);
}

/// [`small_cfg`] with an attention term of a quarter microsecond per pair (exact in binary, so
/// the expected step times below are integers) and a budget that takes a whole 612-token prompt.
fn attention_cfg(max_num_batched_tokens: usize) -> EngineConfig {
    let mut cfg = small_cfg(256);
    cfg.max_num_batched_tokens = max_num_batched_tokens;
    cfg.step.beta3_us_per_attention_pair = 0.25;
    cfg
}

#[test]
fn a_cached_prefix_makes_the_same_new_tokens_dearer_by_the_attention_pairs() {
    let cfg = attention_cfg(4096);
    let shared = prompt(0, 512);
    let mut e = Engine::new(cfg.clone()).unwrap();
    e.add_request(0, req(1, shared.clone(), 1)).unwrap();
    drain(&mut e);
    // 512 cached tokens (32 full blocks), then 100 new ones.
    let at = 100_000_000;
    let mut warm_prompt = shared;
    warm_prompt.extend(prompt(1, 100));
    e.add_request(at, req(2, warm_prompt, 1)).unwrap();
    assert_eq!(e.queued_prefill_tokens(), 100);
    assert_eq!(e.queued_prefill_pairs(), 100 * 512 + 100 * 100 / 2);
    let out = drain(&mut e);
    assert_eq!(finished(&out, 2).2.cached_tokens, 512);
    let warm_ttft = first_token_at(&out, 2) - at;

    let mut cold = Engine::new(cfg).unwrap();
    cold.add_request(0, req(3, prompt(2, 100), 1)).unwrap();
    assert_eq!(cold.queued_prefill_pairs(), 100 * 100 / 2);
    let cold_ttft = first_token_at(&drain(&mut cold), 3);

    // β0 + β1·100 + β3·100²/2 cold; the warm step adds β3·100·512.
    assert_eq!(cold_ttft, 1000 + 1000 + 1250);
    assert_eq!(warm_ttft - cold_ttft, 100 * 512 / 4);
}

#[test]
fn chunked_prefill_of_one_prompt_costs_its_closed_form_attention() {
    // Budget 256: chunks of 256, 256 and 88 tokens after 0, 256 and 512 computed ones.
    let cfg = attention_cfg(256);
    let m = cfg.step;
    let mut e = Engine::new(cfg).unwrap();
    e.add_request(0, req(1, prompt(0, 600), 1)).unwrap();
    assert_eq!(e.queued_prefill_pairs(), 600 * 600 / 2);
    let t1 = m.step_us(256, 0, attention_pairs(0, 256));
    let mut out = Vec::new();
    e.advance(t1, &mut out);
    assert_eq!(e.queued_prefill_pairs(), attention_pairs(256, 344) as u64);
    let out = drain(&mut e);
    assert_eq!(e.queued_prefill_pairs(), 0);
    // The chunks' pairs sum to the whole prompt's, 600²/2, whatever the chunking.
    assert_eq!(
        attention_pairs(0, 256) + attention_pairs(256, 256) + attention_pairs(512, 88),
        attention_pairs(0, 600)
    );
    let closed_form = 3 * 1000 + 10 * 600 + 600 * 600 / 2 / 4;
    assert_eq!(first_token_at(&out, 1), closed_form);
}

#[test]
fn queued_prefill_pairs_follow_a_preempted_request_through_its_recompute() {
    // Two 160-token prompts (10 blocks each) that grow to 15 blocks each in a 24-block cache:
    // the newer one is preempted and recomputes, its pairs counted again from where it restarts.
    let mut cfg = attention_cfg(4096);
    cfg.num_gpu_blocks = 25;
    let mut e = Engine::new(cfg).unwrap();
    e.add_request(0, req(1, prompt(0, 160), 80)).unwrap();
    e.add_request(0, req(2, prompt(1, 160), 80)).unwrap();
    assert_eq!(e.queued_prefill_pairs(), 2 * 160 * 160 / 2);
    let mut out = Vec::new();
    let mut saw_recompute = false;
    while let Some(t) = e.next_wakeup_us() {
        e.advance(t, &mut out);
        e.check_invariants().unwrap();
        saw_recompute |= e.queued_prefill_tokens() > 0 && e.stats().preemptions_total > 0;
    }
    assert!(e.stats().preemptions_total > 0, "the scenario preempts");
    assert!(saw_recompute, "the preempted request queued a recompute");
    assert_eq!(e.queued_prefill_pairs(), 0);
    assert_eq!(e.stats().finished_length, 2);
}

#[test]
fn default_output_words_are_single_distinct_tokens() {
    let words = default_output_words();
    let ids = default_output_vocab();
    assert_eq!(words.len(), DEFAULT_OUTPUT_VOCAB_LEN);
    assert_eq!(ids.len(), DEFAULT_OUTPUT_VOCAB_LEN);
    let tok = BuiltinTokenizer;
    for (w, &id) in words.iter().zip(ids) {
        assert_eq!(tok.encode(w), vec![id], "{w:?}");
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    // Rendering any sequence of words and re-tokenizing gives the same ids.
    let picks = [3usize, 1000, 3, 77, 512];
    let text: String = picks.iter().map(|&i| words[i].as_str()).collect();
    let want: Vec<u32> = picks.iter().map(|&i| ids[i]).collect();
    assert_eq!(tok.encode(&text), want);
    assert_eq!(EngineConfig::h100().output_vocab, ids);
}

#[test]
fn bad_requests_get_typed_errors() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    assert_eq!(
        e.add_request(0, req(1, vec![], 1)),
        Err(EngineError::EmptyPrompt { id: 1 })
    );
    assert_eq!(
        e.add_request(0, req(1, vec![5], 0)),
        Err(EngineError::ZeroMaxTokens { id: 1 })
    );
    assert!(matches!(
        e.add_request(0, req(1, prompt(0, 4000), 200)),
        Err(EngineError::TooLong {
            id: 1,
            prompt_tokens: 4000,
            max_tokens: 200,
            max_model_len: 4096
        })
    ));
    // 63 usable blocks of 16 = 1008 tokens of KV.
    assert!(matches!(
        e.add_request(0, req(1, prompt(0, 1000), 10)),
        Err(EngineError::TooManyBlocks {
            id: 1,
            needed_blocks: 64,
            capacity_blocks: 63
        })
    ));
    e.add_request(0, req(1, prompt(0, 1000), 9)).unwrap();
    let dup = e.add_request(0, req(1, prompt(1, 10), 1)).unwrap_err();
    assert_eq!(dup, EngineError::DuplicateRequest { id: 1 });
    assert!(dup.is_retryable());
    let bad_hashes = EngineRequest {
        block_hashes: Some(Arc::from(Vec::new())),
        ..req(2, prompt(2, 40), 1)
    };
    assert_eq!(
        e.add_request(0, bad_hashes),
        Err(EngineError::BlockHashCountMismatch {
            id: 2,
            expected: 2,
            got: 0
        })
    );
    e.check_invariants().unwrap();
}

#[test]
fn single_request_timeline() {
    let cfg = small_cfg(64);
    let m = cfg.step;
    let mut e = Engine::new(cfg).unwrap();
    e.add_request(1_000, req(7, prompt(0, 100), 3)).unwrap();
    assert_eq!(e.num_running(), 1);
    let t1 = 1_000 + m.step_us(100, 0, 0.0);
    assert_eq!(e.next_wakeup_us(), Some(t1));
    let mut out = Vec::new();
    e.advance(t1 - 1, &mut out);
    assert!(out.is_empty(), "nothing before the step ends");
    let out = drain(&mut e);
    let t2 = t1 + m.step_us(0, 1, 0.0);
    let t3 = t2 + m.step_us(0, 1, 0.0);
    let vocab = &e.config().output_vocab;
    let tokens: Vec<(u64, u32)> = out
        .iter()
        .filter_map(|o| match *o {
            Output::Token {
                at_us,
                index,
                token,
                ..
            } => {
                assert!(vocab.contains(&token));
                Some((at_us, index))
            }
            _ => None,
        })
        .collect();
    assert_eq!(tokens, vec![(t1, 0), (t2, 1), (t3, 2)]);
    let (at, reason, usage) = finished(&out, 7);
    assert_eq!((at, reason), (t3, FinishReason::Length));
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 100,
            completion_tokens: 3,
            cached_tokens: 0
        }
    );
    let s = e.stats();
    assert_eq!((s.running, s.waiting, s.finished_length), (0, 0, 1));
    assert_eq!((s.prompt_tokens_total, s.generation_tokens_total), (100, 3));
    assert_eq!(s.ttft.count, 1);
    assert!((s.ttft.sum_s - (t1 - 1_000) as f64 / 1e6).abs() < 1e-12);
    assert_eq!(s.itl.count, 2);
    assert_eq!(s.e2e.count, 1);
    assert!((s.e2e.sum_s - (t3 - 1_000) as f64 / 1e6).abs() < 1e-12);
    assert_eq!(e.next_wakeup_us(), None);
}

#[test]
fn long_prompt_is_prefilled_in_budget_sized_chunks() {
    let cfg = small_cfg(128);
    let m = cfg.step;
    let mut e = Engine::new(cfg).unwrap();
    e.add_request(0, req(1, prompt(0, 600), 1)).unwrap();
    assert_eq!(e.queued_prefill_tokens(), 600);
    let mut out = Vec::new();
    let t1 = m.step_us(256, 0, 0.0);
    e.advance(t1, &mut out);
    assert!(out.is_empty());
    assert_eq!(e.queued_prefill_tokens(), 344);
    let t2 = t1 + m.step_us(256, 0, 0.0);
    let t3 = t2 + m.step_us(88, 0, 0.0);
    let out = drain(&mut e);
    assert_eq!(first_token_at(&out, 1), t3);
    assert_eq!(e.queued_prefill_tokens(), 0);
}

#[test]
fn decodes_share_the_step_with_a_prefill_chunk() {
    let cfg = small_cfg(128);
    let m = cfg.step;
    let mut e = Engine::new(cfg).unwrap();
    e.add_request(0, req(1, prompt(0, 10), 50)).unwrap();
    let t1 = m.step_us(10, 0, 0.0);
    let mut out = Vec::new();
    e.advance(t1, &mut out); // first token of 1; the next step has started
    e.add_request(t1 + 1, req(2, prompt(1, 300), 1)).unwrap();
    // The step in flight (decode of 1) ends at t1 + step(0,1); the next one decodes 1 and
    // prefills 255 tokens of 2 (budget 256).
    let t2 = t1 + m.step_us(0, 1, 0.0);
    let t3 = t2 + m.step_us(255, 1, 0.0);
    e.advance(t2, &mut out);
    assert_eq!(e.next_wakeup_us(), Some(t3));
    assert_eq!(e.queued_prefill_tokens(), 300);
    e.advance(t3, &mut out);
    assert_eq!(e.queued_prefill_tokens(), 45);
}

#[test]
fn repeated_prefix_hits_the_cache_but_never_the_whole_prompt() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    e.add_request(0, req(1, prompt(0, 64), 1)).unwrap();
    drain(&mut e);
    let s = e.stats();
    assert_eq!(
        (s.prefix_cache_queries_tokens, s.prefix_cache_hits_tokens),
        (64, 0)
    );
    // Same 64-token prompt: at most 63 tokens may hit, i.e. 3 full blocks.
    e.add_request(10_000_000, req(2, prompt(0, 64), 1)).unwrap();
    let out = drain(&mut e);
    assert_eq!(finished(&out, 2).2.cached_tokens, 48);
    // One more token: all 4 blocks hit.
    let mut p = prompt(0, 64);
    p.push(5);
    e.add_request(20_000_000, req(3, p, 1)).unwrap();
    let out = drain(&mut e);
    assert_eq!(finished(&out, 3).2.cached_tokens, 64);
    let s = e.stats();
    assert_eq!(s.prefix_cache_queries_tokens, 64 + 64 + 65);
    assert_eq!(s.prefix_cache_hits_tokens, 48 + 64);
    let keys = small_cfg(64)
        .block_hasher()
        .keys(&prompt(0, 64), ExtraKeys::default());
    assert_eq!(e.cached_prefix_tokens(&keys), 64);
    let other = small_cfg(64)
        .block_hasher()
        .keys(&prompt(1, 64), ExtraKeys::default());
    assert_eq!(e.cached_prefix_tokens(&other), 0);
}

#[test]
fn warm_prefix_gives_a_shorter_ttft() {
    let cfg = small_cfg(256);
    let mut e = Engine::new(cfg).unwrap();
    e.add_request(0, req(1, prompt(0, 1000), 1)).unwrap();
    let cold = drain(&mut e);
    let cold_ttft = first_token_at(&cold, 1);
    e.add_request(100_000_000, req(2, prompt(0, 1000), 1))
        .unwrap();
    let warm = drain(&mut e);
    let warm_ttft = first_token_at(&warm, 2) - 100_000_000;
    assert!(
        warm_ttft < cold_ttft / 2,
        "warm {warm_ttft} cold {cold_ttft}"
    );
}

#[test]
fn stored_events_form_the_hash_chain_and_wait_for_the_step_end() {
    let cfg = small_cfg(64);
    let m = cfg.step;
    let mut e = Engine::new(cfg).unwrap();
    let r = EngineRequest {
        lora_name: Some("sql".into()),
        cache_salt: Some("s1".into()),
        ..req(1, prompt(0, 40), 1)
    };
    e.add_request(0, r).unwrap();
    assert!(
        e.take_kv_events().is_empty(),
        "published at the end of the step"
    );
    let mut out = Vec::new();
    e.advance(m.step_us(40, 0, 0.0), &mut out);
    let keys = small_cfg(64).block_hasher().keys(
        &prompt(0, 40),
        small_cfg(64).extra_keys(Some("sql"), Some("s1")),
    );
    assert_eq!(
        e.take_kv_events(),
        vec![KvEvent::BlockStored {
            block_hashes: keys.clone(),
            parent_block_hash: None,
            token_ids: prompt(0, 32),
            block_size: 16,
            lora_name: Some("sql".into()),
            extra_keys: vec![
                Some(vec!["sql".into(), "s1".into()]),
                Some(vec!["sql".into()])
            ],
        }]
    );
    assert!(e.take_kv_events().is_empty());
    // Without the adapter and salt the same tokens miss.
    let plain = small_cfg(64)
        .block_hasher()
        .keys(&prompt(0, 40), ExtraKeys::default());
    assert_eq!(e.cached_prefix_tokens(&plain), 0);
    assert_eq!(e.cached_prefix_tokens(&keys), 32);
}

#[test]
fn generated_tokens_fill_blocks_that_get_stored() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    e.add_request(0, req(1, prompt(0, 10), 20)).unwrap();
    let out = drain(&mut e);
    let generated: Vec<u32> = out
        .iter()
        .filter_map(|o| match *o {
            Output::Token { token, .. } => Some(token),
            _ => None,
        })
        .collect();
    assert_eq!(generated.len(), 20);
    let events = e.take_kv_events();
    // Tokens 0..16 (prompt + 6 outputs) are computed in the step that feeds output 5 back.
    let mut all = prompt(0, 10);
    all.extend_from_slice(&generated);
    let keys = small_cfg(64)
        .block_hasher()
        .keys(&all[..16], ExtraKeys::default());
    assert_eq!(
        events,
        vec![KvEvent::BlockStored {
            block_hashes: keys,
            parent_block_hash: None,
            token_ids: all[..16].to_vec(),
            block_size: 16,
            lora_name: None,
            extra_keys: vec![None],
        }]
    );
}

#[test]
fn precomputed_hashes_are_used_as_given() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    let fake: Vec<kvgate_tokens::BlockHash> = (0..2u8)
        .map(|i| kvgate_tokens::BlockHash([i + 1; 32]))
        .collect();
    let want: Vec<u64> = fake.iter().map(|h| h.key()).collect();
    let r = EngineRequest {
        block_hashes: Some(Arc::from(fake)),
        ..req(1, prompt(0, 33), 1)
    };
    e.add_request(0, r).unwrap();
    drain(&mut e);
    match &e.take_kv_events()[..] {
        [KvEvent::BlockStored { block_hashes, .. }] => assert_eq!(block_hashes, &want),
        other => panic!("{other:?}"),
    }
    assert_eq!(e.cached_prefix_tokens(&want), 32);
}

#[test]
fn eviction_takes_the_least_recent_and_tail_blocks_first() {
    // 8 usable blocks.
    let mut e = Engine::new(small_cfg(9)).unwrap();
    let h = small_cfg(64).block_hasher();
    e.add_request(0, req(1, prompt(0, 64), 1)).unwrap(); // 4 blocks, all cached
    drain(&mut e);
    e.add_request(10_000_000, req(2, prompt(1, 64), 1)).unwrap(); // 4 never-used blocks
    drain(&mut e);
    e.take_kv_events();
    assert_eq!(e.free_blocks(), 8);
    assert_eq!(e.stats().kv_usage, 0.0, "cached free blocks count as free");
    // 2 new blocks: evicts request 1's tail blocks (3 then 2), its prefix survives.
    e.add_request(20_000_000, req(3, prompt(2, 17), 1)).unwrap();
    drain(&mut e);
    let k1 = h.keys(&prompt(0, 64), ExtraKeys::default());
    let events = e.take_kv_events();
    assert_eq!(
        events[0],
        KvEvent::BlockRemoved {
            block_hashes: vec![k1[3], k1[2]]
        }
    );
    assert_eq!(e.cached_prefix_tokens(&k1), 32);
}

#[test]
fn cache_pressure_preempts_the_newest_running_request() {
    // 6 usable blocks; two requests of 40 prompt tokens (3 blocks) growing to 3 + 60 tokens.
    let mut e = Engine::new(small_cfg(7)).unwrap();
    e.add_request(0, req(1, prompt(0, 40), 40)).unwrap();
    e.add_request(0, req(2, prompt(1, 40), 40)).unwrap();
    let out = drain(&mut e);
    let s = e.stats();
    assert!(s.preemptions_total > 0);
    assert_eq!(s.finished_length, 2);
    // Request 1 (older) is never preempted, so it finishes first; request 2's token indices
    // still run 0..40 exactly once each despite recomputation.
    assert!(finished(&out, 1).0 < finished(&out, 2).0);
    for id in [1, 2] {
        let idx: Vec<u32> = out
            .iter()
            .filter_map(|o| match *o {
                Output::Token { id: i, index, .. } if i == id => Some(index),
                _ => None,
            })
            .collect();
        assert_eq!(idx, (0..40).collect::<Vec<_>>());
    }
    assert_eq!(s.ttft.count, 2, "TTFT is recorded once per request");
    // vLLM records a preempted request's re-admission apart (`preempted_*`, not exported):
    // the counters hold the two first admissions, and the prompts are distinct, so no hit
    // (request 2's finding the blocks it left cached when preempted is not counted).
    assert_eq!(
        (s.prefix_cache_queries_tokens, s.prefix_cache_hits_tokens),
        (80, 0)
    );
}

#[test]
fn max_num_seqs_caps_the_batch() {
    let mut cfg = small_cfg(64);
    cfg.max_num_seqs = 2;
    let mut e = Engine::new(cfg).unwrap();
    e.add_request(0, req(1, prompt(0, 5), 5)).unwrap();
    e.add_request(0, req(2, prompt(1, 5), 5)).unwrap();
    e.add_request(0, req(3, prompt(2, 5), 5)).unwrap();
    let mut out = Vec::new();
    let t = e.next_wakeup_us().unwrap();
    e.advance(t, &mut out);
    assert_eq!((e.num_running(), e.num_waiting()), (2, 1));
    let out = drain(&mut e);
    assert!(finished(&out, 3).0 > finished(&out, 2).0);
}

#[test]
fn same_step_admissions_share_freshly_scheduled_blocks() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    e.add_request(0, req(9, prompt(9, 5), 2)).unwrap(); // occupies the engine
    e.add_request(1, req(1, prompt(0, 100), 1)).unwrap();
    e.add_request(1, req(2, prompt(0, 100), 1)).unwrap();
    let out = drain(&mut e);
    assert_eq!(finished(&out, 1).2.cached_tokens, 0);
    assert_eq!(finished(&out, 2).2.cached_tokens, 96);
}

#[test]
fn abort_frees_blocks_and_reports_on_next_advance() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    e.add_request(0, req(1, prompt(0, 100), 50)).unwrap();
    e.add_request(0, req(2, prompt(1, 100), 50)).unwrap();
    assert!(e.free_blocks() < 63);
    assert!(!e.abort(5, 99));
    assert!(e.abort(5, 1));
    assert!(!e.abort(5, 1));
    e.check_invariants().unwrap();
    // Re-adding the id while the step that scheduled the old instance is in flight is fine.
    e.add_request(6, req(1, prompt(3, 20), 2)).unwrap();
    let mut out = Vec::new();
    e.advance(6, &mut out);
    assert_eq!(
        out,
        vec![Output::Finished {
            id: 1,
            at_us: 5,
            reason: FinishReason::Abort,
            usage: Usage {
                prompt_tokens: 100,
                completion_tokens: 0,
                cached_tokens: 0
            },
        }]
    );
    assert!(e.abort(6, 2), "waiting request aborts");
    let out = drain(&mut e);
    assert_eq!(finished(&out, 1).2.prompt_tokens, 20);
    let s = e.stats();
    assert_eq!((s.finished_abort, s.finished_length), (2, 1));
    assert_eq!(e.free_blocks(), 63);
    assert_eq!(e.queued_prefill_tokens(), 0);
}

#[test]
fn reset_prefix_cache_clears_the_index_and_publishes_with_the_next_step() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    e.add_request(0, req(1, prompt(0, 64), 1)).unwrap();
    drain(&mut e);
    e.take_kv_events();
    assert!(e.cached_blocks() > 0);
    assert!(e.reset_prefix_cache(40_000_000, false));
    assert_eq!(e.cached_blocks(), 0);
    assert!(
        e.take_kv_events().is_empty(),
        "an idle engine publishes AllBlocksCleared with its next step, as vLLM does"
    );
    e.add_request(50_000_000, req(2, prompt(0, 64), 1)).unwrap();
    let out = drain(&mut e);
    assert_eq!(finished(&out, 2).2.cached_tokens, 0);
    let events = e.take_kv_events();
    assert_eq!(events[0], KvEvent::AllBlocksCleared);
    assert!(matches!(events[1], KvEvent::BlockStored { .. }));
}

#[test]
fn reset_prefix_cache_refuses_while_blocks_are_in_use_unless_told_to_preempt() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    e.add_request(0, req(1, prompt(0, 64), 50)).unwrap();
    e.add_request(0, req(2, prompt(1, 40), 50)).unwrap();
    let mut out = Vec::new();
    e.advance(e.next_wakeup_us().unwrap(), &mut out);
    let cached = e.cached_blocks();
    assert!(cached > 0);
    let now = e.next_wakeup_us().unwrap() - 1;
    assert!(!e.reset_prefix_cache(now, false), "blocks are held");
    assert_eq!(e.cached_blocks(), cached);
    assert!(e.reset_prefix_cache(now, true));
    e.check_invariants().unwrap();
    assert_eq!(e.cached_blocks(), 0);
    assert_eq!((e.num_running(), e.num_waiting()), (0, 2));
    assert_eq!(e.stats().preemptions_total, 2);
    // The step in flight credits neither request; both restart and finish normally.
    let out = drain(&mut e);
    for id in [1, 2] {
        let (_, reason, usage) = finished(&out, id);
        assert_eq!(
            (reason, usage.completion_tokens),
            (FinishReason::Length, 50)
        );
    }
    let events = e.take_kv_events();
    let cleared = events
        .iter()
        .position(|ev| *ev == KvEvent::AllBlocksCleared)
        .expect("AllBlocksCleared published");
    assert!(
        events[cleared + 1..].iter().any(|ev| matches!(
            ev,
            KvEvent::BlockStored {
                parent_block_hash: None,
                ..
            }
        )),
        "the restarted prompts are stored again after the clear"
    );
}

#[test]
fn hash_algorithms_and_adapter_paths_change_every_key() {
    let toks = prompt(0, 64);
    let cbor = EngineConfig {
        prefix_caching_hash_algo: HashAlgo::Sha256Cbor,
        ..small_cfg(64)
    };
    let keyed = small_cfg(64);
    assert_eq!(
        keyed.prefix_caching_hash_algo,
        HashAlgo::Sha256,
        "vLLM's default"
    );
    let secret = EngineConfig {
        sha256_secret: Some([7; 32]),
        ..small_cfg(64)
    };
    let none = ExtraKeys::default();
    let k_cbor = cbor.block_hasher().keys(&toks, none);
    assert_eq!(
        k_cbor,
        kvgate_tokens::BlockHasher::new("vllm-none-hash", 16).keys(&toks, none),
        "sha256_cbor is vLLM's reproducible chain on vLLM's default seed"
    );
    let k_keyed = keyed.block_hasher().keys(&toks, none);
    let k_secret = secret.block_hasher().keys(&toks, none);
    assert!(k_cbor.iter().zip(&k_keyed).all(|(a, b)| a != b));
    assert!(k_keyed.iter().zip(&k_secret).all(|(a, b)| a != b));
    let mut moved = cbor.clone();
    moved
        .lora_paths
        .insert("sql".into(), "/adapters/sql-v2".into());
    assert_eq!(cbor.extra_keys(Some("sql"), None).lora_path, Some("sql"));
    assert_ne!(
        cbor.block_hasher()
            .keys(&toks, cbor.extra_keys(Some("sql"), None)),
        moved
            .block_hasher()
            .keys(&toks, moved.extra_keys(Some("sql"), None)),
        "re-pointing an adapter name at another path changes its hashes"
    );
    assert_eq!("sha256_cbor".parse::<HashAlgo>(), Ok(HashAlgo::Sha256Cbor));
    assert!("xxhash".parse::<HashAlgo>().is_err());
    for a in HashAlgo::ALL {
        assert_eq!(a.as_str().parse::<HashAlgo>(), Ok(a));
    }
}

#[test]
fn generated_blocks_carry_the_adapter_but_not_the_salt() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    let r = EngineRequest {
        lora_name: Some("sql".into()),
        cache_salt: Some("s1".into()),
        ..req(1, prompt(0, 20), 30)
    };
    e.add_request(0, r).unwrap();
    drain(&mut e);
    let extra: Vec<Option<Vec<String>>> = e
        .take_kv_events()
        .into_iter()
        .flat_map(|ev| match ev {
            KvEvent::BlockStored { extra_keys, .. } => extra_keys,
            _ => vec![],
        })
        .collect();
    assert_eq!(
        extra,
        vec![
            Some(vec!["sql".to_owned(), "s1".to_owned()]),
            Some(vec!["sql".to_owned()]),
            Some(vec!["sql".to_owned()]),
        ]
    );
}

#[test]
fn prefix_caching_off_never_hits_or_publishes() {
    let mut cfg = small_cfg(64);
    cfg.enable_prefix_caching = false;
    let mut e = Engine::new(cfg).unwrap();
    for (i, t) in [(1, 0), (2, 50_000_000)] {
        e.add_request(t, req(i, prompt(0, 64), 1)).unwrap();
        let out = drain(&mut e);
        assert_eq!(finished(&out, i).2.cached_tokens, 0);
    }
    assert!(e.take_kv_events().is_empty());
    assert_eq!(e.stats().prefix_cache_queries_tokens, 0);
}

#[test]
fn lora_adapters_are_listed_per_queue() {
    let mut cfg = small_cfg(64);
    cfg.max_num_seqs = 2;
    let mut e = Engine::new(cfg).unwrap();
    for (id, lora) in [(1, Some("b")), (2, Some("a")), (3, None), (4, Some("c"))] {
        let r = EngineRequest {
            lora_name: lora.map(str::to_owned),
            ..req(id, prompt(id as u32, 20), 3)
        };
        e.add_request(0, r).unwrap();
    }
    // Request 1 started a step alone; the others wait for it to end.
    let (running, waiting) = e.lora_adapters();
    assert_eq!(running, vec!["b".to_owned()]);
    assert_eq!(waiting, vec!["a".to_owned(), "c".to_owned()]);
    let mut out = Vec::new();
    e.advance(e.next_wakeup_us().unwrap(), &mut out);
    assert_eq!(e.lora_adapters().0, vec!["a".to_owned(), "b".to_owned()]);
    drain(&mut e);
    assert_eq!(e.lora_adapters(), (vec![], vec![]));
}

#[test]
fn config_deserializes_partially_over_the_h100_preset() {
    let c: EngineConfig =
        serde_json::from_str(r#"{"num_gpu_blocks": 1000, "step": {"beta0_us": 1.0, "beta1_us_per_prefill_token": 2.0, "beta2_us_per_decode_token": 3.0}}"#)
            .unwrap();
    assert_eq!(c.num_gpu_blocks, 1000);
    assert_eq!(c.step.beta2_us_per_decode_token, 3.0);
    assert_eq!(
        c.step.beta3_us_per_attention_pair, 0.0,
        "a model without beta3 is linear"
    );
    assert_eq!(c.block_size, 16);
    assert_eq!(c.output_vocab, default_output_vocab());
    let back: EngineConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert_eq!(
        serde_json::to_string(&FinishReason::Length).unwrap(),
        r#""length""#
    );
}

/// vLLM's `get_usage` leaves the null block out: an idle engine reports 0 (a real vLLM 0.32's
/// capture, `crates/signals/tests/fixtures/vllm032/sha256/metrics.txt`, shows 0.0).
#[test]
fn idle_usage_leaves_out_the_null_block() {
    let e = Engine::new(small_cfg(100)).unwrap();
    let s = e.stats();
    assert_eq!(s.kv_usage, 0.0);
    assert_eq!((s.num_gpu_blocks, s.block_size), (100, 16));
    assert_eq!(e.free_blocks(), 99);
}

#[derive(Clone, Debug)]
enum Op {
    Add {
        prefix: u8,
        extra: u8,
        len: u16,
        max_tokens: u8,
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
        4 => (0u8..3, 0u8..4, 1u16..300, 1u8..40, 0u32..20_000).prop_map(
            |(prefix, extra, len, max_tokens, dt_us)| Op::Add { prefix, extra, len, max_tokens, dt_us }
        ),
        1 => (0u8..8, 0u32..20_000).prop_map(|(back, dt_us)| Op::Abort { back, dt_us }),
        2 => (0u32..50_000).prop_map(|dt_us| Op::Advance { dt_us }),
    ]
}

/// Shared-prefix prompts: `prefix` picks one of three 128-token prefixes, `extra` a suffix.
fn stream_prompt(prefix: u8, extra: u8, len: u16) -> Vec<u32> {
    (0..len as u32)
        .map(|i| {
            if i < 128 {
                1000 + u32::from(prefix) * 1000 + i
            } else {
                50_000 + u32::from(extra) * 1000 + i
            }
        })
        .collect()
}

/// Replays `ops`, checking invariants after each; returns (outputs, events, stats).
fn replay(
    cfg: &EngineConfig,
    ops: &[Op],
) -> (Vec<Output>, Vec<KvEvent>, EngineStats, Vec<RequestId>) {
    let mut e = Engine::new(cfg.clone()).unwrap();
    let (mut now, mut next_id) = (0u64, 0u64);
    let mut out = Vec::new();
    let mut events = Vec::new();
    let mut added = Vec::new();
    for op in ops {
        match *op {
            Op::Add {
                prefix,
                extra,
                len,
                max_tokens,
                dt_us,
            } => {
                now += u64::from(dt_us);
                e.advance(now, &mut out);
                let r = req(
                    next_id,
                    stream_prompt(prefix, extra, len),
                    u32::from(max_tokens),
                );
                if e.add_request(now, r).is_ok() {
                    added.push(next_id);
                }
                next_id += 1;
            }
            Op::Abort { back, dt_us } => {
                now += u64::from(dt_us);
                e.advance(now, &mut out);
                e.abort(now, next_id.saturating_sub(u64::from(back) + 1));
            }
            Op::Advance { dt_us } => {
                now += u64::from(dt_us);
                e.advance(now, &mut out);
            }
        }
        e.check_invariants().unwrap();
        let s = e.stats();
        assert!((0.0..=1.0).contains(&s.kv_usage));
        assert!(e.free_blocks() < cfg.num_gpu_blocks);
        events.append(&mut e.take_kv_events());
    }
    out.extend(drain(&mut e));
    events.append(&mut e.take_kv_events());
    assert_eq!(
        e.free_blocks(),
        cfg.num_gpu_blocks - 1,
        "everything freed at the end"
    );
    (out, events, e.stats(), added)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_streams_keep_invariants_and_finish_everything(
        ops in prop::collection::vec(op(), 1..60),
        blocks in 20usize..60,
    ) {
        let cfg = small_cfg(blocks);
        let (out, events, stats, added) = replay(&cfg, &ops);
        // Every admitted request finishes exactly once; outputs are in time order; each
        // request's token indices are 0, 1, 2, ... and stop at its finish.
        let mut last_at = 0;
        let mut next_index = std::collections::HashMap::new();
        let mut done = std::collections::HashSet::new();
        for o in &out {
            match *o {
                Output::Token { id, at_us, index, .. } => {
                    prop_assert!(!done.contains(&id));
                    let n = next_index.entry(id).or_insert(0u32);
                    prop_assert_eq!(*n, index);
                    *n += 1;
                    prop_assert!(at_us >= last_at);
                    last_at = at_us;
                }
                Output::Finished { id, at_us, reason, usage } => {
                    prop_assert!(done.insert(id), "finished twice");
                    prop_assert!(at_us >= last_at);
                    last_at = at_us;
                    prop_assert_eq!(usage.completion_tokens, next_index.get(&id).copied().unwrap_or(0));
                    if reason == FinishReason::Length {
                        prop_assert!(usage.completion_tokens > 0);
                    }
                }
            }
        }
        for id in &added {
            prop_assert!(done.contains(id), "request {} never finished", id);
        }
        prop_assert_eq!(stats.finished_length + stats.finished_abort, added.len() as u64);
        // The event stream is a consistent multiset (a key stored once per cached copy, as
        // vLLM's pool keeps copies): a key is removed only while a copy is stored.
        let mut stored = std::collections::HashMap::<u64, u32>::new();
        for ev in &events {
            match ev {
                KvEvent::BlockStored { block_hashes, token_ids, .. } => {
                    prop_assert_eq!(token_ids.len(), block_hashes.len() * 16);
                    for k in block_hashes {
                        *stored.entry(*k).or_default() += 1;
                    }
                }
                KvEvent::BlockRemoved { block_hashes } => {
                    for k in block_hashes {
                        let n = stored.get_mut(k);
                        prop_assert!(n.as_ref().is_some_and(|n| **n > 0), "removed a key never stored");
                        if let Some(n) = n {
                            *n -= 1;
                        }
                    }
                }
                KvEvent::AllBlocksCleared => stored.clear(),
            }
        }
    }

    #[test]
    fn same_inputs_give_same_outputs(ops in prop::collection::vec(op(), 1..40)) {
        let cfg = small_cfg(40);
        let a = replay(&cfg, &ops);
        let b = replay(&cfg, &ops);
        prop_assert_eq!(a.0, b.0);
        prop_assert_eq!(a.1, b.1);
        prop_assert_eq!(a.2, b.2);
    }

    #[test]
    fn a_repeated_prefix_is_a_hit(len in 33usize..400, max_tokens in 1u32..20) {
        let mut e = Engine::new(small_cfg(128)).unwrap();
        e.add_request(0, req(1, prompt(0, len), max_tokens)).unwrap();
        drain(&mut e);
        let before = e.stats().prefix_cache_hits_tokens;
        e.add_request(1_000_000_000, req(2, prompt(0, len), max_tokens)).unwrap();
        let out = drain(&mut e);
        let cached = finished(&out, 2).2.cached_tokens as usize;
        prop_assert_eq!(cached, (len - 1) / 16 * 16);
        prop_assert!(cached > 0);
        prop_assert!(e.stats().prefix_cache_hits_tokens > before);
    }

    #[test]
    fn ttft_grows_with_uncached_tokens(short in 1usize..500, more in 1usize..500) {
        let ttft = |len: usize| {
            let mut e = Engine::new(small_cfg(128)).unwrap();
            e.add_request(0, req(1, prompt(0, len), 1)).unwrap();
            first_token_at(&drain(&mut e), 1)
        };
        prop_assert!(ttft(short + more) > ttft(short));
    }

    #[test]
    fn a_tiny_cache_preempts(n in 3u64..6) {
        // 10 usable blocks; n requests each growing to 5+ blocks cannot all stay resident.
        let mut e = Engine::new(small_cfg(11)).unwrap();
        for id in 0..n {
            e.add_request(0, req(id, prompt(id as u32, 40), 40)).unwrap();
        }
        drain(&mut e);
        let s = e.stats();
        prop_assert!(s.preemptions_total > 0);
        prop_assert_eq!(s.finished_length, n);
    }
}

/// Where in the step cycle a request arrived: nothing to wait for on an idle engine; the rest
/// of the step in flight otherwise, and that step's length, until the request finishes.
#[test]
fn arrival_phase_is_the_rest_of_the_step_in_flight() {
    let mut e = Engine::new(small_cfg(64)).unwrap();
    e.add_request(1_000, req(1, prompt(1, 100), 3)).unwrap();
    // Idle: its step starts at once. 100 prefill tokens: 1000 + 10·100 µs.
    assert_eq!(e.arrival_phase_us(1), Some((0, 0)));
    // Arrives 300 µs into that 2,000 µs step: admitted at its end, 1,700 µs later.
    e.add_request(1_300, req(2, prompt(2, 50), 3)).unwrap();
    assert_eq!(e.arrival_phase_us(2), Some((1_700, 2_000)));
    assert_eq!(e.arrival_phase_us(99), None);
    let out = drain(&mut e);
    // Its first token ends the step that starts when the first one's ends.
    assert!(first_token_at(&out, 2) > 3_000);
    assert_eq!(
        e.arrival_phase_us(2),
        None,
        "finished requests are forgotten"
    );
}
