//! Prefill/decode disaggregation between two simulated fleets over real loopback sockets: the
//! vLLM NixlConnector flow (prefill leg, then decode leg with its `kv_transfer_params`), the
//! SGLang bootstrap flow (both legs at once), the decode engine's KV events over real ZeroMQ,
//! metrics per role, and each fault: a failing prefill pod, a failing transfer, a dying decode
//! pod.

mod common;

use std::sync::{Arc, Mutex};

use common::{SseData, client, eventually, fleet, parse_sse};
use kvgate_engine::KvLoadFailurePolicy;
use kvgate_sim::{Fleet, FleetConfig, Role};
use serde_json::{Value, json};

/// A chat prompt of a few hundred tokens (many 16-token blocks).
fn messages(topic: &str) -> Value {
    let text: String = (0..60).map(|i| format!("{topic} fact {i}. ")).collect();
    json!([{"role": "user", "content": text}])
}

async fn role_fleet(role: Role, tweak: impl FnOnce(&mut FleetConfig)) -> Fleet {
    fleet(1, |c| {
        c.engines[0].role = role;
        tweak(c);
    })
    .await
}

fn url(f: &Fleet, path: &str) -> String {
    format!("http://{}{path}", f.engines[0].http_addr)
}

/// The prefill leg vLLM's proxies send.
fn prefill_leg(topic: &str) -> Value {
    json!({
        "messages": messages(topic),
        "max_tokens": 1,
        "stream": false,
        "kv_transfer_params": {
            "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null,
        },
    })
}

async fn post(url: String, body: &Value) -> reqwest::Response {
    client()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent")
}

/// The value of the first sample of `name` whose line contains `label`.
async fn metric(f: &Fleet, name: &str, label: &str) -> f64 {
    let text = client()
        .get(url(f, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .next()
        .unwrap_or_else(|| panic!("{name} {label} in /metrics"))
}

/// Collects every `BlockStored` chain a fleet's engine 0 publishes, over a real SUB socket.
struct Stored(Arc<Mutex<Vec<Vec<u64>>>>);

impl Stored {
    fn subscribe(f: &Fleet) -> Self {
        let ctx = zmq::Context::new();
        let sub = ctx.socket(zmq::SUB).unwrap();
        sub.set_linger(0).unwrap();
        sub.connect(&f.engines[0].kv_pub_endpoint).unwrap();
        sub.set_subscribe(b"").unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let _ctx = ctx;
            loop {
                if sub.poll(zmq::POLLIN, 5_000).unwrap_or(0) == 0 {
                    return;
                }
                let Ok(frames) = sub.recv_multipart(0) else {
                    return;
                };
                let batch = rmpv::decode::read_value(&mut &frames[2][..]).unwrap();
                for ev in batch[1].as_array().unwrap() {
                    let m = ev.as_map().unwrap();
                    let get = |k: &str| m.iter().find(|(n, _)| n.as_str() == Some(k)).map(|e| &e.1);
                    if get("type").and_then(|t| t.as_str()) == Some("BlockStored") {
                        let keys = get("block_hashes")
                            .unwrap()
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|h| h.as_u64().unwrap())
                            .collect();
                        sink.lock().unwrap().push(keys);
                    }
                }
            }
        });
        Self(out)
    }

    fn keys(&self) -> Vec<u64> {
        self.0.lock().unwrap().iter().flatten().copied().collect()
    }
}

/// Subscribers see nothing published before they joined; wait until a probe is received.
async fn wait_subscribed(f: &Fleet, s: &Stored) {
    let before = s.keys().len();
    eventually("the subscriber receives", || async {
        let probe = json!({"prompt": vec![9; 40], "max_tokens": 1});
        post(url(f, "/v1/completions"), &probe).await;
        s.keys().len() > before
    })
    .await;
}

#[tokio::test]
async fn nixl_prefill_then_decode_moves_the_blocks_and_publishes_them_on_the_decode_side() {
    let p = role_fleet(Role::Prefill, |_| {}).await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    assert!(p.engines[0].kv_side_channel.is_some());
    assert!(d.engines[0].kv_side_channel.is_none());
    let (p_events, d_events) = (Stored::subscribe(&p), Stored::subscribe(&d));
    wait_subscribed(&p, &p_events).await;
    wait_subscribed(&d, &d_events).await;
    let (p_seen, d_seen) = (p_events.keys().len(), d_events.keys().len());
    let p_prompt0 = metric(&p, "vllm:prompt_tokens_total", "").await;
    let d_gen0 = metric(&d, "vllm:generation_tokens_total", "").await;

    let r = post(url(&p, "/v1/chat/completions"), &prefill_leg("alpha")).await;
    assert_eq!(r.status(), 200);
    let pv: Value = r.json().await.unwrap();
    let prompt = pv["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 200, "{prompt}");
    assert_eq!(pv["usage"]["completion_tokens"], 1);
    let params = pv["kv_transfer_params"].clone();
    assert_eq!(params["do_remote_prefill"], true);
    assert_eq!(params["do_remote_decode"], false);
    let blocks = params["remote_block_ids"][0].as_array().unwrap();
    assert_eq!(
        blocks.len() as u64,
        prompt.div_ceil(16),
        "every block of the prompt"
    );
    assert_eq!(params["remote_request_id"], pv["id"]);
    assert!(
        params["remote_engine_id"].as_str().unwrap().len() == 36,
        "a UUID"
    );
    let side = p.engines[0].kv_side_channel.unwrap();
    assert_eq!(params["remote_host"], side.ip().to_string());
    assert_eq!(params["remote_port"], side.port());
    assert_eq!(params["tp_size"], 1);
    assert_eq!(
        p.stats(0).await.unwrap().kv_holds,
        1,
        "held for the decode engine"
    );
    let d_computed0 = d.stats(0).await.unwrap().prompt_tokens_local_compute;

    let decode_leg = json!({
        "messages": messages("alpha"),
        "max_tokens": 8,
        "kv_transfer_params": params,
    });
    let r = post(url(&d, "/v1/chat/completions"), &decode_leg).await;
    assert_eq!(r.status(), 200);
    let dv: Value = r.json().await.unwrap();
    assert_eq!(dv["usage"]["prompt_tokens"].as_u64(), Some(prompt));
    assert_eq!(dv["usage"]["completion_tokens"], 8);
    assert_eq!(
        dv["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(prompt - 1),
        "vLLM counts the loaded tokens as cached"
    );
    assert_eq!(dv["kv_transfer_params"], Value::Null);
    let ps = p.stats(0).await.unwrap();
    assert_eq!(
        (ps.kv_holds, ps.kv_holds_expired),
        (0, 0),
        "released by the read"
    );

    // The decode engine publishes the transferred full blocks as its own: the same keys the
    // prefill engine published (one process, one hash secret).
    let full = (prompt / 16) as usize;
    eventually("the decode engine publishes the loaded blocks", || async {
        d_events.keys().len() >= d_seen + full
    })
    .await;
    let p_keys = p_events.keys()[p_seen..p_seen + full].to_vec();
    let d_keys = d_events.keys()[d_seen..d_seen + full].to_vec();
    assert_eq!(d_keys, p_keys);

    // Metrics per role, as vLLM reports them.
    assert_eq!(
        metric(&p, "vllm:prompt_tokens_total", "").await - p_prompt0,
        prompt as f64
    );
    assert_eq!(
        metric(&d, "vllm:generation_tokens_total", "").await - d_gen0,
        8.0
    );
    assert_eq!(
        metric(
            &d,
            "vllm:prompt_tokens_by_source_total",
            "external_kv_transfer"
        )
        .await,
        prompt as f64
    );
    assert_eq!(
        metric(&d, "vllm:external_prefix_cache_hits_total", "").await,
        prompt as f64
    );
    assert_eq!(
        metric(&d, "vllm:prompt_tokens_cached_by_source_total", "p2p").await,
        prompt as f64
    );
    // vLLM's NIXL transfer metrics on the reading side: one read of the whole prompt.
    assert_eq!(
        metric(&d, "vllm:nixl_bytes_transferred_sum", "").await,
        (prompt * 131_072) as f64
    );
    assert_eq!(
        metric(&d, "vllm:nixl_xfer_time_seconds_count", "").await,
        1.0
    );
    assert_eq!(
        metric(&d, "vllm:nixl_num_failed_transfers_total", "").await,
        0.0
    );
    let ds = d.stats(0).await.unwrap();
    assert_eq!(
        ds.prompt_tokens_local_compute - d_computed0,
        1,
        "only the last prompt token is computed on the decode side"
    );
}

#[tokio::test]
async fn nixl_decode_leg_streams_like_any_request() {
    let p = role_fleet(Role::Prefill, |_| {}).await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    let pv: Value = post(url(&p, "/v1/chat/completions"), &prefill_leg("beta"))
        .await
        .json()
        .await
        .unwrap();
    let body = json!({
        "messages": messages("beta"),
        "max_tokens": 5,
        "stream": true,
        "stream_options": {"include_usage": true},
        "kv_transfer_params": pv["kv_transfer_params"],
    });
    let r = post(url(&d, "/v1/chat/completions"), &body).await;
    assert_eq!(r.status(), 200);
    let events = parse_sse(&r.text().await.unwrap());
    assert_eq!(events.last(), Some(&SseData::Done));
    let usage = events
        .iter()
        .find_map(|e| match e {
            SseData::Json(v) if v["usage"].is_object() => Some(v["usage"].clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(usage["prompt_tokens"], pv["usage"]["prompt_tokens"]);
    assert_eq!(p.stats(0).await.unwrap().kv_holds, 0);
    assert_eq!(
        d.stats(0).await.unwrap().external_prefix_cache_hits_tokens,
        { pv["usage"]["prompt_tokens"].as_u64().unwrap() }
    );
}

#[tokio::test]
async fn requests_without_transfer_fields_are_served_whole_by_either_role() {
    for role in [Role::Prefill, Role::Decode] {
        let f = role_fleet(role, |_| {}).await;
        let body = json!({"messages": messages("gamma"), "max_tokens": 3});
        let v: Value = post(url(&f, "/v1/chat/completions"), &body)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 3, "{role}");
        assert_eq!(v["kv_transfer_params"], Value::Null);
        let s = f.stats(0).await.unwrap();
        assert_eq!((s.kv_holds, s.external_prefix_cache_queries_tokens), (0, 0));
    }
    // A decode engine computes a prefill leg itself (it serves no KV) and hands out nothing.
    let d = role_fleet(Role::Decode, |_| {}).await;
    let v: Value = post(url(&d, "/v1/chat/completions"), &prefill_leg("gamma"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["kv_transfer_params"], Value::Null);
    assert_eq!(d.stats(0).await.unwrap().kv_holds, 0);
}

/// The prefill leg's answer, then the prefill fleet is handed to `between`.
async fn decode_after(
    p: &Fleet,
    d: &Fleet,
    topic: &str,
    between: impl AsyncFnOnce(&Fleet),
) -> reqwest::Response {
    let pv: Value = post(url(p, "/v1/chat/completions"), &prefill_leg(topic))
        .await
        .json()
        .await
        .unwrap();
    between(p).await;
    let body = json!({
        "messages": messages(topic),
        "max_tokens": 4,
        "kv_transfer_params": pv["kv_transfer_params"],
    });
    post(url(d, "/v1/chat/completions"), &body).await
}

#[tokio::test]
async fn a_transfer_from_a_crashed_prefill_engine_fails_the_decode_request() {
    let p = role_fleet(Role::Prefill, |_| {}).await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    let r = decode_after(&p, &d, "delta", async |p| p.kill(0).await.unwrap()).await;
    assert_eq!(
        r.status(),
        500,
        "vLLM's default kv_load_failure_policy is fail"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], 500);
    let s = d.stats(0).await.unwrap();
    assert_eq!((s.finished_error, s.waiting, s.running), (1, 0, 0));
    assert_eq!(
        d.stats(0).await.unwrap().kv_usage,
        0.0,
        "the destination blocks are freed"
    );
    assert_eq!(
        metric(&d, "vllm:request_success_total", "\"error\"").await,
        1.0
    );
}

#[tokio::test]
async fn a_failed_load_is_recomputed_locally_under_the_recompute_policy() {
    let p = role_fleet(Role::Prefill, |_| {}).await;
    let d = role_fleet(Role::Decode, |c| {
        c.engines[0].engine.kv_transfer.kv_load_failure_policy = KvLoadFailurePolicy::Recompute;
    })
    .await;
    let r = decode_after(&p, &d, "epsilon", async |p| p.kill(0).await.unwrap()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let s = d.stats(0).await.unwrap();
    assert_eq!(s.prompt_tokens_external_kv_transfer, 0);
    assert_eq!(
        s.prompt_tokens_local_compute,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn an_injected_transfer_failure_fails_the_load_and_the_prefill_blocks_time_out() {
    let p = role_fleet(Role::Prefill, |c| {
        c.engines[0].faults.transfer_failure_rate = 1.0;
        // 2 simulated seconds: 40 ms of wall time at the tests' time scale.
        c.engines[0].engine.kv_transfer.abort_request_timeout_us = 2_000_000;
    })
    .await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    let r = decode_after(&p, &d, "zeta", async |_| {}).await;
    assert_eq!(r.status(), 500);
    assert_eq!(d.stats(0).await.unwrap().finished_error, 1);
    assert_eq!(
        metric(&d, "vllm:nixl_num_failed_transfers_total", "").await,
        1.0
    );
    eventually("the unread blocks time out", || async {
        let s = p.stats(0).await.unwrap();
        s.kv_holds == 0 && s.kv_holds_expired == 1
    })
    .await;
    assert_eq!(
        metric(&p, "vllm:nixl_num_kv_expired_reqs_total", "").await,
        1.0
    );
}

#[tokio::test]
async fn blocks_that_timed_out_cannot_be_read() {
    let p = role_fleet(Role::Prefill, |c| {
        c.engines[0].engine.kv_transfer.abort_request_timeout_us = 1_000_000;
    })
    .await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    let r = decode_after(&p, &d, "eta", async |p| {
        eventually("the hold expires", || async {
            p.stats(0).await.unwrap().kv_holds_expired == 1
        })
        .await;
    })
    .await;
    assert_eq!(r.status(), 500);
}

#[tokio::test]
async fn a_prefill_engine_crash_fault_refuses_prefill_legs() {
    let p = role_fleet(Role::Prefill, |c| {
        c.engines[0].faults.crash_after_requests = Some(0);
    })
    .await;
    let sent = client()
        .post(url(&p, "/v1/chat/completions"))
        .json(&prefill_leg("theta"))
        .send()
        .await;
    assert!(sent.is_err(), "the connection is cut");
    eventually("the engine is down", || async { !p.is_alive(0) }).await;
}

#[tokio::test]
async fn a_dying_decode_engine_cuts_its_stream_after_the_transfer() {
    let p = role_fleet(Role::Prefill, |_| {}).await;
    let d = role_fleet(Role::Decode, |c| c.time_scale = 1.0).await;
    let pv: Value = post(url(&p, "/v1/chat/completions"), &prefill_leg("iota"))
        .await
        .json()
        .await
        .unwrap();
    let body = json!({
        "messages": messages("iota"),
        "max_tokens": 2000,
        "stream": true,
        "kv_transfer_params": pv["kv_transfer_params"],
    });
    let mut r = post(url(&d, "/v1/chat/completions"), &body).await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("the first token arrives");
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    assert_eq!(
        p.stats(0).await.unwrap().kv_holds,
        0,
        "read before decoding"
    );
    d.kill(0).await.unwrap();
    let mut cut = false;
    for _ in 0..10_000 {
        match r.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(cut, "the stream ends in an error, not a clean end");
}

/// SGLang's legs: the request plus the prefill engine's bootstrap address and a room.
fn sglang_leg(p: &Fleet, topic: &str, room: u64, max_tokens: u32, stream: bool) -> Value {
    let side = p.engines[0].kv_side_channel.unwrap();
    json!({
        "messages": messages(topic),
        "max_tokens": max_tokens,
        "stream": stream,
        "bootstrap_host": side.ip().to_string(),
        "bootstrap_port": side.port(),
        "bootstrap_room": room,
    })
}

#[tokio::test]
async fn sglang_legs_sent_at_once_meet_in_the_bootstrap_room() {
    let p = role_fleet(Role::Prefill, |_| {}).await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    for (room, stream) in [(u64::MAX >> 1, false), (12_345, true)] {
        let leg = sglang_leg(&p, "kappa", room, 6, stream);
        let (pr, dr) = tokio::join!(
            post(url(&p, "/v1/chat/completions"), &leg),
            post(url(&d, "/v1/chat/completions"), &leg),
        );
        assert_eq!(pr.status(), 200);
        let pv: Value = if stream {
            let events = parse_sse(&pr.text().await.unwrap());
            assert_eq!(events.last(), Some(&SseData::Done));
            Value::Null
        } else {
            pr.json().await.unwrap()
        };
        if !stream {
            assert_eq!(
                pv["usage"]["completion_tokens"], 1,
                "the prefill leg makes one token"
            );
        }
        assert_eq!(dr.status(), 200);
        if stream {
            let events = parse_sse(&dr.text().await.unwrap());
            let tokens = events
                .iter()
                .filter(|e| matches!(e, SseData::Json(v) if v["choices"][0]["delta"]["content"].is_string()))
                .count();
            assert!(tokens >= 6, "{tokens}");
        } else {
            let dv: Value = dr.json().await.unwrap();
            assert_eq!(dv["usage"]["completion_tokens"], 6);
        }
        let ps = p.stats(0).await.unwrap();
        assert_eq!(ps.kv_holds, 0, "the room's blocks were read and released");
    }
    assert!(d.stats(0).await.unwrap().prompt_tokens_external_kv_transfer > 0);
}

#[tokio::test]
async fn an_sglang_decode_leg_fails_when_its_prefill_leg_fails() {
    let p = role_fleet(Role::Prefill, |c| {
        c.engines[0].faults.error_rate = 1.0;
        c.engines[0].engine.kv_transfer.abort_request_timeout_us = 2_000_000;
    })
    .await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    let leg = sglang_leg(&p, "lambda", 99, 4, false);
    let (pr, dr) = tokio::join!(
        post(url(&p, "/v1/chat/completions"), &leg),
        post(url(&d, "/v1/chat/completions"), &leg),
    );
    assert_eq!(pr.status(), 500, "the injected prefill error");
    assert_eq!(dr.status(), 500, "the room never fills: the load fails");
    assert_eq!(d.stats(0).await.unwrap().finished_error, 1);
}

#[tokio::test]
async fn a_failed_load_ends_a_decode_stream_with_an_error_event() {
    let p = role_fleet(Role::Prefill, |_| {}).await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    let pv: Value = post(url(&p, "/v1/chat/completions"), &prefill_leg("mu"))
        .await
        .json()
        .await
        .unwrap();
    p.kill(0).await.unwrap();
    let body = json!({
        "messages": messages("mu"),
        "max_tokens": 4,
        "stream": true,
        "kv_transfer_params": pv["kv_transfer_params"],
    });
    let r = post(url(&d, "/v1/chat/completions"), &body).await;
    assert_eq!(r.status(), 200, "headers go out before the load fails");
    let events = parse_sse(&r.text().await.unwrap());
    assert_eq!(events.len(), 2, "{events:?}");
    match &events[0] {
        SseData::Json(v) => assert_eq!(v["error"]["code"], 500),
        other => panic!("expected an error event, got {other:?}"),
    }
    assert_eq!(events[1], SseData::Done);
}

#[tokio::test]
async fn a_decode_leg_dropped_before_its_blocks_are_allocated_frees_the_prefill_blocks() {
    let p = role_fleet(Role::Prefill, |_| {}).await;
    // One batch slot, taken by a long request: the decode leg cannot be allocated.
    let d = role_fleet(Role::Decode, |c| {
        c.engines[0].engine.max_num_seqs = 1;
        c.time_scale = 1.0;
    })
    .await;
    let busy = json!({"prompt": vec![5; 20], "max_tokens": 5000, "stream": true});
    let mut busy = post(url(&d, "/v1/completions"), &busy).await;
    busy.chunk().await.unwrap().expect("the slot is taken");
    let pv: Value = post(url(&p, "/v1/chat/completions"), &prefill_leg("nu"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(p.stats(0).await.unwrap().kv_holds, 1);
    let body = json!({
        "messages": messages("nu"),
        "max_tokens": 4,
        "kv_transfer_params": pv["kv_transfer_params"],
    });
    let leg_url = url(&d, "/v1/chat/completions");
    let leg = tokio::spawn(async move { post(leg_url, &body).await });
    eventually("the decode leg waits", || async {
        d.stats(0).await.unwrap().waiting == 1
    })
    .await;
    assert_eq!(
        metric(&d, "vllm:num_requests_waiting_by_reason", "capacity").await,
        1.0,
        "not allocated yet: waiting for a batch slot"
    );
    leg.abort();
    eventually("the prefill engine is told to free the blocks", || async {
        p.stats(0).await.unwrap().kv_holds == 0
    })
    .await;
    let ps = p.stats(0).await.unwrap();
    assert_eq!(
        ps.kv_holds_expired, 0,
        "freed by the notification, not the timeout"
    );
    assert_eq!(
        d.stats(0).await.unwrap().waiting,
        0,
        "aborted on the decode side"
    );
}

#[tokio::test]
async fn a_decode_leg_waiting_for_its_kv_counts_as_deferred_waiting() {
    // A slow link: 10 simulated seconds per transfer, 200 ms of wall time at the tests' scale.
    let p = role_fleet(Role::Prefill, |c| {
        c.engines[0].engine.kv_transfer.link_latency_us = 10_000_000;
    })
    .await;
    let d = role_fleet(Role::Decode, |_| {}).await;
    let pv: Value = post(url(&p, "/v1/chat/completions"), &prefill_leg("xi"))
        .await
        .json()
        .await
        .unwrap();
    let body = json!({
        "messages": messages("xi"),
        "max_tokens": 2,
        "kv_transfer_params": pv["kv_transfer_params"],
    });
    let leg_url = url(&d, "/v1/chat/completions");
    let leg = tokio::spawn(async move { post(leg_url, &body).await });
    eventually("the decode leg is loading", || async {
        d.stats(0).await.unwrap().waiting_for_remote_kv == 1
    })
    .await;
    assert_eq!(metric(&d, "vllm:num_requests_waiting", "").await, 1.0);
    assert_eq!(
        metric(&d, "vllm:num_requests_waiting_by_reason", "deferred").await,
        1.0
    );
    assert_eq!(
        metric(&d, "vllm:num_requests_running", "").await,
        0.0,
        "no slot taken"
    );
    assert_eq!(leg.await.unwrap().status(), 200);
    let s = d.stats(0).await.unwrap();
    assert_eq!((s.waiting, s.waiting_for_remote_kv), (0, 0));
}
