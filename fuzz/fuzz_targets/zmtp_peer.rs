//! The ZMTP framing path of the KV-event subscriber, fed as a peer feeds it: over a real TCP
//! connection on loopback to a bound kvgate SUB socket (libzmq, `ZMQ_MAXMSGSIZE` 1 MiB), whose
//! messages go through kvgate's frame decoder.
//!
//! Why a real socket rather than a call into a decoder: the framing is libzmq's C++ code,
//! which has no Rust entry point, and what must hold is a property of the whole path (no abort,
//! no unbounded allocation, the reactor keeps serving). The cost is speed (one TCP connection
//! per input, a few thousand inputs a second instead of hundreds of thousands) and attribution:
//! libzmq parses on its own I/O thread, so a crash may surface one or two inputs after the one
//! that caused it (libFuzzer still saves the input it was running; rerun the last few).
//!
//! Input: first byte even → a valid ZMTP 3.0 greeting and NULL `READY` (Socket-Type PUB) are
//! sent first and the rest is the frame stream; odd → the rest is sent raw, handshake included.
#![no_main]

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use kvgate_signals::transport::{KvTransport, RawMessage, SocketHandle, TopicRoute};
use libfuzzer_sys::fuzz_target;

/// Decodes what libzmq delivers, as the listener's router would.
struct Decode(AtomicU64);

impl TopicRoute for Decode {
    fn route(&self, message: RawMessage) {
        let frames: Vec<&[u8]> = message.iter().map(Vec::as_slice).collect();
        let _ = kvgate_signals::decode_frames(&frames);
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

struct Target {
    _transport: KvTransport,
    _socket: SocketHandle,
    address: String,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let transport = KvTransport::start(1 << 20);
        let socket = transport
            .bind("tcp://127.0.0.1:*", Arc::new(Decode(AtomicU64::new(0))))
            .expect("bind a loopback SUB socket");
        let address = socket.endpoint().trim_start_matches("tcp://").to_owned();
        Target {
            _transport: transport,
            _socket: socket,
            address,
        }
    })
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

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let t = target();
    let Ok(mut stream) = TcpStream::connect(&t.address) else {
        return;
    };
    let _ = stream.set_nodelay(true);
    if mode & 1 == 0 {
        let _ = stream.write_all(&handshake());
    }
    let _ = stream.write_all(rest);
});
