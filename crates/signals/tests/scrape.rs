//! The scraper over real sockets on 127.0.0.1: a tiny HTTP/1.1 server on a raw tokio
//! `TcpListener` (port 0) that serves a fixture, hangs, returns garbage or an error status.

use std::sync::Arc;
use std::time::Duration;

use kvgate_core::endpoint::EngineKind;
use kvgate_signals::{MonotonicClock, Observation, ScrapeConfig, ScrapeError, spawn_scraper};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Bound on waiting for one observation; generous because CI machines are shared.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
enum Behaviour {
    /// 200 with this body.
    Serve(&'static str),
    /// Accept, read the request, never answer.
    Hang,
    /// Answer with this status and a short body.
    Status(u16),
}

/// Starts a one-behaviour HTTP server; returns its `/metrics` URL.
async fn server(behaviour: Behaviour) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let behaviour = behaviour.clone();
            tokio::spawn(async move {
                // Read until the end of the request head.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) = match behaviour {
                    Behaviour::Serve(body) => (200, body),
                    Behaviour::Status(code) => (code, "oops\n"),
                    Behaviour::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    format!("http://{addr}/metrics")
}

async fn next(rx: &mut mpsc::Receiver<Observation>) -> Observation {
    tokio::time::timeout(RECV_TIMEOUT, rx.recv())
        .await
        .expect("no observation within the timeout")
        .expect("scraper stopped")
}

fn vllm_fixture() -> &'static str {
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/vllm.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    Box::leak(text.into_boxed_str())
}

fn config(url: String, timeout_ms: u64) -> ScrapeConfig {
    ScrapeConfig {
        interval_ms: 20,
        timeout_ms,
        ..ScrapeConfig::new(url, EngineKind::Vllm)
    }
}

#[tokio::test]
async fn serves_samples_repeatedly_with_increasing_timestamps() {
    let url = server(Behaviour::Serve(vllm_fixture())).await;
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        config(url, 1_000),
        "10.0.0.7:8000".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    let mut last = None;
    for _ in 0..3 {
        match next(&mut rx).await {
            Observation::Metrics {
                endpoint,
                taken_at_us,
                sample,
            } => {
                assert_eq!(endpoint, "10.0.0.7:8000");
                assert_eq!((sample.running, sample.waiting), (7, 3));
                if let Some(prev) = last {
                    assert!(taken_at_us > prev, "{taken_at_us} <= {prev}");
                }
                last = Some(taken_at_us);
            }
            other => panic!("expected a sample, got {other:?}"),
        }
    }
    handle.abort();
}

#[tokio::test]
async fn hanging_server_times_out_and_the_loop_keeps_going() {
    let url = server(Behaviour::Hang).await;
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        config(url, 150),
        "hang".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    for _ in 0..2 {
        match next(&mut rx).await {
            Observation::ScrapeFailed { error, .. } => {
                assert!(
                    matches!(error, ScrapeError::Timeout { timeout_ms: 150 }),
                    "{error:?}"
                );
                assert!(error.is_retryable());
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    handle.abort();
}

#[tokio::test]
async fn garbage_body_is_a_parse_failure() {
    let url = server(Behaviour::Serve(
        "<html><body>Welcome to nginx!</body></html>\n",
    ))
    .await;
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        config(url, 1_000),
        "garbage".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    match next(&mut rx).await {
        Observation::ScrapeFailed { error, .. } => {
            assert!(matches!(error, ScrapeError::Parse(_)), "{error:?}");
            assert!(!error.is_retryable());
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    handle.abort();
}

#[tokio::test]
async fn error_status_is_reported() {
    let url = server(Behaviour::Status(503)).await;
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        config(url, 1_000),
        "down".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    match next(&mut rx).await {
        Observation::ScrapeFailed { error, .. } => {
            assert!(
                matches!(error, ScrapeError::HttpStatus { status: 503 }),
                "{error:?}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    handle.abort();
}

#[tokio::test]
async fn refused_connection_is_a_transport_error() {
    // Bind then drop a listener so the port is very likely closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        config(format!("http://127.0.0.1:{port}/metrics"), 1_000),
        "closed".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    match next(&mut rx).await {
        Observation::ScrapeFailed { error, .. } => {
            assert!(matches!(error, ScrapeError::Transport { .. }), "{error:?}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    handle.abort();
}

#[tokio::test]
async fn scraper_stops_when_the_router_goes_away() {
    let url = server(Behaviour::Serve(vllm_fixture())).await;
    let (tx, rx) = mpsc::channel(1);
    let handle = spawn_scraper(
        config(url, 1_000),
        "x".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    drop(rx);
    tokio::time::timeout(RECV_TIMEOUT, handle)
        .await
        .expect("scraper did not stop")
        .unwrap();
}
