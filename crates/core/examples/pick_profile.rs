//! A fixed-count driver of `Router::pick` on the bench's fleet (`benches/route.rs`), for
//! repeatable instruction counts on a noisy machine:
//!
//! `cargo build --release -p kvgate-core --example pick_profile && valgrind --tool=callgrind
//! --collect-atstart=no --toggle-collect='*pick_loop*' target/release/examples/pick_profile
//! 1000 1024 200`
//!
//! Arguments: endpoints, prompt tokens, picks. Instructions per pick = the callgrind total
//! divided by the number of picks. With a fourth argument `time`, it prints instead the median
//! wall time per pick of 31 rounds of that many picks (a quick check between criterion runs).

use std::hint::black_box;

use kvgate_core::testing::{bench_fleet, label_keys};
use kvgate_core::{Router, RoutingRequest};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLOCK: u32 = 16;

/// The bench's fleet ([`kvgate_core::testing::bench_fleet`]) with its 1,024-block shared chain.
fn fleet(n: usize) -> (Router, Vec<u64>) {
    bench_fleet("kvgate", n, 1024, BLOCK)
}

#[inline(never)]
fn pick_loop(r: &Router, req: &RoutingRequest, picks: usize, rng: &mut ChaCha8Rng) -> u64 {
    let mut sum = 0u64;
    for _ in 0..picks {
        let d = black_box(r.pick(2_000, req, rng, None).unwrap());
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
    let time = std::env::args().nth(4).is_some_and(|a| a == "time");
    let (n, tokens, picks) = match args[..] {
        [n, t, p] => (n, t as u32, p),
        _ => (1000, 1024, 200),
    };
    let (r, shared) = fleet(n);
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
                black_box(pick_loop(&r, &req, picks, &mut rng));
                t.elapsed().as_secs_f64() * 1e9 / picks as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        println!(
            "{n}ep/{tokens}: {:.0} ns/pick (median of 31 rounds)",
            rounds[15]
        );
    } else {
        println!("{}", pick_loop(&r, &req, picks, &mut rng));
    }
}
