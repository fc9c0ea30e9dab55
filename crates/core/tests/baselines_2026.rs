//! The 2026 baselines behave as their sources describe (issue 11.3): llm-d sticks to the prefix
//! holder until the holder's in-flight uncached prefill is τ ahead of the others, then takes
//! the least token load; SMG's `least_load` ignores the cache and follows load plus KV
//! pressure; Dynamo with softmax temperature spreads where the argmin does not.

use kvgate_core::testing::label_keys;
use kvgate_core::{
    DecisionReason, EndpointId, EndpointSpec, MetricsSample, Router, RouterConfig, RoutingRequest,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn fleet(policy: &str, n: usize) -> (Router, Vec<EndpointId>) {
    let mut r = Router::new(RouterConfig::for_policy(policy).unwrap()).unwrap();
    let ids = (0..n)
        .map(|i| r.add_endpoint(0, EndpointSpec::new(format!("10.0.0.{i}:8000"), "m")))
        .collect();
    (r, ids)
}

/// A request whose prompt is `blocks` 16-token blocks of family `family`.
fn req(id: u64, family: u64, blocks: u64) -> RoutingRequest {
    let labels: Vec<u64> = (0..blocks).map(|i| family * 1_000_000 + i).collect();
    RoutingRequest::new(id, "m", blocks as u32 * 16, label_keys(&labels, 16))
}

fn pick_and_book(r: &mut Router, rng: &mut ChaCha8Rng, q: &RoutingRequest) -> EndpointId {
    let d = r.pick(0, q, rng, None).unwrap();
    r.book(0, q, &d);
    d.primary
}

#[test]
fn llm_d_is_sticky_until_the_holder_is_tau_ahead_then_takes_the_least_token_load() {
    let (mut r, ids) = fleet("llm-d", 3);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // 200 blocks = 3,200 tokens of family 1.
    let holder = pick_and_book(&mut r, &mut rng, &req(1, 1, 200));
    // The same prefix follows the holder while its extra queued prefill is far below τ.
    for id in 2..6 {
        assert_eq!(pick_and_book(&mut r, &mut rng, &req(id, 1, 200)), holder);
    }
    // Pile 300k uncached tokens onto the holder (≈ 5.2 s at 58k tokens/s): past the 5 s
    // penalty, stickiness breaks and the request goes where the token load is least.
    for (k, id) in (100..103).enumerate() {
        let big = req(id, 50 + k as u64, 6_250);
        let d = r
            .decision_for(0, &big, holder, DecisionReason::MaxScore)
            .unwrap();
        r.book(0, &big, &d);
    }
    let other = pick_and_book(&mut r, &mut rng, &req(7, 1, 200));
    assert_ne!(other, holder, "the saturated holder keeps no affinity");
    assert!(ids.contains(&other));
}

#[test]
fn smg_least_load_follows_load_and_kv_pressure_not_the_cache() {
    let (mut r, ids) = fleet("smg-least-load", 2);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let sample = |kv: f64| MetricsSample {
        kv_usage: Some(kv),
        kv_capacity_blocks: Some(10_000),
        block_size: Some(16),
        ..MetricsSample::default()
    };
    r.observe_metrics(ids[0], 0, &sample(0.9));
    r.observe_metrics(ids[1], 0, &sample(0.1));
    // Endpoint 0's KV is 90% full: its k/(1−k) term (9 s) outweighs everything else.
    let first = pick_and_book(&mut r, &mut rng, &req(1, 1, 100));
    assert_eq!(first, ids[1]);
    // The cache does not pull: a repeat of the same prompt is placed by load alone, and with
    // the request just booked on endpoint 1 it still goes there only while its load is less.
    let again = r.pick(0, &req(2, 1, 100), &mut rng, None).unwrap();
    assert_eq!(again.primary, ids[1]);
    r.observe_metrics(ids[0], 1, &sample(0.0));
    r.observe_metrics(ids[1], 1, &sample(0.5));
    let after = r.pick(1, &req(3, 1, 100), &mut rng, None).unwrap();
    assert_eq!(
        after.primary, ids[0],
        "the holder is not preferred for its cache"
    );
}

#[test]
fn dynamo_softmax_spreads_where_the_argmin_does_not() {
    let spread = |policy: &str| {
        let (mut r, ids) = fleet(policy, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // One endpoint holds a long prefix of every request: the argmin always picks it.
        let warm = req(0, 7, 400);
        let d = r
            .decision_for(0, &warm, ids[0], DecisionReason::MaxScore)
            .unwrap();
        r.book(0, &warm, &d);
        r.on_finish(0, 0, &Default::default());
        let mut hits = [0usize; 4];
        for id in 1..200 {
            let q = req(id, 7, 400);
            let d = r.pick(0, &q, &mut rng, None).unwrap();
            hits[ids.iter().position(|&e| e == d.primary).unwrap()] += 1;
        }
        hits
    };
    let argmin = spread("dynamo");
    assert_eq!(argmin[0], 199, "{argmin:?}");
    let softmax = spread("dynamo-softmax");
    assert!(
        softmax[0] > softmax[1],
        "the cheapest is still likeliest: {softmax:?}"
    );
    assert!(
        softmax[1..].iter().all(|&k| k > 0),
        "temperature 0.5 gives every endpoint a share: {softmax:?}"
    );
}
