//! A fixed-count driver of `Router::pick` on the bench's fleet (`benches/route.rs`), for
//! repeatable instruction counts on a noisy machine:
//!
//! `cargo build --release -p kvgate-core --example pick_profile && valgrind --tool=callgrind
//! --collect-atstart=no --toggle-collect='*pick_loop*' target/release/examples/pick_profile
//! 1000 1024 200`
//!
//! Arguments: endpoints, prompt tokens, picks, then optionally `time` and `served`.
//! Instructions per pick = the callgrind total divided by the number of picks. With `time`, it
//! prints instead the median wall time per pick of 31 rounds of that many picks (a quick check
//! between criterion runs); with `served`, the fleet has served traffic first (see `fleet`).

use std::hint::black_box;

use kvgate_core::testing::{bench_fleet, bench_fleet_served, label_keys};
use kvgate_core::{Router, RoutingRequest};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLOCK: u32 = 16;

/// The bench's fleet ([`kvgate_core::testing::bench_fleet`]) with its 1,024-block shared chain,
/// and when to pick on it; with `served`, after two requests per endpoint (at most 2,000, one
/// every 0.4 ms) and 200 ms later ([`kvgate_core::testing::bench_fleet_served`], as the
/// bench's `pick_kvgate_served` group).
fn fleet(n: usize, served: bool) -> (Router, Vec<u64>, u64) {
    if served {
        let until = 2_000 + 2_000 * 400 + 200_000;
        let (r, shared) =
            bench_fleet_served("kvgate", n, 1024, BLOCK, (2 * n).min(2_000), 400, until);
        (r, shared, until)
    } else {
        let (r, shared) = bench_fleet("kvgate", n, 1024, BLOCK);
        (r, shared, 2_000)
    }
}

#[inline(never)]
fn pick_loop(
    r: &Router,
    req: &RoutingRequest,
    picks: usize,
    rng: &mut ChaCha8Rng,
    now_us: u64,
) -> u64 {
    let mut sum = 0u64;
    for _ in 0..picks {
        let d = black_box(r.pick(now_us, req, rng, None).unwrap());
        sum = sum.wrapping_add(u64::from(d.primary.0));
    }
    sum
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .take(3)
        .map(|a| a.parse().expect("endpoints tokens picks"))
        .collect();
    let time = std::env::args().skip(4).any(|a| a == "time");
    let served = std::env::args().skip(4).any(|a| a == "served");
    let (n, tokens, picks) = match args[..] {
        [n, t, p] => (n, t as u32, p),
        _ => (1000, 1024, 200),
    };
    let (r, shared, now_us) = fleet(n, served);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let blocks = (tokens / BLOCK) as usize;
    let mut labels: Vec<u64> = shared[..(blocks / 2).min(shared.len())].to_vec();
    while labels.len() < blocks {
        labels.push(rng.random());
    }
    let req = RoutingRequest::new(1, "m", tokens, label_keys(&labels, BLOCK));
    if time {
        let mut rounds: Vec<f64> = (0..31)
            .map(|_| {
                // A driver timing the library from outside; the library itself never reads
                // the clock.
                #[allow(clippy::disallowed_methods)]
                let t = std::time::Instant::now();
                black_box(pick_loop(&r, &req, picks, &mut rng, now_us));
                t.elapsed().as_secs_f64() * 1e9 / picks as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        println!(
            "{n}ep/{tokens}: {:.0} ns/pick (median of 31 rounds)",
            rounds[15]
        );
    } else {
        println!("{}", pick_loop(&r, &req, picks, &mut rng, now_us));
    }
}
