//! The scraper over real sockets on 127.0.0.1: a tiny HTTP/1.1 server on a raw tokio
//! `TcpListener` (port 0) that serves a fixture, hangs, returns garbage or an error status,
//! redirects, or changes its body while running.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvgate_core::endpoint::EngineKind;
use kvgate_signals::{
    MonotonicClock, Observation, ScrapeConfig, ScrapeError, ScrapePace, spawn_paced_scraper,
    spawn_scraper,
};
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
    /// 302 to this URL.
    Redirect(String),
    /// 200 with whatever body the test has put there.
    Switch(Arc<Mutex<&'static str>>),
    /// 200 with this body at `/metrics`; anything else (the narrowed page) answered with this
    /// status and body.
    WholePageOnly(&'static str, u16, &'static str),
}

/// Starts a one-behaviour HTTP server; returns its `/metrics` URL.
async fn server(behaviour: Behaviour) -> String {
    server_counting(behaviour).await.0
}

/// Starts a one-behaviour HTTP server; returns its `/metrics` URL and how many requests it
/// has read.
async fn server_counting(behaviour: Behaviour) -> (String, Arc<AtomicUsize>) {
    let (url, hits, _) = server_recording(behaviour).await;
    (url, hits)
}

/// Starts a one-behaviour HTTP server; returns its `/metrics` URL, how many requests it has
/// read and their paths (with query).
async fn server_recording(
    behaviour: Behaviour,
) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&paths);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let behaviour = behaviour.clone();
            let counter = Arc::clone(&counter);
            let recorded = Arc::clone(&recorded);
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
                counter.fetch_add(1, Ordering::SeqCst);
                let path = String::from_utf8_lossy(&head)
                    .split(' ')
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                recorded.lock().unwrap().push(path.clone());
                let mut location = String::new();
                let (status, body) = match behaviour {
                    Behaviour::Serve(body) => (200, body),
                    Behaviour::Status(code) => (code, "oops\n"),
                    Behaviour::Redirect(to) => {
                        location = format!("location: {to}\r\n");
                        (302, "")
                    }
                    Behaviour::Switch(body) => (200, *body.lock().unwrap()),
                    Behaviour::WholePageOnly(body, _, _) if path == "/metrics" => (200, body),
                    Behaviour::WholePageOnly(_, status, other) => (status, other),
                    Behaviour::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: text/plain; version=0.0.4\r\n{location}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/metrics"), hits, paths)
}

async fn next(rx: &mut mpsc::Receiver<Observation>) -> Observation {
    tokio::time::timeout(RECV_TIMEOUT, rx.recv())
        .await
        .expect("no observation within the timeout")
        .expect("scraper stopped")
}

fn fixture(name: &str) -> &'static str {
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    Box::leak(text.into_boxed_str())
}

fn vllm_fixture() -> &'static str {
    fixture("vllm.txt")
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
                ..
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

fn auto_config(url: String) -> ScrapeConfig {
    ScrapeConfig {
        interval_ms: 20,
        timeout_ms: 1_000,
        ..ScrapeConfig::new(url, None)
    }
}

/// The next sample, skipping failures (a scrape that raced server start-up).
async fn next_sample(rx: &mut mpsc::Receiver<Observation>) -> kvgate_core::observe::MetricsSample {
    loop {
        match next(rx).await {
            Observation::Metrics { sample, .. } => return sample,
            Observation::ScrapeFailed { error, .. } => panic!("scrape failed: {error}"),
            _ => {}
        }
    }
}

/// Issue 10.12: two llama.cpp servers given only as `--endpoint` were scraped with vLLM's
/// names, so their load never reached the router. With no kind configured, each engine's own
/// body, served over HTTP, yields its load gauges.
#[tokio::test]
async fn llama_cpp_endpoint_without_a_configured_kind_is_scraped_as_llama_cpp() {
    // (fixture, running, waiting): llama.cpp as its server renders `/metrics` today
    // (`server_task_result_metrics::to_metrics`) and with the older `kv_cache_usage_ratio`,
    // vLLM (one and two DP ranks), SGLang (two DP ranks) and TensorRT-LLM.
    let cases = [
        ("llamacpp_server.txt", 3, 1),
        ("llamacpp.txt", 2, 4),
        ("vllm.txt", 7, 3),
        ("vllm_dp2.txt", 12, 3),
        ("sglang.txt", 12, 3),
        ("trtllm.txt", 12, 5),
    ];
    for (name, running, waiting) in cases {
        let url = server(Behaviour::Serve(fixture(name))).await;
        let (tx, mut rx) = mpsc::channel(16);
        let handle = spawn_scraper(
            auto_config(url),
            name.into(),
            Arc::new(MonotonicClock::new()),
            tx,
        );
        let sample = next_sample(&mut rx).await;
        assert_eq!(
            (sample.running, sample.waiting),
            (running, waiting),
            "{name}"
        );
        handle.abort();
    }
}

#[tokio::test]
async fn configured_engine_kind_wins_over_detection() {
    // A llama.cpp body read as configured vLLM: the vLLM gauges are missing, and the scraper
    // must say so rather than quietly switch adapters.
    let url = server(Behaviour::Serve(fixture("llamacpp_server.txt"))).await;
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        config(url, 1_000),
        "configured".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    match next(&mut rx).await {
        Observation::ScrapeFailed { error, .. } => assert!(
            matches!(
                error,
                ScrapeError::Parse(kvgate_signals::MetricsError::MissingMetric {
                    name: "vllm:num_requests_running"
                })
            ),
            "{error:?}"
        ),
        other => panic!("expected a failure, got {other:?}"),
    }
    handle.abort();
}

#[tokio::test]
async fn engine_kind_is_detected_again_when_the_families_change() {
    // Another engine now answers on the same address (a pod replaced by a different image).
    let body = Arc::new(Mutex::new(fixture("vllm.txt")));
    let url = server(Behaviour::Switch(Arc::clone(&body))).await;
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        auto_config(url),
        "switching".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    let first = next_sample(&mut rx).await;
    assert_eq!((first.running, first.waiting), (7, 3));
    *body.lock().unwrap() = fixture("llamacpp_server.txt");
    // Samples already in flight may still be vLLM's; the llama.cpp one must follow.
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let s = next_sample(&mut rx).await;
        if (s.running, s.waiting) == (3, 1) {
            break;
        }
        assert_eq!((s.running, s.waiting), (7, 3), "neither engine's figures");
        assert!(tokio::time::Instant::now() < deadline, "never re-detected");
    }
    handle.abort();
}

#[tokio::test]
async fn endpoint_exposing_no_known_engine_is_an_unknown_engine_failure() {
    let url = server(Behaviour::Serve(
        "# TYPE process_open_fds gauge\nprocess_open_fds 6\n",
    ))
    .await;
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        auto_config(url),
        "unknown".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    for _ in 0..2 {
        match next(&mut rx).await {
            Observation::ScrapeFailed { error, .. } => {
                assert!(
                    matches!(
                        error,
                        ScrapeError::Parse(kvgate_signals::MetricsError::UnknownEngine)
                    ),
                    "{error:?}"
                );
                assert!(!error.is_retryable());
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    handle.abort();
}

/// Issue 10.5 (SSRF): an engine answering `302 Location: <anywhere>` made the scraper fetch
/// that address. The redirect must be reported, and the other server never asked.
#[tokio::test]
async fn scraper_does_not_follow_an_engine_redirect_to_another_address() {
    let (target, target_hits) = server_counting(Behaviour::Serve(vllm_fixture())).await;
    let (url, engine_hits) = server_counting(Behaviour::Redirect(target)).await;
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_scraper(
        config(url, 1_000),
        "redirecting".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    for _ in 0..3 {
        match next(&mut rx).await {
            Observation::ScrapeFailed { error, .. } => assert!(
                matches!(error, ScrapeError::HttpStatus { status: 302 }),
                "{error:?}"
            ),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    handle.abort();
    assert!(engine_hits.load(Ordering::SeqCst) >= 3);
    assert_eq!(
        target_hits.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

#[tokio::test]
async fn discovery_does_not_follow_an_engine_redirect_to_another_address() {
    let (target, target_hits) = server_counting(Behaviour::Serve(vllm_fixture())).await;
    let (url, _) = server_counting(Behaviour::Redirect(target)).await;
    let base = url.trim_end_matches("/metrics");
    let err = kvgate_signals::discover(base).await.unwrap_err();
    assert!(
        matches!(
            err,
            kvgate_signals::DiscoverError::Fetch {
                source: ScrapeError::HttpStatus { status: 302 },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        target_hits.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

/// A paced scraper waits the interval its pace says, and a change of pace wakes it: slowed to
/// 5 s after its first scrape it stays silent, and back at the base it scrapes at once instead
/// of sleeping out the slow interval.
#[tokio::test]
async fn a_paced_scraper_slows_down_and_a_reset_wakes_it() {
    let (url, hits) = server_counting(Behaviour::Serve(vllm_fixture())).await;
    let pace = ScrapePace::new(20, 5_000);
    while pace.after_sample(true).is_some() {}
    assert_eq!(pace.interval_ms(), 5_000);
    let (tx, mut rx) = mpsc::channel(16);
    let handle = spawn_paced_scraper(
        config(url, 1_000),
        &pace,
        "10.0.0.7:8000".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    assert!(matches!(next(&mut rx).await, Observation::Metrics { .. }));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .is_err(),
        "a second scrape within 1 s at a 5 s pace"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let reset = std::time::Instant::now();
    assert_eq!(pace.after_sample(false), Some(20));
    assert!(matches!(next(&mut rx).await, Observation::Metrics { .. }));
    assert!(
        reset.elapsed() < Duration::from_millis(2_500),
        "the reset woke the scraper ({:?} after it; the slow interval had ~4 s left)",
        reset.elapsed()
    );
    // Back at the base pace.
    for _ in 0..3 {
        assert!(matches!(next(&mut rx).await, Observation::Metrics { .. }));
    }
    handle.abort();
}

/// A vLLM is asked for only the samples the router reads (`/metrics/?name[]=…`) once its kind
/// is known: detected from the first (whole) page here.
#[tokio::test]
async fn a_vllm_is_asked_for_the_samples_the_router_reads() {
    let (url, _, paths) = server_recording(Behaviour::Serve(vllm_fixture())).await;
    let (tx, mut rx) = mpsc::channel(16);
    let cfg = ScrapeConfig {
        interval_ms: 20,
        ..ScrapeConfig::new(url.clone(), None)
    };
    let handle = spawn_scraper(cfg, "e".into(), Arc::new(MonotonicClock::new()), tx);
    for _ in 0..3 {
        assert!(matches!(next(&mut rx).await, Observation::Metrics { .. }));
    }
    handle.abort();
    let paths = paths.lock().unwrap().clone();
    let narrowed = kvgate_signals::metrics::narrowed_metrics_url(&url, EngineKind::Vllm).unwrap();
    let narrowed_path = &narrowed[narrowed.find("/metrics/").unwrap()..];
    assert_eq!(paths[0], "/metrics", "{paths:?}");
    assert!(paths.len() >= 3);
    for p in &paths[1..] {
        assert_eq!(p, narrowed_path);
    }
}

/// A server that does not narrow (a proxy, a build without prometheus_client's app below
/// `/metrics/`) answers the narrowed page with an error or with something else: that scrape
/// still yields a sample, from the whole page, and the narrowed page is not asked for again.
#[tokio::test]
async fn a_server_that_does_not_narrow_is_scraped_whole_without_losing_a_sample() {
    for (status, other) in [(404, "not found\n"), (200, "<html>proxy</html>\n")] {
        let (url, _, paths) =
            server_recording(Behaviour::WholePageOnly(vllm_fixture(), status, other)).await;
        let (tx, mut rx) = mpsc::channel(16);
        let handle = spawn_scraper(
            config(url, 1_000),
            "e".into(),
            Arc::new(MonotonicClock::new()),
            tx,
        );
        for _ in 0..4 {
            match next(&mut rx).await {
                Observation::Metrics {
                    sample, body_bytes, ..
                } => {
                    assert_eq!((sample.running, sample.waiting), (7, 3));
                    assert_eq!(body_bytes, vllm_fixture().len());
                }
                other => panic!("{status}: expected a sample, got {other:?}"),
            }
        }
        handle.abort();
        let paths = paths.lock().unwrap().clone();
        let narrowed = paths.iter().filter(|p| *p != "/metrics").count();
        assert_eq!(narrowed, 1, "{status}: {paths:?}");
        assert!(paths[0].starts_with("/metrics/?name%5B%5D="), "{paths:?}");
    }
}
