//! KV-cache events over ZeroMQ, published as vLLM 0.32's `ZmqEventPublisher` publishes them
//! (`vllm/distributed/kv_events.py`), on libzmq (the `zmq` crate).
//!
//! **Who binds.** vLLM's PUB socket *connects* to its configured `endpoint` unless the address
//! contains `*` or `::` or is `ipc://`/`inproc://`, in which case it binds
//! (`ZmqEventPublisher._is_bind_endpoint`, [`publisher_binds`]). With a concrete address, one
//! router SUB socket binds it and every engine connects, telling them apart by topic (llm-d's
//! "centralized" mode). The replay ROUTER socket is always bound.
//!
//! **PUB frames.** Every message is three frames: topic (UTF-8, vLLM's `topic` setting), sequence
//! number (8 bytes, big-endian, from 0, +1 per batch) and the msgpack `EventBatch`. One batch per
//! engine step that changed the cache; nothing is sent when nothing changed (vLLM has no
//! heartbeat). The batch is `[ts, events, data_parallel_rank]` (`EventBatch` is `array_like`);
//! events come in one of two shapes ([`KvEncoding`]):
//! - **map** (vLLM 0.32, the default): msgspec's tagged structs with `omit_defaults=True`, a
//!   map whose first key is `"type"`, then the fields in declaration order, fields at their
//!   default (`None`) left out: `BlockStored{block_hashes, parent_block_hash, token_ids,
//!   block_size, lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind}`
//!   (`lora_id`, `medium` and `lora_name` have no default, so they are always written, null or
//!   not; `extra_keys` is one entry per block, null or the untagged values,
//!   `kv_cache_utils.to_event_extra_keys`; `group_idx` is 0 and `kv_cache_spec_kind`
//!   `"full_attention"`, which `KVCacheManager.take_events` fills in), `BlockRemoved{block_hashes,
//!   medium, group_idx}`, `AllBlocksCleared{}`;
//! - **array** (older vLLM, SGLang): `["BlockStored", block_hashes, parent_block_hash,
//!   token_ids, block_size, lora_id, medium, lora_name]`, `["BlockRemoved", block_hashes,
//!   medium]`, `["AllBlocksCleared"]`.
//!
//! `BlockRemoved` carries one hash per event, as `BlockPool._emit_block_removed_events` emits it
//! (the engine model batches an allocation's evictions; they are split here).
//!
//! **Replay (ROUTER).** A DEALER sends `[b"", start_seq (8 bytes BE)]`; vLLM 0.32 answers one
//! four-frame message `[b"", topic, seq, payload]` per buffered batch with `seq >= start`, then
//! the end marker `[b"", b"", 0xFF×8, b""]` (`_service_replay`); older vLLM answers three frames
//! `[b"", seq, payload]` and ends with `[b"", 0xFF×8, b""]` ([`ReplayFormat`]). Requests of any
//! other shape are ignored, as vLLM ignores them. The buffer is a ring of the last
//! `replay_buffer_batches` batches (see [`crate::config::DEFAULT_REPLAY_BUFFER_BATCHES`]).
//!
//! **Threads.** libzmq sockets block and must not be shared between threads, so each socket runs
//! on its own OS thread: the PUB thread is fed batches by the engine actor through a channel and
//! appends each to the ring before sending it, the ROUTER thread polls for replay requests and
//! reads the ring. Each engine has its own ZMQ context, so killing an engine terminates it:
//! once [`crate::Fleet::kill`] returns, both sockets are closed and their ports released.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use kvgate_engine::KvEvent;
use rmpv::Value;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::SimError;
use crate::fault::{DrawKind, uniform};

/// vLLM's `MEDIUM_GPU`: every block the simulated engine stores lives in GPU memory.
const MEDIUM_GPU: &str = "GPU";

/// `KVCacheSpecKind.FULL_ATTENTION.value`, the kind of the model's only KV-cache group.
const FULL_ATTENTION: &str = "full_attention";

/// The replay terminator's sequence number: -1 as a signed 64-bit big-endian integer.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// vLLM's PUB high-water mark (`ZmqEventPublisher(hwm=100_000)`): batches queued per subscriber
/// before the PUB socket drops them.
const PUB_SNDHWM: i32 = 100_000;

/// Largest replay request frame the ROUTER accepts. A request is an empty delimiter and an
/// 8-byte sequence number; libzmq drops a peer that sends more *before* allocating the frame, so
/// a misbehaving client cannot make the engine buffer a huge message.
const REPLAY_MAX_MSG_BYTES: i64 = 256;

/// How often the socket threads look at the stop token while idle: a killed engine's sockets
/// close within this bound.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Which msgpack shape KV events are written in (both exist in deployed engines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KvEncoding {
    /// vLLM 0.32: events are maps tagged by `"type"`, default-valued fields omitted.
    #[default]
    Map,
    /// Older vLLM and SGLang: events are arrays `["BlockStored", field, ...]`.
    Array,
}

/// How the replay socket answers (vLLM 0.32 added the topic frame).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum ReplayFormat {
    /// `[b"", topic, seq, payload]` per batch, end marker `[b"", b"", 0xFF×8, b""]`.
    #[default]
    #[serde(rename = "v0_32")]
    #[value(name = "v0_32")]
    V0_32,
    /// `[b"", seq, payload]` per batch, end marker `[b"", 0xFF×8, b""]`.
    #[serde(rename = "legacy")]
    #[value(name = "legacy")]
    Legacy,
}

/// Whether a KV-event PUB socket binds or connects its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketRole {
    /// The engine binds; subscribers connect to it.
    Bind,
    /// The engine connects to an address a subscriber has bound.
    Connect,
}

impl SocketRole {
    /// `"bind"` or `"connect"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SocketRole::Bind => "bind",
            SocketRole::Connect => "connect",
        }
    }
}

/// vLLM's rule for its PUB socket (`ZmqEventPublisher._is_bind_endpoint`): bind wildcard and
/// ipc/inproc endpoints, connect to everything else.
pub fn publisher_binds(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

/// A TCP endpoint on `host`; port 0 becomes libzmq's ephemeral-port wildcard.
pub(crate) fn tcp_endpoint(host: IpAddr, port: u16) -> String {
    let host = match host {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    if port == 0 {
        format!("tcp://{host}:*")
    } else {
        format!("tcp://{host}:{port}")
    }
}

/// One engine step's events, ready to encode.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Wall-clock Unix time of the step, in seconds.
    pub ts: f64,
    pub events: Vec<KvEvent>,
}

/// Maps a LoRA adapter name to vLLM's integer `lora_id` (1-based, in configuration order, as
/// vLLM numbers `--lora-modules`).
#[derive(Clone, Debug)]
pub(crate) struct LoraIds(pub Vec<String>);

impl LoraIds {
    fn id(&self, name: &str) -> Option<u64> {
        self.0.iter().position(|a| a == name).map(|i| i as u64 + 1)
    }
}

fn hashes(h: &[u64]) -> Value {
    Value::Array(h.iter().map(|&x| Value::from(x)).collect())
}

fn opt_str(s: Option<&str>) -> Value {
    s.map_or(Value::Nil, Value::from)
}

fn extra_keys(keys: &[Option<Vec<String>>]) -> Value {
    Value::Array(
        keys.iter()
            .map(|k| {
                k.as_ref().map_or(Value::Nil, |k| {
                    Value::Array(k.iter().map(|s| Value::from(s.as_str())).collect())
                })
            })
            .collect(),
    )
}

fn tagged(enc: KvEncoding, tag: &str, fields: Vec<(&str, Value)>) -> Value {
    match enc {
        KvEncoding::Array => Value::Array(
            std::iter::once(Value::from(tag))
                .chain(fields.into_iter().map(|(_, v)| v))
                .collect(),
        ),
        KvEncoding::Map => Value::Map(
            std::iter::once((Value::from("type"), Value::from(tag)))
                .chain(fields.into_iter().map(|(k, v)| (Value::from(k), v)))
                .collect(),
        ),
    }
}

/// Appends the wire events of one engine event (one per removed hash).
fn push_events(out: &mut Vec<Value>, e: &KvEvent, enc: KvEncoding, loras: &LoraIds) {
    let map = enc == KvEncoding::Map;
    match e {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_name,
            extra_keys: extra,
        } => {
            let mut fields = vec![
                ("block_hashes", hashes(block_hashes)),
                (
                    "parent_block_hash",
                    parent_block_hash.map_or(Value::Nil, Value::from),
                ),
                (
                    "token_ids",
                    Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
                ),
                ("block_size", Value::from(*block_size)),
                (
                    "lora_id",
                    lora_name
                        .as_deref()
                        .and_then(|n| loras.id(n))
                        .map_or(Value::Nil, Value::from),
                ),
                ("medium", Value::from(MEDIUM_GPU)),
                ("lora_name", opt_str(lora_name.as_deref())),
            ];
            if map {
                fields.extend([
                    ("extra_keys", extra_keys(extra)),
                    ("group_idx", Value::from(0)),
                    ("kv_cache_spec_kind", Value::from(FULL_ATTENTION)),
                ]);
            }
            out.push(tagged(enc, "BlockStored", fields));
        }
        KvEvent::BlockRemoved { block_hashes } => {
            for &h in block_hashes {
                let mut fields = vec![
                    ("block_hashes", hashes(&[h])),
                    ("medium", Value::from(MEDIUM_GPU)),
                ];
                if map {
                    fields.push(("group_idx", Value::from(0)));
                }
                out.push(tagged(enc, "BlockRemoved", fields));
            }
        }
        KvEvent::AllBlocksCleared => out.push(tagged(enc, "AllBlocksCleared", vec![])),
    }
}

/// Encodes one batch as msgpack `[ts, events, data_parallel_rank]`.
pub(crate) fn encode_batch(batch: &Batch, enc: KvEncoding, loras: &LoraIds) -> Vec<u8> {
    let mut events = Vec::with_capacity(batch.events.len());
    for e in &batch.events {
        push_events(&mut events, e, enc, loras);
    }
    let v = Value::Array(vec![
        Value::F64(batch.ts),
        Value::Array(events),
        Value::from(0),
    ]);
    let mut out = Vec::with_capacity(64);
    rmpv::encode::write_value(&mut out, &v).expect("writing msgpack to a Vec cannot fail");
    out
}

/// The ring of published batches both socket threads share.
type Ring = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// One engine's two KV-event sockets, opened (bound or connected) and ready to hand to threads.
pub(crate) struct KvSockets {
    publ: zmq::Socket,
    replay: zmq::Socket,
    /// Where the PUB socket is bound (what subscribers connect to) or what it connects to.
    pub pub_endpoint: String,
    pub pub_role: SocketRole,
    /// Where the replay ROUTER is bound.
    pub replay_endpoint: String,
}

fn zmq_err(what: &'static str, endpoint: &str) -> impl FnOnce(zmq::Error) -> SimError {
    let endpoint = endpoint.to_owned();
    move |source| SimError::Zmq {
        what,
        endpoint,
        source,
    }
}

fn bind(sock: &zmq::Socket, endpoint: &str) -> Result<String, SimError> {
    // vLLM (pyzmq) binds `tcp://*:0` to an ephemeral port; libzmq spells that port `*`.
    let endpoint = match endpoint.strip_suffix(":0") {
        Some(base) if endpoint.starts_with("tcp://") => format!("{base}:*"),
        _ => endpoint.to_owned(),
    };
    let endpoint = endpoint.as_str();
    if endpoint.starts_with("tcp://[") {
        sock.set_ipv6(true)
            .map_err(zmq_err("set ZMQ_IPV6 on", endpoint))?;
    }
    sock.bind(endpoint).map_err(zmq_err("bind", endpoint))?;
    Ok(sock
        .get_last_endpoint()
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| endpoint.to_owned()))
}

impl KvSockets {
    /// Opens the PUB socket on `pub_endpoint` (binding or connecting by vLLM's rule, or binding
    /// when `force_bind`) and binds the replay ROUTER on `replay_endpoint`, both in a fresh
    /// context.
    pub fn open(
        pub_endpoint: &str,
        force_bind: bool,
        replay_endpoint: &str,
    ) -> Result<Self, SimError> {
        let ctx = zmq::Context::new();
        let publ = ctx
            .socket(zmq::PUB)
            .map_err(zmq_err("create PUB socket for", pub_endpoint))?;
        publ.set_sndhwm(PUB_SNDHWM)
            .map_err(zmq_err("set ZMQ_SNDHWM on", pub_endpoint))?;
        // A killed engine drops what it has not sent, as a crashed process would.
        publ.set_linger(0)
            .map_err(zmq_err("set ZMQ_LINGER on", pub_endpoint))?;
        let (pub_endpoint, pub_role) = if force_bind || publisher_binds(pub_endpoint) {
            (bind(&publ, pub_endpoint)?, SocketRole::Bind)
        } else {
            publ.connect(pub_endpoint)
                .map_err(zmq_err("connect", pub_endpoint))?;
            (pub_endpoint.to_owned(), SocketRole::Connect)
        };
        let replay = ctx
            .socket(zmq::ROUTER)
            .map_err(zmq_err("create ROUTER socket for", replay_endpoint))?;
        replay
            .set_maxmsgsize(REPLAY_MAX_MSG_BYTES)
            .map_err(zmq_err("set ZMQ_MAXMSGSIZE on", replay_endpoint))?;
        replay
            .set_linger(0)
            .map_err(zmq_err("set ZMQ_LINGER on", replay_endpoint))?;
        let replay_endpoint = bind(&replay, replay_endpoint)?;
        Ok(Self {
            publ,
            replay,
            pub_endpoint,
            pub_role,
            replay_endpoint,
        })
    }
}

/// Everything the two socket threads need.
pub(crate) struct Publisher {
    pub sockets: KvSockets,
    pub topic: Bytes,
    pub encoding: KvEncoding,
    pub replay_format: ReplayFormat,
    pub loras: LoraIds,
    pub buffer_batches: usize,
    pub drop_rate: f64,
    pub fault_seed: u64,
    pub engine_index: usize,
}

impl Publisher {
    /// Starts the PUB thread (publishing batches from `rx` until the sender is gone or `stop`
    /// fires) and the replay thread (until `stop` fires). Each closes its socket when it ends.
    pub fn spawn(
        self,
        rx: Receiver<Batch>,
        stop: CancellationToken,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let engine_index = self.engine_index;
        let ring: Ring = Arc::new(Mutex::new(VecDeque::with_capacity(
            self.buffer_batches.min(1024),
        )));
        let KvSockets { publ, replay, .. } = self.sockets;
        let pub_loop = PubLoop {
            publ,
            ring: ring.clone(),
            topic: self.topic.clone(),
            encoding: self.encoding,
            loras: self.loras,
            buffer_batches: self.buffer_batches,
            drop_rate: self.drop_rate,
            fault_seed: self.fault_seed,
            engine_index,
        };
        let pub_stop = stop.clone();
        let pub_thread = std::thread::Builder::new()
            .name(format!("sim-{engine_index}-kv-pub"))
            .spawn(move || pub_loop.run(&rx, &pub_stop))?;
        let (topic, format) = (self.topic, self.replay_format);
        let replay_thread = std::thread::Builder::new()
            .name(format!("sim-{engine_index}-kv-replay"))
            .spawn(move || serve_replay(&replay, &ring, &topic, format, &stop))?;
        Ok(vec![pub_thread, replay_thread])
    }
}

/// The PUB thread's state.
struct PubLoop {
    publ: zmq::Socket,
    ring: Ring,
    topic: Bytes,
    encoding: KvEncoding,
    loras: LoraIds,
    buffer_batches: usize,
    drop_rate: f64,
    fault_seed: u64,
    engine_index: usize,
}

impl PubLoop {
    /// Encodes, buffers and publishes every batch until the actor is gone or `stop` fires.
    fn run(self, rx: &Receiver<Batch>, stop: &CancellationToken) {
        let mut seq: u64 = 0;
        loop {
            let batch = match rx.recv_timeout(STOP_POLL) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) if !stop.is_cancelled() => continue,
                Err(_) => return,
            };
            if stop.is_cancelled() {
                return;
            }
            let payload = Bytes::from(encode_batch(&batch, self.encoding, &self.loras));
            {
                let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
                if ring.len() == self.buffer_batches {
                    ring.pop_front();
                }
                // Buffered before it is sent, so a subscriber that sees a gap can replay it.
                ring.push_back((seq, payload.clone()));
            }
            let dropped = self.drop_rate > 0.0
                && uniform(self.fault_seed, self.engine_index, DrawKind::KvDrop, seq)
                    < self.drop_rate;
            if !dropped {
                let frames: [&[u8]; 3] = [&self.topic[..], &seq.to_be_bytes(), &payload[..]];
                if let Err(e) = self.publ.send_multipart(frames, 0) {
                    let engine = self.engine_index;
                    tracing::warn!(engine, error = %e, "KV event publish failed");
                }
            }
            seq += 1;
        }
    }
}

/// Answers replay requests until `stop` fires.
fn serve_replay(
    sock: &zmq::Socket,
    ring: &Ring,
    topic: &[u8],
    format: ReplayFormat,
    stop: &CancellationToken,
) {
    let poll_ms = STOP_POLL.as_millis() as i64;
    while !stop.is_cancelled() {
        match sock.poll(zmq::POLLIN, poll_ms) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        let Ok(frames) = sock.recv_multipart(zmq::DONTWAIT) else {
            continue;
        };
        // [identity, b"", start_seq]: anything else is ignored, as vLLM does.
        let [identity, delim, start] = frames.as_slice() else {
            continue;
        };
        if !delim.is_empty() || start.len() > 8 {
            continue;
        }
        let start = start.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let batches: Vec<(u64, Bytes)> = ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(s, _)| *s >= start)
            .cloned()
            .collect();
        let identity = identity.as_slice();
        const EMPTY: &[u8] = b"";
        for (seq, payload) in &batches {
            let seq = seq.to_be_bytes();
            let sent = match format {
                ReplayFormat::V0_32 => {
                    let frames: [&[u8]; 5] = [identity, EMPTY, topic, &seq, &payload[..]];
                    sock.send_multipart(frames, 0)
                }
                ReplayFormat::Legacy => {
                    let frames: [&[u8]; 4] = [identity, EMPTY, &seq, &payload[..]];
                    sock.send_multipart(frames, 0)
                }
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = match format {
            ReplayFormat::V0_32 => {
                let frames: [&[u8]; 5] = [identity, EMPTY, EMPTY, &END_SEQ, EMPTY];
                sock.send_multipart(frames, 0)
            }
            ReplayFormat::Legacy => {
                let frames: [&[u8]; 4] = [identity, EMPTY, &END_SEQ, EMPTY];
                sock.send_multipart(frames, 0)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: vec![u64::MAX, 7],
            parent_block_hash: None,
            token_ids: vec![1, 2, 3, 4],
            block_size: 2,
            lora_name: Some("a".into()),
            extra_keys: vec![
                Some(vec!["a".into(), "salt".into()]),
                Some(vec!["a".into()]),
            ],
        }
    }

    fn get(m: &Value, k: &str) -> Option<Value> {
        m.as_map()
            .unwrap()
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
    }

    fn keys(m: &Value) -> Vec<&str> {
        m.as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap())
            .collect()
    }

    #[test]
    fn vllm_rule_decides_who_binds() {
        for ep in [
            "tcp://*:5557",
            "tcp://[::]:5557",
            "ipc:///tmp/kv",
            "inproc://kv",
        ] {
            assert!(publisher_binds(ep), "{ep}");
        }
        for ep in ["tcp://127.0.0.1:5557", "tcp://router.svc:5557"] {
            assert!(!publisher_binds(ep), "{ep}");
        }
    }

    #[test]
    fn array_encoding_follows_the_older_vllm_field_order() {
        let b = Batch {
            ts: 1.5,
            events: vec![
                stored(),
                KvEvent::BlockRemoved {
                    block_hashes: vec![7, 8],
                },
                KvEvent::AllBlocksCleared,
            ],
        };
        let bytes = encode_batch(&b, KvEncoding::Array, &LoraIds(vec!["a".into()]));
        let v = rmpv::decode::read_value(&mut bytes.as_slice()).unwrap();
        let top = v.as_array().unwrap();
        assert_eq!(top[0].as_f64(), Some(1.5));
        assert_eq!(top[2].as_u64(), Some(0));
        let ev = top[1].as_array().unwrap();
        let s = ev[0].as_array().unwrap();
        assert_eq!(s.len(), 8);
        assert_eq!(s[0].as_str(), Some("BlockStored"));
        assert_eq!(s[1].as_array().unwrap()[0].as_u64(), Some(u64::MAX));
        assert!(s[2].is_nil());
        assert_eq!(s[3].as_array().unwrap().len(), 4);
        assert_eq!(s[4].as_u64(), Some(2));
        assert_eq!(s[5].as_u64(), Some(1));
        assert_eq!(s[6].as_str(), Some("GPU"));
        assert_eq!(s[7].as_str(), Some("a"));
        for (i, h) in [(1, 7), (2, 8)] {
            let r = ev[i].as_array().unwrap();
            assert_eq!(r.len(), 3);
            assert_eq!(r[1].as_array().unwrap()[0].as_u64(), Some(h));
            assert_eq!(r[2].as_str(), Some("GPU"));
        }
        assert_eq!(ev[3].as_array().unwrap().len(), 1);
    }

    #[test]
    fn map_encoding_is_vllm_0_32_msgspec() {
        let plain = KvEvent::BlockStored {
            block_hashes: vec![5],
            parent_block_hash: Some(4),
            token_ids: vec![9, 9],
            block_size: 2,
            lora_name: None,
            extra_keys: vec![None],
        };
        let b = Batch {
            ts: 2.0,
            events: vec![
                stored(),
                plain,
                KvEvent::BlockRemoved {
                    block_hashes: vec![7, 8],
                },
                KvEvent::AllBlocksCleared,
            ],
        };
        let bytes = encode_batch(&b, KvEncoding::Map, &LoraIds(vec![]));
        let v = rmpv::decode::read_value(&mut bytes.as_slice()).unwrap();
        let top = v.as_array().expect("the batch is an array");
        assert_eq!(top.len(), 3);
        assert_eq!(top[2].as_u64(), Some(0));
        let events = top[1].as_array().unwrap();
        assert_eq!(events.len(), 5, "one BlockRemoved per hash");
        let order = [
            "type",
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
            "lora_name",
            "extra_keys",
            "group_idx",
            "kv_cache_spec_kind",
        ];
        assert_eq!(keys(&events[0]), order);
        assert_eq!(keys(&events[1]), order);
        let e0 = &events[0];
        assert_eq!(get(e0, "type").unwrap().as_str(), Some("BlockStored"));
        assert!(
            get(e0, "lora_id").unwrap().is_nil(),
            "unknown adapter has no id"
        );
        assert_eq!(get(e0, "lora_name").unwrap().as_str(), Some("a"));
        let extra = get(e0, "extra_keys").unwrap();
        let extra = extra.as_array().unwrap();
        assert_eq!(extra[0].as_array().unwrap().len(), 2);
        assert_eq!(extra[1].as_array().unwrap()[0].as_str(), Some("a"));
        assert_eq!(get(e0, "group_idx").unwrap().as_u64(), Some(0));
        assert_eq!(
            get(e0, "kv_cache_spec_kind").unwrap().as_str(),
            Some("full_attention")
        );
        let e1 = &events[1];
        assert!(
            get(e1, "lora_name").unwrap().is_nil(),
            "no default: written"
        );
        assert!(get(e1, "extra_keys").unwrap().as_array().unwrap()[0].is_nil());
        assert_eq!(
            keys(&events[2]),
            ["type", "block_hashes", "medium", "group_idx"]
        );
        assert_eq!(keys(&events[4]), ["type"]);
    }
}
