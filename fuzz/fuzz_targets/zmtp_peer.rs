//! The ZMTP framing path of the KV-event subscriber, fed as a peer feeds it: over a real TCP
//! connection on loopback to a bound kvgate SUB socket (libzmq, `ZMQ_MAXMSGSIZE` 1 MiB), whose
//! messages go through kvgate's frame decoder.
//!
//! Why a real socket rather than a call into a decoder: the framing is libzmq's C++ code,
//! which has no Rust entry point, and what must hold is a property of the whole path (no abort,
//! no unbounded allocation, the reactor keeps serving). The cost is speed: one TCP connection
//! per input, thousands of inputs a second instead of hundreds of thousands.
//!
//! Why each input waits for two things. First, for libzmq to close the connection after the harness
//! half-closes it (`shutdown(Write)`, then read to EOF): libzmq has then read every byte of the
//! input, and the harness never outruns its accept loop. Sending without waiting (the first
//! version) filled the listen backlog (100 in libzmq) within milliseconds; the kernel then dropped
//! SYNs, and each one cost a 1 s retransmit: 500 to 1,200 inputs a second with the CPU mostly idle.
//! Closing with libzmq's greeting unread also reset the connection, and libzmq may drop a reset
//! connection before it has processed all of the input. Second, for a marker message on a second,
//! long-lived connection to a second SUB socket of the same reactor to reach its consumer: the
//! reactor polls its sockets in order and drains the decoder's socket first, so the decoder has
//! (nearly always) run on this input's messages before the next input starts, and libFuzzer credits
//! the coverage to the right input; and a reactor that stops serving after some input fails that
//! input (the marker or the close does not come within [`WEDGED`]) instead of going unnoticed.
//! libzmq still parses on its own I/O thread, so a crash there is reported on the input that caused
//! it only as far as these waits order it. Each input leaves a TIME_WAIT socket behind (the harness
//! sends the first FIN); Linux reuses those ports for new loopback connections after a second
//! (`net.ipv4.tcp_tw_reuse`, 2 by default), far more than the few thousand a second needed.
//!
//! Input: first byte even → a valid ZMTP 3.0 greeting and NULL `READY` (Socket-Type PUB) are
//! sent first and the rest is the frame stream; odd → the rest is sent raw, handshake included.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use kvgate_signals::transport::{KvTransport, RawMessage, SocketHandle, TopicRoute};
use libfuzzer_sys::fuzz_target;

/// How long libzmq may take to close an input's connection, or the reactor to deliver a
/// marker, before the input counts as having wedged the transport. Far above the tens of
/// microseconds either takes, so that a busy shared machine does not fail an input.
const WEDGED: Duration = Duration::from_secs(30);

/// Decodes what libzmq delivers, as the listener's router would.
struct Decode;

impl TopicRoute for Decode {
    fn route(&self, message: RawMessage) {
        let frames: Vec<&[u8]> = message.iter().map(Vec::as_slice).collect();
        let _ = kvgate_signals::decode_frames(&frames);
    }
}

/// Counts the markers delivered on the second socket, for the harness to wait on.
#[derive(Default)]
struct Markers {
    seen: Mutex<u64>,
    arrived: Condvar,
}

impl TopicRoute for Markers {
    fn route(&self, _message: RawMessage) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.arrived.notify_all();
    }
}

struct Target {
    _transport: KvTransport,
    _frames: SocketHandle,
    _markers: SocketHandle,
    /// Where inputs are sent (the decoder's socket).
    address: String,
    /// The harness's long-lived PUB-side connection to the marker socket.
    marker_peer: TcpStream,
    markers: Arc<Markers>,
    sent: AtomicU64,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let transport = KvTransport::start(1 << 20);
        let frames = transport
            .bind("tcp://127.0.0.1:*", Arc::new(Decode))
            .expect("bind a loopback SUB socket");
        let markers = Arc::new(Markers::default());
        let marker_socket = transport
            .bind(
                "tcp://127.0.0.1:*",
                Arc::clone(&markers) as Arc<dyn TopicRoute>,
            )
            .expect("bind the marker SUB socket");
        let mut marker_peer =
            TcpStream::connect(tcp_address(&marker_socket)).expect("connect to the marker socket");
        marker_peer.set_nodelay(true).expect("TCP_NODELAY");
        marker_peer
            .write_all(&handshake())
            .expect("handshake with the marker socket");
        let address = tcp_address(&frames).to_owned();
        Target {
            _transport: transport,
            _frames: frames,
            _markers: marker_socket,
            address,
            marker_peer,
            markers,
            sent: AtomicU64::new(0),
        }
    })
}

fn tcp_address(socket: &SocketHandle) -> &str {
    socket.endpoint().trim_start_matches("tcp://")
}

fn handshake() -> Vec<u8> {
    let mut g = vec![0u8; 64];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&3u32.to_be_bytes());
    body.extend_from_slice(b"PUB");
    g.push(0x04);
    g.push(body.len() as u8);
    g.extend_from_slice(&body);
    g
}

/// Sends one input as a peer would and waits until libzmq has closed the connection.
fn feed(address: &str, mode: u8, rest: &[u8]) {
    let mut stream = TcpStream::connect(address).expect("connect to the SUB socket");
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(WEDGED));
    if mode & 1 == 0 {
        let _ = stream.write_all(&handshake());
    }
    let _ = stream.write_all(rest);
    let _ = stream.shutdown(Shutdown::Write);
    // libzmq's greeting and subscription are read and discarded; EOF or a reset (libzmq
    // dropping the peer with input unread) ends the input.
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("libzmq kept the connection open {WEDGED:?} after the peer's EOF");
            }
            Err(_) => break,
        }
    }
}

/// Sends a marker (one empty frame) and waits until the reactor has delivered it.
fn sync_with_reactor(t: &Target) {
    let n = t.sent.fetch_add(1, Ordering::Relaxed) + 1;
    (&t.marker_peer)
        .write_all(&[0x00, 0x00])
        .expect("the marker connection is open");
    let seen = t.markers.seen.lock().unwrap_or_else(|p| p.into_inner());
    let (_seen, wait) = t
        .markers
        .arrived
        .wait_timeout_while(seen, WEDGED, |seen| *seen < n)
        .unwrap_or_else(|p| p.into_inner());
    assert!(
        !wait.timed_out(),
        "the reactor delivered no marker within {WEDGED:?}: it stopped serving"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let t = target();
    feed(&t.address, mode, rest);
    sync_with_reactor(t);
});
