//! Process-level tests of `kvgate serve`: a real gateway on loopback ephemeral ports in front of
//! `kvgate sim` engines started by each test, spoken to over real sockets.

use std::time::Duration;

#[path = "common/fleet.rs"]
mod common;

use common::{base_config, endpoint, endpoints_of, start_gateway};
use kvgate_engine::EngineConfig;
use kvgate_gateway::Gateway;
use kvgate_runtime::config::{DataPlaneConfig, Limits, Overrides};
use kvgate_sim::{FaultConfig, Fleet, FleetConfig, start_fleet};
use kvgate_testkit::{MODEL, chat, client, eventually, fleet, fleet_with, metric_sum};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn gateway(cfg: DataPlaneConfig) -> Gateway {
    let want = cfg.endpoints.iter().filter(|e| e.models.is_empty()).count();
    start_gateway(cfg, want).await
}

fn url(gw: &Gateway, path: &str) -> String {
    format!("http://{}{path}", gw.api_addr)
}

async fn admin_metrics(gw: &Gateway) -> String {
    client()
        .get(format!("http://{}/metrics", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn non_streaming_round_trips_and_health() {
    let f = fleet(2, 50.0).await;
    let gw = gateway(base_config(endpoints_of(&f, false))).await;
    let c = client();
    let r = c
        .post(url(&gw, "/v1/chat/completions"))
        .json(&chat("hello there", 8, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-kvgate-endpoint"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    let r = c
        .post(url(&gw, "/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "once upon a time", "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let models: Value = c
        .get(url(&gw, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec![MODEL], "two engines, one model: listed once");
    for path in ["/health", "/ready"] {
        assert_eq!(c.get(url(&gw, path)).send().await.unwrap().status(), 200);
        let admin = format!("http://{}{path}", gw.admin_addr);
        assert_eq!(c.get(admin).send().await.unwrap().status(), 200);
    }
    let first = f.engines[0].http_addr.to_string();
    let ids = gw.control.endpoint_ids([first.as_str(), "10.9.9.9:1"]);
    assert_eq!(ids.len(), 1, "unknown addresses are skipped");
    assert_eq!(
        gw.control.address_of(ids[0]).as_deref(),
        Some(first.as_str())
    );
    let m = admin_metrics(&gw).await;
    assert!(
        m.contains(r#"kvgate_gateway_requests_total{api="chat",status="200"} 1"#),
        "{m}"
    );
    assert!(m.contains("kvgate_gateway_decisions_total{"), "{m}");
    eventually("signal ages exported", Duration::from_secs(5), || {
        let gw = &gw;
        async move {
            admin_metrics(gw)
                .await
                .contains(r#"kvgate_gateway_signal_age_seconds{endpoint="#)
        }
    })
    .await;
}

/// Streams `body` directly from one fresh engine and through a gateway in front of an identical
/// fresh engine; returns the stream once both agree (or panics), with the gateway and its engine.
async fn stream_direct_and_through_gateway(body: &Value) -> (String, Gateway, Fleet) {
    let c = client();
    // Two identical fresh single-engine fleets: the same request gets the same id and tokens on
    // both, so the gateway's stream (from one) must equal a direct stream (from the other).
    // `created` is in whole seconds; a second boundary between the two requests is retried.
    let direct_fleet = fleet(1, 50.0).await;
    let gw_fleet = fleet(1, 50.0).await;
    let gw = gateway(base_config(endpoints_of(&gw_fleet, false))).await;
    let mut last = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let direct = c
            .post(format!(
                "http://{}/v1/chat/completions",
                direct_fleet.engines[0].http_addr
            ))
            .json(body)
            .send()
            .await
            .unwrap();
        let direct = direct.bytes().await.unwrap().to_vec();
        let mut r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        let mut through = Vec::new();
        let mut frames = 0;
        while let Some(chunk) = r.chunk().await.unwrap() {
            frames += 1;
            through.extend_from_slice(&chunk);
        }
        assert!(frames > 1, "relayed as it streams, not in one buffer");
        if direct == through {
            return (String::from_utf8(through).unwrap(), gw, gw_fleet);
        }
        last = (direct, through);
    }
    panic!(
        "streams differ:\ndirect:  {}\ngateway: {}",
        String::from_utf8_lossy(&last.0),
        String::from_utf8_lossy(&last.1)
    );
}

#[tokio::test]
async fn streaming_is_byte_for_byte_the_engine_stream() {
    let (text, gw, _engines) =
        stream_direct_and_through_gateway(&chat("tell me a story about routers", 24, true)).await;
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(
        text.contains(r#""cached_tokens""#),
        "the client asked for usage and got it"
    );
    let m = admin_metrics(&gw).await;
    assert!(
        metric_sum(&m, "kvgate_gateway_ttft_seconds_count") >= 1.0,
        "{m}"
    );
    assert!(
        metric_sum(&m, "kvgate_gateway_tpot_seconds_count") >= 1.0,
        "{m}"
    );
    assert!(
        metric_sum(&m, "kvgate_gateway_prompt_tokens_total") > 0.0,
        "{m}"
    );
}

#[tokio::test]
async fn usage_requested_by_the_gateway_is_stripped_for_clients_that_did_not_ask() {
    let mut body = chat("tell me a story about routers", 24, true);
    body.as_object_mut().unwrap().remove("stream_options");
    let (text, gw, _engines) = stream_direct_and_through_gateway(&body).await;
    assert!(!text.contains(r#""usage""#), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    // ...while the gateway still learnt the usage figures from the engine.
    let m = admin_metrics(&gw).await;
    assert!(
        metric_sum(&m, "kvgate_gateway_prompt_tokens_total") > 0.0,
        "{m}"
    );
    assert!(
        metric_sum(&m, "kvgate_gateway_tpot_seconds_count") >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn repeated_long_prefix_lands_on_the_pod_that_holds_it() {
    let f = fleet(4, 50.0).await;
    let gw = gateway(base_config(endpoints_of(&f, true))).await;
    let c = client();
    let prefix: String = (0..1500)
        .map(|i| format!(" w{}", i * 7919 % 100_003))
        .collect();
    let ask = |suffix: &str| chat(&format!("{prefix} {suffix}"), 4, false);
    let first = c
        .post(url(&gw, "/v1/chat/completions"))
        .json(&ask("first"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let holder = first.headers()["x-kvgate-endpoint"]
        .to_str()
        .unwrap()
        .to_owned();
    first.bytes().await.unwrap();
    for i in 0..6 {
        let r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(&ask(&format!("follow-up {i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-kvgate-endpoint"].to_str().unwrap(),
            holder,
            "request {i}"
        );
        let v: Value = r.json().await.unwrap();
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(
            cached >= 1000,
            "the prefix was served from cache, got {cached} cached tokens"
        );
    }
    let m = admin_metrics(&gw).await;
    assert!(m.contains(r#"reason="prefix_hit""#), "{m}");
}

#[tokio::test]
async fn lora_adapter_routes_only_to_endpoints_serving_it() {
    let plain = fleet(2, 50.0).await;
    let mut cfg = FleetConfig::homogeneous(1, EngineConfig::h100());
    cfg.time_scale = 50.0;
    cfg.lora_adapters = vec!["sql-lora".into()];
    let lora = start_fleet(cfg).await.unwrap();
    let mut eps = endpoints_of(&plain, false);
    eps.extend(endpoints_of(&lora, false));
    let gw = gateway(base_config(eps)).await;
    let c = client();
    let want = lora.engines[0].http_addr.to_string();
    for i in 0..6 {
        let mut body = chat(&format!("select {i}"), 2, false);
        body["model"] = json!("sql-lora");
        let r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-kvgate-endpoint"].to_str().unwrap(), want);
    }
}

#[tokio::test]
async fn refused_and_failing_endpoints_are_retried_without_losing_requests() {
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let f = fleet_with(2, 50.0, |i, e| {
        if i == 0 {
            e.faults = FaultConfig {
                error_rate: 1.0,
                error_status: 500,
                ..FaultConfig::default()
            };
        }
    })
    .await;
    let mut eps = vec![endpoint(refused)];
    eps[0].models = vec![MODEL.into()];
    eps.extend(endpoints_of(&f, false));
    let gw = gateway(base_config(eps)).await;
    let c = client();
    let good = f.engines[1].http_addr.to_string();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let c = c.clone();
        let u = url(&gw, "/v1/chat/completions");
        let stream = i % 2 == 0;
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(u)
                .json(&chat(&format!("q{i}"), 3, stream))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let ep = r.headers()["x-kvgate-endpoint"]
                .to_str()
                .unwrap()
                .to_owned();
            r.bytes().await.unwrap();
            (status, ep)
        }));
    }
    for t in tasks {
        let (status, ep) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(ep, good);
    }
    let m = admin_metrics(&gw).await;
    assert!(metric_sum(&m, "kvgate_gateway_retries_total") >= 1.0, "{m}");
    assert!(
        m.contains(r#"kind="connect""#) || m.contains(r#"kind="status_5xx""#),
        "{m}"
    );
}

#[tokio::test]
async fn engine_killed_mid_stream_gets_an_error_event_and_a_clean_end() {
    let f = fleet(2, 1.0).await;
    let gw = gateway(base_config(endpoints_of(&f, false))).await;
    let mut r = client()
        .post(url(&gw, "/v1/chat/completions"))
        .json(&chat("a long answer please", 5000, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ep = r.headers()["x-kvgate-endpoint"]
        .to_str()
        .unwrap()
        .to_owned();
    let victim = f
        .engines
        .iter()
        .position(|e| e.http_addr.to_string() == ep)
        .unwrap();
    let mut body = r.chunk().await.unwrap().unwrap().to_vec();
    f.kill(victim).await.unwrap();
    while let Some(chunk) = r
        .chunk()
        .await
        .expect("the stream ends cleanly, not with a transport error")
    {
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains(r#"data: {"error":"#), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let m = admin_metrics(&gw).await;
    assert!(m.contains(r#"kind="mid_stream""#), "{m}");
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let f = fleet(1, 1.0).await;
    let gw = gateway(base_config(endpoints_of(&f, false))).await;
    let mut r = client()
        .post(url(&gw, "/v1/chat/completions"))
        .json(&chat("keep talking", 5000, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.chunk().await.unwrap().unwrap();
    assert_eq!(f.stats(0).await.unwrap().running, 1);
    drop(r);
    eventually("engine stops decoding", Duration::from_secs(5), || {
        let f = &f;
        async move { f.stats(0).await.unwrap().running == 0 }
    })
    .await;
    assert_eq!(f.stats(0).await.unwrap().finished_abort, 1);
    let m = admin_metrics(&gw).await;
    assert!(
        metric_sum(&m, "kvgate_gateway_client_cancellations_total") >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn client_disconnect_before_the_response_head_cancels_too() {
    let f = fleet(1, 1.0).await;
    let gw = gateway(base_config(endpoints_of(&f, false))).await;
    // Non-streaming: the engine answers only when done, so the client gives up while the
    // gateway is still waiting for the response head.
    let c = client();
    let u = url(&gw, "/v1/chat/completions");
    let pending = tokio::spawn(async move {
        c.post(u)
            .json(&chat("think hard", 5000, false))
            .send()
            .await
    });
    eventually("engine running the request", Duration::from_secs(5), || {
        let f = &f;
        async move { f.stats(0).await.unwrap().running == 1 }
    })
    .await;
    pending.abort();
    eventually("engine stops decoding", Duration::from_secs(5), || {
        let f = &f;
        async move { f.stats(0).await.unwrap().running == 0 }
    })
    .await;
    assert_eq!(f.stats(0).await.unwrap().finished_abort, 1);
}

/// Sends one complete chat request on a raw socket, then shuts down the sending side, as
/// `printf ... | nc` does; returns what the gateway wrote back before closing.
async fn half_closed_request(gw: &Gateway) -> String {
    let body = serde_json::to_string(&chat("half close", 4, false)).unwrap();
    let mut sock = tokio::net::TcpStream::connect(gw.api_addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    sock.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out))
        .await
        .expect("the gateway closes the connection")
        .unwrap_or_default();
    String::from_utf8_lossy(&out).into_owned()
}

/// Regression (issue 10.13): a client that half-closed after a full request got no response.
/// Serving it is opt-in (`--client-half-close`): by default a client's end of input cancels
/// its request at once (see `client_disconnect_before_the_response_head_cancels_too`).
#[tokio::test]
async fn half_closing_client_gets_its_response_with_client_half_close() {
    let f = fleet(1, 1.0).await;
    let mut cfg = base_config(endpoints_of(&f, false));
    cfg.limits.client_half_close = true;
    let gw = gateway(cfg).await;
    let answer = half_closed_request(&gw).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("chat.completion"), "{answer}");

    // The default cancels the half-closed request instead of answering it.
    let f = fleet(1, 1.0).await;
    let gw = gateway(base_config(endpoints_of(&f, false))).await;
    let answer = half_closed_request(&gw).await;
    assert!(!answer.contains("chat.completion"), "{answer}");
}

async fn status_and_error(resp: reqwest::Response) -> (u16, Value) {
    let s = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (s, v)
}

#[tokio::test]
async fn bad_inputs_get_openai_errors_with_the_right_status() {
    let f = fleet(2, 50.0).await;
    let mut eps = endpoints_of(&f, false);
    // An endpoint that serves a model only as a prefill pod: the model is known, nobody is
    // eligible for an aggregated request → 503. It is reachable (a live engine), so a model
    // nobody lists is a plain 404.
    let mut prefill = eps.pop().unwrap();
    prefill.models = vec!["prefill-only".into()];
    prefill.role = kvgate_core::Role::Prefill;
    eps.push(prefill);
    let mut cfg = base_config(eps);
    cfg.limits.max_body_bytes = 64 * 1024;
    let gw = gateway(cfg).await;
    let c = client();
    let post = |path: &str, body: String| {
        c.post(url(&gw, path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, None),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}]}"#.into(),
            400,
            Some("model"),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model":"{MODEL}"}}"#),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model":"{MODEL}","messages":"x"}}"#),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":7,"messages":[]}"#.into(),
            400,
            Some("model"),
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"{MODEL}"}}"#),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"{MODEL}","prompt":"x","max_tokens":"many"}}"#),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/embeddings",
            format!(r#"{{"model":"{MODEL}"}}"#),
            400,
            Some("input"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.into(),
            404,
            Some("model"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"prefill-only","messages":[{"role":"user","content":"x"}]}"#.into(),
            503,
            None,
        ),
        (
            "/v1/completions",
            format!(
                r#"{{"model":"{MODEL}","prompt":"{}"}}"#,
                "a".repeat(100 * 1024)
            ),
            413,
            None,
        ),
    ];
    for (path, body, want, param) in cases {
        let (status, v) = status_and_error(post(path, body.clone()).await.unwrap()).await;
        let shown = &body[..body.len().min(80)];
        assert_eq!(status, want, "{path} {shown}: {v}");
        assert_eq!(v["error"]["code"], want, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{path} {shown}");
        }
    }
    // Routing headers from clients are ignored: only configured endpoints are ever used.
    let r = c
        .post(url(&gw, "/v1/chat/completions"))
        .header("x-gateway-destination-endpoint", "127.0.0.1:1")
        .json(&chat("hi", 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-kvgate-endpoint"].to_str().unwrap(),
        f.engines[0].http_addr.to_string()
    );
}

#[tokio::test]
async fn sheddable_requests_get_429_when_the_pool_is_saturated() {
    let f = fleet_with(1, 1.0, |_, e| e.engine.max_num_seqs = 1).await;
    let mut cfg = base_config(endpoints_of(&f, false));
    cfg.objectives.insert("batch".into(), -1);
    let gw = gateway(cfg).await;
    let c = client();
    let mut held = Vec::new();
    for i in 0..7 {
        let r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(&chat(&format!("long {i}"), 5000, true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    eventually(
        "engine queue seen as saturated",
        Duration::from_secs(5),
        || {
            let f = &f;
            async move { f.stats(0).await.unwrap().waiting >= 6 }
        },
    )
    .await;
    // llm-d's twin of the header is read as well.
    for (header, objective) in [
        ("x-gateway-inference-objective", "batch"),
        ("x-gateway-inference-objective", "-1"),
        ("x-llm-d-inference-objective", "-1"),
    ] {
        let resp = c
            .post(url(&gw, "/v1/chat/completions"))
            .header(header, objective)
            .json(&chat("can wait", 2, false))
            .send()
            .await
            .unwrap();
        // Shed requests are told when to come back (issue 14.6).
        let retry_after = resp.headers().get("retry-after").cloned();
        let (status, v) = status_and_error(resp).await;
        assert_eq!(status, 429, "{objective}: {v}");
        assert_eq!(retry_after.as_ref().map(|h| h.to_str().unwrap()), Some("1"));
        assert_eq!(v["error"]["code"], 429);
    }
    drop(held);
}

// Paused time: the timeouts are the defaults (seconds), and no test waits for them.
#[tokio::test(start_paused = true)]
async fn slowloris_headers_time_out() {
    let gw = gateway(base_config(Vec::new())).await;
    let header_timeout = Duration::from_millis(Limits::default().header_read_timeout_ms);
    let mut sock = tokio::net::TcpStream::connect(gw.api_addr).await.unwrap();
    sock.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    // The server must close the connection (read returns EOF, possibly after a 408) on its own.
    let closed = tokio::time::timeout(header_timeout * 2, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "connection still open after twice the header timeout"
    );
    assert!(
        started.elapsed() >= header_timeout,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn config_file_changes_add_and_drain_endpoints() {
    let a = fleet(1, 50.0).await;
    let b = fleet(1, 50.0).await;
    let (a_addr, b_addr) = (
        a.engines[0].http_addr.to_string(),
        b.engines[0].http_addr.to_string(),
    );
    let path =
        std::env::temp_dir().join(format!("kvgate-gateway-reload-{}.yaml", std::process::id()));
    let write = |addrs: &[&str]| {
        let list: Vec<String> = addrs
            .iter()
            .map(|a| format!("  - url: http://{a}\n"))
            .collect();
        std::fs::write(
            &path,
            format!(
                "host: 127.0.0.1\nport: 0\nadmin_port: 0\nendpoints:\n{}",
                list.concat()
            ),
        )
        .unwrap();
    };
    write(&[&a_addr]);
    let cfg = DataPlaneConfig::load(Some(&path), &Overrides::default()).unwrap();
    let gw = gateway(cfg).await;
    assert_eq!(gw.control.endpoint_addresses(), vec![a_addr.clone()]);
    // Make sure the new file gets a newer modification time than the first on coarse clocks.
    tokio::time::sleep(Duration::from_millis(20)).await;
    write(&[&b_addr]);
    let control = gw.control.clone();
    eventually(
        "reload swaps the endpoints",
        Duration::from_secs(10),
        || {
            let c = control.clone();
            let b = b_addr.clone();
            async move { c.endpoint_addresses() == vec![b] && c.ready_endpoints() == 1 }
        },
    )
    .await;
    let r = client()
        .post(url(&gw, "/v1/chat/completions"))
        .json(&chat("hi", 2, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-kvgate-endpoint"].to_str().unwrap(), b_addr);
    r.bytes().await.unwrap();
    // The removed endpoint can come back.
    tokio::time::sleep(Duration::from_millis(20)).await;
    write(&[&a_addr, &b_addr]);
    let control = gw.control.clone();
    eventually(
        "reload re-adds the first endpoint",
        Duration::from_secs(10),
        || {
            let c = control.clone();
            async move { c.ready_endpoints() == 2 }
        },
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let r = client()
            .post(url(&gw, "/v1/chat/completions"))
            .json(&chat(&format!("spread {i}"), 2, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        seen.insert(
            r.headers()["x-kvgate-endpoint"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both endpoints serve after the reload");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn kv_events_steer_requests_to_a_pod_warmed_behind_the_gateways_back() {
    let f = fleet(3, 50.0).await;
    let gw = gateway(base_config(endpoints_of(&f, true))).await;
    let c = client();
    // Each round warms one engine directly with a fresh prefix: only that engine's KV events can
    // tell the gateway where the prefix is, so a lucky guess passes a round with p = 1/3 and all
    // six rounds with p < 0.2%.
    for round in 0..6usize {
        let prefix: String = (0..1200)
            .map(|i| format!(" r{round}k{}", i * 104_729 % 99_991))
            .collect();
        let ask = |suffix: &str| chat(&format!("{prefix} {suffix}"), 2, false);
        let warm = f.engines[round % 3].http_addr.to_string();
        let r = c
            .post(format!("http://{warm}/v1/chat/completions"))
            .json(&ask("direct"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let control = gw.control.clone();
        let w = warm.clone();
        let want_blocks = 64 * (round / 3 + 1);
        eventually(
            "precise blocks indexed from KV events",
            Duration::from_secs(5),
            || {
                let control = control.clone();
                let w = w.clone();
                async move {
                    control.with_router(|r| {
                        r.endpoints().any(|v| {
                            v.address == w && v.events_trusted && v.precise_blocks >= want_blocks
                        })
                    })
                }
            },
        )
        .await;
        let r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(&ask("via gateway"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-kvgate-endpoint"].to_str().unwrap(),
            warm,
            "round {round}"
        );
        r.bytes().await.unwrap();
    }
}

/// Waits until the gateway's one endpoint is scraped every `seconds`.
async fn scrape_interval_reaches(gw: &Gateway, seconds: f64, within: Duration) {
    eventually(
        &format!("a {seconds} s scrape interval"),
        within,
        || async {
            let m = admin_metrics(gw).await;
            (metric_sum(&m, "kvgate_gateway_scrape_interval_seconds") - seconds).abs() < 1e-9
        },
    )
    .await;
}

/// Scrapes slow down while an engine holds only this gateway's requests, and come back to the
/// base interval as soon as a sample shows work the gateway did not send (a client talking to
/// the engine directly), counted at the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_slow_down_while_the_gateway_sent_everything_and_not_otherwise() {
    let f = fleet(1, 1.0).await;
    let engine = 0;
    let mut cfg = base_config(endpoints_of(&f, false));
    cfg.scrape_max_interval_ms = 800;
    let gw = gateway(cfg).await;
    let c = client();
    // This gateway's own traffic, one short request after another, all along.
    let stop = tokio_util::sync::CancellationToken::new();
    let own = {
        let (c, u, stop) = (c.clone(), url(&gw, "/v1/chat/completions"), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.is_cancelled() {
                let r = c.post(&u).json(&chat(&format!("own {n}"), 2, false)).send();
                assert_eq!(r.await.unwrap().status(), 200);
                n += 1;
            }
            n
        })
    };
    scrape_interval_reaches(&gw, 0.8, Duration::from_secs(10)).await;
    let before = f.metrics_requests(engine).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slow = f.metrics_requests(engine).unwrap() - before;
    assert!(
        slow <= 6,
        "{slow} scrapes in 2 s at an 800 ms interval (40 at the 50 ms base)"
    );
    // Another client's long request, straight to the engine.
    let foreign = {
        let (c, addr) = (c.clone(), f.engines[engine].http_addr);
        tokio::spawn(async move {
            let r = c
                .post(format!("http://{addr}/v1/chat/completions"))
                .json(&chat("foreign", 800, true))
                .send()
                .await
                .unwrap();
            r.bytes().await.unwrap();
        })
    };
    scrape_interval_reaches(&gw, 0.05, Duration::from_secs(5)).await;
    let before = f.metrics_requests(engine).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fast = f.metrics_requests(engine).unwrap() - before;
    assert!(
        fast >= 10,
        "{fast} scrapes in 1 s while another client's request runs (20 at the 50 ms base)"
    );
    foreign.await.unwrap();
    scrape_interval_reaches(&gw, 0.8, Duration::from_secs(10)).await;
    // Each scrape asked the (vLLM-speaking) engine for only the samples the router reads.
    let whole = c
        .get(format!("http://{}/metrics", f.engines[engine].http_addr))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len() as f64;
    let read = metric_sum(
        &admin_metrics(&gw).await,
        "kvgate_gateway_scrape_body_bytes",
    );
    assert!(
        read > 0.0 && read * 3.0 < whole,
        "the page read was {read} bytes, the whole page {whole}"
    );
    stop.cancel();
    assert!(own.await.unwrap() > 0);
}

/// `--tokenizer engine`: with no local tokenizer, each prompt's tokens come from an engine's
/// `/tokenize`, and they key to the blocks the engines publish: a prefix warmed on one engine
/// behind the gateway's back is found there (a lucky guess passes all rounds with p < 4%).
#[tokio::test]
async fn engine_mode_tokens_key_the_engines_blocks() {
    let f = fleet(3, 50.0).await;
    let mut cfg = base_config(endpoints_of(&f, true));
    cfg.model_dir = Some(kvgate_runtime::tokenize::ENGINE_MODE.into());
    let gw = gateway(cfg).await;
    assert!(gw.control.tokenizes_remotely());
    let c = client();
    for round in 0..3usize {
        let prefix: String = (0..1200)
            .map(|i| format!(" e{round}k{}", i * 104_729 % 99_991))
            .collect();
        let ask = |suffix: &str| chat(&format!("{prefix} {suffix}"), 2, false);
        let warm = f.engines[round].http_addr.to_string();
        let r = c
            .post(format!("http://{warm}/v1/chat/completions"))
            .json(&ask("direct"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let control = gw.control.clone();
        let w = warm.clone();
        eventually("the warmed blocks indexed", Duration::from_secs(5), || {
            let control = control.clone();
            let w = w.clone();
            async move {
                control.with_router(|r| {
                    r.endpoints()
                        .any(|v| v.address == w && v.events_trusted && v.precise_blocks >= 64)
                })
            }
        })
        .await;
        let r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(&ask("via gateway"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-kvgate-endpoint"].to_str().unwrap(),
            warm,
            "round {round}"
        );
        r.bytes().await.unwrap();
    }
    let m = admin_metrics(&gw).await;
    assert!(
        metric_sum(&m, "kvgate_gateway_decisions_total{") >= 3.0
            && m.contains("reason=\"prefix_hit\""),
        "{m}"
    );
}

/// A minimal OpenAI-shaped upstream that reports back exactly what it received, to check what
/// the gateway forwards for the pass-through APIs.
async fn recording_upstream() -> String {
    use axum::http::HeaderMap;
    async fn echo(
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::Json<Value> {
        let names: Vec<String> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        axum::Json(json!({
            "path": uri.path(),
            "headers": names,
            "body": String::from_utf8_lossy(&body),
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        }))
    }
    let app = axum::Router::new()
        .route("/v1/embeddings", axum::routing::post(echo))
        .route("/v1/responses", axum::routing::post(echo));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

#[tokio::test]
async fn embeddings_and_responses_pass_through_untouched() {
    let upstream = recording_upstream().await;
    let mut ep = endpoint(upstream.clone());
    ep.models = vec!["embedder".into()];
    let gw = gateway(base_config(vec![ep])).await;
    let c = client();
    for (path, body) in [
        (
            "/v1/embeddings",
            r#"{"model":"embedder",  "input":["a b c", "d"], "encoding_format":"float"}"#,
        ),
        (
            "/v1/responses",
            r#"{"model":"embedder","instructions":"be brief","input":"hi","stream":false}"#,
        ),
    ] {
        let r = c
            .post(url(&gw, path))
            .header("content-type", "application/json")
            .header("authorization", "Bearer k")
            .header("x-gateway-destination-endpoint", "10.0.0.1:80")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["x-kvgate-endpoint"].to_str().unwrap(), upstream);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["path"], path);
        assert_eq!(v["body"], body, "body forwarded byte for byte");
        let headers: Vec<&str> = v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(headers.contains(&"authorization"), "{headers:?}");
        assert!(
            !headers.contains(&"x-gateway-destination-endpoint"),
            "{headers:?}"
        );
    }
}

#[tokio::test]
async fn an_endpoint_whose_metrics_fail_is_still_discovered_and_served() {
    let f = fleet_with(1, 50.0, |_, e| e.faults.metrics_unavailable = true).await;
    let gw = gateway(base_config(endpoints_of(&f, false))).await;
    let c = client();
    for _ in 0..3 {
        let r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(&chat("hi", 2, false))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "served on its stale (absent) signals rather than dropped"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn idle_keep_alive_connections_are_closed() {
    let gw = gateway(base_config(Vec::new())).await;
    let idle_timeout = Duration::from_millis(Limits::default().idle_timeout_ms);
    let mut sock = tokio::net::TcpStream::connect(gw.api_addr).await.unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = sock.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let idle_since = tokio::time::Instant::now();
    let closed = tokio::time::timeout(idle_timeout * 2, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "idle connection still open after twice the idle timeout"
    );
    assert!(
        idle_since.elapsed() >= idle_timeout,
        "{:?}",
        idle_since.elapsed()
    );
}

/// A log sink the access-log test reads back.
#[derive(Clone, Default)]
struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    /// Captures this thread's INFO logs as JSON lines until the guard drops.
    fn capture() -> (LogBuf, tracing::subscriber::DefaultGuard) {
        let buf = LogBuf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || sink.clone())
            .finish();
        (buf, tracing::subscriber::set_default(subscriber))
    }

    fn access_lines(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "kvgate::access")
            .collect()
    }
}

/// Issue 14.7: with `--access-log`, every request gets exactly one line: a routed one when its
/// booking ends (with its endpoint), and one answered before routing (unknown model, bad body,
/// unknown path) or passed through, by the API layer. (Current-thread runtime: the gateway's
/// tasks log on the test's thread, where the capturing subscriber is installed.)
#[tokio::test]
async fn access_log_has_one_line_per_request_routed_or_not() {
    let (buf, _guard) = LogBuf::capture();
    let f = fleet(1, 50.0).await;
    let mut cfg = base_config(endpoints_of(&f, false));
    cfg.logs.access_log = true;
    let gw = gateway(cfg).await;
    let c = client();
    let post = |path: &str, body: String| {
        c.post(url(&gw, path))
            .header("content-type", "application/json")
            .header("x-request-id", format!("t-{path}"))
            .body(body)
            .send()
    };
    let routed = post("/v1/chat/completions", chat("hello", 2, false).to_string())
        .await
        .unwrap();
    assert_eq!(routed.status(), 200);
    routed.bytes().await.unwrap();
    let unknown = json!({"model": "no-such-model", "prompt": "hello", "max_tokens": 2});
    let unknown = post("/v1/completions", unknown.to_string()).await.unwrap();
    assert_eq!(unknown.status(), 404);
    let bad = post("/v1/embeddings", "{not json".into()).await.unwrap();
    assert_eq!(bad.status(), 400);
    let nowhere = c.get(url(&gw, "/nowhere")).send().await.unwrap();
    assert_eq!(nowhere.status(), 404);
    let tokenized = post(
        "/tokenize",
        json!({"model": MODEL, "prompt": "hi"}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(tokenized.status(), 200);
    eventually("five access-log lines", Duration::from_secs(5), || {
        let n = buf.access_lines().len();
        async move { n >= 5 }
    })
    .await;
    let lines = buf.access_lines();
    let by_path =
        |p: &str| -> Vec<&Value> { lines.iter().filter(|l| l["fields"]["path"] == p).collect() };
    for (path, status) in [
        ("/v1/chat/completions", 200),
        ("/v1/completions", 404),
        ("/v1/embeddings", 400),
        ("/nowhere", 404),
        ("/tokenize", 200),
    ] {
        let got = by_path(path);
        assert_eq!(got.len(), 1, "one line for {path}: {lines:?}");
        assert_eq!(got[0]["fields"]["status"], status, "{path}: {:?}", got[0]);
    }
    let chat_line = &by_path("/v1/chat/completions")[0]["fields"];
    assert_eq!(chat_line["endpoint"], f.engines[0].http_addr.to_string());
    assert_eq!(chat_line["request_id"], "t-/v1/chat/completions");
    assert_eq!(
        by_path("/v1/embeddings")[0]["fields"]["request_id"],
        "t-/v1/embeddings"
    );
    assert_eq!(
        by_path("/tokenize")[0]["fields"]["endpoint"],
        f.engines[0].http_addr.to_string()
    );
    assert_eq!(lines.len(), 5, "exactly one line per request: {lines:?}");
}

/// Review finding: a request whose client went away before the response head (here, while a
/// pass-through waits for an engine that never answers) got no access line: the middleware's
/// future was dropped. It gets one, status 499 (`cancelled`).
#[tokio::test]
async fn access_log_has_a_line_for_a_client_that_left_before_the_answer() {
    let (buf, _guard) = LogBuf::capture();
    // An engine that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            socks.push(s);
        }
    });
    let mut ep = endpoint(address.to_string());
    ep.models = vec![MODEL.to_owned()];
    let mut cfg = base_config(vec![ep]);
    cfg.logs.access_log = true;
    let gw = gateway(cfg).await;
    let mut sock = tokio::net::TcpStream::connect(gw.api_addr).await.unwrap();
    let body = json!({"model": MODEL, "prompt": "hi"}).to_string();
    let head = format!(
        "POST /tokenize HTTP/1.1\r\nHost: kvgate\r\nx-request-id: gone-1\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    // The pass-through is waiting for the silent engine when the client closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(sock);
    eventually(
        "an access line for the request",
        Duration::from_secs(5),
        || {
            let n = buf.access_lines().len();
            async move { n >= 1 }
        },
    )
    .await;
    let lines = buf.access_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0]["fields"];
    assert_eq!(l["status"], 499, "{l}");
    assert_eq!(l["result"], "cancelled");
    assert_eq!(l["request_id"], "gone-1");
    held.abort();
}

/// Issue 16.2: each streamed request served where it was booked compares the TTFT its decision
/// predicted with the one measured; the relative error is exported per endpoint (non-streamed
/// responses have no first token apart from the whole answer, so they are not counted).
#[tokio::test]
async fn ttft_prediction_error_is_exported_for_streams() {
    let f = fleet(1, 50.0).await;
    let gw = gateway(base_config(endpoints_of(&f, false))).await;
    let c = client();
    for (i, stream) in [true, true, false, true].into_iter().enumerate() {
        let r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(&chat(&format!("question {i}"), 3, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let m = admin_metrics(&gw).await;
    let ep = f.engines[0].http_addr.to_string();
    let count = metric_sum(
        &m,
        &format!("kvgate_gateway_ttft_prediction_error_ratio_count{{endpoint=\"{ep}\"}}"),
    );
    assert_eq!(count, 3.0, "{m}");
    let sum = metric_sum(
        &m,
        &format!("kvgate_gateway_ttft_prediction_error_ratio_sum{{endpoint=\"{ep}\"}}"),
    );
    assert!(sum.is_finite() && sum > 0.0, "{m}");
}

/// Review finding: the record writers were detached threads, so receipts and the captured
/// trace's tail still queued when the process exited were lost. The trace writer holds records
/// back behind the oldest request in flight (arrival order); here a long stream is in flight
/// when the drain cuts it, so the records behind it are still held when the drain ends. The
/// drain now writes them out before it returns.
#[tokio::test]
async fn drain_writes_out_every_queued_record() {
    // Real-time engines: the long stream takes seconds, the short requests milliseconds.
    let f = fleet(2, 1.0).await;
    let dir = std::env::temp_dir().join(format!("kvgate-records-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (receipts, trace) = (dir.join("decisions.jsonl"), dir.join("trace.jsonl"));
    for p in [&receipts, &trace] {
        let _ = std::fs::remove_file(p);
    }
    let mut cfg = base_config(endpoints_of(&f, false));
    cfg.logs.decision_log = Some(receipts.clone());
    cfg.logs.capture_trace = Some(trace.clone());
    cfg.shutdown.accept_grace_ms = 0;
    cfg.shutdown.drain_timeout_ms = 200;
    let gw = gateway(cfg).await;
    let c = client();
    let long = {
        let (c, u) = (c.clone(), url(&gw, "/v1/chat/completions"));
        tokio::spawn(async move {
            let r = c.post(u).json(&chat("a long one", 3000, true)).send().await;
            if let Ok(r) = r {
                let _ = r.bytes().await;
            }
        })
    };
    let control = gw.control.clone();
    eventually(
        "the long stream is in flight",
        Duration::from_secs(5),
        || {
            let c = control.clone();
            async move { c.in_flight() > 0 }
        },
    )
    .await;
    let n = 6;
    for i in 0..n {
        let r = c
            .post(url(&gw, "/v1/chat/completions"))
            .json(&chat(&format!("request {i}"), 2, true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    gw.drain("test").await;
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(
        lines(&trace),
        n,
        "the held trace lines are written before the drain ends"
    );
    assert_eq!(
        lines(&receipts),
        n + 1,
        "a receipt for each, the cut stream's too"
    );
    long.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
