//! The shutdown contract of the real `kvgate serve` binary (issue 10.10): on SIGTERM or ctrl-c,
//! `/ready` turns 503 at once, the listeners keep accepting for the grace period, a stream in
//! flight completes, and the process exits 0 — Kubernetes, systemd and docker all stop a
//! process with SIGTERM.
//!
//! The engine is a small SSE server in this test process that holds its stream open until the
//! test releases it, so the stream is provably in flight when the signal arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate_testkit::eventually_sync;
use kvgate_testkit::process::{Proc, kvgate_serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const MODEL: &str = "m";

const METRICS: &str = "# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"m\"} 0\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{model_name=\"m\"} 0\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{model_name=\"m\"} 0.0\n";

/// Reads one HTTP/1.1 request (head and content-length body); returns its path.
async fn read_request(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(head.split_whitespace().nth(1)?.to_owned())
}

/// An engine whose chat streams send one chunk, then wait for `release` before finishing.
async fn holding_engine(release: Arc<Notify>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let release = release.clone();
            tokio::spawn(async move {
                let Some(path) = read_request(&mut sock).await else {
                    return;
                };
                let plain = |ct: &str, body: &str| {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let out = match path.as_str() {
                    "/metrics" => plain("text/plain; version=0.0.4", METRICS),
                    "/v1/models" => plain(
                        "application/json",
                        &format!(
                            r#"{{"object":"list","data":[{{"id":"{MODEL}","object":"model"}}]}}"#
                        ),
                    ),
                    "/v1/chat/completions" => {
                        let chunk = |data: &str| format!("{:x}\r\n{data}\r\n", data.len());
                        let first = r#"data: {"choices":[{"index":0,"delta":{"content":"a"}}]}"#;
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                        if sock
                            .write_all(
                                format!("{head}{}", chunk(&format!("{first}\n\n"))).as_bytes(),
                            )
                            .await
                            .is_err()
                        {
                            return;
                        }
                        release.notified().await;
                        let last = r#"data: {"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"stop"}]}"#;
                        format!(
                            "{}{}0\r\n\r\n",
                            chunk(&format!("{last}\n\n")),
                            chunk("data: [DONE]\n\n")
                        )
                    }
                    _ => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned(),
                };
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    address
}

async fn status_of(client: &reqwest::Client, url: &str) -> Option<u16> {
    Some(client.get(url).send().await.ok()?.status().as_u16())
}

async fn sigterm_or_ctrl_c_drains_a_stream_in_flight_and_exits_0(signal: &str) {
    let release = Arc::new(Notify::new());
    let engine = holding_engine(release.clone()).await;
    let mut cmd = kvgate_serve(env!("CARGO_BIN_EXE_kvgate"));
    cmd.args([
        "--endpoint",
        &engine,
        "--scrape-interval-ms",
        "50",
        "--shutdown-grace-ms",
        "1000",
        "--drain-timeout-ms",
        "20000",
    ]);
    let mut serve = Proc::spawn("kvgate serve", cmd);
    let mut addrs = None;
    eventually_sync("the listening log line", Duration::from_secs(30), || {
        addrs = serve.gateway_addrs();
        addrs.is_some()
    })
    .await;
    let (api, admin) = addrs.unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let ready = format!("http://{admin}/ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(&client, &ready).await != Some(200) {
        assert!(Instant::now() < deadline, "never ready:\n{}", serve.dump());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut stream = client
        .post(format!("http://{api}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let first = stream.chunk().await.unwrap().expect("first chunk");
    assert!(String::from_utf8_lossy(&first).contains("\"a\""));

    serve.signal(signal);
    let signalled = Instant::now();
    let deadline = signalled + Duration::from_secs(5);
    while status_of(&client, &ready).await != Some(503) {
        assert!(
            Instant::now() < deadline,
            "/ready not 503 after {signal}:\n{}",
            serve.dump()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Still accepting during the grace period: a fresh connection to the API port is served.
    let fresh = reqwest::Client::builder().no_proxy().build().unwrap();
    assert_eq!(
        status_of(&fresh, &format!("http://{api}/health")).await,
        Some(200),
        "new connections are served during the grace period"
    );
    assert!(
        signalled.elapsed() < Duration::from_millis(1000),
        "checked within the grace period"
    );
    assert_eq!(status_of(&client, &ready).await, Some(503));

    release.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = stream.chunk().await.expect("the stream is not cut") {
        rest.extend_from_slice(&c);
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("\"b\"") && rest.contains("data: [DONE]"),
        "{rest}"
    );

    let status = serve
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("still running:\n{}", serve.dump()));
    assert_eq!(status.code(), Some(0), "{}", serve.dump());
    assert!(
        serve.log_contains(signal),
        "the signal is logged:\n{}",
        serve.dump()
    );
    assert!(
        serve.log_contains("every in-flight request finished"),
        "{}",
        serve.dump()
    );
}

#[tokio::test]
async fn sigterm_cut_streams_and_exited_143() {
    sigterm_or_ctrl_c_drains_a_stream_in_flight_and_exits_0("TERM").await;
}

#[tokio::test]
async fn ctrl_c_drains_like_sigterm() {
    sigterm_or_ctrl_c_drains_a_stream_in_flight_and_exits_0("INT").await;
}
