//! Prefill/decode disaggregation in the discrete-event runner: determinism, what the engines
//! compute on each side, how splits are counted, and the two scenarios the comparison exists for
//! (a saturated prefill pool, where kvgate's decider must beat llm-d's threshold; long prompts
//! over many running decodes, where disaggregation must beat the same GPUs aggregated).

#[path = "common/args.rs"]
mod common;

use common::args;
use kvgate_bench::BenchError;
use kvgate_bench::cli::{bench, bench_config, parse_pd_deciders};
use kvgate_bench::des::{Arm, DesConfig, PolicyRun, run_arm};
use kvgate_bench::report::{PdFigures, PolicyReport, Slo};
use kvgate_bench::workload::{SharedPrefixConfig, Workload, shared_prefix};
use kvgate_core::{PdDecider, Role};
use kvgate_engine::EngineConfig;

/// `p` prefill and `d` decode H100s (prefill pods first).
fn pd_fleet(p: usize, d: usize) -> DesConfig {
    let mut cfg = DesConfig::homogeneous(p + d, EngineConfig::h100());
    cfg.roles = (0..p + d)
        .map(|i| if i < p { Role::Prefill } else { Role::Decode })
        .collect();
    cfg.seed = 7;
    cfg
}

/// Unshared prompts of `prompt` tokens with `output`-token answers at `rate` req/s.
fn unshared(n: u32, prompt: u32, output: u32, rate: f64, seed: u64) -> Workload {
    shared_prefix(
        SharedPrefixConfig {
            num_groups: n,
            num_prompts_per_group: 1,
            system_prompt_len: prompt - 16,
            question_len: 16,
            output_len: output,
            rate_per_s: rate,
        },
        seed,
    )
}

fn run(w: &Workload, arm: Arm, cfg: &DesConfig) -> PolicyRun {
    run_arm(w, arm, cfg, None).expect("the run completes")
}

fn report(run: &PolicyRun) -> PolicyReport {
    PolicyReport::from_run(run, Slo::default())
}

#[test]
fn same_seed_same_run_for_every_decider() {
    let w = unshared(40, 1_200, 30, 30.0, 1);
    let cfg = pd_fleet(1, 2);
    for arm in [Arm::Aggregated]
        .into_iter()
        .chain(Arm::PD_DECIDERS.map(Arm::Pd))
    {
        let a = run(&w, arm, &cfg);
        assert_eq!(a, run(&w, arm, &cfg), "{} is not deterministic", arm.name());
        assert_eq!(
            serde_json::to_string(&report(&a)).unwrap(),
            serde_json::to_string(&report(&run(&w, arm, &cfg))).unwrap()
        );
    }
}

#[test]
fn decode_engines_compute_one_prompt_token_per_split_request() {
    let w = unshared(30, 2_000, 20, 20.0, 2);
    let cfg = pd_fleet(2, 2);
    let r = run(&w, Arm::Pd(PdDecider::Always), &cfg);
    assert!(r.requests.iter().all(|q| q.split && q.finish_us > 0));
    for (e, sources) in r.prompt_sources.iter().enumerate() {
        let decoded = r
            .requests
            .iter()
            .filter(|q| q.engine as usize == e)
            .collect::<Vec<_>>();
        let prefilled = r
            .requests
            .iter()
            .filter(|q| q.prefill_engine as usize == e)
            .collect::<Vec<_>>();
        match cfg.roles[e] {
            Role::Decode => {
                // The engine's own counters: the last prompt token of each request (to sample
                // the first output token), the rest loaded from the prefill pod.
                assert_eq!(sources.local_compute, decoded.len() as u64, "engine {e}");
                let loaded: u64 = decoded.iter().map(|q| u64::from(q.transfer_tokens)).sum();
                assert_eq!(sources.external_kv_transfer, loaded, "engine {e}");
                assert!(prefilled.is_empty());
            }
            _ => {
                assert!(decoded.is_empty(), "a prefill pod decoded");
                let prompts: u64 = prefilled.iter().map(|q| u64::from(q.prompt_tokens)).sum();
                assert_eq!(
                    sources.local_compute + sources.local_cache_hit,
                    prompts,
                    "engine {e}"
                );
                assert_eq!(sources.external_kv_transfer, 0);
            }
        }
    }
    // Unshared prompts: the decode pod holds none of it, so the whole prompt moves (the engine
    // loads it all, then recomputes the last token, as vLLM's NixlConnector does).
    for q in &r.requests {
        assert_eq!(q.transfer_tokens, q.prompt_tokens);
        assert!(q.transfer_us > 0);
        assert!(q.first_token_us > q.arrival_us);
    }
}

#[test]
fn splits_and_transfers_are_counted_per_decider() {
    let w = unshared(30, 1_500, 20, 20.0, 3);
    let cfg = pd_fleet(1, 3);
    let always = report(&run(&w, Arm::Pd(PdDecider::Always), &cfg));
    let f = always.pd.expect("a P/D fleet reports P/D figures");
    assert_eq!((f.prefill_engines, f.decode_engines), (1, 3));
    assert_eq!(f.split_fraction, 1.0);
    assert_eq!(f.transfers, w.requests.len());
    assert!(f.transfer_ms.mean > 0.0);
    assert!(f.prefill_pod_share > 0.99, "{}", f.prefill_pod_share);

    let never = run(&w, Arm::Pd(PdDecider::Aggregated), &cfg);
    let f = PdFigures::of(&never).unwrap();
    assert_eq!((f.split_fraction, f.transfers), (0.0, 0));
    assert_eq!(
        never.prefill_tokens_per_engine[0], 0,
        "the prefill pod idles"
    );
    assert_eq!(never.requests_per_engine[0], 0);

    // The baseline runs the same four engines aggregated: no P/D figures, nothing split.
    let agg = run(&w, Arm::Aggregated, &cfg);
    assert!(PdFigures::of(&agg).is_none());
    assert!(agg.requests.iter().all(|q| !q.split));
    assert!(agg.requests_per_engine.iter().all(|&n| n > 0));
}

/// One prefill pod in front of three decode pods, and 4,000-token prompts at 25 req/s: about
/// twice what one prefill pod computes. llm-d's threshold sends every prompt through it (all are
/// uncached) and its queue grows for the whole run; kvgate's decider prices that queue and keeps
/// enough prompts on the decode pods, whose TPOT it trades for a TTFT an order of magnitude
/// lower.
#[test]
fn cost_decider_beats_threshold_when_the_prefill_pool_is_saturated() {
    let w = unshared(100, 4_000, 50, 25.0, 4);
    let cfg = pd_fleet(1, 3);
    let threshold = report(&run(&w, Arm::Pd(PdDecider::Threshold), &cfg));
    let cost = report(&run(&w, Arm::Pd(PdDecider::Cost), &cfg));
    let (t, c) = (threshold.pd.unwrap(), cost.pd.clone().unwrap());
    assert_eq!(t.split_fraction, 1.0, "every prompt is above the threshold");
    // Measured: TTFT p90 2,222 ms (threshold) against 234 ms (cost), 53% split.
    assert!(
        cost.ttft_ms.p90 * 4.0 < threshold.ttft_ms.p90,
        "TTFT p90: cost {:.0} ms, threshold {:.0} ms",
        cost.ttft_ms.p90,
        threshold.ttft_ms.p90
    );
    assert!(cost.goodput.fraction > threshold.goodput.fraction);
    // It still uses the prefill pod: this is not "never split".
    assert!(
        (0.25..0.85).contains(&c.split_fraction),
        "{}",
        c.split_fraction
    );
}

/// 8,000-token prompts with 300-token answers over two prefill and two decode pods, against the
/// same four pods aggregated: an aggregated pod stalls every sequence it decodes for each
/// prompt it prefills (a 140 ms step), a decode pod never does. kvgate's decider, with room on
/// the prefill pods, splits nearly everything and takes that stall away.
#[test]
fn disaggregation_beats_aggregated_on_long_prompts_over_running_decodes() {
    let w = unshared(120, 8_000, 300, 10.0, 5);
    let cfg = pd_fleet(2, 2);
    let agg = report(&run(&w, Arm::Aggregated, &cfg));
    let cost = report(&run(&w, Arm::Pd(PdDecider::Cost), &cfg));
    // Measured: longest inter-token gap p99 143.8 ms aggregated against 5.8 ms; TPOT p99 10.9
    // against 5.8 ms; 97.5% split.
    assert!(
        cost.max_itl_ms.p99 * 5.0 < agg.max_itl_ms.p99,
        "stall p99: cost {:.1} ms, aggregated {:.1} ms",
        cost.max_itl_ms.p99,
        agg.max_itl_ms.p99
    );
    assert!(
        cost.tpot_ms.p99 * 1.5 < agg.tpot_ms.p99,
        "TPOT p99: cost {:.2} ms, aggregated {:.2} ms",
        cost.tpot_ms.p99,
        agg.tpot_ms.p99
    );
    assert!(cost.pd.unwrap().split_fraction > 0.9);
    // What it pays: the prompt moves (21 ms at 50 GB/s) and waits on the prefill pods' queue.
    assert!(cost.ttft_ms.p50 > agg.ttft_ms.p50);
}

#[test]
fn pd_flags_set_roles_link_and_rows() {
    let a = args(&[
        "--pd-fleet",
        "1:2",
        "--transfer-bandwidth-gbps",
        "10",
        "--transfer-latency-us",
        "500",
        "--pd-threshold-tokens",
        "64",
    ]);
    let cfg = bench_config(&a).unwrap();
    assert_eq!(cfg.roles, [Role::Prefill, Role::Decode, Role::Decode]);
    assert_eq!(cfg.engines.len(), 3, "--pd-fleet replaces --engines");
    for e in &cfg.engines {
        assert_eq!(e.kv_transfer.link_bandwidth_bytes_per_s, 10e9);
        assert_eq!(e.kv_transfer.link_latency_us, 500);
    }
    // The routers price transfers on the same link.
    assert_eq!(cfg.pd.transfer_bandwidth_bytes_per_s, 10e9);
    assert_eq!(cfg.pd.transfer_latency_us, 500);
    assert_eq!(cfg.pd.threshold_tokens, 64);
    let same = bench_config(&args(&["--prefill-engines", "1", "--decode-engines", "2"])).unwrap();
    assert_eq!(same.roles, cfg.roles);

    assert_eq!(
        parse_pd_deciders("cost, threshold").unwrap(),
        [PdDecider::Cost, PdDecider::Threshold]
    );
    assert!(parse_pd_deciders("cost,sometimes").is_err());
    assert!(matches!(
        bench_config(&args(&["--pd-fleet", "0:4"])),
        Err(BenchError::InvalidArgument(_))
    ));
    assert!(bench_config(&args(&["--pd-fleet", "2-6"])).is_err());
}

#[test]
fn pd_bench_reports_the_aggregated_baseline_and_each_decider() {
    let report = bench(&args(&[
        "--workload",
        "long-prompt",
        "--rate",
        "2",
        "--limit",
        "12",
        "--pd-fleet",
        "1:1",
        "--pd-deciders",
        "threshold,cost",
        "--quiet",
    ]))
    .unwrap();
    let names: Vec<&str> = report.policies.iter().map(|p| p.policy.as_str()).collect();
    assert_eq!(names, ["aggregated", "pd-threshold", "pd-cost"]);
    assert!(report.policies[0].pd.is_none());
    let t = report.policies[1].pd.as_ref().unwrap();
    assert_eq!(t.split_fraction, 1.0, "8,000 uncached tokens are above 10");
    assert!(report.policies.iter().all(|p| p.completed == 12));
    let json = serde_json::to_value(&report).unwrap();
    assert!(
        json["policies"][1]["pd"]["transfer_ms"]["mean"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}
