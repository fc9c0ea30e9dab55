//! End to end against `kvgate-sim`, the vLLM-compatible simulator: discovery, scraping and the
//! KV subscriber (with replay of batches the simulator deliberately drops) all read a server
//! this crate did not write, over real sockets.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kvgate_core::endpoint::EngineKind;
use kvgate_core::observe::KvEvent;
use kvgate_engine::EngineConfig;
use kvgate_signals::{
    KvSubscribeConfig, KvTransport, MonotonicClock, Observation, ScrapeConfig, discover,
    spawn_kv_subscriber, spawn_scraper,
};
use kvgate_sim::{FleetConfig, KvEncoding, start_fleet};
use kvgate_testkit::client;
use tokio::sync::mpsc;

/// Bound on the whole exchange; the simulator runs 50× faster than real time.
const DEADLINE: Duration = Duration::from_secs(30);

async fn run(encoding: KvEncoding) {
    let mut cfg = FleetConfig::homogeneous(1, EngineConfig::h100());
    cfg.time_scale = 50.0;
    cfg.kv_encoding = encoding;
    cfg.lora_adapters = vec!["sql-lora".into()];
    // Every third batch or so is never published: the subscriber must replay it.
    cfg.engines[0].faults.kv_drop_rate = 0.3;
    let model = cfg.model.clone();
    let fleet = start_fleet(cfg).await.expect("simulator starts");
    let info = &fleet.engines[0];
    let base = format!("http://{}", info.http_addr);

    let facts = discover(&base).await.expect("discovery");
    assert_eq!(facts.models, vec![model.clone()]);
    assert_eq!(facts.block_size, Some(16));
    assert!(facts.num_gpu_blocks.is_some_and(|b| b > 1000), "{facts:?}");
    assert!(
        facts.lora_adapters.contains(&"sql-lora".to_owned()),
        "{facts:?}"
    );

    let (tx, mut rx) = mpsc::channel(1024);
    let clock = Arc::new(MonotonicClock::new());
    let scraper = spawn_scraper(
        ScrapeConfig {
            interval_ms: 20,
            ..ScrapeConfig::new(format!("{base}/metrics"), EngineKind::Vllm)
        },
        "sim-0".into(),
        clock.clone(),
        tx.clone(),
    );
    let subscriber = spawn_kv_subscriber(
        &KvTransport::start(kvgate_signals::DEFAULT_MAX_MESSAGE_BYTES),
        KvSubscribeConfig {
            replay_endpoint: Some(info.kv_replay_endpoint.clone()),
            topic_filter: info.kv_topic.clone(),
            ..KvSubscribeConfig::new(info.kv_pub_endpoint.clone())
        },
        "sim-0".into(),
        clock,
        tx,
    );
    // Give the SUB socket time to connect and subscribe before events flow; missing early
    // batches would be replayed anyway, so this only keeps the test's expectations simple.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let client = client();
    let complete = |prompt: Vec<u32>| {
        let request = client
            .post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 2}));
        async move {
            let status = request.send().await.expect("completion").status();
            assert!(status.is_success(), "{status}");
        }
    };
    // 12 prompts of 64 tokens: 48 full blocks whose token ids the events must carry.
    let mut wanted = BTreeSet::new();
    for i in 0..12u32 {
        let prompt: Vec<u32> = (0..64).map(|t| 1000 + i * 64 + t).collect();
        wanted.extend(prompt.iter().copied());
        complete(prompt).await;
    }

    let mut seqs = Vec::new();
    let mut stored_tokens = BTreeSet::new();
    let mut samples = 0;
    let mut resynced = 0;
    let mut fillers = 0u32;
    let mut last_batch_at = tokio::time::Instant::now();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !wanted.is_subset(&stored_tokens) || samples == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {} of {} prompt tokens stored, {samples} samples, seqs {seqs:?}",
            wanted.intersection(&stored_tokens).count(),
            wanted.len()
        );
        if last_batch_at.elapsed() > Duration::from_millis(300) {
            // A dropped batch is only noticed when a later one arrives: make the engine
            // publish again with a request of its own.
            fillers += 1;
            complete((0..16).map(|t| 50_000 + fillers * 16 + t).collect()).await;
            last_batch_at = tokio::time::Instant::now();
        }
        let Ok(o) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await else {
            continue;
        };
        match o.expect("channel open") {
            Observation::Metrics { sample, .. } => {
                samples += 1;
                assert_eq!(sample.block_size, Some(16));
                assert!(sample.kv_capacity_blocks.is_some());
            }
            Observation::ScrapeFailed { error, .. } => panic!("scrape failed: {error}"),
            Observation::KvBatch { batch, .. } => {
                last_batch_at = tokio::time::Instant::now();
                seqs.push(batch.seq);
                for e in batch.events {
                    if let KvEvent::BlockStored {
                        token_ids,
                        block_size,
                        ..
                    } = e
                    {
                        assert_eq!(block_size, 16);
                        stored_tokens.extend(token_ids);
                    }
                }
            }
            Observation::KvResynced { .. } => resynced += 1,
            Observation::KvSubscribed { .. } => {}
            Observation::KvGap { expected, got, .. } => {
                panic!("gap {expected}..{got} although replay is available")
            }
            Observation::KvPublisherRestarted { .. } => panic!("no restart happened"),
            Observation::KvDisconnected { .. } => panic!("the publisher never went away"),
        }
    }
    // Delivered in publisher order with nothing missing, dropped batches included.
    let expected: Vec<u64> = (0..seqs.len() as u64).collect();
    assert_eq!(seqs, expected);
    assert!(
        resynced >= 1,
        "30% drop rate over {} batches caused no replay",
        seqs.len()
    );
    // The loop may stop before the last resync notice is read.
    assert!(subscriber.stats.replays_ok.load(Ordering::Relaxed) >= resynced);
    assert_eq!(subscriber.stats.gaps_reported.load(Ordering::Relaxed), 0);
    assert_eq!(subscriber.stats.decode_errors.load(Ordering::Relaxed), 0);
    scraper.abort();
    subscriber.abort();
}

#[tokio::test]
async fn signals_follow_the_simulator_array_encoding() {
    run(KvEncoding::Array).await;
}

#[tokio::test]
async fn signals_follow_the_simulator_map_encoding() {
    run(KvEncoding::Map).await;
}
