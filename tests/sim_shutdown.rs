//! The shutdown contract of the real `kvgate sim` binary (issue 10.10): on SIGTERM or ctrl-c
//! every simulated engine answers `/health` with 503 at once, keeps accepting for the grace
//! period, then closes its listener, lets the stream in flight finish, and the process exits 0.
//! Before, SIGTERM cut the streams and the process died with 143.

use std::time::{Duration, Instant};

use kvgate_testkit::process::{Proc, spawn_sim};

/// Accept grace given to the binary: long enough to observe both "503 but accepting" and,
/// after it, "listener closed while the stream still runs".
const GRACE: Duration = Duration::from_millis(1_500);

/// Tokens of the stream in flight: at time scale 1 an H100-like engine decodes one token per
/// ~6 ms, so the stream outlives the grace period by seconds.
const STREAM_TOKENS: u32 = 1_200;

/// One simulated engine draining within [`GRACE`]; returns the process and its HTTP address.
fn start_sim() -> (Proc, String) {
    let grace_ms = GRACE.as_millis().to_string();
    let (sim, engines) = spawn_sim(
        env!("CARGO_BIN_EXE_kvgate"),
        1,
        &[
            "--shutdown-accept-grace-ms",
            &grace_ms,
            "--shutdown-drain-timeout-ms",
            "30000",
        ],
    );
    (sim, engines[0].http.clone())
}

/// The next piece of a streamed body; a cut stream fails the test.
async fn next_chunk(r: &mut reqwest::Response) -> Option<bytes::Bytes> {
    r.chunk().await.expect("the stream was cut")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        // A fresh connection per request: the checks below are about accepting new ones.
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn status(client: &reqwest::Client, url: &str) -> Option<u16> {
    client
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

async fn sim_drains_a_stream_in_flight_and_exits_0(signal: &str) {
    let (mut sim, http) = start_sim();
    let client = client();
    let base = format!("http://{http}");
    assert_eq!(status(&client, &format!("{base}/health")).await, Some(200));

    let mut stream = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": STREAM_TOKENS,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = Vec::new();
    body.extend_from_slice(&next_chunk(&mut stream).await.expect("a first chunk"));

    sim.signal(signal);
    let signalled = Instant::now();

    // At once: unhealthy, but still accepting and serving new connections.
    let deadline = signalled + GRACE / 2;
    loop {
        if status(&client, &format!("{base}/health")).await == Some(503) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health did not turn 503 at once"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        signalled.elapsed() < GRACE,
        "the check ran past the grace period"
    );
    assert_eq!(
        status(&client, &format!("{base}/v1/models")).await,
        Some(200)
    );

    // Read the stream concurrently while checking that the listener closes after the grace.
    let reader = tokio::spawn(async move {
        while let Some(chunk) = next_chunk(&mut stream).await {
            body.extend_from_slice(&chunk);
        }
        (body, Instant::now())
    });
    let closed_at = loop {
        if tokio::net::TcpStream::connect(&http).await.is_err() {
            break Instant::now();
        }
        assert!(
            signalled.elapsed() < GRACE + Duration::from_secs(10),
            "the listener never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        closed_at - signalled >= GRACE - Duration::from_millis(100),
        "the listener closed {:?} after the signal, before the grace period",
        closed_at - signalled
    );

    let (body, finished_at) = reader.await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "stream cut: …{}",
        &text[text.len().saturating_sub(200)..]
    );
    assert!(
        finished_at > closed_at,
        "the stream finished before the listener closed; it was not in flight during the drain"
    );

    let code = sim
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("kvgate sim did not exit after draining")
        .code();
    assert_eq!(code, Some(0), "kvgate sim exit status after {signal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_sigterm_cut_streams_and_exited_143() {
    sim_drains_a_stream_in_flight_and_exits_0("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_ctrl_c_drains_like_sigterm() {
    sim_drains_a_stream_in_flight_and_exits_0("INT").await;
}
