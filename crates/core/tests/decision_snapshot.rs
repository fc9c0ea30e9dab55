//! Decisions pinned across refactors: every built-in policy routes seeded random fleets through
//! random traffic (picks, bookings, first tokens, finishes, failures, scrapes, KV events with
//! gaps, drains); every decision, with the booked endpoint's load estimate right after booking,
//! is written as one line, and each run's lines are digested and compared with
//! `fixtures/decisions.txt` (one xxh3 digest per policy and fleet, so the fixture stays small).
//!
//! The fixture was written by the code before `Router::pick` was split into stages and before
//! booking took its data from the decision; a change that alters any decision (or what booking
//! counts) fails here, naming the run and printing its decisions. A deliberate behaviour change
//! rewrites the fixture with `KVGATE_BLESS=1 cargo test -p kvgate-core --test
//! decision_snapshot` and says why in its commit.

use std::fmt::Write as _;

use kvgate_core::Policy;
use kvgate_core::testing::{label_keys, label_stored};
use kvgate_core::{
    EndpointId, EndpointSpec, FailureKind, KvEventBatch, MetricsSample, OracleView, Outcome,
    Router, RouterConfig, RoutingRequest, Tier, TrueLoad,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/decisions.txt");
const FLEETS: u64 = 16;
const STEPS: usize = 60;

/// True state derived from the endpoint id and the request (deterministic).
struct Oracle;
impl OracleView for Oracle {
    fn true_load(&self, id: EndpointId, req: &RoutingRequest) -> TrueLoad {
        TrueLoad {
            queued_prefill_tokens: u64::from(id.0 % 3) * 700 + u64::from(req.prompt_tokens % 5),
            queued_prefill_pairs: u64::from(id.0 % 3) * 245_000,
            running: id.0 % 5,
            waiting: id.0 % 2,
            kv_usage: 0.1 * f64::from(id.0 % 9),
            cached_prefix_tokens: (id.0 % 4) * 16,
        }
    }
}

/// Prefix families: requests and KV events draw their chains from a few shared roots, so
/// prefixes are matched, partly matched and missed.
fn chain(family: u64, len: usize) -> Vec<u64> {
    (0..len as u64).map(|i| family * 10_000 + i).collect()
}

fn run(policy: &str, seed: u64, out: &mut String) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pick_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xD1CE);
    let mut r = Router::new(RouterConfig::for_policy(policy).unwrap()).unwrap();
    let n = rng.random_range(2..=12usize);
    let mut ids = Vec::new();
    let mut seqs = Vec::new();
    for i in 0..n {
        let mut spec = EndpointSpec::new(format!("10.1.{}.{}:8000", seed, i), "m");
        if rng.random_bool(0.25) {
            spec.hardware_class = "a100".into();
        }
        ids.push(r.add_endpoint(0, spec));
        seqs.push(0u64);
    }
    let mut now = 1_000u64;
    let mut live: Vec<u64> = Vec::new();
    let mut next_req = 0u64;
    for step in 0..STEPS {
        now += rng.random_range(1..40_000u64);
        // Observations between decisions.
        for (e, &id) in ids.iter().enumerate() {
            if rng.random_bool(0.3) {
                let sample = MetricsSample {
                    waiting: rng.random_range(0..8),
                    running: rng.random_range(0..24),
                    kv_usage: Some(rng.random_range(0.0..0.97)),
                    ..Default::default()
                };
                r.observe_metrics(id, now - rng.random_range(0..2_000u64), &sample);
            }
            if rng.random_bool(0.15) {
                // Mostly in order, sometimes a jump (a gap) or a repeat.
                let seq = match rng.random_range(0..10) {
                    0 => seqs[e] + 3,
                    1 => seqs[e].saturating_sub(1),
                    _ => seqs[e],
                };
                seqs[e] = seqs[e].max(seq + 1);
                let family = rng.random_range(0..4u64);
                let batch = KvEventBatch {
                    seq,
                    ts: 0.0,
                    events: vec![label_stored(
                        &chain(family, rng.random_range(1..24)),
                        16,
                        Tier::Gpu,
                    )],
                    data_parallel_rank: None,
                };
                r.observe_kv_batch(id, now, &batch);
            }
            if rng.random_bool(0.02) {
                r.kv_resynced(id, now);
            }
            if rng.random_bool(0.02) {
                r.observe_scrape_failure(id, now);
            }
        }
        if step == STEPS / 2 && n > 2 {
            r.drain_endpoint(now, ids[n - 1]).unwrap();
        }
        // Progress of requests in flight.
        let mut k = 0;
        while k < live.len() {
            let id = live[k];
            match rng.random_range(0..6) {
                0 => r.on_first_token(id, now),
                1 => {
                    let outcome = Outcome {
                        output_tokens: rng.random_range(1..300),
                        cached_tokens: rng.random_bool(0.5).then(|| rng.random_range(0..512)),
                        tpot_us: rng
                            .random_bool(0.7)
                            .then(|| rng.random_range(5_000..60_000)),
                        ..Default::default()
                    };
                    r.on_finish(id, now, &outcome);
                    live.swap_remove(k);
                    continue;
                }
                2 if rng.random_bool(0.1) => {
                    let kind = [
                        FailureKind::Connect,
                        FailureKind::Timeout,
                        FailureKind::Cancelled,
                    ][rng.random_range(0..3)];
                    r.on_failure(id, now, kind);
                    live.swap_remove(k);
                    continue;
                }
                _ => {}
            }
            k += 1;
        }
        // A few decisions at this instant.
        for _ in 0..rng.random_range(1..4) {
            let family = rng.random_range(0..5u64);
            let blocks = rng.random_range(0..40usize);
            let mut req = RoutingRequest::new(
                next_req,
                "m",
                blocks as u32 * 16 + rng.random_range(1..16),
                label_keys(&chain(family, blocks), 16),
            );
            req.max_tokens = rng.random_bool(0.5).then(|| rng.random_range(1..2_000));
            req.priority = if rng.random_bool(0.2) { -1 } else { 0 };
            let d = r.pick(now, &req, &mut pick_rng, Some(&Oracle));
            write!(out, "{step} {next_req} ").unwrap();
            match d {
                Ok(d) => {
                    r.book(now, &req, &d);
                    live.push(next_req);
                    let est = r
                        .endpoints()
                        .find(|v| v.id == d.primary)
                        .map(|v| {
                            format!(
                                "{} {} {} {} {:.6}",
                                v.estimate.waiting,
                                v.estimate.running,
                                v.estimate.queued_prefill_tokens,
                                v.estimate.kv_blocks,
                                v.prefill_speed
                            )
                        })
                        .unwrap_or_default();
                    writeln!(
                        out,
                        "{} {:?} {:?} {} {:?} {:?} | {est}",
                        d.primary.0,
                        d.fallbacks.iter().map(|f| f.0).collect::<Vec<_>>(),
                        d.reason,
                        d.matched_blocks,
                        d.precise_matched_blocks,
                        d.predicted_ttft_us,
                    )
                    .unwrap();
                }
                Err(e) => writeln!(out, "error {e}").unwrap(),
            }
            next_req += 1;
        }
    }
}

/// One line per run: `policy seed digest`, the digest over that run's decision lines.
fn digests() -> (String, Vec<(String, String)>) {
    let mut out = String::new();
    let mut runs = Vec::new();
    for policy in Policy::ALL.map(Policy::as_str) {
        for seed in 0..FLEETS {
            let mut lines = String::new();
            run(policy, seed, &mut lines);
            let digest = xxhash_rust::xxh3::xxh3_64(lines.as_bytes());
            let key = format!("{policy} {seed}");
            writeln!(out, "{key} {digest:016x} {}", lines.lines().count()).unwrap();
            runs.push((key, lines));
        }
    }
    (out, runs)
}

#[test]
fn decisions_match_the_recorded_snapshot() {
    let (now, runs) = digests();
    if std::env::var_os("KVGATE_BLESS").is_some() {
        std::fs::create_dir_all(std::path::Path::new(FIXTURE).parent().unwrap()).unwrap();
        std::fs::write(FIXTURE, &now).unwrap();
        return;
    }
    let recorded =
        std::fs::read_to_string(FIXTURE).expect("fixture missing: run with KVGATE_BLESS=1");
    let key = |line: &str| line.rsplitn(3, ' ').nth(2).unwrap_or_default().to_string();
    let now_by_key: std::collections::BTreeMap<String, &str> =
        now.lines().map(|l| (key(l), l)).collect();
    for want in recorded.lines() {
        let k = key(want);
        let got = now_by_key
            .get(&k)
            .unwrap_or_else(|| panic!("run `{k}` is recorded but no longer runs"));
        let lines = &runs.iter().find(|(r, _)| *r == k).unwrap().1;
        assert_eq!(
            want, *got,
            "decisions of run `{k}` changed (recorded vs now); its decisions now:\n{lines}"
        );
    }
    // A policy added since the fixture was written is not pinned until it is blessed.
    let recorded_keys: Vec<String> = recorded.lines().map(key).collect();
    for k in now_by_key.keys().filter(|k| !recorded_keys.contains(k)) {
        eprintln!("run `{k}` is not in the fixture yet (KVGATE_BLESS=1 pins it)");
    }
}
