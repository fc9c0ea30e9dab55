//! Discrete-event runs: determinism, completeness, and that cache-aware routing finds caches.

use kvgate_bench::cli::{compare, parse_policies};
use kvgate_bench::des::{DesConfig, run_policy};
use kvgate_bench::report::{PolicyReport, Slo};
use kvgate_bench::workload::{SharedPrefixConfig, shared_prefix};
use kvgate_core::Policy;
use kvgate_engine::EngineConfig;

fn small_workload(seed: u64) -> kvgate_bench::workload::Workload {
    shared_prefix(
        SharedPrefixConfig {
            num_groups: 6,
            num_prompts_per_group: 12,
            system_prompt_len: 1500,
            question_len: 60,
            output_len: 20,
            rate_per_s: 40.0,
        },
        seed,
    )
}

fn fleet(seed: u64) -> DesConfig {
    let mut cfg = DesConfig::homogeneous(4, EngineConfig::h100());
    cfg.seed = seed;
    cfg
}

#[test]
fn same_seed_same_report_for_every_policy() {
    let w = small_workload(3);
    for policy in Policy::ALL {
        let a = run_policy(&w, policy, &fleet(11), None).unwrap();
        let b = run_policy(&w, policy, &fleet(11), None).unwrap();
        assert_eq!(a, b, "{policy} is not deterministic");
        assert_eq!(
            PolicyReport::from_run(&a, Slo::default()),
            PolicyReport::from_run(&b, Slo::default())
        );
    }
}

#[test]
fn every_request_completes_and_cache_aware_policies_hit() {
    let w = small_workload(5);
    let (report, runs) = compare(&w, &Policy::ALL, &fleet(1), Slo::default(), true).unwrap();
    for (p, run) in report.policies.iter().zip(&runs) {
        assert_eq!(p.completed, w.requests.len(), "{}", p.policy);
        assert_eq!(p.rejected, 0, "{}", p.policy);
        assert!(
            p.ttft_ms.p50 > 0.0 && p.ttft_ms.p99 >= p.ttft_ms.p50,
            "{}",
            p.policy
        );
        assert!(
            run.requests
                .iter()
                .all(|r| r.first_token_us >= r.arrival_us)
        );
        assert_eq!(
            run.requests_per_engine.iter().sum::<u64>(),
            w.requests.len() as u64
        );
    }
    let hit = |name: &str| {
        report
            .policies
            .iter()
            .find(|p| p.policy == name)
            .unwrap()
            .hit_ratio
    };
    // 6 system prompts of 1500 tokens shared by 12 questions each: a cache-aware router should
    // hit on most of them; random placement over 4 engines hits less.
    for p in [
        "kvgate",
        "dynamo",
        "sglang-cache-aware",
        "gie-default",
        "oracle",
    ] {
        assert!(
            hit(p) > hit("random"),
            "{p}: {} vs random {}",
            hit(p),
            hit("random")
        );
    }
}

#[test]
fn unknown_policy_is_a_clear_error() {
    let err = parse_policies("no-such-policy").unwrap_err();
    assert!(err.to_string().contains("no-such-policy"), "{err}");
}
