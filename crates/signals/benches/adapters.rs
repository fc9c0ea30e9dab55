//! Cost of the pure adapters on the hot path of the signal loops: one `/metrics` body parse per
//! scrape per endpoint (10/s per pod at the default interval) and one msgpack decode per KV
//! batch (one per engine step per pod).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvgate_core::endpoint::EngineKind;
use kvgate_signals::{decode_event_batch, parse_metrics};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

fn metrics(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_metrics");
    for (name, kind) in [
        ("vllm.txt", EngineKind::Vllm),
        ("vllm_dp2.txt", EngineKind::Vllm),
        // A real vLLM 0.32 body: every family, histograms included.
        ("vllm032/sha256/metrics.txt", EngineKind::Vllm),
        ("sglang.txt", EngineKind::Sglang),
        ("llamacpp.txt", EngineKind::LlamaCpp),
    ] {
        let body = fixture(name);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| parse_metrics(kind, black_box(body)).expect("parses"))
        });
    }
    group.finish();
}

/// An older-vLLM (array) batch of `events` BlockStored events, 16 blocks of 16 tokens each.
fn batch(events: u64) -> Vec<u8> {
    type Stored = (
        &'static str,
        Vec<u64>,
        Option<u64>,
        Vec<u32>,
        u32,
        Option<u32>,
        &'static str,
        Option<String>,
    );
    let evs: Vec<Stored> = (0..events)
        .map(|e| {
            let hashes: Vec<u64> = (0..16)
                .map(|b| (e << 32 | b) ^ 0x9e37_79b9_7f4a_7c15)
                .collect();
            (
                "BlockStored",
                hashes,
                Some(e),
                (0..256).collect(),
                16,
                None,
                "GPU",
                None,
            )
        })
        .collect();
    rmp_serde::to_vec(&(1_763_769_600.0f64, evs, 0u32)).expect("encodes")
}

fn kv(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_event_batch");
    for events in [1u64, 16, 128] {
        let payload = batch(events);
        group.throughput(Throughput::Elements(events));
        group.bench_with_input(BenchmarkId::from_parameter(events), &payload, |b, p| {
            b.iter(|| decode_event_batch(7, black_box(p)).expect("decodes"))
        });
    }
    group.finish();
}

criterion_group!(benches, metrics, kv);
criterion_main!(benches);
