//! Bytes per (block, endpoint) entry of the prefix index, freshly built and after heavy
//! store/remove churn, from [`PrefixIndex::memory`] (container capacities, so the figures are
//! deterministic and repeat exactly on any machine).
//!
//! `cargo run --release -p kvgate-core --example index_memory [-- ENDPOINTS BLOCKS ROUNDS]`
//!
//! The main shape is a fleet of `ENDPOINTS` engines each holding `BLOCKS` private blocks (default
//! 10 × 29,205: a full H100's KV cache each) that then evicts and stores 256 random blocks per
//! endpoint per round for `ROUNDS` rounds (default: until every endpoint has turned its cache
//! over 20 times), as an engine under steady load does. Hash tables have power-of-two sizes, so
//! the cost per entry depends on where the live set falls between two powers: a sweep over live
//! sizes reports the worst case too. Shared blocks (several holders per key) and the router's
//! approximate entries are reported separately.

use kvgate_core::Tier;
use kvgate_core::endpoint::EndpointId;
use kvgate_core::index::{IndexConfig, PrefixIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Blocks one engine evicts and stores per round (a busy engine's events are of this order).
const PER_ROUND: usize = 256;

fn cfg() -> IndexConfig {
    IndexConfig {
        approx_capacity_blocks: 31_250,
        approx_ttl_us: None,
        precise_capacity_blocks: 1 << 21,
    }
}

fn per_entry(idx: &PrefixIndex) -> f64 {
    let m = idx.memory();
    m.heap_bytes as f64 / m.entries.max(1) as f64
}

/// Builds `endpoints × blocks` entries, each block held by `holders` consecutive endpoints,
/// then churns `rounds` rounds; returns (bytes/entry fresh, bytes/entry after churn, entries).
fn precise(endpoints: u32, blocks: usize, holders: u32, rounds: usize) -> (f64, f64, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let mut idx = PrefixIndex::new(cfg());
    // Per endpoint group, its live keys (a random one is evicted each time).
    let groups = endpoints / holders;
    let mut live: Vec<Vec<u64>> = (0..groups)
        .map(|_| (0..blocks).map(|_| rng.random()).collect())
        .collect();
    for (g, keys) in live.iter().enumerate() {
        for h in 0..holders {
            idx.store(EndpointId(g as u32 * holders + h), keys, Tier::Gpu);
        }
    }
    let fresh = per_entry(&idx);
    let mut evict = Vec::with_capacity(PER_ROUND);
    let mut fresh_keys = Vec::with_capacity(PER_ROUND);
    for _ in 0..rounds {
        for (g, keys) in live.iter_mut().enumerate() {
            evict.clear();
            fresh_keys.clear();
            // Distinct positions, so no block is evicted in the same round it was stored.
            for i in rand::seq::index::sample(&mut rng, keys.len(), PER_ROUND.min(keys.len())) {
                let k: u64 = rng.random();
                evict.push(std::mem::replace(&mut keys[i], k));
                fresh_keys.push(k);
            }
            for h in 0..holders {
                let id = EndpointId(g as u32 * holders + h);
                idx.remove(id, &evict, Tier::Gpu);
                idx.store(id, &fresh_keys, Tier::Gpu);
            }
        }
    }
    (fresh, per_entry(&idx), idx.memory().entries)
}

/// The router's own entries: `endpoints` endpoints each booked with 64-block prompts until
/// every endpoint has cycled its approximate capacity `turns` times.
fn approx(endpoints: u32, turns: usize) -> (f64, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let mut idx = PrefixIndex::new(cfg());
    let cap = cfg().approx_capacity_blocks;
    let mut now = 1u64;
    for _ in 0..turns * cap / 64 {
        for e in 0..endpoints {
            let keys: Vec<u64> = (0..64).map(|_| rng.random()).collect();
            now += 1;
            idx.touch_approx(EndpointId(e), &keys, now);
        }
    }
    (per_entry(&idx), idx.memory().entries)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ENDPOINTS BLOCKS ROUNDS are integers"))
        .collect();
    let endpoints = args.first().copied().unwrap_or(10) as u32;
    let blocks = args.get(1).copied().unwrap_or(29_205);
    let rounds = args
        .get(2)
        .copied()
        .unwrap_or(20 * blocks.div_ceil(PER_ROUND));
    let (holder, slot) = PrefixIndex::layout_sizes();
    println!("layout: holder record {holder} B, table slot {slot} B (5 to a 64-byte chunk)");

    let (fresh, churned, entries) = precise(endpoints, blocks, 1, rounds);
    println!(
        "private blocks, {endpoints} endpoints x {blocks} blocks ({entries} entries), {rounds} rounds of {PER_ROUND} evict+store per endpoint: fresh {fresh:.1} B/entry, after churn {churned:.1} B/entry"
    );

    // Live sizes spread over two doublings, so one of them sits just past a power of two.
    let (mut worst_fresh, mut worst_churned) = ((0.0f64, 0), (0.0f64, 0));
    for step in 0..16 {
        let total = 40_000 + step * 10_000;
        let per_ep = total / 4;
        let (f, c, n) = precise(4, per_ep, 1, 12 * per_ep.div_ceil(PER_ROUND));
        if f > worst_fresh.0 {
            worst_fresh = (f, n);
        }
        if c > worst_churned.0 {
            worst_churned = (c, n);
        }
    }
    println!(
        "sweep over 16 live sizes 40k..190k entries: worst fresh {:.1} B/entry (at {} entries), worst after churn {:.1} B/entry (at {} entries)",
        worst_fresh.0, worst_fresh.1, worst_churned.0, worst_churned.1
    );

    for holders in [2u32, 3, 10] {
        let (fresh, churned, entries) =
            precise(holders * 4, 10_000, holders, 12 * 10_000 / PER_ROUND);
        println!(
            "blocks shared by {holders} endpoints ({entries} entries): fresh {fresh:.1} B/entry, after churn {churned:.1} B/entry"
        );
    }

    let (per, entries) = approx(10, 4);
    println!(
        "approximate entries, 10 endpoints at capacity {} ({entries} entries), eviction log included: {per:.1} B/entry",
        cfg().approx_capacity_blocks
    );
}
