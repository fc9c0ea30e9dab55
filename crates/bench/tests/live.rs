//! Live mode against real sockets: `kvgate sim` engines behind `kvgate serve`, driven by the
//! load generator. The TTFT the generator measures from the SSE stream must agree with the
//! engines' own `time_to_first_token` histograms.

use std::time::Duration;

use kvgate_bench::live::{LiveConfig, run_live};
use kvgate_bench::report::{PolicyReport, Slo};
use kvgate_bench::workload::{SharedPrefixConfig, shared_prefix};
use kvgate_engine::EngineConfig;
use kvgate_gateway::Gateway;
use kvgate_runtime::config::{DataPlaneConfig, Overrides};
use kvgate_sim::{FleetConfig, start_fleet};
use kvgate_testkit::eventually_sync;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_ttft_through_gateway_agrees_with_engine_histograms() {
    // A100 coefficients: prefills ~3x slower than H100, so the engines' TTFT (tens of ms) is well
    // above the fixed cost of HTTP + gateway + SSE in an unoptimised test build.
    let mut fc = FleetConfig::homogeneous(2, EngineConfig::a100());
    fc.http_port = 0;
    fc.zmq_port = 0;
    let fleet = start_fleet(fc).await.expect("sim fleet starts");
    let model = fleet.engines[0].model.clone();
    let flags = Overrides {
        host: Some("127.0.0.1".into()),
        port: Some(0),
        admin_port: Some(0),
        endpoints: fleet
            .engines
            .iter()
            .map(|e| format!("http://{}", e.http_addr))
            .collect(),
        ..Overrides::default()
    };
    let cfg = DataPlaneConfig::load(None, &flags).expect("config from flags");
    let gw = Gateway::start(cfg, flags).await.expect("gateway starts");
    eventually_sync(
        "the gateway to see both engines",
        Duration::from_secs(10),
        || gw.control.ready_endpoints() >= 2,
    )
    .await;

    // 32 requests over ~3 s: 4 system prompts of 1,500 tokens, so later requests hit the cache.
    let workload = shared_prefix(
        SharedPrefixConfig {
            num_groups: 4,
            num_prompts_per_group: 8,
            system_prompt_len: 1500,
            question_len: 100,
            output_len: 16,
            rate_per_s: 10.0,
        },
        9,
    );
    let live = run_live(
        &workload,
        &LiveConfig {
            base_url: format!("http://{}", gw.api_addr),
            model,
            timeout: Duration::from_secs(30),
            label: "live".into(),
        },
    )
    .await;
    assert!(live.errors.is_empty(), "{:?}", live.errors);
    let report = PolicyReport::from_run(&live.run, Slo::default());
    assert_eq!(report.completed, workload.requests.len());
    assert!(report.hit_ratio > 0.3, "hit ratio {}", report.hit_ratio);
    assert_eq!(
        live.itl_us.len(),
        workload.requests.len() * 15,
        "one gap per token after the first"
    );

    let (mut sum_s, mut count) = (0.0, 0u64);
    for i in 0..fleet.engines.len() {
        let s = fleet.stats(i).await.expect("engine stats");
        sum_s += s.ttft.sum_s;
        count += s.ttft.count;
    }
    assert_eq!(count as usize, workload.requests.len());
    let engine_mean_ms = sum_s / count as f64 * 1000.0;
    let client_mean_ms = report.ttft_ms.mean;
    // The client's TTFT also covers HTTP, the gateway (tokenising and hashing the prompt) and
    // SSE framing: ~1 ms in a release build, ~15 ms in a debug build on this 2-core machine,
    // and up to ~30 ms more when another process loads both cores (seen: +29.7 ms beside two
    // vLLM engines). The check is that the two measurements agree, not a speed bound.
    let tolerance_ms = 0.25 * engine_mean_ms + 40.0;
    assert!(
        client_mean_ms >= engine_mean_ms - 1.0 && client_mean_ms - engine_mean_ms <= tolerance_ms,
        "client TTFT mean {client_mean_ms:.2} ms vs engines' {engine_mean_ms:.2} ms"
    );
    eprintln!("client TTFT mean {client_mean_ms:.2} ms, engines' {engine_mean_ms:.2} ms");
    gw.shutdown().await;
    fleet.shutdown().await;
}
