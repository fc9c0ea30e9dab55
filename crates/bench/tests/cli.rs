//! `kvgate bench` as an operator meets it (issue 10.13): mistakes fail before the run, an
//! invalid request is one rejection rather than the end of the benchmark, and a live run in
//! which nothing succeeded is a failure.

#[path = "common/args.rs"]
mod common;

use common::args;
use kvgate_bench::BenchError;
use kvgate_bench::cli::bench;
use kvgate_bench::des::{DesConfig, run_policy};
use kvgate_bench::report::{PolicyReport, Slo};
use kvgate_bench::workload::{Segment, Workload, WorkloadRequest};
use kvgate_core::Policy;
use kvgate_engine::EngineConfig;

/// Regression (10.13): `--policies kvgate,foo` ran kvgate to the end before rejecting `foo`.
/// With no engines the run itself would fail (`NoEngines`); the policy error comes first.
#[test]
fn unknown_policy_in_the_list_is_rejected_before_anything_runs() {
    let a = args(&[
        "--workload",
        "shared-prefix",
        "--limit",
        "5",
        "--engines",
        "0",
        "--quiet",
        "--policies",
        "kvgate,foo",
    ]);
    match bench(&a) {
        Err(BenchError::Policy { policy, .. }) => assert_eq!(policy, "foo"),
        other => panic!("expected the policy error first, got {other:?}"),
    }
}

/// Regression (10.13): an unwritable `--json` path failed only after the whole run.
#[test]
fn unwritable_json_path_fails_before_the_run() {
    let dir = std::env::temp_dir().join(format!("kvgate-bench-nodir-{}", std::process::id()));
    let path = dir.join("missing").join("report.json");
    let a = args(&[
        "--workload",
        "shared-prefix",
        "--limit",
        "5",
        "--engines",
        "0",
        "--quiet",
        "--policies",
        "kvgate",
        "--json",
        path.to_str().unwrap(),
    ]);
    match bench(&a) {
        Err(BenchError::Write { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected the JSON path error first, got {other:?}"),
    }
    // A writable path passes the check and is not left behind by it.
    let ok = std::env::temp_dir().join(format!("kvgate-bench-ok-{}.json", std::process::id()));
    let a = args(&[
        "--workload",
        "shared-prefix",
        "--limit",
        "5",
        "--engines",
        "0",
        "--quiet",
        "--json",
        ok.to_str().unwrap(),
    ]);
    assert!(matches!(bench(&a), Err(BenchError::NoEngines)));
    assert!(!ok.exists());
}

fn request(arrival_us: u64, id: u64, tokens: u32) -> WorkloadRequest {
    WorkloadRequest {
        arrival_us,
        segments: vec![Segment { id, tokens }],
        output_tokens: 16,
        session: None,
    }
}

/// Regression (10.13): a trace request longer than `max_model_len` aborted the whole benchmark.
/// vLLM answers such a request 400; the benchmark counts it as rejected and goes on.
#[test]
fn request_longer_than_max_model_len_is_rejected_and_the_run_goes_on() {
    let mut engine = EngineConfig::h100();
    engine.max_model_len = 4096;
    let cfg = DesConfig::homogeneous(2, engine);
    let workload = Workload::new(
        "one too long",
        vec![
            request(0, 1, 1000),
            request(10_000, 2, 5000),
            request(20_000, 3, 1000),
        ],
    );
    for policy in [Policy::Kvgate, Policy::RoundRobin, Policy::Oracle] {
        let run = run_policy(&workload, policy, &cfg, None).expect("the run goes on");
        let rejected: Vec<bool> = run.requests.iter().map(|r| r.rejected).collect();
        assert_eq!(rejected, [false, true, false], "{policy}");
        let report = PolicyReport::from_run(&run, Slo::default());
        assert_eq!((report.completed, report.rejected), (2, 1), "{policy}");
    }
}

/// Regression (10.13): `bench --live` in which every request failed (a wrong `--model`, a
/// gateway that is down) printed a report of zeros and exited 0.
#[test]
fn live_run_where_every_request_failed_is_an_error() {
    // A loopback port with nothing listening: every request fails to connect.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let a = args(&[
        "--workload",
        "shared-prefix",
        "--limit",
        "3",
        "--rate",
        "1000",
        "--quiet",
        "--live",
        &url,
        "--model",
        "some-model",
    ]);
    match bench(&a) {
        Err(BenchError::AllFailed {
            requests,
            first_error,
        }) => {
            assert_eq!(requests, 3);
            assert!(!first_error.is_empty());
        }
        other => panic!("expected AllFailed, got {other:?}"),
    }
}

/// Regression (10.13): `bench --live` against `kvgate serve` sent `--model`'s old default
/// (`llama-3.1-8b`), which nothing served, so every request failed. Without `--model` the
/// generator now sends the first model the target's `/v1/models` lists.
#[test]
fn live_run_without_model_sends_what_the_target_serves() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (fleet, gw) = rt.block_on(async {
        let mut fc = kvgate_sim::FleetConfig::homogeneous(2, EngineConfig::h100());
        fc.http_port = 0;
        fc.zmq_port = 0;
        let fleet = kvgate_sim::start_fleet(fc).await.expect("sim fleet starts");
        let flags = kvgate_runtime::config::Overrides {
            host: Some("127.0.0.1".into()),
            port: Some(0),
            admin_port: Some(0),
            endpoints: fleet
                .engines
                .iter()
                .map(|e| format!("http://{}", e.http_addr))
                .collect(),
            ..Default::default()
        };
        let cfg = kvgate_runtime::config::DataPlaneConfig::load(None, &flags).unwrap();
        let gw = kvgate_gateway::Gateway::start(cfg, flags).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !gw.control.is_ready() {
            assert!(std::time::Instant::now() < deadline, "gateway never ready");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        (fleet, gw)
    });
    let url = format!("http://{}", gw.api_addr);
    let a = args(&[
        "--workload",
        "shared-prefix",
        "--limit",
        "3",
        "--rate",
        "100",
        "--quiet",
        "--live",
        &url,
    ]);
    let served = bench(&a).expect("live run succeeds without --model");
    drop(served);
    // Nothing listening there: no model to find is a clear error, not a run of failures.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}");
    let a = args(&[
        "--workload",
        "shared-prefix",
        "--limit",
        "3",
        "--quiet",
        "--live",
        &dead,
    ]);
    assert!(matches!(bench(&a), Err(BenchError::NoModel { .. })));
    drop((gw, fleet));
    rt.shutdown_background();
}
