//! The gateway's HTTP/1.1 connection handling (`kvgate_gateway::server`) over real loopback
//! sockets: keep-alive and header timeouts (on tokio's paused clock, so no test waits for a
//! timeout) and `Host` validation. Each test is named after the defect
//! it pins (issue 10).

use std::time::Duration;

use axum::routing::get;
use kvgate_runtime::config::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Serves a router with `/health` with `limits`; returns its address.
async fn server(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/health", get(|| async { "ok" }));
    let stop = CancellationToken::new();
    tokio::spawn(kvgate_gateway::server::serve(
        listener,
        app,
        limits,
        stop.clone(),
    ));
    (addr, stop)
}

/// Reads until the peer closes; returns what was read.
async fn read_to_close(sock: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

async fn read_response(sock: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = sock.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(start_paused = true)]
async fn idle_keep_alive_timeout_was_the_header_timeout() {
    let limits = Limits::default();
    assert_eq!(
        (limits.header_read_timeout_ms, limits.idle_timeout_ms),
        (10_000, 60_000)
    );
    let (addr, _stop) = server(limits).await;
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_response(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Idle, well past the header timeout: the documented idle timeout (60 s) still holds it.
    let early = tokio::time::timeout(Duration::from_secs(59), read_to_close(&mut sock)).await;
    assert!(
        early.is_err(),
        "an idle keep-alive connection was closed before the 60 s idle timeout"
    );
    // ... and is closed within a check interval (a quarter of the shorter timeout) after it.
    tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut sock))
        .await
        .expect("closed once idle for 60 s");

    // The same connection can serve a second request after 50 s of idleness.
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut sock).await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let again = read_response(&mut sock).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
}

#[tokio::test(start_paused = true)]
async fn slow_request_heads_and_silent_connections_still_time_out() {
    let (addr, _stop) = server(Limits::default()).await;
    // A head dribbled after an idle period: cut 10 s after its first byte, not 60 s.
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut sock).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    sock.write_all(b"GET /health HTTP/1.1\r\nHo").await.unwrap();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), read_to_close(&mut sock))
        .await
        .expect("a slow head is cut");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took <= Duration::from_millis(12_500),
        "{took:?}"
    );
    // A connection that never sends a request is cut by the header timeout too.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), read_to_close(&mut silent))
        .await
        .expect("a silent connection is cut");
    assert!(started.elapsed() <= Duration::from_millis(12_500));
}

#[tokio::test]
async fn missing_or_duplicate_host_got_200() {
    let (addr, _stop) = server(Limits::default()).await;
    for (req, want) in [
        ("GET /health HTTP/1.1\r\n\r\n", "400"),
        ("GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        ("GET /health HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        ("GET /health HTTP/1.0\r\n\r\n", "200"),
        ("GET /health HTTP/1.1\r\nHost: a\r\n\r\n", "200"),
    ] {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(req.as_bytes()).await.unwrap();
        let resp = read_response(&mut sock).await;
        assert_eq!(
            resp.split_whitespace().nth(1),
            Some(want),
            "{req:?} → {resp}"
        );
        if want == "400" {
            let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
            let v: serde_json::Value = serde_json::from_str(body).expect("OpenAI error JSON");
            assert_eq!(v["error"]["code"], 400, "{body}");
        }
    }
}
