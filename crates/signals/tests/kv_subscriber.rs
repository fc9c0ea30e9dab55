//! The KV subscriber against an independent publisher: `tests/py/publish_kv.py` (pyzmq +
//! msgpack) behaving like vLLM's ZmqEventPublisher, over real TCP on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kvgate_core::observe::KvEvent;
use kvgate_signals::{
    KvSubscribeConfig, KvTransport, MonotonicClock, Observation, spawn_kv_subscriber,
};
use tokio::sync::mpsc;

/// Bound on waiting for one observation; generous for shared CI machines.
const RECV_TIMEOUT: Duration = Duration::from_secs(15);

/// The publisher process; killed on drop so a failing test leaves nothing behind.
struct Publisher {
    child: Child,
    pub_endpoint: String,
    replay_endpoint: Option<String>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require_python() {
    let ok = Command::new("python3")
        .args(["-c", "import zmq, msgpack"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with pyzmq and msgpack is required for the KV subscriber tests; \
         run scripts/setup-test-deps.sh"
    );
}

fn publisher(args: &[&str]) -> Publisher {
    require_python();
    let script = format!("{}/tests/py/publish_kv.py", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read publisher endpoints");
    let j: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("publisher printed {line:?}: {e}"));
    Publisher {
        child,
        pub_endpoint: j["pub"].as_str().unwrap().to_owned(),
        replay_endpoint: j["replay"].as_str().map(str::to_owned),
    }
}

/// The next observation after the subscriber's `KvSubscribed` hello.
async fn next(rx: &mut mpsc::Receiver<Observation>) -> Observation {
    loop {
        let o = tokio::time::timeout(RECV_TIMEOUT, rx.recv())
            .await
            .expect("no observation within the timeout")
            .expect("subscriber stopped");
        if !matches!(o, Observation::KvSubscribed { .. }) {
            return o;
        }
    }
}

/// `(seq, block hash)` of a batch observation, or panics with what arrived instead.
fn batch(o: &Observation) -> (u64, u64) {
    let Observation::KvBatch { batch, .. } = o else {
        panic!("expected a KV batch, got {o:?}");
    };
    let [KvEvent::BlockStored { block_hashes, .. }] = batch.events.as_slice() else {
        panic!("unexpected events {:?}", batch.events);
    };
    (batch.seq, block_hashes[0])
}

/// Collects the next `n` batches as `(seq, first block hash)`, skipping resync notices, and
/// returns them with the number of gaps reported meanwhile. With a replay socket the worker
/// loads the engine's replay buffer at start-up and then follows the live stream, so which
/// batches come by replay and which live depends on timing; what must hold is that every batch
/// arrives once, in order.
async fn collect(rx: &mut mpsc::Receiver<Observation>, n: usize) -> (Vec<(u64, u64)>, usize) {
    let mut seen = Vec::new();
    let mut gaps = 0;
    while seen.len() < n {
        match next(rx).await {
            o @ Observation::KvBatch { .. } => seen.push(batch(&o)),
            Observation::KvResynced { .. } => {}
            Observation::KvGap { .. } => gaps += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    (seen, gaps)
}

fn start(
    p: &Publisher,
    with_replay: bool,
) -> (mpsc::Receiver<Observation>, kvgate_signals::KvSubscriber) {
    let (tx, rx) = mpsc::channel(64);
    let cfg = KvSubscribeConfig {
        replay_endpoint: if with_replay {
            p.replay_endpoint.clone()
        } else {
            None
        },
        topic_filter: "kv@".into(),
        ..KvSubscribeConfig::new(p.pub_endpoint.clone())
    };
    let sub = spawn_kv_subscriber(
        &KvTransport::start(kvgate_signals::DEFAULT_MAX_MESSAGE_BYTES),
        cfg,
        "127.0.0.1:8000".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    (rx, sub)
}

#[tokio::test]
async fn dropped_batch_is_replayed_in_order() {
    let p = publisher(&["--count", "6", "--drop", "2"]);
    let (mut rx, sub) = start(&p, true);
    // Seq 2 never went out on PUB; the subscriber fetched it from the replay socket.
    let (seen, gaps) = collect(&mut rx, 6).await;
    assert_eq!(seen, (0..6).map(|s| (s, 1000 + s)).collect::<Vec<_>>());
    assert_eq!(gaps, 0);
    assert_eq!(sub.stats.gaps_reported.load(Ordering::Relaxed), 0);
    assert_eq!(sub.stats.batches.load(Ordering::Relaxed), 6);
    sub.abort();
}

/// An engine on IPv6 (`tcp://[::1]:P`, what discovery builds for an IPv6 pod): its batches and
/// its replay arrive (libzmq resolved no IPv6 literal without ZMQ_IPV6 and retried forever).
#[tokio::test]
async fn an_ipv6_publisher_is_followed_and_replayed() {
    let p = publisher(&["--count", "4", "--drop", "1", "--host", "[::1]"]);
    assert!(
        p.pub_endpoint.starts_with("tcp://[::1]:"),
        "{}",
        p.pub_endpoint
    );
    let (mut rx, sub) = start(&p, true);
    let (seen, gaps) = collect(&mut rx, 4).await;
    assert_eq!(seen, (0..4).map(|s| (s, 1000 + s)).collect::<Vec<_>>());
    assert_eq!(gaps, 0);
    sub.abort();
}

#[tokio::test]
async fn without_replay_a_gap_is_reported() {
    let p = publisher(&["--count", "5", "--drop", "2", "--no-replay"]);
    let (mut rx, sub) = start(&p, false);
    assert_eq!(batch(&next(&mut rx).await).0, 0);
    assert_eq!(batch(&next(&mut rx).await).0, 1);
    match next(&mut rx).await {
        Observation::KvGap {
            endpoint,
            expected,
            got,
        } => {
            assert_eq!(endpoint, "127.0.0.1:8000");
            assert_eq!((expected, got), (2, 3));
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(batch(&next(&mut rx).await).0, 3);
    assert_eq!(batch(&next(&mut rx).await).0, 4);
    sub.abort();
}

#[tokio::test]
async fn undecodable_batch_is_counted_and_reported_as_lost() {
    let p = publisher(&["--count", "4", "--garbage", "1"]);
    let (mut rx, sub) = start(&p, true);
    // In order: batch 0, the loss of batch 1 (its bytes do not decode, live or replayed), then
    // batches 2 and 3; resync notices (the start-up replay) may come in between.
    let mut seen = Vec::new();
    while seen.last() != Some(&"3".to_owned()) {
        match next(&mut rx).await {
            o @ Observation::KvBatch { .. } => seen.push(batch(&o).0.to_string()),
            Observation::KvGap { expected, got, .. } => seen.push(format!("gap {expected}..{got}")),
            Observation::KvResynced { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["0", "gap 1..2", "2", "3"]);
    assert_eq!(sub.stats.decode_errors.load(Ordering::Relaxed), 1);
    sub.abort();
}

#[tokio::test]
async fn publisher_restart_is_detected_and_followed() {
    let p = publisher(&["--count", "3", "--restart", "3"]);
    let (mut rx, sub) = start(&p, true);
    let (seen, _) = collect(&mut rx, 3).await;
    assert_eq!(seen, (0..3).map(|s| (s, 1000 + s)).collect::<Vec<_>>());
    // The old process's socket closes: the drop is reported to the router (issue 10.9) before
    // anything of the new incarnation, which starts again at 0 with an empty cache.
    let lost = next(&mut rx).await;
    assert!(
        matches!(&lost, Observation::KvDisconnected { endpoint, .. } if endpoint == "127.0.0.1:8000"),
        "expected the disconnect first, got {lost:?}"
    );
    let restart = next(&mut rx).await;
    assert!(
        matches!(restart, Observation::KvPublisherRestarted { .. }),
        "expected a restart, got {restart:?}"
    );
    // After a reconnect the subscriber may join a few batches late; whatever it missed of the
    // new incarnation is replayed, so it sees 0, 1, 2 of incarnation 2 in order.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match next(&mut rx).await {
            o @ Observation::KvBatch { .. } => seen.push(batch(&o)),
            Observation::KvResynced { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec![(0, 2000), (1, 2001), (2, 2002)]);
    assert_eq!(sub.stats.restarts.load(Ordering::Relaxed), 1);
    sub.abort();
}

#[tokio::test]
async fn subscriber_waits_for_a_publisher_that_is_not_up_yet() {
    // Nothing listens on this port at first: the subscriber must keep retrying, not give up.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (tx, mut rx) = mpsc::channel(8);
    let cfg = KvSubscribeConfig {
        ..KvSubscribeConfig::new(format!("tcp://127.0.0.1:{port}"))
    };
    let sub = spawn_kv_subscriber(
        &KvTransport::start(kvgate_signals::DEFAULT_MAX_MESSAGE_BYTES),
        cfg,
        "x".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sub.handle.is_finished());
    // Its hello only: nothing from a publisher that is not there.
    assert!(matches!(
        rx.try_recv(),
        Ok(Observation::KvSubscribed { .. })
    ));
    assert!(rx.try_recv().is_err());
    sub.abort();
}

#[tokio::test]
async fn joining_a_running_publisher_replays_its_history() {
    // Batches 0..3 went out before we subscribed; the replay buffer still holds them.
    let p = publisher(&["--preroll", "3", "--count", "2"]);
    let (mut rx, sub) = start(&p, true);
    let (seen, gaps) = collect(&mut rx, 5).await;
    assert_eq!(seen, (0..5).map(|s| (s, 1000 + s)).collect::<Vec<_>>());
    assert_eq!(gaps, 0);
    sub.abort();
}

#[tokio::test]
async fn joining_without_replay_reports_the_unknown_history() {
    let p = publisher(&["--preroll", "3", "--count", "1", "--no-replay"]);
    let (mut rx, sub) = start(&p, false);
    match next(&mut rx).await {
        Observation::KvGap { expected, got, .. } => assert_eq!((expected, got), (0, 3)),
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(batch(&next(&mut rx).await), (3, 1003));
    sub.abort();
}
