//! Capacity at SLO and router replicas (issue 11.1, 11.2): the search is deterministic and
//! brackets the boundary it reports; replicas decide their own share and only see their own
//! streams; herding is measured as documented; the CLI writes the JSON contract, with the
//! work ceiling.

use clap::Parser;
use kvgate_bench::capacity::{
    CapacityOptions, CapacitySearch, CapacitySlo, find_capacity, offered_rps,
};
use kvgate_bench::cli::{BenchArgs, bench};
use kvgate_bench::des::{DesConfig, QueueSample, ReplicaSpread, run_policy};
use kvgate_bench::report::{Herding, PolicyReport, Slo};
use kvgate_bench::workload::{SharedPrefixConfig, Workload, shared_prefix};
use kvgate_core::Policy;
use kvgate_engine::EngineConfig;

fn workload(rate: f64) -> Workload {
    shared_prefix(
        SharedPrefixConfig {
            num_groups: 4,
            num_prompts_per_group: 10,
            system_prompt_len: 3000,
            question_len: 100,
            output_len: 20,
            rate_per_s: rate,
        },
        9,
    )
}

fn fleet(n: usize) -> DesConfig {
    let mut cfg = DesConfig::homogeneous(n, EngineConfig::h100());
    cfg.seed = 4;
    cfg
}

#[test]
fn capacity_search_is_deterministic_and_brackets_the_boundary() {
    let cfg = fleet(2);
    let search = CapacitySearch {
        cfg: &cfg,
        // A tight TTFT bound so the boundary sits at a rate this small workload reaches.
        slo: CapacitySlo {
            ttft_p90_ms: 150.0,
            ..CapacitySlo::default()
        },
        report_slo: Slo::default(),
        opts: CapacityOptions {
            start_rate: 10.0,
            max_bisections: 3,
            ..CapacityOptions::default()
        },
        is_trace: false,
    };
    let a = find_capacity(Policy::RoundRobin, &workload, &search).unwrap();
    let b = find_capacity(Policy::RoundRobin, &workload, &search).unwrap();
    assert_eq!(a, b, "same seed, same search");
    let cap = a.capacity_rate.expect("some rate meets the SLO");
    assert_eq!(
        a.capacity_speedup, None,
        "synthetic rates are not speed-ups"
    );
    // The capacity is the highest rate that met, and a rate at most 2× above it missed.
    let best_met = a
        .probes
        .iter()
        .filter(|p| p.meets)
        .map(|p| p.rate)
        .fold(0.0, f64::max);
    assert_eq!(cap, best_met);
    assert!(
        a.probes
            .iter()
            .any(|p| !p.meets && p.rate > cap && p.rate <= cap * 2.0),
        "{:?}",
        a.probes
    );
    for p in &a.probes {
        let meets = p.ttft_p90_ms <= 150.0 && p.tpot_p99_ms <= 100.0 && p.goodput >= 0.99;
        assert_eq!(p.meets, meets, "{p:?}");
    }
    assert!((a.capacity_rps - offered_rps(&workload(cap))).abs() < 1e-9);
    assert!(a.ttft_ms.p90 <= 150.0);
}

#[test]
fn replicas_decide_their_share_and_every_request_completes() {
    let w = workload(30.0);
    let mut cfg = fleet(3);
    cfg.router_replicas = 4;
    cfg.scrape_interval_max_ms = 200;
    cfg.kv_event_delay_max_ms = 50;
    let run = run_policy(&w, Policy::Kvgate, &cfg, None).unwrap();
    assert_eq!(run.router_replicas, 4);
    for (i, r) in run.requests.iter().enumerate() {
        assert_eq!(r.replica as usize, i % 4, "round-robin spread");
        assert!(r.finish_us >= r.first_token_us && r.first_token_us >= r.arrival_us);
    }
    assert_eq!(
        PolicyReport::from_run(&run, Slo::default()).completed,
        w.requests.len()
    );
    assert!(!run.queue_samples.is_empty());
    assert!(run.queue_samples.iter().all(|q| q.waiting.len() == 3));
    assert_eq!(run, run_policy(&w, Policy::Kvgate, &cfg, None).unwrap());

    cfg.replica_spread = ReplicaSpread::Random;
    let random = run_policy(&w, Policy::Kvgate, &cfg, None).unwrap();
    let mut per = [0usize; 4];
    for r in &random.requests {
        per[r.replica as usize] += 1;
    }
    assert!(per.iter().all(|&k| k > 0), "{per:?}");
    assert_ne!(
        random
            .requests
            .iter()
            .map(|r| r.replica)
            .collect::<Vec<_>>(),
        run.requests.iter().map(|r| r.replica).collect::<Vec<_>>()
    );
}

#[test]
fn one_replica_ignores_the_spread_and_delay_ranges_spread_over_replicas() {
    let w = workload(30.0);
    let mut a = fleet(2);
    a.replica_spread = ReplicaSpread::Random;
    let b = fleet(2);
    assert_eq!(
        run_policy(&w, Policy::Dynamo, &a, None).unwrap(),
        run_policy(&w, Policy::Dynamo, &b, None).unwrap()
    );
    let mut c = fleet(2);
    c.router_replicas = 4;
    c.scrape_interval_ms = 50;
    c.scrape_interval_max_ms = 100;
    c.kv_event_delay_ms = 10;
    c.kv_event_delay_max_ms = 50;
    // Replica i takes min + (max − min)·(i + ½)/R.
    assert_eq!(c.replica_delays_us(0), (56_250, 20_000, 15_000));
    assert_eq!(c.replica_delays_us(3), (93_750, 20_000, 45_000));
}

#[test]
fn herding_is_max_over_mean_waiting_and_its_spread() {
    let s = |t: u64, w: &[u32]| QueueSample {
        t_us: t,
        waiting: w.to_vec(),
    };
    let even = Herding::of(&[s(0, &[2, 2, 2, 2]), s(1, &[0, 0, 0, 0])]);
    assert_eq!(even.mean_max_over_mean_waiting, 1.0);
    assert_eq!(even.oscillation, 0.0);
    assert_eq!(even.samples, 1, "instants with nothing waiting are skipped");
    let piled = Herding::of(&[s(0, &[8, 0, 0, 0]), s(1, &[2, 2, 2, 2])]);
    assert_eq!(piled.mean_max_over_mean_waiting, 2.5);
    assert_eq!(piled.oscillation, 1.5);
    assert_eq!(piled.mean_max_waiting, 5.0);
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

#[test]
fn capacity_cli_writes_capacity_speedup_and_rps_per_policy() {
    let dir = std::env::temp_dir().join(format!("kvgate-capacity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("trace.jsonl");
    let mut text = String::new();
    for i in 0..40u64 {
        text.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": 1500, \"output_length\": 10, \"hash_ids\": [0, 1, {}]}}\n",
            i * 100,
            100 + i
        ));
    }
    // One request longer than max_model_len: rejected and counted, not fatal.
    text.push_str(
        "{\"timestamp\": 4000, \"input_length\": 200000, \"output_length\": 10, \"hash_ids\": [",
    );
    text.push_str(
        &(0..391)
            .map(|k| (5000 + k).to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    text.push_str("]}\n");
    std::fs::write(&trace, text).unwrap();
    let json = dir.join("cap.json");
    let charts = dir.join("charts");
    let argv = [
        "bench",
        "--trace",
        trace.to_str().unwrap(),
        "--engines",
        "2",
        "--policies",
        "round-robin,llm-d",
        "--capacity",
        "--capacity-bisections",
        "2",
        "--slo-ttft-p90-ms",
        "300",
        "--router-replicas",
        "2",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--charts",
        charts.to_str().unwrap(),
    ];
    let args = Cli::try_parse_from(argv).unwrap().bench;
    bench(&args).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["router_replicas"], 2);
    let policies = v["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 2);
    for p in policies {
        assert!(p["capacity_speedup"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["capacity_rps"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["ttft_ms"]["p90"].as_f64().unwrap() <= 300.0, "{p}");
        assert_eq!(p["invalid"], 1, "{p}");
    }
    // The work ceiling: every request after the first finds the two shared 512-token blocks
    // cached (the one too long for the engines is left out), and the two H100s are exactly
    // busy over the arrival span (4 s at speed-up 1): 20,064 prefill tokens, 360 decode tokens
    // in full steps (the token budget binds: 20,424 / 8,192 steps), split over two engines.
    let ceiling = &v["ceiling"];
    let hit = ceiling["ideal_hit_ratio"].as_f64().unwrap();
    assert!(
        (hit - 39.0 * 1024.0 / (40.0 * 1500.0)).abs() < 1e-12,
        "{ceiling}"
    );
    let (prefill, decode) = (1500.0 + 39.0 * 476.0, 40.0 * 9.0);
    let one_engine_us = 17.25 * prefill + 6.0 * decode + 5752.7 * (prefill + decode) / 8192.0;
    let speedup = 4e6 / (one_engine_us / 2.0);
    let rate = ceiling["rate"].as_f64().unwrap();
    assert!(
        (rate / speedup - 1.0).abs() < 2e-3,
        "{ceiling} vs {speedup}"
    );
    let rps = ceiling["rps"].as_f64().unwrap();
    assert!(
        (rps / (41.0 / 4.0 * speedup) - 1.0).abs() < 2e-3,
        "{ceiling}"
    );
    assert!(dir.join("charts").join("ttft_p90_vs_rate.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regression: the mix kept a fixed request count, so at high rates it arrived as one burst the
/// fleet drained afterwards and "met" the SLO at thousands of requests per second. Its span of
/// arrivals is now fixed and its offered load follows the rate.
#[test]
fn mix_offered_load_scales_with_the_rate_over_a_fixed_span() {
    use kvgate_bench::cli::{Synthetic, synthetic};
    let low = synthetic(Some(Synthetic::Mix), 20.0, 1);
    let high = synthetic(Some(Synthetic::Mix), 200.0, 1);
    let ratio = offered_rps(&high) / offered_rps(&low);
    assert!((ratio - 10.0).abs() < 1.0, "{ratio}");
    let span =
        |w: &kvgate_bench::workload::Workload| w.requests.last().unwrap().arrival_us as f64 / 1e6;
    assert!((span(&high) / span(&low) - 1.0).abs() < 0.2);
}

#[test]
fn demo_conclusion_names_who_sustains_more_and_by_how_much() {
    use kvgate_bench::capacity::PolicyCapacity;
    use kvgate_bench::cli::demo_conclusion;
    let cap = |p: &str, rps: f64| PolicyCapacity {
        policy: p.to_string(),
        capacity_rps: rps,
        ..Default::default()
    };
    let found = [cap("kvgate", 30.0), cap("llm-d", 20.0), cap("dynamo", 10.0)];
    let s = demo_conclusion(&found, None);
    assert!(
        s.contains("kvgate sustains 30.0 req/s, 1.50x the best baseline (llm-d at 20.0"),
        "{s}"
    );
    let ceiling = kvgate_bench::ceiling::WorkCeiling {
        rps: 120.0,
        ..Default::default()
    };
    let with = demo_conclusion(&found, Some(&ceiling));
    assert!(
        with.starts_with(&s)
            && with.ends_with(
                "could compute 120.0 req/s (KV memory aside); kvgate reaches 25% of it."
            ),
        "{with}"
    );
    let s = demo_conclusion(&[cap("kvgate", 15.0), cap("llm-d", 20.0)], None);
    assert!(
        s.starts_with("At the SLO llm-d sustains 20.0 req/s, more than kvgate's 15.0"),
        "{s}"
    );
}
