//! What the endpoint picker adds to a request's latency through Envoy, for a small prompt and a
//! 220 KB prompt (large bodies are where ext_proc pickers hurt: the body crosses to the picker
//! and back in 62 KB chunks, and the picker parses, tokenises and hashes it).
//!
//! Setup, all on 127.0.0.1: one upstream that answers an OpenAI chat completion at once (so
//! engine time does not drown the difference), `kvgate epp` in front of it, and one Envoy with
//! two listeners: "picked" (the reference ext_proc config: FULL_DUPLEX_STREAMED bodies,
//! ORIGINAL_DST by `x-gateway-destination-endpoint`) and "direct" (same Envoy, same cluster, no
//! ext_proc; the client sets the destination header itself). Requests alternate between the
//! two, one at a time over keep-alive connections; the added latency is the difference of the
//! percentiles.
//!
//! Run: `cargo run --release -p kvgate-epp --example envoy_overhead [-- small_n large_n]`
//! (needs Envoy: scripts/setup-envoy.sh).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use hdrhistogram::Histogram;
use kvgate_epp::{Epp, EppArgs};
use kvgate_runtime::config::RoutingFlags;
use kvgate_testkit::envoy;
use serde_json::json;

const MODEL: &str = "bench-model";

async fn upstream() -> SocketAddr {
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(|body: axum::body::Bytes| async move {
                let n = body.len() / 4;
                axum::Json(json!({
                    "id": "cmpl-0", "object": "chat.completion", "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1},
                }))
            }),
        )
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"object": "list", "data": [{"id": MODEL, "object": "model"}]})) }),
        )
        .route(
            "/metrics",
            get(|| async {
                format!(
                    "vllm:num_requests_running{{model_name=\"{MODEL}\"}} 0\n\
                     vllm:num_requests_waiting{{model_name=\"{MODEL}\"}} 0\n\
                     vllm:kv_cache_usage_perc{{model_name=\"{MODEL}\"}} 0.1\n"
                )
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

struct Run {
    picked: Histogram<u64>,
    direct: Histogram<u64>,
}

async fn measure(
    client: &reqwest::Client,
    envoy: &envoy::Envoy,
    upstream: SocketAddr,
    body: &[u8],
    n: usize,
) -> Run {
    let mut run = Run {
        picked: Histogram::new(3).unwrap(),
        direct: Histogram::new(3).unwrap(),
    };
    let dest = upstream.to_string();
    let one = |via: SocketAddr, direct: bool| {
        let mut req = client
            .post(format!("http://{via}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if direct {
            req = req.header("x-gateway-destination-endpoint", dest.as_str());
        }
        async move {
            let t = Instant::now();
            let resp = req.send().await.expect("envoy answers");
            assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
            resp.bytes().await.expect("body");
            t.elapsed()
        }
    };
    // Warm connections, caches and Envoy's ORIGINAL_DST host.
    for _ in 0..n.min(50) {
        one(envoy.picked, false).await;
        one(envoy.direct, true).await;
    }
    for i in 0..n {
        // Alternate which goes first so neither benefits from the other's warm-up.
        let (a, b) = if i % 2 == 0 {
            let a = one(envoy.picked, false).await;
            (a, one(envoy.direct, true).await)
        } else {
            let b = one(envoy.direct, true).await;
            (one(envoy.picked, false).await, b)
        };
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        run.picked.record(us(a)).unwrap();
        run.direct.record(us(b)).unwrap();
    }
    run
}

fn report(name: &str, bytes: usize, n: usize, r: &Run) {
    let p = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q);
    let (p50a, p50b) = (p(&r.picked, 0.5), p(&r.direct, 0.5));
    let (p99a, p99b) = (p(&r.picked, 0.99), p(&r.direct, 0.99));
    println!(
        "{name:<6} {bytes:>8} B  n={n:<5} direct p50 {p50b:>6} µs p99 {p99b:>6} µs | via picker p50 {p50a:>6} µs p99 {p99a:>6} µs | added p50 {:>6} µs p99 {:>6} µs | ratio p50 {:.2}× p99 {:.2}×",
        p50a as i64 - p50b as i64,
        p99a as i64 - p99b as i64,
        p50a as f64 / p50b as f64,
        p99a as f64 / p99b as f64,
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let small_n = args.first().copied().unwrap_or(1_000);
    let large_n = args.get(1).copied().unwrap_or(200);

    let up = upstream().await;
    let epp = Epp::start(&EppArgs {
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        routing: RoutingFlags {
            endpoints: vec![up.to_string()],
            models: vec![MODEL.into()],
            ..RoutingFlags::default()
        },
        ..EppArgs::default()
    })
    .await
    .expect("picker starts");
    let envoy = envoy::Envoy::start(epp.grpc_addr, epp.health_addr).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(4)
        .build()
        .unwrap();

    let small = serde_json::to_vec(&json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        "max_tokens": 1,
    }))
    .unwrap();
    let words: String = (0..40_000)
        .map(|i| format!(" w{}", i * 7919 % 10_007))
        .collect();
    let large_text = &words[..220_000 - 120];
    let large = serde_json::to_vec(&json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": large_text}],
        "max_tokens": 1,
    }))
    .unwrap();

    println!("kvgate epp overhead through Envoy (one request at a time, keep-alive, 127.0.0.1)");
    let r = measure(&client, &envoy, up, &small, small_n).await;
    report("small", small.len(), small_n, &r);
    let r = measure(&client, &envoy, up, &large, large_n).await;
    report("220KB", large.len(), large_n, &r);
    let m = epp.metrics.encode();
    for l in m.lines().filter(|l| {
        l.starts_with("kvgate_epp_decision_seconds_sum")
            || l.starts_with("kvgate_epp_decision_seconds_count")
    }) {
        println!("{l}");
    }
}
