//! `kvgate serve` in front of a disaggregated simulated fleet (issue 12.2): prefill and decode
//! pods speaking vLLM's NixlConnector flow or SGLang's bootstrap flow, over real HTTP and the
//! simulator's KV side channel, with the decode pod's KV events over real ZeroMQ.

use std::time::Duration;

#[path = "common/fleet.rs"]
mod common;

use common::{base_config, endpoints_of, start_gateway};
use kvgate_core::{PdDecider, Role};
use kvgate_gateway::Gateway;
use kvgate_runtime::config::{DataPlaneConfig, EndpointConfig, PdProtocol, PolicyChoice};
use kvgate_sim::Fleet;
use kvgate_sim::Role as SimRole;
use kvgate_testkit::{MODEL, client, eventually, fleet_with, metric_sum};
use serde_json::{Value, json};

/// Engine `i`'s role in a fleet of `prefill` prefill pods followed by decode pods.
fn roles(prefill: usize) -> impl Fn(usize) -> SimRole {
    move |i| {
        if i < prefill {
            SimRole::Prefill
        } else {
            SimRole::Decode
        }
    }
}

async fn pd_fleet(prefill: usize, decode: usize) -> Fleet {
    let role = roles(prefill);
    fleet_with(prefill + decode, 20.0, move |i, e| e.role = role(i)).await
}

/// The fleet's engines, the first `prefill` as prefill pods and the rest as decode pods, all
/// speaking `protocol`.
fn endpoints(f: &Fleet, prefill: usize, protocol: PdProtocol) -> Vec<EndpointConfig> {
    endpoints_of(f, true)
        .into_iter()
        .zip(&f.engines)
        .enumerate()
        .map(|(i, (mut ep, e))| {
            ep.role = if i < prefill {
                Role::Prefill
            } else {
                Role::Decode
            };
            ep.pd_protocol = protocol;
            ep.bootstrap_port = e.kv_side_channel.map(|a| a.port());
            ep
        })
        .collect()
}

async fn gateway(f: &Fleet, prefill: usize, protocol: PdProtocol, decider: PdDecider) -> Gateway {
    start_gateway(
        gateway_config(f, prefill, protocol, decider),
        f.engines.len(),
    )
    .await
}

fn gateway_config(
    f: &Fleet,
    prefill: usize,
    protocol: PdProtocol,
    decider: PdDecider,
) -> DataPlaneConfig {
    DataPlaneConfig {
        pd_decider: Some(decider),
        ..base_config(endpoints(f, prefill, protocol))
    }
}

/// A chat request with a prompt of about `words` words.
fn chat(words: usize, seed: usize, max_tokens: u32, stream: bool) -> Value {
    let text: String = (0..words)
        .map(|i| format!(" w{}", (i * 7_919 + seed * 104_729) % 99_991))
        .collect();
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

async fn metrics_of(addr: std::net::SocketAddr) -> String {
    client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// SSE `data:` payloads of a stream, `[DONE]` included.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_request_is_prefilled_on_one_pod_and_streamed_from_the_other() {
    let f = pd_fleet(1, 1).await;
    let gw = gateway(&f, 1, PdProtocol::VllmNixl, PdDecider::Always).await;
    // A second gateway on the same fleet sees the same KV events and decides by bare cost
    // (no margin in favour of splitting).
    let mut by_cost = gateway_config(&f, 1, PdProtocol::VllmNixl, PdDecider::Cost);
    by_cost.policy =
        PolicyChoice::Yaml("policy: kvgate\ntuning:\n  pd:\n    whole_margin_us: 0\n".into());
    let by_cost = start_gateway(by_cost, f.engines.len()).await;
    let (prefill, decode) = (f.engines[0].http_addr, f.engines[1].http_addr);
    let url = format!("http://{}/v1/chat/completions", gw.api_addr);
    let r = client()
        .post(&url)
        .json(&chat(400, 1, 8, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-kvgate-endpoint"],
        decode.to_string().as_str()
    );
    let body = r.text().await.unwrap();
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let tokens = ev.iter().filter(|e| e.contains("\"content\"")).count();
    assert!(tokens >= 1, "{body}");
    assert!(
        !body.contains("\"usage\""),
        "the usage chunk the gateway asked for is not the client's: {body}"
    );
    // The prefill pod computed the prompt and produced one token; the decode pod generated.
    let (pm, dm) = (metrics_of(prefill).await, metrics_of(decode).await);
    assert!(metric_sum(&pm, "vllm:prompt_tokens_total") > 400.0, "{pm}");
    assert_eq!(metric_sum(&pm, "vllm:generation_tokens_total"), 1.0);
    assert_eq!(metric_sum(&dm, "vllm:generation_tokens_total"), 8.0);
    let gm = gw.control.metrics.encode();
    for line in [
        "kvgate_gateway_pd_decisions_total{phase=\"disaggregated\",reason=\"always_split\"} 1",
        "kvgate_gateway_pd_transfers_total{protocol=\"vllm-nixl\",outcome=\"ok\"} 1",
        "kvgate_gateway_pd_transfer_seconds_count 1",
    ] {
        assert!(gm.contains(line), "{line} missing from\n{gm}");
    }
    // Non-streaming and split, a fresh prompt: the client's usage says how much of its prompt
    // a cache served (the prefill pod's figure), not the transferred prompt the decode pod
    // counts as cached.
    let r = client()
        .post(&url)
        .json(&chat(300, 2, 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 300, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{v}"
    );
    let gm = gw.control.metrics.encode();
    let decode_cached =
        format!("kvgate_gateway_cached_tokens_reported_total{{endpoint=\"{decode}\"}}");
    assert!(
        !gm.contains(&decode_cached),
        "a decode leg's cached tokens (the transferred prompt) are no evidence about the index: {gm}"
    );

    // Non-streaming, the same prompt: the decode pod's KV events taught the index the
    // transferred blocks, so the cost decider keeps it whole there, and usage reports the real
    // prompt with it cached.
    let control = by_cost.control.clone();
    eventually(
        "decode pod's KV events indexed",
        Duration::from_secs(10),
        || {
            let c = control.clone();
            async move {
                c.with_router(|r| {
                    r.endpoints()
                        .any(|e| e.address == decode.to_string() && e.precise_blocks > 0)
                })
            }
        },
    )
    .await;
    let r = client()
        .post(format!("http://{}/v1/chat/completions", by_cost.api_addr))
        .json(&chat(400, 1, 4, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-kvgate-endpoint"],
        decode.to_string().as_str()
    );
    let v: Value = r.json().await.unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(prompt > 400 && cached >= prompt - 16, "{v}");
    assert!(
        v["choices"][0]["message"]["content"].as_str().is_some(),
        "{v}"
    );
    let gm = by_cost.control.metrics.encode();
    let line =
        "kvgate_gateway_pd_decisions_total{phase=\"aggregated\",reason=\"aggregated_cheaper\"} 1";
    assert!(gm.contains(line), "{line} missing from\n{gm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_bootstrap_sends_both_legs_at_once_and_the_client_gets_the_decode_answer() {
    let f = pd_fleet(1, 1).await;
    let gw = gateway(&f, 1, PdProtocol::SglangBootstrap, PdDecider::Always).await;
    let (prefill, decode) = (f.engines[0].http_addr, f.engines[1].http_addr);
    let url = format!("http://{}/v1/chat/completions", gw.api_addr);
    for (i, stream) in [(0, true), (1, false)] {
        let r = client()
            .post(&url)
            .json(&chat(300, 10 + i, 6, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-kvgate-endpoint"],
            decode.to_string().as_str()
        );
        let body = r.text().await.unwrap();
        if stream {
            assert_eq!(events(&body).last().map(String::as_str), Some("[DONE]"));
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
            // A fresh prompt: no cache served any of it, whatever the decode pod counts.
            assert_eq!(
                v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
                "{v}"
            );
        }
    }
    let (pm, dm) = (metrics_of(prefill).await, metrics_of(decode).await);
    assert!(metric_sum(&pm, "vllm:prompt_tokens_total") > 600.0, "{pm}");
    assert_eq!(
        metric_sum(&dm, "vllm:generation_tokens_total"),
        12.0,
        "{dm}"
    );
    let gm = gw.control.metrics.encode();
    let line = "kvgate_gateway_pd_transfers_total{protocol=\"sglang-bootstrap\",outcome=\"ok\"} 2";
    assert!(gm.contains(line), "{line} missing from\n{gm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_prefill_pod_leaves_the_request_whole_on_its_decode_pod() {
    let f = pd_fleet(1, 1).await;
    let gw = gateway(&f, 1, PdProtocol::VllmNixl, PdDecider::Always).await;
    f.kill(0).await.unwrap();
    let url = format!("http://{}/v1/chat/completions", gw.api_addr);
    let r = client()
        .post(&url)
        .json(&chat(200, 2, 5, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-kvgate-endpoint"],
        f.engines[1].http_addr.to_string().as_str()
    );
    let body = r.text().await.unwrap();
    assert_eq!(events(&body).last().map(String::as_str), Some("[DONE]"));
    let gm = gw.control.metrics.encode();
    for line in [
        "kvgate_gateway_pd_decisions_total{phase=\"disaggregated\",reason=\"always_split\"} 1",
        "kvgate_gateway_pd_transfers_total{protocol=\"vllm-nixl\",outcome=\"connect\"} 1",
    ] {
        assert!(gm.contains(line), "{line} missing from\n{gm}");
    }
    // The decode pod computed the prompt itself.
    let dm = metrics_of(f.engines[1].http_addr).await;
    assert!(metric_sum(&dm, "vllm:prompt_tokens_total") > 200.0, "{dm}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_prefill_pod_is_retried_on_another() {
    // Two prefill pods, one failing everything with 500: every request still splits, through
    // the healthy one.
    let role = roles(2);
    let f = fleet_with(3, 20.0, move |i, e| {
        e.role = role(i);
        if i == 0 {
            e.faults.error_rate = 1.0;
            e.faults.error_status = 500;
        }
    })
    .await;
    let gw = gateway(&f, 2, PdProtocol::VllmNixl, PdDecider::Always).await;
    let url = format!("http://{}/v1/chat/completions", gw.api_addr);
    for i in 0..4 {
        let r = client()
            .post(&url)
            .json(&chat(150, 20 + i, 3, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let gm = gw.control.metrics.encode();
    let line = "kvgate_gateway_pd_transfers_total{protocol=\"vllm-nixl\",outcome=\"ok\"} 4";
    assert!(gm.contains(line), "{line} missing from\n{gm}");
    let healthy = metrics_of(f.engines[1].http_addr).await;
    assert_eq!(metric_sum(&healthy, "vllm:generation_tokens_total"), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_pod_failing_before_its_first_byte_is_retried_elsewhere_with_a_fresh_prefill() {
    // Two decode pods, one answering 500: every request ends on the healthy one, and a request
    // that went to the failing one first was prefilled twice.
    let role = roles(1);
    let f = fleet_with(3, 20.0, move |i, e| {
        e.role = role(i);
        if i == 1 {
            e.faults.error_rate = 1.0;
            e.faults.error_status = 500;
        }
    })
    .await;
    // The healthy pod is declared dearer, so ties go to the failing one and the first request
    // meets the failure whatever the timing (the core's tie-break toward cheaper hardware).
    let mut cfg = gateway_config(&f, 1, PdProtocol::VllmNixl, PdDecider::Always);
    cfg.endpoints[2].relative_cost = 2.0;
    let gw = start_gateway(cfg, f.engines.len()).await;
    let url = format!("http://{}/v1/chat/completions", gw.api_addr);
    let n = 6;
    for i in 0..n {
        let r = client()
            .post(&url)
            .json(&chat(150, 30 + i, 3, true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(
            r.headers()["x-kvgate-endpoint"],
            f.engines[2].http_addr.to_string().as_str()
        );
        r.bytes().await.unwrap();
    }
    let gm = gw.control.metrics.encode();
    let failed = metric_sum(
        &gm,
        "kvgate_gateway_pd_transfers_total{protocol=\"vllm-nixl\",outcome=\"decode_failed\"}",
    );
    assert!(
        failed >= 1.0,
        "the failing decode pod was never tried: {gm}"
    );
    let prefills = metric_sum(
        &metrics_of(f.engines[0].http_addr).await,
        "vllm:generation_tokens_total",
    );
    assert_eq!(
        prefills,
        n as f64 + failed,
        "one fresh prefill per decode retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_both_legs() {
    for protocol in [PdProtocol::VllmNixl, PdProtocol::SglangBootstrap] {
        // Real time: a 4,000-token generation takes tens of seconds on the decode pod.
        let role = roles(1);
        let f = fleet_with(2, 1.0, move |i, e| e.role = role(i)).await;
        let gw = gateway(&f, 1, protocol, PdDecider::Always).await;
        let url = format!("http://{}/v1/chat/completions", gw.api_addr);
        let mut r = client()
            .post(&url)
            .json(&chat(300, 40, 4_000, true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.chunk().await.unwrap().expect("a first chunk");
        drop(r);
        let fleet = &f;
        eventually(
            "both pods idle again",
            Duration::from_secs(10),
            || async move {
                let (p, d) = (fleet.stats(0).await.unwrap(), fleet.stats(1).await.unwrap());
                p.running + p.waiting + d.running + d.waiting == 0
            },
        )
        .await;
        let control = gw.control.clone();
        eventually("no booking left", Duration::from_secs(10), || {
            let c = control.clone();
            async move { c.in_flight() == 0 }
        })
        .await;
        let gm = gw.control.metrics.encode();
        assert!(
            metric_sum(&gm, "kvgate_gateway_client_cancellations_total") >= 1.0,
            "{protocol:?}: {gm}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transfer_is_retried_and_then_served_whole_before_the_client_sees_a_byte() {
    // Every KV read from the prefill pod fails: vLLM's decode pod answers 200 and then an error
    // event (kv_load_failure_policy: fail). The gateway must not pass that on.
    let role = roles(1);
    let f = fleet_with(2, 20.0, move |i, e| {
        e.role = role(i);
        if i == 0 {
            e.faults.transfer_failure_rate = 1.0;
        }
    })
    .await;
    let gw = gateway(&f, 1, PdProtocol::VllmNixl, PdDecider::Always).await;
    let url = format!("http://{}/v1/chat/completions", gw.api_addr);
    for stream in [true, false] {
        let r = client()
            .post(&url)
            .json(&chat(200, 50 + usize::from(stream), 4, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.text().await.unwrap();
        assert!(!body.contains("\"error\""), "{body}");
        if stream {
            assert_eq!(events(&body).last().map(String::as_str), Some("[DONE]"));
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
        }
    }
    let gm = gw.control.metrics.encode();
    // Each request: failed loads (an error event on a stream, a 500 otherwise) and fresh
    // prefills until the attempts run out, then the decode pod computes the prompt itself.
    let failed = metric_sum(
        &gm,
        "kvgate_gateway_pd_transfers_total{protocol=\"vllm-nixl\",outcome=\"transfer_failed\"}",
    ) + metric_sum(
        &gm,
        "kvgate_gateway_pd_transfers_total{protocol=\"vllm-nixl\",outcome=\"decode_failed\"}",
    );
    assert!(failed >= 2.0, "{gm}");
    assert_eq!(
        metric_sum(
            &gm,
            "kvgate_gateway_pd_transfers_total{protocol=\"vllm-nixl\",outcome=\"ok\"}"
        ),
        0.0
    );
    let dm = metrics_of(f.engines[1].http_addr).await;
    assert!(metric_sum(&dm, "vllm:prompt_tokens_total") > 400.0, "{dm}");
}
