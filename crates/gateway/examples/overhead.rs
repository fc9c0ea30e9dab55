//! What the gateway costs: latency added to each streamed request and CPU spent per request,
//! measured against a direct connection to the same simulated engine.
//!
//! ```text
//! cargo run --release -p kvgate-gateway --example overhead -- [requests_per_level] [max_tokens]
//! ```
//!
//! One simulated H100 engine (time scale 100, so a 32-token stream takes a few ms of wall time)
//! serves both phases. For each concurrency level (1 and 256 streams in flight), the same number
//! of streaming chat requests is sent first directly to the engine, then through a gateway in
//! front of it, and for each request the time to the first body byte (TTFB) and to the end of the
//! stream is recorded. The gateway runs on its own tokio runtime whose worker threads are named
//! `kvgate-gw`; its CPU time is read from `/proc/self/task/*/stat` for those threads only, so
//! client and engine CPU do not count. `KVGATE_DECISION_LOG=FILE` runs the gateway with a
//! decision log (`--decision-log FILE`), to measure what route receipts cost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvgate_engine::EngineConfig;
use kvgate_gateway::Gateway;
use kvgate_runtime::config::{DataPlaneConfig, Overrides};
use kvgate_sim::{FleetConfig, start_fleet};
use serde_json::json;

const GATEWAY_THREAD: &str = "kvgate-gw";

/// Gateway worker threads: enough that the gateway is never CPU-starved by the benchmark's own
/// client and engine threads on a small machine.
const GATEWAY_WORKERS: usize = 2;

/// CPU seconds (user + system) of this process's threads named `name`.
fn thread_cpu_s(name: &str) -> f64 {
    // Linux reports these in USER_HZ ticks, 100 per second on every mainstream architecture
    // (reading sysconf would need libc for no gain).
    const TICKS_PER_S: f64 = 100.0;
    let mut ticks = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for task in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // Format: pid (comm) state ... ; fields 14 and 15 (1-based) are utime and stime.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(name) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let get = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // After "pid (comm) ", field 3 (state) is index 0, so utime (14) is index 11.
        ticks += get(11) + get(12);
    }
    ticks as f64 / TICKS_PER_S
}

struct Run {
    ttfb_us: Histogram<u64>,
    total_us: Histogram<u64>,
    wall: Duration,
}

async fn run_level(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    requests: usize,
    max_tokens: u32,
) -> Run {
    let ttfb = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let total = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, ttfb, total, next) = (
            client.clone(),
            url.to_owned(),
            ttfb.clone(),
            total.clone(),
            next.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                let body = json!({
                    "model": kvgate_sim::config::DEFAULT_MODEL,
                    "messages": [{"role": "user", "content": format!("request {i}: say something about routing")}],
                    "max_tokens": max_tokens,
                    "stream": true,
                });
                let t0 = Instant::now();
                let mut r = client.post(&url).json(&body).send().await.expect("request sent");
                assert!(r.status().is_success(), "status {}", r.status());
                let mut first = None;
                while let Some(_chunk) = r.chunk().await.expect("stream read") {
                    first.get_or_insert_with(Instant::now);
                }
                let end = Instant::now();
                let us = |t: Instant| u64::try_from(t.duration_since(t0).as_micros()).unwrap_or(u64::MAX);
                ttfb.lock().unwrap().record(us(first.unwrap_or(end))).unwrap();
                total.lock().unwrap().record(us(end)).unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let wall = started.elapsed();
    let ttfb_us = ttfb.lock().unwrap().clone();
    let total_us = total.lock().unwrap().clone();
    Run {
        ttfb_us,
        total_us,
        wall,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let requests: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let max_tokens: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(32);

    let gw_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(GATEWAY_WORKERS)
        .thread_name(GATEWAY_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut fleet_cfg = FleetConfig::homogeneous(1, EngineConfig::h100());
    fleet_cfg.time_scale = 100.0;
    let fleet = rt.block_on(start_fleet(fleet_cfg)).expect("engine starts");
    let engine = fleet.engines[0].http_addr.to_string();

    let mut cfg =
        DataPlaneConfig::from_yaml(&format!("endpoints: [{{url: 'http://{engine}'}}]")).unwrap();
    cfg.host = "127.0.0.1".into();
    cfg.port = 0;
    cfg.admin_port = 0;
    cfg.logs.decision_log = std::env::var_os("KVGATE_DECISION_LOG").map(Into::into);
    let gw = gw_rt
        .block_on(Gateway::start(cfg, Overrides::default()))
        .expect("gateway starts");
    while !gw.control.is_ready() {
        std::thread::sleep(Duration::from_millis(10));
    }

    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let direct_url = format!("http://{engine}/v1/chat/completions");
    let gw_url = format!("http://{}/v1/chat/completions", gw.api_addr);

    println!(
        "kvgate gateway overhead: {requests} streaming chat requests per run, max_tokens {max_tokens}, 1 simulated H100 engine (time scale 100)"
    );
    println!(
        "{:>5} {:>8} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9} | {:>7} {:>7} | {:>10}",
        "conc",
        "path",
        "ttfb p50",
        "ttfb p99",
        "end p50",
        "end p99",
        "+ttfb p50",
        "+ttfb p99",
        "+end p50",
        "+end p99",
        "x p50",
        "x p99",
        "gw cpu/req"
    );
    for concurrency in [1usize, 256] {
        // Warm both paths (connection pools, allocator, engine prefix cache of the template).
        rt.block_on(run_level(
            &client,
            &direct_url,
            concurrency,
            concurrency * 2,
            max_tokens,
        ));
        rt.block_on(run_level(
            &client,
            &gw_url,
            concurrency,
            concurrency * 2,
            max_tokens,
        ));
        let direct = rt.block_on(run_level(
            &client,
            &direct_url,
            concurrency,
            requests,
            max_tokens,
        ));
        let cpu0 = thread_cpu_s(GATEWAY_THREAD);
        let via = rt.block_on(run_level(
            &client,
            &gw_url,
            concurrency,
            requests,
            max_tokens,
        ));
        let cpu_us_per_req = (thread_cpu_s(GATEWAY_THREAD) - cpu0) * 1e6 / requests as f64;
        let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as i64;
        for (name, r) in [("direct", &direct), ("gateway", &via)] {
            print!(
                "{concurrency:>5} {name:>8} | {:>9} {:>9} {:>9} {:>9} |",
                q(&r.ttfb_us, 0.5),
                q(&r.ttfb_us, 0.99),
                q(&r.total_us, 0.5),
                q(&r.total_us, 0.99)
            );
            if name == "gateway" {
                println!(
                    " {:>9} {:>9} {:>9} {:>9} | {:>7.3} {:>7.3} | {:>8.0}us  ({:.0} req/s direct, {:.0} req/s gateway)",
                    q(&via.ttfb_us, 0.5) - q(&direct.ttfb_us, 0.5),
                    q(&via.ttfb_us, 0.99) - q(&direct.ttfb_us, 0.99),
                    q(&via.total_us, 0.5) - q(&direct.total_us, 0.5),
                    q(&via.total_us, 0.99) - q(&direct.total_us, 0.99),
                    q(&via.total_us, 0.5) as f64 / q(&direct.total_us, 0.5).max(1) as f64,
                    q(&via.total_us, 0.99) as f64 / q(&direct.total_us, 0.99).max(1) as f64,
                    cpu_us_per_req,
                    requests as f64 / direct.wall.as_secs_f64(),
                    requests as f64 / via.wall.as_secs_f64(),
                );
            } else {
                println!();
            }
        }
    }
    println!(
        "times in us; +X = gateway minus direct at the same quantile; x = gateway / direct (end of stream)"
    );
    drop(gw);
    drop(fleet);
}
