//! Throughput of a simulated fleet: how many requests per second a 16-engine sim sustains on
//! this machine. Ignored by default (it measures, it does not check); run with
//!
//! ```text
//! cargo test -p kvgate-sim --release --test load -- --ignored --nocapture
//! ```
//!
//! Each request is a short streaming completion (64-token prompt, 8 output tokens) so the
//! figure measures the simulator's HTTP + actor + SSE path, not simulated GPU time; time scale
//! 1000 makes the engine steps nearly free. A bounded number of client tasks keeps a fixed
//! concurrency; the run reports the median of several timed rounds.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::fleet;
use serde_json::json;

/// Engines in the measured fleet.
const ENGINES: usize = 16;
/// Concurrent client tasks: enough to keep every engine busy without measuring queueing.
const CONCURRENCY: usize = 128;
/// Length of one timed round.
const ROUND: Duration = Duration::from_secs(3);
/// Timed rounds; the median is reported.
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement, run explicitly"]
async fn sixteen_engine_fleet_requests_per_second() {
    let f = fleet(ENGINES, |c| c.time_scale = 1000.0).await;
    let addrs: Arc<Vec<String>> = Arc::new(
        f.engines
            .iter()
            .map(|e| format!("http://{}/v1/completions", e.http_addr))
            .collect(),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let prompt: Vec<u32> = (0..64).map(|i| 1000 + i).collect();
    let mut rates = Vec::with_capacity(ROUNDS);
    for round in 0..=ROUNDS {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + ROUND;
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(CONCURRENCY);
        for t in 0..CONCURRENCY {
            let (client, addrs, done, failed, prompt) = (
                client.clone(),
                addrs.clone(),
                done.clone(),
                failed.clone(),
                prompt.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut k = t;
                while Instant::now() < deadline {
                    let url = &addrs[k % addrs.len()];
                    k += CONCURRENCY;
                    let r = client
                        .post(url)
                        .json(&json!({"prompt": prompt, "max_tokens": 8, "stream": true}))
                        .send()
                        .await;
                    let ok = match r {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    let counter = if ok { &done } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let rps = done.load(Ordering::Relaxed) as f64 / secs;
        let failures = failed.load(Ordering::Relaxed);
        // Round 0 warms up connections and caches and is not counted.
        if round > 0 {
            println!("round {round}: {rps:.0} req/s ({failures} failed)");
            rates.push(rps);
        }
        assert_eq!(failures, 0);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median over {ROUNDS} rounds: {:.0} req/s ({ENGINES} engines, concurrency {CONCURRENCY})",
        rates[ROUNDS / 2]
    );
    f.shutdown().await;
}
