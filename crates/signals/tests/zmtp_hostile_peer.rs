//! Issue 10.1: a peer that completes the ZMTP handshake on a KV-event or replay address and
//! then announces a huge frame must be dropped before anything is allocated, and the transport
//! must go on serving good publishers.
//!
//! The hostile peer is written by hand over a plain TCP socket, byte for byte as ZMTP 3.0
//! (<https://rfc.zeromq.org/spec/23/>) defines it: a 64-byte greeting (signature, version 3.0,
//! mechanism `NULL`), a `READY` command carrying `Socket-Type`, then a long frame header whose
//! 8-byte size is the attack. With the former pure-Rust transport a size of 2^40 aborted the
//! process (`memory allocation of 1099511693321 bytes failed`) and 2^33 left the subscriber
//! waiting forever; libzmq with `ZMQ_MAXMSGSIZE` refuses the frame from its header alone.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvgate_signals::subscribe::KvSubscribeConfig;
use kvgate_signals::transport::{
    KvTransport, RECONNECT_IVL_MAX_MS, RawMessage, TopicRoute, replay_blocking,
};
use kvgate_signals::{MonotonicClock, Observation, spawn_kv_subscriber};
use tokio::sync::mpsc;

/// Bound on every wait; generous for a shared two-core machine.
const WAIT: Duration = Duration::from_secs(15);

/// The size limit the transports under test enforce (small, so that a real over-limit frame is
/// cheap to send).
const LIMIT: i64 = 1 << 20;

/// The frame sizes each attack announces: 2^40 (aborted the process), 2^33 (wedged the
/// subscriber), and a real frame one byte over the limit.
const ATTACKS: [(u64, bool); 3] = [(1 << 40, false), (1 << 33, false), (LIMIT as u64 + 1, true)];

/// Polls `cond` until it holds or [`WAIT`] passes.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Accepts one connection, failing (rather than hanging) if none comes within [`WAIT`].
fn accept_within(listener: &TcpListener, what: &str) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection: {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The 64-byte ZMTP 3.0 greeting with the NULL mechanism.
fn greeting(as_server: bool) -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3; // version major
    g[11] = 0; // version minor
    g[12..16].copy_from_slice(b"NULL");
    g[32] = u8::from(as_server);
    g
}

/// A short `READY` command with the one property every peer must send.
fn ready(socket_type: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.push(5);
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut cmd = vec![0x04, u8::try_from(body.len()).unwrap()];
    cmd.extend_from_slice(&body);
    cmd
}

/// Completes the handshake as `socket_type` and reads libzmq's greeting and READY back, so
/// the attack frame is the first thing after a successful handshake.
fn handshake(stream: &mut TcpStream, socket_type: &str, as_server: bool) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(&greeting(as_server)).unwrap();
    stream.write_all(&ready(socket_type)).unwrap();
    let mut theirs = [0u8; 64];
    stream.read_exact(&mut theirs).unwrap();
    assert_eq!(
        (theirs[0], theirs[9], theirs[10]),
        (0xFF, 0x7F, 3),
        "not ZMTP 3"
    );
    // Their READY: a command frame, short or long.
    let mut flags = [0u8; 1];
    stream.read_exact(&mut flags).unwrap();
    assert_eq!(
        flags[0] & 0x04,
        0x04,
        "expected a command, got flags {:#x}",
        flags[0]
    );
    let len = if flags[0] & 0x02 != 0 {
        let mut n = [0u8; 8];
        stream.read_exact(&mut n).unwrap();
        usize::try_from(u64::from_be_bytes(n)).unwrap()
    } else {
        let mut n = [0u8; 1];
        stream.read_exact(&mut n).unwrap();
        usize::from(n[0])
    };
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    assert!(body.starts_with(b"\x05READY"), "expected READY");
}

/// Sends a long message frame announcing `size` bytes (and, when `send_body`, the bytes), then
/// waits until libzmq closes the connection. Write errors are expected: libzmq may close
/// before the body is through.
fn attack_and_expect_disconnect(stream: &mut TcpStream, size: u64, send_body: bool) {
    let mut header = vec![0x02];
    header.extend_from_slice(&size.to_be_bytes());
    let _ = stream.write_all(&header);
    if send_body {
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if stream.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
    }
    // libzmq may first send us something (a subscription); drain until end of stream.
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "the peer announcing {size} bytes was not disconnected"
            ),
        }
    }
}

/// Collects what a bound socket routes.
#[derive(Default)]
struct Collect(Mutex<Vec<RawMessage>>);

impl TopicRoute for Collect {
    fn route(&self, message: RawMessage) {
        self.0.lock().unwrap().push(message);
    }
}

fn tcp_address(endpoint: &str) -> &str {
    endpoint.strip_prefix("tcp://").unwrap()
}

/// Publishes `[topic, seq, payload]` from a real libzmq PUB until `delivered` says it arrived
/// (a fresh connection drops messages until the subscription reaches the publisher).
fn publish_until(
    publisher: &zmq::Socket,
    topic: &str,
    payload: &[u8],
    mut delivered: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + WAIT;
    let mut seq = 0u64;
    while !delivered() {
        assert!(
            Instant::now() < deadline,
            "the good publisher's messages never arrived"
        );
        publisher
            .send_multipart(
                [topic.as_bytes(), &seq.to_be_bytes()[..], payload],
                zmq::DONTWAIT,
            )
            .unwrap();
        seq += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn payload() -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/vllm_map.msgpack",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn peer_announcing_a_2_pow_40_byte_frame_is_refused_without_allocating() {
    let transport = KvTransport::start(LIMIT);
    let collected = Arc::new(Collect::default());
    let listener = transport
        .bind("tcp://127.0.0.1:*", collected.clone())
        .unwrap();
    let address = tcp_address(listener.endpoint()).to_owned();
    let stats = Arc::clone(transport.stats());

    for (round, (size, send_body)) in ATTACKS.into_iter().enumerate() {
        let mut peer = TcpStream::connect(&address).unwrap();
        handshake(&mut peer, "PUB", false);
        attack_and_expect_disconnect(&mut peer, size, send_body);
        let dropped = round as u64 + 1;
        eventually("libzmq reports the peer dropped", || {
            stats.peer_disconnects.load(Ordering::Relaxed) >= dropped
        });
    }
    assert_eq!(stats.messages.load(Ordering::Relaxed), 0);

    // The process is alive and the listener still serves a well-behaved engine.
    let ctx = zmq::Context::new();
    let publisher = ctx.socket(zmq::PUB).unwrap();
    publisher.set_linger(0).unwrap();
    publisher.connect(listener.endpoint()).unwrap();
    let payload = payload();
    publish_until(&publisher, "kv@127.0.0.1:8000@m", &payload, || {
        !collected.0.lock().unwrap().is_empty()
    });
    let first = collected.0.lock().unwrap()[0].clone();
    assert_eq!(first.len(), 3);
    assert_eq!(first[0], b"kv@127.0.0.1:8000@m");
    assert_eq!(first[2], payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_announcing_a_2_pow_40_byte_frame_is_dropped_and_reconnected_to() {
    // Connect mode: the "engine" binds, kvgate's SUB connects to it. The hostile engine
    // accepts each connection, handshakes as PUB and announces a huge frame; libzmq drops it,
    // reports the disconnect to the subscriber, and reconnects by itself.
    let hostile = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hostile.local_addr().unwrap().port();
    let transport = KvTransport::start(LIMIT);
    let (tx, mut rx) = mpsc::channel(64);
    let sub = spawn_kv_subscriber(
        &transport,
        KvSubscribeConfig::new(format!("tcp://127.0.0.1:{port}")),
        "127.0.0.1:8000".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    let attacker = std::thread::spawn(move || {
        for (size, send_body) in ATTACKS {
            let mut peer = accept_within(&hostile, "kvgate did not reconnect after a drop");
            handshake(&mut peer, "PUB", true);
            attack_and_expect_disconnect(&mut peer, size, send_body);
        }
        // Closing the port makes way for the good engine below.
        drop(hostile);
    });
    tokio::task::spawn_blocking(move || attacker.join().unwrap())
        .await
        .unwrap();
    let stats = Arc::clone(&sub.stats);
    eventually("the subscriber saw every disconnect", || {
        stats.socket_rebuilds.load(Ordering::Relaxed) >= ATTACKS.len() as u64
    });
    assert_eq!(stats.batches.load(Ordering::Relaxed), 0);

    // A good engine binds the same port: its batches arrive through the same subscriber.
    let ctx = zmq::Context::new();
    let publisher = ctx.socket(zmq::PUB).unwrap();
    publisher.set_linger(0).unwrap();
    publisher.bind(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let payload = payload();
    let got = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&got);
    let reader = tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            if let Observation::KvBatch { endpoint, .. } = o {
                *seen.lock().unwrap() = Some(endpoint);
                return;
            }
        }
    });
    let waiting = Arc::clone(&got);
    tokio::task::spawn_blocking(move || {
        publish_until(&publisher, "kv@127.0.0.1:8000@m", &payload, || {
            waiting.lock().unwrap().is_some()
        });
    })
    .await
    .unwrap();
    reader.await.unwrap();
    assert_eq!(got.lock().unwrap().as_deref(), Some("127.0.0.1:8000"));
    sub.abort();
}

#[test]
fn replay_server_announcing_a_2_pow_40_byte_frame_fails_the_replay_not_the_process() {
    // The replay path: kvgate's DEALER connects to the engine's ROUTER. A hostile "engine"
    // answers the replay request with a huge frame header; the exchange must fail within its
    // timeout, and a later replay against a good server must succeed.
    let hostile = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://{}", hostile.local_addr().unwrap());
    let attacker = std::thread::spawn(move || {
        for (size, send_body) in ATTACKS {
            let mut peer = accept_within(&hostile, "no replay request");
            handshake(&mut peer, "ROUTER", true);
            attack_and_expect_disconnect(&mut peer, size, send_body);
        }
    });
    let ctx = zmq::Context::new();
    for (size, _) in ATTACKS {
        let started = Instant::now();
        let result = replay_blocking(
            &ctx,
            &endpoint,
            0,
            u64::MAX,
            true,
            Duration::from_millis(1_500),
            LIMIT,
        );
        assert!(
            result.is_err(),
            "replay of a {size}-byte frame returned {result:?}"
        );
        assert!(started.elapsed() < WAIT);
    }
    attacker.join().unwrap();

    // A well-behaved replay server (vLLM 0.32's frames): one batch, then the end marker.
    let router = ctx.socket(zmq::ROUTER).unwrap();
    router.set_linger(0).unwrap();
    router.bind("tcp://127.0.0.1:*").unwrap();
    let good = router.get_last_endpoint().unwrap().unwrap();
    let payload = payload();
    let server = std::thread::spawn(move || {
        let request = router.recv_multipart(0).unwrap();
        let identity = request[0].clone();
        let topic = b"kv@127.0.0.1:8000@m".to_vec();
        router
            .send_multipart(
                [&identity[..], b"", &topic, &7u64.to_be_bytes(), &payload],
                0,
            )
            .unwrap();
        router
            .send_multipart([&identity[..], b"", b"", &[0xFF; 8], b""], 0)
            .unwrap();
        payload
    });
    let replayed = replay_blocking(&ctx, &good, 0, u64::MAX, true, WAIT, LIMIT).unwrap();
    let payload = server.join().unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!((replayed[0].seq, &replayed[0].payload), (7, &payload));
}

/// Issue 10.9: the KV subscription came back 11-20 s after an engine restart. With libzmq's
/// backoff capped at [`RECONNECT_IVL_MAX_MS`], an engine that comes back after a 3 s outage is
/// subscribed to again within that cap (plus scheduling slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_subscription_is_back_within_the_reconnect_cap_after_an_engine_restart() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("tcp://127.0.0.1:{port}");
    let transport = KvTransport::start(LIMIT);
    let (tx, mut rx) = mpsc::channel(4_096);
    let sub = spawn_kv_subscriber(
        &transport,
        KvSubscribeConfig::new(address.clone()),
        "127.0.0.1:8000".into(),
        Arc::new(MonotonicClock::new()),
        tx,
    );
    let payload = payload();
    let ctx = zmq::Context::new();
    let batches = Arc::clone(&sub.stats);

    let start_engine = || {
        let publisher = ctx.socket(zmq::PUB).unwrap();
        publisher.set_linger(0).unwrap();
        publisher.bind(&address).unwrap();
        publisher
    };
    let deliver = |publisher: zmq::Socket,
                   payload: Vec<u8>,
                   batches: Arc<kvgate_signals::KvSubscriberStats>| {
        tokio::task::spawn_blocking(move || {
            let before = batches.batches.load(Ordering::Relaxed);
            publish_until(&publisher, "kv@127.0.0.1:8000@m", &payload, || {
                batches.batches.load(Ordering::Relaxed) > before
            });
            publisher
        })
    };
    let first = deliver(start_engine(), payload.clone(), Arc::clone(&batches))
        .await
        .unwrap();
    // The engine dies; the subscriber notices.
    let rebuilds = batches.socket_rebuilds.load(Ordering::Relaxed);
    drop(first);
    eventually("the subscriber saw the engine go away", || {
        batches.socket_rebuilds.load(Ordering::Relaxed) > rebuilds
    });
    // Long enough for the backoff to reach its cap.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = Instant::now();
    let second = deliver(start_engine(), payload, Arc::clone(&batches))
        .await
        .unwrap();
    let back_after = restarted.elapsed();
    drop(second);
    eprintln!("KV subscription back {back_after:?} after the engine bound again");
    assert!(
        back_after < Duration::from_millis(RECONNECT_IVL_MAX_MS as u64) + Duration::from_secs(2),
        "KV subscription came back only after {back_after:?}"
    );
    while rx.try_recv().is_ok() {}
    sub.abort();
}
