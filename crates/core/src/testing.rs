//! Support for tests and benchmarks of the core and its users: prompts built from block
//! *labels* (each label stands for one block of identical tokens), their router keys, and the
//! `BlockStored` events an engine would publish for them, with engine hashes unrelated to the
//! router's keys (as real engines' are).
//!
//! A chain of labels `[a, b, c]` is the prompt whose block 0 is `block_size` tokens `a`, block 1
//! tokens `b`, and so on; two label chains share a prefix exactly when their label lists do.

use crate::endpoint::Tier;
use crate::keys::{KeyScope, chain_keys};
use crate::observe::KvEvent;
use crate::request::PromptKeys;

/// What the fake engine XORs into the router's key to name a block: any bijection works, the
/// point is that engine hashes are not the router's keys.
const ENGINE_HASH_MASK: u64 = 0x5EED_0FE4_614E_0000;

/// The prompt tokens of a label chain.
pub fn label_tokens(labels: &[u64], block_size: u32) -> Vec<u32> {
    labels
        .iter()
        .flat_map(|&l| std::iter::repeat_n(l as u32, block_size as usize))
        .collect()
}

/// The router keys of a label chain.
pub fn label_keys(labels: &[u64], block_size: u32) -> PromptKeys {
    PromptKeys::from_tokens(
        &label_tokens(labels, block_size),
        block_size,
        KeyScope::default(),
    )
}

/// The engine hashes the fake engine gives the blocks of a label chain.
pub fn label_engine_hashes(labels: &[u64], block_size: u32) -> Vec<u64> {
    chain_keys(
        &label_tokens(labels, block_size),
        block_size,
        KeyScope::default(),
    )
    .into_iter()
    .map(|k| k ^ ENGINE_HASH_MASK)
    .collect()
}

/// A `BlockStored` of a whole label chain from its root, as the fake engine publishes it.
pub fn label_stored(labels: &[u64], block_size: u32, tier: Tier) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: label_engine_hashes(labels, block_size),
        parent: None,
        token_ids: label_tokens(labels, block_size),
        block_size,
        lora_name: None,
        extra_keys: Vec::new(),
        tier,
    }
}

/// A `BlockStored` of the blocks `labels` continuing the already published chain `prefix`
/// (its parent is the engine hash of `prefix`'s last block).
pub fn label_stored_after(prefix: &[u64], labels: &[u64], block_size: u32, tier: Tier) -> KvEvent {
    let all: Vec<u64> = prefix.iter().chain(labels).copied().collect();
    let hashes = label_engine_hashes(&all, block_size);
    KvEvent::BlockStored {
        block_hashes: hashes[prefix.len()..].to_vec(),
        parent: prefix.len().checked_sub(1).map(|i| hashes[i]),
        token_ids: label_tokens(labels, block_size),
        block_size,
        lora_name: None,
        extra_keys: Vec::new(),
        tier,
    }
}

/// A `BlockRemoved` of the last `n` blocks of a label chain.
pub fn label_removed(labels: &[u64], n: usize, block_size: u32, tier: Tier) -> KvEvent {
    let hashes = label_engine_hashes(labels, block_size);
    KvEvent::BlockRemoved {
        block_hashes: hashes[hashes.len().saturating_sub(n)..].to_vec(),
        tier,
    }
}

/// The routing benchmarks' fleet (`benches/route.rs`, `examples/pick_profile.rs`): `n`
/// endpoints of `policy`'s router, each with a scraped sample (waiting 0-3, running 0-31, KV use
/// 0.1-0.8) and ~2,000 cached blocks (20 private 100-block conversations), and a shared "system
/// prompt" chain of `shared_blocks` blocks held by every tenth endpoint, all of `block_size`
/// tokens; seeded, so every caller gets the same fleet. Returns the router and the shared chain.
pub fn bench_fleet(
    policy: &str,
    n: usize,
    shared_blocks: usize,
    block_size: u32,
) -> (crate::Router, Vec<u64>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut r =
        crate::Router::new(crate::RouterConfig::for_policy(policy).expect("a known policy"))
            .expect("a valid config");
    let shared: Vec<u64> = (0..shared_blocks).map(|_| rng.random()).collect();
    let stored = |seq, labels: &[u64]| crate::KvEventBatch {
        seq,
        ts: 0.0,
        events: vec![label_stored(labels, block_size, Tier::Gpu)],
        data_parallel_rank: None,
    };
    for i in 0..n {
        let id = r.add_endpoint(
            0,
            crate::EndpointSpec::new(format!("10.0.{}.{}:8000", i / 256, i % 256), "m"),
        );
        r.observe_metrics(
            id,
            1_000,
            &crate::MetricsSample {
                waiting: rng.random_range(0..4),
                running: rng.random_range(0..32),
                kv_usage: Some(rng.random_range(0.1..0.8)),
                ..Default::default()
            },
        );
        let mut seq = 0;
        if i % 10 == 0 {
            r.observe_kv_batch(id, 1_000, &stored(seq, &shared));
            seq += 1;
        }
        for _ in 0..20 {
            let conv: Vec<u64> = (0..100).map(|_| rng.random()).collect();
            r.observe_kv_batch(id, 1_000, &stored(seq, &conv));
            seq += 1;
        }
    }
    (r, shared)
}

/// [`bench_fleet`] after it has served traffic, as a running fleet has: `requests` 1k-token
/// requests (half of them on the shared chain), one every `every_us` from 2 ms on, each picked
/// by the router, booked, given its first token 20-80 ms later and finished 10 ms after that.
/// So endpoints carry prefill factors calibrated at different times and learnt step
/// coefficients, and a pick timed well after the last of them (`until_us`) decays the factors
/// whose evidence is older than `calibration_hold_us`, as a pick in a large fleet does for
/// most endpoints. Every event up to `until_us` is delivered in time order.
pub fn bench_fleet_served(
    policy: &str,
    n: usize,
    shared_blocks: usize,
    block_size: u32,
    requests: usize,
    every_us: u64,
    until_us: u64,
) -> (crate::Router, Vec<u64>) {
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    enum Next {
        FirstToken,
        Finish(u32),
    }
    let (mut r, shared) = bench_fleet(policy, n, shared_blocks, block_size);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(43);
    let mut pending: BTreeMap<(u64, u64), Next> = BTreeMap::new();
    let deliver = |r: &mut crate::Router, pending: &mut BTreeMap<(u64, u64), Next>, to: u64| {
        while let Some(entry) = pending.first_entry() {
            let (t, id) = *entry.key();
            if t > to {
                break;
            }
            match entry.remove() {
                Next::FirstToken => r.on_first_token(id, t),
                Next::Finish(cached) => {
                    r.on_finish(
                        id,
                        t,
                        &crate::Outcome {
                            output_tokens: 16,
                            cached_tokens: Some(cached),
                            tpot_us: Some(6_000),
                            ..Default::default()
                        },
                    );
                }
            }
        }
    };
    let blocks = (1024 / block_size.max(1)) as usize;
    for k in 0..requests {
        let now = 2_000 + k as u64 * every_us;
        deliver(&mut r, &mut pending, now);
        let mut labels: Vec<u64> = if k % 2 == 0 {
            shared[..(blocks / 2).min(shared.len())].to_vec()
        } else {
            Vec::new()
        };
        while labels.len() < blocks {
            labels.push(rng.random());
        }
        let id = 1_000_000 + k as u64;
        let req = crate::RoutingRequest::new(
            id,
            "m",
            labels.len() as u32 * block_size,
            label_keys(&labels, block_size),
        );
        let Ok(d) = r.pick(now, &req, &mut rng, None) else {
            continue;
        };
        r.book(now, &req, &d);
        let first = now + rng.random_range(20_000..80_000);
        pending.insert((first, id), Next::FirstToken);
        pending.insert(
            (first + 10_000, id),
            Next::Finish(d.matched_blocks * block_size),
        );
    }
    deliver(&mut r, &mut pending, until_us);
    (r, shared)
}
