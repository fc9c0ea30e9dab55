//! Test helpers shared by kvgate's integration tests: waiting for a condition, starting a
//! simulated fleet, the request shapes and metric readers most tests need, and processes under
//! test ([`process`]: the real `kvgate` binary, killed on drop; [`envoy`]: a real Envoy in front
//! of the endpoint picker).
//!
//! Why a crate: these helpers were copied into each test file (four `eventually`s with three
//! different poll intervals and two signatures), and copies drift. A dev-dependency costs the
//! production build nothing. Network tests wait with [`eventually`], which polls a condition
//! until a deadline, instead of sleeping for a guessed time; the deadline is wall-clock so it
//! holds under tokio's paused time too.
#![deny(missing_docs)]

pub mod envoy;
pub mod process;

use std::future::Future;
use std::time::{Duration, Instant};

use kvgate_engine::EngineConfig;
use kvgate_sim::{EngineSpec, Fleet, FleetConfig, start_fleet};
use serde_json::{Value, json};

/// The model simulated engines serve by default.
pub const MODEL: &str = kvgate_sim::config::DEFAULT_MODEL;

/// How often a condition is polled: short enough to add little latency to a test, long enough
/// not to compete with the system under test for the CPU.
pub const POLL_INTERVAL_MS: u64 = 10;

/// Polls `f` until it returns true; fails the test, naming `what`, after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}

/// [`eventually`] for a condition that needs no `.await`.
pub async fn eventually_sync(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    eventually(what, within, || std::future::ready(f())).await;
}

/// Starts `n` simulated H100 engines at `time_scale`, each adjusted by `tweak(index, spec)`.
pub async fn fleet_with(
    n: usize,
    time_scale: f64,
    tweak: impl Fn(usize, &mut EngineSpec),
) -> Fleet {
    let mut cfg = FleetConfig::homogeneous(n, EngineConfig::h100());
    cfg.time_scale = time_scale;
    for (i, e) in cfg.engines.iter_mut().enumerate() {
        tweak(i, e);
    }
    start_fleet(cfg).await.expect("fleet starts")
}

/// Starts `n` simulated H100 engines at `time_scale`.
pub async fn fleet(n: usize, time_scale: f64) -> Fleet {
    fleet_with(n, time_scale, |_, _| {}).await
}

/// An HTTP client that never goes through a proxy from the environment (tests talk to
/// loopback).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A one-message chat request for [`MODEL`]; a streaming one asks for the usage chunk.
pub fn chat(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

/// The body of a GET of `url`, as text (a test's view of `/metrics` and the like).
pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    c.get(url).send().await.unwrap().text().await.unwrap()
}

/// Sum of the values of every Prometheus text line starting with `prefix` (a metric name, or a
/// name with the start of its labels).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_matching_lines_only() {
        let text = "a_total{x=\"1\"} 2\na_total{x=\"2\"} 3.5\nab 100\n# HELP a_total x\n";
        assert_eq!(metric_sum(text, "a_total{"), 5.5);
        assert_eq!(metric_sum(text, "b"), 0.0);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out waiting for never")]
    async fn eventually_fails_after_its_deadline() {
        eventually_sync("never", Duration::from_millis(30), || false).await;
    }

    #[tokio::test]
    async fn eventually_returns_once_the_condition_holds() {
        let mut calls = 0;
        eventually_sync("third call", Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        })
        .await;
        assert_eq!(calls, 3);
    }
}
