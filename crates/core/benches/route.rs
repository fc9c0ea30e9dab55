//! Decision latency, block hashing, KV-event ingest, prefix-index lookups and index memory of
//! the routing core.
//!
//! `cargo bench -p kvgate-core -- --warm-up-time 1 --measurement-time 3`
//!
//! Index memory per entry, fresh and after churn, has its own deterministic report:
//! `cargo run --release -p kvgate-core --example index_memory`.
//!
//! Instruction counts of `Router::pick` on the same fleet, repeatable where wall time is not:
//! `examples/pick_profile.rs` under callgrind (the command is in its docs).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvgate_core::index::{IndexConfig, PrefixIndex, PrefixQuery, PrefixSource};
use kvgate_core::testing::{
    bench_fleet, bench_fleet_served, label_keys, label_removed, label_stored,
};
use kvgate_core::{
    EndpointId, EndpointSpec, KeyScope, KvEventBatch, PromptKeys, Router, RouterConfig,
    RoutingRequest, Tier,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLOCK: u32 = 16;

/// The bench fleet ([`kvgate_core::testing::bench_fleet`]).
fn fleet(policy: &str, n: usize, shared_blocks: usize) -> (Router, Vec<u64>) {
    bench_fleet(policy, n, shared_blocks, BLOCK)
}

/// When the served fleet's picks are timed: 200 ms after its last request.
const SERVED_UNTIL_US: u64 = 2_000 + 2_000 * 400 + 200_000;

/// The bench fleet after two requests per endpoint (at most 2,000, one every 0.4 ms), picked at
/// [`SERVED_UNTIL_US`] ([`kvgate_core::testing::bench_fleet_served`]).
fn served(n: usize) -> (Router, Vec<u64>) {
    bench_fleet_served(
        "kvgate",
        n,
        1024,
        BLOCK,
        (2 * n).min(2_000),
        400,
        SERVED_UNTIL_US,
    )
}

fn request(tokens: u32, shared: &[u64], rng: &mut ChaCha8Rng) -> RoutingRequest {
    let blocks = (tokens / BLOCK) as usize;
    // Half the prompt is the shared prefix, the rest unique.
    let mut labels: Vec<u64> = shared[..(blocks / 2).min(shared.len())].to_vec();
    while labels.len() < blocks {
        labels.push(rng.random());
    }
    RoutingRequest::new(1, "m", tokens, label_keys(&labels, BLOCK))
}

fn bench_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick_kvgate");
    g.throughput(Throughput::Elements(1));
    for &n in &[10usize, 100, 1000] {
        for &tokens in &[1024u32, 32 * 1024] {
            let (r, shared) = fleet("kvgate", n, 1024);
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let req = request(tokens, &shared, &mut rng);
            g.bench_with_input(
                BenchmarkId::new(format!("{n}ep"), tokens),
                &req,
                |b, req| b.iter(|| black_box(r.pick(2_000, req, &mut rng, None).unwrap())),
            );
        }
    }
    g.finish();

    // The same picks on a fleet that has served traffic (`bench_fleet_served`): calibrated
    // prefill factors, most of them decaying at the pick's time, and learnt coefficients.
    let mut g = c.benchmark_group("pick_kvgate_served");
    g.throughput(Throughput::Elements(1));
    for &n in &[100usize, 1000] {
        let (r, shared) = served(n);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let req = request(1024, &shared, &mut rng);
        g.bench_with_input(BenchmarkId::new(format!("{n}ep"), 1024), &req, |b, req| {
            b.iter(|| black_box(r.pick(SERVED_UNTIL_US, req, &mut rng, None).unwrap()))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("pick_by_policy_100ep_1k");
    g.throughput(Throughput::Elements(1));
    for policy in [
        "kvgate",
        "gie-default",
        "sglang-cache-aware",
        "dynamo",
        "round-robin",
        "random",
        "least-request",
        "power-of-two",
    ] {
        let (mut r, shared) = fleet(policy, 100, 1024);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Give the approximate index something to match too.
        for k in 0..200u64 {
            let mut q = request(1024, &shared, &mut rng);
            q.id = k;
            let d = r.pick(1_500, &q, &mut rng, None).unwrap();
            r.book(1_500, &q, &d);
        }
        let req = request(1024, &shared, &mut rng);
        g.bench_function(BenchmarkId::from_parameter(policy), |b| {
            b.iter(|| black_box(r.pick(2_000, &req, &mut rng, None).unwrap()))
        });
    }
    g.finish();
}

fn bench_book(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick_and_book_kvgate_100ep");
    g.throughput(Throughput::Elements(1));
    for &tokens in &[1024u32, 32 * 1024] {
        let (mut r, shared) = fleet("kvgate", 100, 1024);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut id = 0u64;
        let mut now = 2_000u64;
        let req = request(tokens, &shared, &mut rng);
        g.bench_with_input(BenchmarkId::from_parameter(tokens), &req, |b, req| {
            b.iter(|| {
                id += 1;
                now += 10;
                let mut q = req.clone();
                q.id = id;
                let d = r.pick(now, &q, &mut rng, None).unwrap();
                r.book(now, &q, &d);
                r.on_first_token(id, now + 5);
                r.on_finish(id, now + 6, &Default::default());
            })
        });
    }
    g.finish();
}

fn bench_hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("prompt_keys");
    for &tokens in &[1024usize, 32 * 1024] {
        let toks: Vec<u32> = (0..tokens as u32)
            .map(|t| t.wrapping_mul(2_654_435_761) % 128_000)
            .collect();
        g.throughput(Throughput::Elements(tokens as u64));
        g.bench_with_input(BenchmarkId::new("router_chain", tokens), &toks, |b, t| {
            b.iter(|| black_box(PromptKeys::from_tokens(t, BLOCK, KeyScope::default())))
        });
        let text = vec![b'x'; tokens * 4];
        g.bench_with_input(
            BenchmarkId::new("approx_xxh3_bytes", tokens),
            &text,
            |b, t| b.iter(|| black_box(PromptKeys::approximate(t, "m"))),
        );
    }
    g.finish();
}

fn bench_ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("kv_event_ingest");
    for &blocks_per_event in &[16usize, 256] {
        // Steady state: each iteration stores a fresh chain and removes the one stored
        // `window` iterations ago, so the index stays at a constant size (≈ a full H100 cache
        // on each of 10 endpoints) and every event touches real entries.
        let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
        let ids: Vec<EndpointId> = (0..10)
            .map(|i| r.add_endpoint(0, EndpointSpec::new(format!("e{i}"), "m")))
            .collect();
        let window = 29_205 / blocks_per_event;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut ring: Vec<Vec<Vec<u64>>> = vec![Vec::new(); ids.len()];
        let mut seq = vec![0u64; ids.len()];
        let mut i = 0usize;
        let mut step = |r: &mut Router| {
            let e = i % ids.len();
            i += 1;
            let labels: Vec<u64> = (0..blocks_per_event).map(|_| rng.random()).collect();
            let mut events = vec![label_stored(&labels, BLOCK, Tier::Gpu)];
            ring[e].push(labels);
            if ring[e].len() > window {
                let old = ring[e].remove(0);
                events.push(label_removed(&old, old.len(), BLOCK, Tier::Gpu));
            }
            let batch = KvEventBatch {
                seq: seq[e],
                ts: 0.0,
                events,
                data_parallel_rank: None,
            };
            seq[e] += 1;
            r.observe_kv_batch(ids[e], 1, &batch);
        };
        for _ in 0..window * ids.len() {
            step(&mut r);
        }
        // Each iteration applies one store and one remove of `blocks_per_event` blocks.
        g.throughput(Throughput::Elements(2 * blocks_per_event as u64));
        g.bench_function(
            BenchmarkId::new("store_and_remove", blocks_per_event),
            |b| b.iter(|| step(&mut r)),
        );
        let m = r.index_memory();
        println!(
            "index after ingest ({blocks_per_event}/event): {} keys, {} (block, endpoint) entries, {} heap bytes, {:.1} bytes/entry",
            m.keys,
            m.entries,
            m.heap_bytes,
            m.heap_bytes as f64 / m.entries.max(1) as f64
        );
    }
    g.finish();
}

/// The prefix index alone, without the router around it: `n` endpoints with 2,000 private
/// blocks each (precise), a 1,024-block shared chain held by every tenth (precise), and the
/// router's approximate entries for 64-block prompts booked on every endpoint. Queries walk a
/// chain whose first half is the shared chain and the rest unmatched.
fn bench_index_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("index_longest_prefixes");
    g.throughput(Throughput::Elements(1));
    for &n in &[100u32, 1000] {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut idx = PrefixIndex::new(IndexConfig {
            approx_capacity_blocks: 31_250,
            approx_ttl_us: None,
            precise_capacity_blocks: 1 << 21,
        });
        let shared: Vec<u64> = (0..1024).map(|_| rng.random()).collect();
        for e in 0..n {
            let id = EndpointId(e);
            idx.set_trusted(id, true);
            if e % 10 == 0 {
                idx.store(id, &shared, Tier::Gpu);
            }
            let private: Vec<u64> = (0..2000).map(|_| rng.random()).collect();
            idx.store(id, &private, Tier::Gpu);
            let booked: Vec<u64> = (0..64).map(|_| rng.random()).collect();
            idx.touch_approx(id, &booked, 1);
        }
        for blocks in [64usize, 2048] {
            let mut chain: Vec<u64> = shared[..(blocks / 2).min(shared.len())].to_vec();
            while chain.len() < blocks {
                chain.push(rng.random());
            }
            for (source, precise) in [("best", true), ("approx_only", false)] {
                let q = PrefixQuery {
                    chain: &chain,
                    precise,
                    now_us: 2,
                    source: if precise {
                        PrefixSource::Best
                    } else {
                        PrefixSource::ApproxOnly
                    },
                };
                g.bench_with_input(
                    BenchmarkId::new(format!("{n}ep_{source}"), blocks * BLOCK as usize),
                    &q,
                    |b, q| b.iter(|| black_box(idx.longest_prefixes(q))),
                );
            }
        }
        // Point lookups of private blocks (each key held by one endpoint), the walk's inner
        // step without run skipping.
        let probe: Vec<u64> = {
            let mut r = ChaCha8Rng::seed_from_u64(3);
            let _: Vec<u64> = (0..1024).map(|_| r.random()).collect();
            (0..2000).map(|_| r.random()).collect()
        };
        g.bench_function(
            BenchmarkId::new(format!("{n}ep_private_chain"), 2000),
            |b| b.iter(|| black_box(idx.precise_prefix(EndpointId(0), &probe))),
        );
    }
    g.finish();
}

fn report_memory(_: &mut Criterion) {
    // Entries shared by several endpoints (a hot prefix held by 10 of 100) cost less per entry
    // than unique ones; report both shapes.
    for (label, policy, n, shared) in [
        ("unique blocks", "kvgate", 100usize, 0usize),
        ("with hot prefix", "kvgate", 100, 1024),
    ] {
        let (r, _) = fleet(policy, n, shared.max(1));
        let m = r.index_memory();
        println!(
            "index memory ({label}, {n} endpoints): {} keys, {} entries, {} bytes, {:.1} bytes per (block, endpoint) entry",
            m.keys,
            m.entries,
            m.heap_bytes,
            m.heap_bytes as f64 / m.entries.max(1) as f64
        );
    }
    let (holder, slot) = kvgate_core::index::PrefixIndex::layout_sizes();
    println!(
        "index layout: holder {holder} B, table slot (key + inline holder or arena index) {slot} B, 5 to a 64-byte chunk"
    );
}

criterion_group!(
    benches,
    report_memory,
    bench_pick,
    bench_book,
    bench_hashing,
    bench_ingest,
    bench_index_lookup
);
criterion_main!(benches);
