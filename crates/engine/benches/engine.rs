//! Simulated requests per second of CPU for realistic request mixes: prompts sharing a system
//! prompt / conversation prefix, a fixed output length, arrivals fast enough to keep the batch
//! full (so chunked prefill, decode batching, prefix hits and eviction are all exercised).
//! Block hashes are computed once outside the timed loop, as the benchmark runner does.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvgate_engine::{Engine, EngineConfig, EngineRequest};

struct Workload {
    arrivals: Vec<(u64, EngineRequest)>,
}

/// `n` requests of `prompt_len` tokens whose first `shared_len` tokens come from one of 8
/// prefixes; `output` tokens each; one arrival every `gap_us`.
fn workload(n: usize, prompt_len: usize, shared_len: usize, output: u32, gap_us: u64) -> Workload {
    let cfg = EngineConfig::h100();
    let hasher = cfg.block_hasher();
    let arrivals = (0..n)
        .map(|i| {
            let group = (i % 8) as u32;
            let prompt: Vec<u32> = (0..prompt_len as u32)
                .map(|t| {
                    if (t as usize) < shared_len {
                        1000 + group * 1_000_000 + t
                    } else {
                        10_000_000 + (i as u32) * 50_000 + t
                    }
                })
                .collect();
            let hashes = hasher.hashes(&prompt, cfg.extra_keys(None, None));
            let req = EngineRequest {
                id: i as u64,
                prompt_tokens: prompt,
                max_tokens: output,
                lora_name: None,
                cache_salt: None,
                block_hashes: Some(Arc::from(hashes)),
            };
            (i as u64 * gap_us, req)
        })
        .collect();
    Workload { arrivals }
}

/// Replays the workload on a fresh H100 engine until idle; returns tokens generated.
fn run(w: &Workload) -> u64 {
    let mut e = Engine::new(EngineConfig::h100()).expect("valid config");
    let mut out = Vec::new();
    let mut next = 0;
    loop {
        let arrival = w.arrivals.get(next).map(|(t, _)| *t);
        let wake = e.next_wakeup_us();
        if let Some(a) = arrival
            && wake.is_none_or(|w| a < w)
        {
            e.add_request(a, w.arrivals[next].1.clone())
                .expect("valid request");
            next += 1;
        } else if let Some(wake) = wake {
            e.advance(wake, &mut out);
            out.clear();
            black_box(e.take_kv_events());
        } else {
            break;
        }
    }
    e.stats().generation_tokens_total
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_replay");
    g.sample_size(10);
    // 2k-token prompts, 200 output tokens, 0 / 1k / 1.75k tokens shared with 8 prefixes.
    for shared in [0usize, 1024, 1792] {
        let n = 512;
        let w = workload(n, 2048, shared, 200, 20_000);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new("2k_prompt_200_out_shared", shared),
            &w,
            |b, w| b.iter(|| run(w)),
        );
    }
    // The benchmark trace's shape: 12k-token prompts, mostly shared, ~330 output tokens.
    let n = 96;
    let w = workload(n, 12_288, 10_240, 330, 150_000);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_with_input(
        BenchmarkId::new("12k_prompt_330_out_shared", 10_240),
        &w,
        |b, w| b.iter(|| run(w)),
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
