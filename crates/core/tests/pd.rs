//! The prefill/decode decider ([`kvgate_core::pd`]): which plan it takes and why, against
//! llm-d's threshold decider, and how the legs are booked.

use kvgate_core::testing::{label_keys, label_stored};
use kvgate_core::{
    EndpointId, EndpointSpec, KvEventBatch, MetricsSample, Outcome, PdDecider, PdReason, Phase,
    Role, Router, RouterConfig, RoutingRequest, Tier,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const BS: u32 = 16;

fn chain(n: usize, root: u64) -> Vec<u64> {
    (0..n as u64).map(|i| root * 1_000_000 + i).collect()
}

struct Fleet {
    router: Router,
    prefill: Vec<EndpointId>,
    decode: Vec<EndpointId>,
}

fn fleet(decider: PdDecider, prefill: usize, decode: usize) -> Fleet {
    fleet_with_margin(decider, prefill, decode, 25_000)
}

fn fleet_with_margin(decider: PdDecider, prefill: usize, decode: usize, margin: u64) -> Fleet {
    let mut cfg = RouterConfig::for_policy("kvgate").unwrap();
    cfg.tuning.pd.decider = decider;
    cfg.tuning.pd.whole_margin_us = margin;
    let mut router = Router::new(cfg).unwrap();
    let mut add = |i: usize, role: Role| {
        let mut spec = EndpointSpec::new(format!("10.0.0.{i}:8000"), "m");
        spec.role = role;
        router.add_endpoint(0, spec)
    };
    let p = (0..prefill).map(|i| add(i, Role::Prefill)).collect();
    let d = (0..decode).map(|i| add(100 + i, Role::Decode)).collect();
    Fleet {
        router,
        prefill: p,
        decode: d,
    }
}

impl Fleet {
    fn load(&mut self, id: EndpointId, running: u32, waiting: u32) {
        self.router.observe_metrics(
            id,
            10,
            &MetricsSample {
                running,
                waiting,
                kv_usage: Some(0.1),
                ..Default::default()
            },
        );
    }

    fn holds(&mut self, id: EndpointId, blocks: &[u64]) {
        let batch = KvEventBatch {
            seq: 0,
            ts: 0.0,
            events: vec![label_stored(blocks, BS, Tier::Gpu)],
            data_parallel_rank: None,
        };
        self.router.observe_kv_batch(id, 10, &batch);
    }

    fn decide(&self, req: &RoutingRequest) -> kvgate_core::PdDecision {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        self.router.pick_pd(20, req, &mut rng, None).unwrap()
    }
}

fn request(id: u64, blocks: &[u64]) -> RoutingRequest {
    let mut r = RoutingRequest::new(
        id,
        "m",
        blocks.len() as u32 * BS + 3,
        label_keys(blocks, BS),
    );
    r.max_tokens = Some(64);
    r
}

#[test]
fn a_fleet_without_prefill_pods_serves_whole() {
    let f = fleet(PdDecider::Always, 0, 2);
    let d = f.decide(&request(1, &chain(200, 1)));
    assert!(!d.is_split());
    assert_eq!(d.reason, PdReason::NoPrefillEndpoint);
    assert!(f.decode.contains(&d.decode.primary));
}

#[test]
fn a_long_cold_prompt_on_a_busy_decode_pod_is_split() {
    let mut f = fleet(PdDecider::Cost, 1, 1);
    let (p, d) = (f.prefill[0], f.decode[0]);
    f.load(d, 64, 0);
    f.load(p, 0, 0);
    let dec = f.decide(&request(1, &chain(250, 1)));
    assert_eq!(dec.reason, PdReason::SplitCheaper, "{dec:?}");
    assert_eq!(dec.prefill.as_ref().map(|x| x.primary), Some(p));
    assert_eq!(dec.decode.primary, d);
    let split = dec.split.unwrap();
    assert!(split.cost_us < dec.aggregated.cost_us);
    // 250 blocks + 3 tokens, nothing held on the decode pod: all but the last token move.
    assert_eq!(dec.transfer_tokens, 250 * BS + 2);
    assert!(dec.transfer_us > 2_000.0);
    // The decode leg computes one prompt token, attending to the rest of the prompt: not the
    // whole prompt's attention (which booked phantom prefill work on the decode pod).
    assert_eq!(dec.decode.booking.uncached_tokens, 1.0);
    let prompt = f64::from(250 * BS + 3);
    assert_eq!(
        dec.decode.booking.attention_pairs,
        kvgate_core::cost::attention_pairs(prompt - 1.0, 1.0)
    );
    assert_eq!(dec.decode.predicted_ttft_us, Some(split.ttft_us as u64));
}

#[test]
fn a_short_prompt_on_an_idle_fleet_is_split_within_the_margin_and_whole_without_it() {
    for (margin, split) in [(25_000, true), (0, false)] {
        let mut f = fleet_with_margin(PdDecider::Cost, 1, 1, margin);
        let (p, d) = (f.prefill[0], f.decode[0]);
        f.load(d, 0, 0);
        f.load(p, 0, 0);
        let dec = f.decide(&request(1, &chain(4, 1)));
        let s = dec.split.unwrap();
        assert!(
            s.cost_us > dec.aggregated.cost_us,
            "whole is cheaper on an idle fleet: {dec:?}"
        );
        assert_eq!(dec.is_split(), split, "margin {margin}: {dec:?}");
        if split {
            assert_eq!(dec.reason, PdReason::WithinMargin);
        } else {
            assert_eq!(dec.reason, PdReason::AggregatedCheaper);
            assert_eq!(dec.decode.booking.uncached_tokens, 4.0 * 16.0 + 3.0);
        }
    }
}

#[test]
fn a_prompt_cached_on_the_decode_pod_stays_whole_under_cost_but_not_the_threshold() {
    // The decode pod holds all but the last block of a long prompt and decodes 32 sequences;
    // the prefill pod is idle. Only one block's compute is at stake, so kvgate keeps it whole.
    let blocks = chain(200, 1);
    for (decider, split) in [(PdDecider::Cost, false), (PdDecider::Threshold, true)] {
        let mut f = fleet(decider, 1, 1);
        let (p, d) = (f.prefill[0], f.decode[0]);
        f.load(d, 32, 0);
        f.load(p, 0, 0);
        f.holds(d, &blocks[..199]);
        let dec = f.decide(&request(1, &blocks));
        assert_eq!(dec.is_split(), split, "{decider:?}: {dec:?}");
        assert_eq!(dec.transfer_tokens, BS + 2);
    }
}

#[test]
fn a_saturated_prefill_pool_keeps_requests_whole_where_the_threshold_sends_them_on() {
    // The case llm-d's threshold decider is blind to: the only prefill pod has 40 long prompts
    // queued, the decode pod is idle.
    let blocks = chain(100, 1);
    for (decider, split) in [(PdDecider::Cost, false), (PdDecider::Threshold, true)] {
        let mut f = fleet(decider, 1, 1);
        let (p, d) = (f.prefill[0], f.decode[0]);
        f.load(d, 2, 0);
        f.load(p, 1, 40);
        let dec = f.decide(&request(1, &blocks));
        assert_eq!(dec.is_split(), split, "{decider:?}: {dec:?}");
        let want = if split {
            PdReason::AboveThreshold
        } else {
            PdReason::AggregatedCheaper
        };
        assert_eq!(dec.reason, want);
    }
}

#[test]
fn the_never_and_always_deciders_do_what_they_say() {
    let blocks = chain(4, 1);
    let f = fleet(PdDecider::Aggregated, 1, 1);
    let dec = f.decide(&request(1, &blocks));
    assert_eq!(dec.reason, PdReason::NeverSplit);
    assert!(dec.split.is_none());
    let f = fleet(PdDecider::Always, 1, 1);
    let dec = f.decide(&request(1, &blocks));
    assert_eq!(dec.reason, PdReason::AlwaysSplit);
    assert!(dec.is_split());
}

#[test]
fn an_aggregated_pod_chosen_for_both_legs_serves_whole() {
    let mut cfg = RouterConfig::for_policy("kvgate").unwrap();
    cfg.tuning.pd.decider = PdDecider::Always;
    let mut router = Router::new(cfg).unwrap();
    let only = router.add_endpoint(0, EndpointSpec::new("10.0.0.1:8000", "m"));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let dec = router
        .pick_pd(20, &request(1, &chain(50, 1)), &mut rng, None)
        .unwrap();
    assert_eq!(dec.reason, PdReason::SamePod);
    assert_eq!(dec.decode.primary, only);
    assert!(!dec.is_split());
}

#[test]
fn a_split_decode_leg_teaches_the_decode_pod_nothing_and_the_prefill_leg_teaches_its_pod() {
    let mut f = fleet(PdDecider::Always, 1, 1);
    let (p, d) = (f.prefill[0], f.decode[0]);
    let req = request(1, &chain(100, 1));
    let dec = f.decide(&req);
    assert!(dec.is_split());
    let decode_leg = req.leg(Phase::Decode, 1);
    let prefill_leg = req.leg(Phase::Prefill, 2);
    let r = &mut f.router;
    r.book(20, &prefill_leg, dec.prefill.as_ref().unwrap());
    r.book(20, &decode_leg, &dec.decode);
    r.on_first_token(2, 200_000);
    let finished = Outcome {
        output_tokens: 1,
        prompt_tokens: Some(req.prompt_tokens),
        cached_tokens: Some(0),
        tpot_us: None,
    };
    r.on_finish(2, 200_100, &finished);
    r.on_first_token(1, 260_000);
    let report = r.on_finish(
        1,
        900_000,
        &Outcome {
            output_tokens: 64,
            prompt_tokens: Some(req.prompt_tokens),
            // The decode engine counts the transferred prompt as cached.
            cached_tokens: Some(req.prompt_tokens - 1),
            tpot_us: Some(10_000),
        },
    );
    assert_eq!(
        report.contract_change, None,
        "the decode leg's cached tokens are not the index's to answer for"
    );
    let observations = |id| {
        r.endpoints()
            .find(|e| e.id == id)
            .map(|e| e.step_observations)
            .unwrap()
    };
    assert_eq!(observations(p), 1);
    assert_eq!(observations(d), 0);
}

#[test]
fn a_penalised_prefill_pod_leaves_requests_whole() {
    let mut f = fleet(PdDecider::Always, 1, 1);
    let p = f.prefill[0];
    // A prefill leg on it failed to connect: it is penalised for a while.
    let req = request(1, &chain(50, 1));
    let leg = req.leg(Phase::Prefill, 9);
    let d = f
        .router
        .decision_for(10, &leg, p, kvgate_core::DecisionReason::LeastCost)
        .unwrap();
    f.router.book(10, &leg, &d);
    f.router
        .on_failure(9, 11, kvgate_core::FailureKind::Connect);
    let dec = f.decide(&request(2, &chain(50, 2)));
    assert_eq!(dec.reason, PdReason::PrefillUnavailable, "{dec:?}");
    assert!(!dec.is_split());
}

#[test]
fn a_threshold_of_zero_never_splits_and_the_prefill_leg_books_one_output_token() {
    let mut cfg = RouterConfig::for_policy("kvgate").unwrap();
    cfg.tuning.pd.decider = PdDecider::Threshold;
    cfg.tuning.pd.threshold_tokens = 0;
    let mut router = Router::new(cfg).unwrap();
    for (i, role) in [Role::Prefill, Role::Decode].into_iter().enumerate() {
        let mut spec = EndpointSpec::new(format!("10.0.0.{i}:8000"), "m");
        spec.role = role;
        router.add_endpoint(0, spec);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let dec = router
        .pick_pd(20, &request(1, &chain(200, 1)), &mut rng, None)
        .unwrap();
    assert_eq!(dec.reason, PdReason::BelowThreshold);
    assert_eq!(
        request(1, &chain(2, 1)).leg(Phase::Prefill, 2).max_tokens,
        Some(1)
    );
}

#[test]
fn with_a_stall_bound_a_long_prompt_is_split_to_spare_an_idle_decode_pod_unless_the_split_blows_the_ttft()
 {
    // 8,000 tokens on an idle H100 decode pod: ~145 ms whole, cheaper than the split by more
    // than the margin, but one 145 ms step for whatever decodes there meanwhile.
    let with_bound = |bound: u64| {
        let mut cfg = RouterConfig::for_policy("kvgate").unwrap();
        cfg.tuning.pd.decider = PdDecider::Cost;
        cfg.tuning.pd.max_decode_stall_us = bound;
        let mut router = Router::new(cfg).unwrap();
        let mut ids = Vec::new();
        for (i, role) in [Role::Prefill, Role::Decode].into_iter().enumerate() {
            let mut spec = EndpointSpec::new(format!("10.0.0.{i}:8000"), "m");
            spec.role = role;
            ids.push(router.add_endpoint(0, spec));
        }
        Fleet {
            router,
            prefill: vec![ids[0]],
            decode: vec![ids[1]],
        }
    };
    for (bound, prefill_waiting, want) in [
        // Off by default: the costs decide, and whole is cheaper.
        (0, 0, PdReason::AggregatedCheaper),
        (50_000, 0, PdReason::AvoidsStall),
        // ~2.6 s of prompts queued on the prefill pod: the split's TTFT is past 2 s.
        (50_000, 150, PdReason::AggregatedCheaper),
    ] {
        let mut f = with_bound(bound);
        let (p, d) = (f.prefill[0], f.decode[0]);
        f.load(d, 0, 0);
        f.load(p, 1, prefill_waiting);
        let dec = f.decide(&request(1, &chain(500, 1)));
        assert_eq!(
            dec.reason, want,
            "bound {bound}, waiting {prefill_waiting}: {dec:?}"
        );
        if bound == 0 {
            assert!(dec.aggregated.cost_us + 25_000.0 < dec.split.unwrap().cost_us);
        }
    }
}
