//! Helpers shared by the simulator's process-level tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use kvgate_sim::{Fleet, FleetConfig, start_fleet};

/// Simulated time runs this much faster in tests, so a 5.75 ms decode step takes ~0.1 ms.
pub const TEST_TIME_SCALE: f64 = 50.0;

/// Starts `n` default engines on ephemeral ports after `tweak` adjusts the config.
pub async fn fleet(n: usize, tweak: impl FnOnce(&mut FleetConfig)) -> Fleet {
    let mut cfg = FleetConfig::homogeneous(n, kvgate_engine::EngineConfig::h100());
    cfg.time_scale = TEST_TIME_SCALE;
    tweak(&mut cfg);
    start_fleet(cfg).await.expect("fleet starts")
}

/// Polls `check` every 10 ms until it returns true; panics with `what` after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..1000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// One server-sent event's `data:` payload.
#[derive(Debug, PartialEq)]
pub enum SseData {
    Json(serde_json::Value),
    Done,
}

/// A small SSE parser written for the tests (independent of the server): events are separated
/// by a blank line; every event here must be exactly one `data: ` line.
pub fn parse_sse(body: &str) -> Vec<SseData> {
    assert!(
        body.ends_with("\n\n"),
        "stream must end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|event| {
            let lines: Vec<&str> = event.split('\n').collect();
            assert_eq!(lines.len(), 1, "one line per event: {event:?}");
            let data = lines[0]
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: `: {event:?}"));
            if data == "[DONE]" {
                SseData::Done
            } else {
                SseData::Json(serde_json::from_str(data).expect("event data is JSON"))
            }
        })
        .collect()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}
