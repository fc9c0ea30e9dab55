//! OpenAI/vLLM HTTP conformance of the simulator, over real sockets.

mod common;

use common::{SseData, client, eventually, fleet, parse_sse};
use futures::StreamExt;
use kvgate_tokens::BuiltinTokenizer;
use serde_json::{Value, json};

fn url(f: &kvgate_sim::Fleet, i: usize, path: &str) -> String {
    format!("http://{}{path}", f.engines[i].http_addr)
}

#[tokio::test]
async fn chat_stream_is_framed_like_vllm_with_final_usage_chunk() {
    let f = fleet(1, |_| {}).await;
    let body = client()
        .post(url(&f, 0, "/v1/chat/completions"))
        .json(&json!({
            "model": kvgate_sim::config::DEFAULT_MODEL,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " there"}]}],
            "max_tokens": 5,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), 200);
    assert!(
        body.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = parse_sse(&body.text().await.unwrap());
    assert_eq!(events.last(), Some(&SseData::Done));
    let json: Vec<&Value> = events
        .iter()
        .filter_map(|e| match e {
            SseData::Json(v) => Some(v),
            SseData::Done => None,
        })
        .collect();
    // role chunk + 5 token chunks + usage chunk
    assert_eq!(json.len(), 7, "{json:#?}");
    assert_eq!(json[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        json.iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == json[0]["id"])
    );
    let content = &json[1..6];
    for (k, c) in content.iter().enumerate() {
        let fin = &c["choices"][0]["finish_reason"];
        if k == 4 {
            assert_eq!(fin, "length");
        } else {
            assert!(fin.is_null());
        }
    }
    let text: String = content
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        BuiltinTokenizer.encode(&text).len(),
        5,
        "one token per word"
    );
    let usage_chunk = json[6];
    assert_eq!(usage_chunk["choices"], json!([]));
    let prompt = BuiltinTokenizer
        .encode("<|user|>\nhello there\n<|assistant|>\n")
        .len();
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], prompt);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);
    assert_eq!(usage_chunk["usage"]["total_tokens"], prompt + 5);
    assert!(usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    f.shutdown().await;
}

#[tokio::test]
async fn completion_stream_without_usage_ends_with_done() {
    let f = fleet(1, |_| {}).await;
    let text = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": [1001, 1002, 1003], "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = parse_sse(&text);
    assert_eq!(events.len(), 4);
    assert_eq!(events[3], SseData::Done);
    let SseData::Json(last) = &events[2] else {
        panic!()
    };
    assert_eq!(last["object"], "text_completion");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(last.get("usage").is_none());
    f.shutdown().await;
}

#[tokio::test]
async fn non_streaming_round_trip_reports_cached_tokens() {
    let f = fleet(1, |_| {}).await;
    let prompt = "The quick brown fox jumps over the lazy dog ".repeat(20);
    let ask = || async {
        client()
            .post(url(&f, 0, "/v1/completions"))
            .json(&json!({"prompt": prompt, "max_tokens": 4}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let first = ask().await;
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    let n_prompt = BuiltinTokenizer.encode(&prompt).len();
    assert_eq!(first["usage"]["prompt_tokens"], n_prompt);
    assert_eq!(first["usage"]["completion_tokens"], 4);
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let text = first["choices"][0]["text"].as_str().unwrap();
    assert_eq!(BuiltinTokenizer.encode(text).len(), 4);
    let second = ask().await;
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(
        cached,
        (n_prompt as u64 / 16) * 16,
        "every full block is a hit"
    );

    // Default max_tokens for completions is vLLM's 16.
    let d: Value = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["usage"]["completion_tokens"], 16);

    let chat: Value = client()
        .post(url(&f, 0, "/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(chat["usage"]["completion_tokens"], 2);
    f.shutdown().await;
}

#[tokio::test]
async fn models_tokenize_and_errors_have_vllm_shapes() {
    let f = fleet(1, |c| c.lora_adapters = vec!["sql".into()]).await;
    let base = kvgate_sim::config::DEFAULT_MODEL;
    let models: Value = client()
        .get(url(&f, 0, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["id"], base);
    assert_eq!(data[0]["owned_by"], "vllm");
    assert!(data[0]["parent"].is_null());
    assert!(data[0]["max_model_len"].is_u64());
    assert_eq!(data[1]["id"], "sql");
    assert_eq!(data[1]["parent"], base);
    assert_eq!(
        data[1]["root"], "sql",
        "an adapter without a path: its name"
    );

    let tok: Value = client()
        .post(url(&f, 0, "/tokenize"))
        .json(&json!({"prompt": "Hello world"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tok["tokens"], json!([120602, 113574]));
    assert_eq!(tok["count"], 2);
    assert!(tok["max_model_len"].is_u64());
    let tok_chat: Value = client()
        .post(url(&f, 0, "/tokenize"))
        .json(&json!({"model": "sql", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        tok_chat["count"],
        BuiltinTokenizer
            .encode("<|user|>\nhi\n<|assistant|>\n")
            .len()
    );

    // LoRA adapter accepted as a model.
    let ok = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"model": "sql", "prompt": "x", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/completions",
            b"{not json".to_vec(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/completions",
            br#"{"prompt": 5}"#.to_vec(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/chat/completions",
            br#"{"model": "x"}"#.to_vec(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "a", "max_tokens": 0}"#.to_vec(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "a", "max_tokens": 200000}"#.to_vec(),
            400,
            "BadRequestError",
        ),
        (
            "/v1/chat/completions",
            br#"{"model": "nope", "messages": [{"role": "user", "content": "a"}]}"#.to_vec(),
            404,
            "NotFoundError",
        ),
        (
            "/tokenize",
            br#"{"model": "nope", "prompt": "a"}"#.to_vec(),
            404,
            "NotFoundError",
        ),
    ];
    for (path, body, status, kind) in cases {
        let r = client()
            .post(url(&f, 0, path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            status,
            "{path} {}",
            String::from_utf8_lossy(&body)
        );
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], kind, "{e}");
        assert_eq!(e["error"]["code"], status);
        assert!(e["error"]["param"].is_null());
        assert!(
            e["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let h = client().get(url(&f, 0, "/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    f.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_aborts_the_request_in_the_engine() {
    let f = fleet(1, |_| {}).await;
    let resp = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "tell me a long story", "max_tokens": 100000, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(f.stats(0).await.unwrap().running, 1);
    drop(body);
    eventually("the aborted request leaves the engine", || async {
        let s = f.stats(0).await.unwrap();
        s.running == 0 && s.finished_abort == 1
    })
    .await;
    f.shutdown().await;
}

#[tokio::test]
async fn injected_errors_and_slow_start_answer_before_any_byte() {
    for status in [500u16, 429] {
        let f = fleet(1, |c| {
            c.engines[0].faults.error_rate = 1.0;
            c.engines[0].faults.error_status = status;
        })
        .await;
        let r = client()
            .post(url(&f, 0, "/v1/completions"))
            .json(&json!({"prompt": "a", "max_tokens": 1, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], status);
        assert_eq!(f.stats(0).await.unwrap().prompt_tokens_total, 0);
        f.shutdown().await;
    }
    let f = fleet(1, |c| c.engines[0].faults.slow_start_s = 60.0).await;
    let h = client().get(url(&f, 0, "/health")).send().await.unwrap();
    assert_eq!(h.status(), 503);
    let r = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "a", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    f.shutdown().await;
}

#[tokio::test]
async fn crash_after_n_requests_closes_the_port_and_cuts_streams() {
    let f = fleet(1, |c| c.engines[0].faults.crash_after_requests = Some(2)).await;
    let ok = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "a", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // Request 2: a long stream that is still running when request 3 crashes the engine.
    let long = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "a", "max_tokens": 100000, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut long = long.bytes_stream();
    assert!(long.next().await.unwrap().is_ok());
    let third = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "a", "max_tokens": 2}))
        .send()
        .await;
    assert!(third.is_err(), "request 3 gets no response: {third:?}");
    let mut cut = false;
    while let Some(chunk) = long.next().await {
        if chunk.is_err() {
            cut = true;
            break;
        }
    }
    let text_done = cut;
    assert!(text_done, "the in-flight stream was cut, not completed");
    assert!(!f.is_alive(0));
    assert!(f.stats(0).await.is_err());
    let addr = f.engines[0].http_addr;
    eventually("the port is closed", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    f.shutdown().await;
}

#[tokio::test]
async fn kill_drops_an_engine_and_leaves_the_others() {
    let f = fleet(2, |_| {}).await;
    f.kill(0).await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(f.engines[0].http_addr)
            .await
            .is_err()
    );
    let r = client()
        .post(url(&f, 1, "/v1/completions"))
        .json(&json!({"prompt": "a", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    f.shutdown().await;
}

#[tokio::test]
async fn crash_at_time_closes_the_port() {
    let f = fleet(1, |c| c.engines[0].faults.crash_at_s = Some(0.2)).await;
    let r = client().get(url(&f, 0, "/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let addr = f.engines[0].http_addr;
    eventually("the engine crashes on schedule", || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(!f.is_alive(0));
    f.shutdown().await;
}

#[tokio::test]
async fn non_streaming_client_disconnect_aborts_too() {
    use tokio::io::AsyncWriteExt;
    let f = fleet(1, |_| {}).await;
    let body = r#"{"prompt": "a long one", "max_tokens": 100000}"#;
    let mut sock = tokio::net::TcpStream::connect(f.engines[0].http_addr)
        .await
        .unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    eventually("the request runs", || async {
        f.stats(0).await.unwrap().running == 1
    })
    .await;
    drop(sock);
    eventually("the abandoned request is aborted", || async {
        let s = f.stats(0).await.unwrap();
        s.running == 0 && s.finished_abort == 1
    })
    .await;
    f.shutdown().await;
}

#[tokio::test]
async fn flags_build_a_fleet_with_an_hf_tokenizer_and_print_addresses() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: kvgate_sim::SimArgs,
    }
    let dir = std::env::temp_dir().join(format!("kvgate-sim-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2}, "unk_token": "[UNK]"},
    });
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let cli = Cli::try_parse_from([
        "sim",
        "--engines",
        "2",
        "--port",
        "0",
        "--zmq-port",
        "0",
        "--time-scale",
        "50",
        "--tokenizer",
        path.to_str().unwrap(),
    ])
    .unwrap();
    let f = kvgate_sim::start_fleet(cli.sim.to_fleet_config().unwrap())
        .await
        .unwrap();
    let tok: Value = client()
        .post(url(&f, 1, "/tokenize"))
        .json(&json!({"prompt": "hello world zzz"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tok["tokens"], json!([0, 1, 2]));
    let addrs = f.addresses_json();
    let engines = addrs["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2);
    for (i, e) in engines.iter().enumerate() {
        assert_eq!(e["http"], f.engines[i].http_addr.to_string());
        assert!(
            e["kv_pub"]
                .as_str()
                .unwrap()
                .starts_with("tcp://127.0.0.1:")
        );
        assert!(
            e["kv_replay"]
                .as_str()
                .unwrap()
                .starts_with("tcp://127.0.0.1:")
        );
        assert_ne!(e["kv_pub"], e["kv_replay"]);
    }
    f.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every malformed body gets a 400 in the OpenAI shape, and the server keeps serving.
#[tokio::test]
async fn malformed_bodies_never_break_the_server() {
    let f = fleet(1, |_| {}).await;
    let valid =
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true}"#;
    let mut bodies: Vec<(&str, String)> = (0..valid.len())
        .map(|cut| ("/v1/chat/completions", valid[..cut].to_owned()))
        .collect();
    for wrong in [
        r#"{"messages": "hi"}"#,
        r#"{"messages": [{"role": "user", "content": 5}]}"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
        r#"{"messages": [{"content": "no role"}]}"#,
        r#"{"messages": [], "max_tokens": 2}"#,
        r#"{"messages": [{"role": "user", "content": "a"}], "max_tokens": "5"}"#,
        r#"{"messages": [{"role": "user", "content": "a"}], "max_tokens": -3}"#,
        r#"{"messages": [{"role": "user", "content": "a"}], "stream": "yes"}"#,
        r#"[1, 2, 3]"#,
        r#"null"#,
    ] {
        bodies.push(("/v1/chat/completions", wrong.to_owned()));
    }
    for wrong in [
        r#"{"prompt": [-1]}"#,
        r#"{"prompt": [[1], [2]]}"#,
        r#"{"prompt": ["a", "b"]}"#,
        r#"{"prompt": ""}"#,
        r#"{"prompt": []}"#,
        r#"{"prompt": {"text": "a"}}"#,
        r#"{"max_tokens": 3}"#,
        r#"{"prompt": [4294967296]}"#,
    ] {
        bodies.push(("/v1/completions", wrong.to_owned()));
    }
    bodies.push(("/tokenize", r#"{"prompt": "a", "messages": []}"#.to_owned()));
    bodies.push(("/tokenize", r#"{}"#.to_owned()));
    let http = client();
    for (path, body) in &bodies {
        let r = http
            .post(url(&f, 0, path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path} {body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "BadRequestError", "{body}");
        assert_eq!(e["error"]["code"], 400);
    }
    let ok = client()
        .post(url(&f, 0, "/v1/chat/completions"))
        .body(valid)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    assert!(f.stats(0).await.unwrap().prompt_tokens_total > 0);
    f.shutdown().await;
}

#[tokio::test]
async fn adapters_show_their_path_as_root() {
    let f = fleet(1, |c| {
        c.lora_adapters = vec!["sql".into()];
        c.lora_paths.insert("sql".into(), "/adapters/sql".into());
    })
    .await;
    let models: Value = client()
        .get(url(&f, 0, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][1]["root"], "/adapters/sql");
    f.shutdown().await;
}

/// vLLM reports `prompt_tokens_details` only with `--enable-prompt-tokens-details`: without it a
/// streamed usage chunk has no such key and a full response has it null.
#[tokio::test]
async fn prompt_tokens_details_only_when_enabled() {
    let f = fleet(1, |c| c.enable_prompt_tokens_details = false).await;
    let full: Value = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "hello there", "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(full["usage"]["completion_tokens"], 2);
    assert!(full["usage"]["prompt_tokens_details"].is_null());
    assert!(full["usage"].get("prompt_tokens_details").is_some());
    let body = client()
        .post(url(&f, 0, "/v1/chat/completions"))
        .json(&json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage = parse_sse(&body)
        .into_iter()
        .find_map(|d| match d {
            SseData::Json(v) if v.get("usage").is_some() => Some(v["usage"].clone()),
            _ => None,
        })
        .expect("a usage chunk");
    assert_eq!(usage["completion_tokens"], 2);
    assert!(usage.get("prompt_tokens_details").is_none(), "{usage}");
    f.shutdown().await;
}

/// vLLM's dev-mode `POST /reset_prefix_cache`: `{"success": false}` while a running request holds
/// blocks, true once `reset_running_requests=true` preempts it (the request still finishes).
#[tokio::test]
async fn reset_prefix_cache_refuses_while_requests_run_unless_told_to_preempt() {
    let f = fleet(1, |c| c.time_scale = 1.0).await;
    let reset = |query: &'static str| {
        let u = url(&f, 0, &format!("/reset_prefix_cache{query}"));
        async move { client().post(u).send().await.unwrap() }
    };
    let idle: Value = reset("").await.json().await.unwrap();
    assert_eq!(idle, json!({"success": true}));
    let mut stream = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "a long story ".repeat(40), "max_tokens": 200, "stream": true}))
        .send()
        .await
        .unwrap()
        .bytes_stream();
    stream.next().await.expect("the request runs").unwrap();
    let busy: Value = reset("?reset_running_requests=false")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(busy, json!({"success": false}));
    let forced: Value = reset("?reset_running_requests=true&reset_external=true")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(forced, json!({"success": true}));
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"));
    let bad = reset("?reset_running_requests=maybe").await;
    assert_eq!(bad.status(), 400);
    f.shutdown().await;
}

/// With details on, vLLM 0.32 answers `{cached_tokens, created_cache_tokens, multimodal_tokens}`
/// (chat counts the full-block prompt tokens it newly cached; completions leave it null) and
/// drops the null members from a streamed usage chunk.
#[tokio::test]
async fn prompt_tokens_details_have_vllm_0_32_members() {
    let f = fleet(1, |_| {}).await;
    let text = "The quick brown fox jumps over the lazy dog ".repeat(20);
    let chat = |stream: bool| {
        let u = url(&f, 0, "/v1/chat/completions");
        let body = json!({
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 2,
            "stream": stream,
            "stream_options": {"include_usage": true},
        });
        async move { client().post(u).json(&body).send().await.unwrap() }
    };
    let cold: Value = chat(false).await.json().await.unwrap();
    let n = cold["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        cold["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 0, "created_cache_tokens": n / 16 * 16, "multimodal_tokens": null})
    );
    assert!(cold["usage"]["completion_tokens_details"].is_null());
    let warm = chat(true).await.text().await.unwrap();
    let usage = parse_sse(&warm)
        .into_iter()
        .find_map(|d| match d {
            SseData::Json(v) if v.get("usage").is_some() => Some(v["usage"].clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        usage["prompt_tokens_details"],
        json!({"cached_tokens": n / 16 * 16, "created_cache_tokens": 0})
    );
    assert!(usage.get("completion_tokens_details").is_none());
    let completion: Value = client()
        .post(url(&f, 0, "/v1/completions"))
        .json(&json!({"prompt": "hello", "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        completion["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 0, "created_cache_tokens": null, "multimodal_tokens": null})
    );
    f.shutdown().await;
}

/// `POST /v1/messages` as vLLM 0.32 serves it: the request becomes the chat with the same
/// system and messages (same prompt, same cache), the answer is in the Messages shape, usage as
/// vLLM derives it (input = prompt − cache read − cache creation), the stream is Anthropic's
/// event sequence, and errors use the Anthropic error shape.
#[tokio::test]
async fn messages_api_is_the_chat_in_anthropics_shape() {
    let f = fleet(1, |_| {}).await;
    let system: String = (0..200).map(|i| format!(" s{i}")).collect();
    let chat: Value = client()
        .post(url(&f, 0, "/v1/chat/completions"))
        .json(&json!({
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "hello"}],
            "max_tokens": 3,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let prompt = chat["usage"]["prompt_tokens"].as_i64().unwrap();
    let m: Value = client()
        .post(url(&f, 0, "/v1/messages"))
        .json(&json!({
            "model": kvgate_sim::config::DEFAULT_MODEL,
            "system": [{"type": "text", "text": system}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "max_tokens": 3,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(m["stop_reason"], "max_tokens");
    let u = &m["usage"];
    assert_eq!(u["output_tokens"], 3);
    let read = u["cache_read_input_tokens"].as_i64().unwrap();
    assert!(read > 0, "the chat's blocks are hit: {u}");
    assert_eq!(
        u["input_tokens"].as_i64().unwrap()
            + read
            + u["cache_creation_input_tokens"].as_i64().unwrap(),
        prompt,
        "the same prompt as the chat: {u}"
    );

    let body = client()
        .post(url(&f, 0, "/v1/messages"))
        .json(&json!({
            "system": system,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2,
            "stream": true,
        }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let names: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{body}"
    );
    assert!(
        body.contains("\"text_delta\"") && body.contains("\"max_tokens\""),
        "{body}"
    );

    let r = client()
        .post(url(&f, 0, "/v1/messages"))
        .json(&json!({"messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["type"], "BadRequestError");
    f.shutdown().await;
}
