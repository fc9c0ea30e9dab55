//! Engines that are not what the router was told: kvgate learns their step times from the
//! first tokens they serve and predicts TTFT within 10% after warm-up, where the declared prior
//! and one speed factor cannot (issue 16.2 and 16.3).

use kvgate_bench::des::{DesConfig, run_policy};
use kvgate_bench::report::{
    PolicyReport, Slo, prediction_error_series, ttft_mape, ttft_mape_floor,
};
use kvgate_bench::truth::{HardwareTruth, Priors, apply};
use kvgate_bench::workload::{SharedPrefixConfig, Workload, shared_prefix};
use kvgate_core::Policy;
use kvgate_engine::EngineConfig;

/// 240 requests over 2 engines: 8 shared 1,500-token system prompts with 40- to 400-token
/// questions, so first tokens mix cold and warm prefills and queues of different depths.
fn workload() -> Workload {
    shared_prefix(
        SharedPrefixConfig {
            num_groups: 8,
            num_prompts_per_group: 30,
            system_prompt_len: 1500,
            question_len: 200,
            output_len: 20,
            rate_per_s: 12.0,
        },
        7,
    )
}

fn fleet(truth: HardwareTruth, priors: Priors, static_priors: bool) -> DesConfig {
    let mut cfg = DesConfig::homogeneous(2, EngineConfig::h100());
    cfg.seed = 3;
    apply(&mut cfg, truth, priors);
    cfg.static_priors = static_priors;
    cfg
}

#[test]
fn kvgate_learns_a_cpu_like_engine_to_within_ten_percent_where_static_priors_cannot() {
    let w = workload();
    let learnt = run_policy(
        &w,
        Policy::Kvgate,
        &fleet(HardwareTruth::CpuLike, Priors::Declared, false),
        None,
    )
    .unwrap();
    let fixed = run_policy(
        &w,
        Policy::Kvgate,
        &fleet(HardwareTruth::CpuLike, Priors::Declared, true),
        None,
    )
    .unwrap();
    let learnt_mape = ttft_mape(&learnt).expect("kvgate predicts");
    let fixed_mape = ttft_mape(&fixed).expect("kvgate predicts");
    eprintln!("cpu-like MAPE after warm-up: learning {learnt_mape:.3}, static {fixed_mape:.3}");
    // What each router priced the engines with at the end: learnt from their first tokens,
    // or the declared H100 prior untouched.
    assert!(learnt.step_models.iter().all(|m| m.observations > 50));
    assert!(fixed.step_models.iter().all(|m| m.observations == 0
        && m.prefill_us_per_token
            == kvgate_core::cost::HardwarePrior::H100_LLAMA31_8B.prefill_us_per_token));
    assert!(
        learnt_mape <= 0.10,
        "learning: MAPE {learnt_mape:.3} after warm-up"
    );
    // Every served request knows where in its engine's step it arrived: a wait no longer than
    // that step nor than its TTFT; the least error any router could have is below kvgate's.
    for r in learnt.requests.iter().filter(|r| r.first_token_us > 0) {
        let (wait, step) = r.arrival_phase_us.expect("a served request has a phase");
        assert!(
            wait <= step && wait <= r.first_token_us - r.arrival_us,
            "{r:?}"
        );
    }
    let floor = ttft_mape_floor(&learnt).expect("kvgate predicts");
    assert!(floor < learnt_mape, "floor {floor:.3} vs {learnt_mape:.3}");
    assert!(
        fixed_mape >= 3.0 * learnt_mape && fixed_mape >= 0.3,
        "static priors should be far off a CPU-like engine: {fixed_mape:.3} vs {learnt_mape:.3}"
    );
    // The learning curve falls: the first window is far worse than the last.
    let curve = prediction_error_series(&learnt);
    let (first, last) = (curve.first().unwrap().1, curve.last().unwrap().1);
    assert!(first > 2.0 * last, "learning curve {curve:?}");
    assert_eq!(
        PolicyReport::from_run(&learnt, Slo::default()).ttft_mape,
        Some(learnt_mape)
    );
}

#[test]
fn correct_priors_predict_well_from_the_start_and_baselines_predict_nothing() {
    let w = workload();
    let truth = run_policy(
        &w,
        Policy::Kvgate,
        &fleet(HardwareTruth::CpuLike, Priors::Truth, true),
        None,
    )
    .unwrap();
    let mape = ttft_mape(&truth).unwrap();
    assert!(mape <= 0.10, "true priors, no learning: MAPE {mape:.3}");
    let rr = run_policy(
        &w,
        Policy::RoundRobin,
        &fleet(HardwareTruth::CpuLike, Priors::Declared, false),
        None,
    )
    .unwrap();
    assert_eq!(ttft_mape(&rr), None);
    assert!(rr.requests.iter().all(|r| r.predicted_ttft_us.is_none()));
    assert!(prediction_error_series(&rr).is_empty());
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    bench: kvgate_bench::cli::BenchArgs,
}

fn args(flags: &[&str]) -> kvgate_bench::cli::BenchArgs {
    use clap::Parser;
    let mut argv = vec!["bench"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).expect("flags parse").bench
}

#[test]
fn bench_cli_reports_ttft_mape_for_predicting_policies_and_draws_the_learning_curve() {
    let dir = std::env::temp_dir().join(format!("kvgate-learning-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let charts = dir.join("charts");
    let requests = dir.join("requests.jsonl");
    let a = args(&[
        "--workload",
        "shared-prefix",
        "--rate",
        "4",
        "--limit",
        "60",
        "--engines",
        "2",
        "--policies",
        "kvgate,round-robin",
        "--hardware-truth",
        "three-speeds",
        "--priors",
        "truth",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--charts",
        charts.to_str().unwrap(),
        "--requests-out",
        requests.to_str().unwrap(),
    ]);
    kvgate_bench::cli::bench(&a).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let policies = v["policies"].as_array().unwrap();
    assert!(policies[0]["ttft_mape"].as_f64().unwrap() >= 0.0);
    assert!(policies[1]["ttft_mape"].is_null());
    let floor = policies[0]["ttft_mape_floor"].as_f64().unwrap();
    assert!(floor >= 0.0 && floor <= policies[0]["ttft_mape"].as_f64().unwrap());
    assert!(policies[1]["ttft_mape_floor"].is_null());
    // The per-request lines: every request of both policies, in arrival order per policy, and
    // the report's MAPE recomputed from them (after the first 10% of arrivals).
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&requests)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 120);
    for (policy, part) in ["kvgate", "round-robin"].iter().zip(lines.chunks(60)) {
        assert!(part.iter().all(|l| l["policy"] == *policy));
        let arrivals: Vec<f64> = part
            .iter()
            .map(|l| l["arrival_ms"].as_f64().unwrap())
            .collect();
        assert!(arrivals.windows(2).all(|w| w[0] <= w[1]));
        assert!(part.iter().all(|l| l["ttft_ms"].as_f64().unwrap() > 0.0));
        assert!(part.iter().all(|l| l["engine"].as_u64().unwrap() < 2));
    }
    assert!(lines[60..].iter().all(|l| l["predicted_ttft_ms"].is_null()));
    // Why each was routed where, and what the router expected the engine to hold.
    for l in &lines {
        let reason = l["reason"].as_str().unwrap();
        let matched = l["matched_tokens"].as_u64().unwrap();
        assert!(matched <= l["prompt_tokens"].as_u64().unwrap(), "{l}");
        if l["policy"] == "round-robin" {
            assert_eq!(reason, "round_robin");
        }
    }
    assert!(
        lines[..60]
            .iter()
            .any(|l| l["reason"] == "prefix_hit" && l["matched_tokens"].as_u64().unwrap() > 0),
        "some kvgate request was routed to a prefix it matched"
    );
    let errors: Vec<f64> = lines[6..60]
        .iter()
        .map(|l| {
            let (p, m) = (
                l["predicted_ttft_ms"].as_f64().unwrap(),
                l["ttft_ms"].as_f64().unwrap(),
            );
            (p - m).abs() / m
        })
        .collect();
    let mape = errors.iter().sum::<f64>() / errors.len() as f64;
    let reported = policies[0]["ttft_mape"].as_f64().unwrap();
    assert!(
        (mape - reported).abs() < 1e-3 * reported.max(1e-3),
        "{mape} vs {reported}"
    );
    assert!(charts.join("prediction_error.svg").exists());
    assert!(charts.join("prediction_error.png").exists());
    let _ = std::fs::remove_dir_all(&dir);

    // A truth sets the engines' speed itself; a --gpu beside it would be silently ignored.
    let clash = args(&["--gpu", "a100", "--hardware-truth", "cpu-like", "--quiet"]);
    assert!(matches!(
        kvgate_bench::cli::bench(&clash),
        Err(kvgate_bench::BenchError::InvalidArgument(_))
    ));
}
