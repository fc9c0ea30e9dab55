//! KV-cache events over ZeroMQ, framed exactly as vLLM's `ZmqEventPublisher` frames them.
//!
//! PUB socket: every message is three frames, topic (UTF-8), sequence number (8 bytes,
//! big-endian, from 0, +1 per batch) and the msgpack `EventBatch`. The batch is written in one
//! of the two shapes deployed vLLM versions use ([`KvEncoding`]); field order follows vLLM's
//! msgspec structs (`vllm/distributed/kv_events.py`): `BlockStored(block_hashes,
//! parent_block_hash, token_ids, block_size, lora_id, medium, lora_name)`,
//! `BlockRemoved(block_hashes, medium)`, `AllBlocksCleared()`, `EventBatch(ts, events,
//! data_parallel_rank)`.
//!
//! ROUTER socket (replay): a DEALER sends `[b"", start_seq]` and receives `[b"", seq, payload]`
//! for each buffered batch with `seq >= start_seq`, then `[b"", -1 as 8 bytes, b""]`. The buffer
//! is a ring of the last `replay_buffer_batches` batches (see
//! [`crate::config::DEFAULT_REPLAY_BUFFER_BATCHES`]).

use std::collections::VecDeque;

use bytes::Bytes;
use kvgate_engine::KvEvent;
use rmpv::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::config::KvEncoding;
use crate::fault::{DrawKind, uniform};

/// vLLM's `MEDIUM_GPU`: every block the simulated engine stores lives in GPU memory.
const MEDIUM_GPU: &str = "GPU";

/// The replay terminator's sequence number: -1 as a signed 64-bit big-endian integer.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// One engine step's events, ready to encode.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Wall-clock Unix time of the step, in seconds.
    pub ts: f64,
    pub events: Vec<KvEvent>,
}

/// Maps a LoRA adapter name to vLLM's integer `lora_id` (1-based, in configuration order).
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

fn event_value(e: &KvEvent, enc: KvEncoding, loras: &LoraIds) -> Value {
    let (tag, fields): (&str, Vec<(&str, Value)>) = match e {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_name,
        } => (
            "BlockStored",
            vec![
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
            ],
        ),
        KvEvent::BlockRemoved { block_hashes } => (
            "BlockRemoved",
            vec![
                ("block_hashes", hashes(block_hashes)),
                ("medium", Value::from(MEDIUM_GPU)),
            ],
        ),
        KvEvent::AllBlocksCleared => ("AllBlocksCleared", vec![]),
    };
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

/// Encodes one batch as msgpack in the chosen shape.
pub(crate) fn encode_batch(batch: &Batch, enc: KvEncoding, loras: &LoraIds) -> Vec<u8> {
    let events = Value::Array(
        batch
            .events
            .iter()
            .map(|e| event_value(e, enc, loras))
            .collect(),
    );
    let v = match enc {
        KvEncoding::Array => Value::Array(vec![Value::F64(batch.ts), events, Value::from(0)]),
        KvEncoding::Map => Value::Map(vec![
            (Value::from("ts"), Value::F64(batch.ts)),
            (Value::from("events"), events),
            (Value::from("data_parallel_rank"), Value::from(0)),
        ]),
    };
    let mut out = Vec::with_capacity(64);
    rmpv::encode::write_value(&mut out, &v).expect("writing msgpack to a Vec cannot fail");
    out
}

/// Everything the publisher task needs.
pub(crate) struct Publisher {
    pub publ: PubSocket,
    pub replay: RouterSocket,
    pub topic: Bytes,
    pub encoding: KvEncoding,
    pub loras: LoraIds,
    pub buffer_batches: usize,
    pub drop_rate: f64,
    pub fault_seed: u64,
    pub engine_index: usize,
}

fn message(frames: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(frames).expect("frames are never empty")
}

impl Publisher {
    /// Publishes batches from `rx` and serves replay requests until `stop` fires or the engine
    /// actor goes away; then drops both sockets (closing their ports).
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Batch>, stop: CancellationToken) {
        let Publisher {
            mut publ,
            replay,
            topic,
            encoding,
            loras,
            buffer_batches,
            drop_rate,
            fault_seed,
            engine_index,
        } = self;
        let (mut replay_tx, mut replay_rx) = replay.split();
        let mut ring: VecDeque<(u64, Bytes)> = VecDeque::with_capacity(buffer_batches.min(1024));
        let mut seq: u64 = 0;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                batch = rx.recv() => {
                    let Some(batch) = batch else { break };
                    let payload = Bytes::from(encode_batch(&batch, encoding, &loras));
                    let seq_bytes = Bytes::copy_from_slice(&seq.to_be_bytes());
                    let dropped = drop_rate > 0.0
                        && uniform(fault_seed, engine_index, DrawKind::KvDrop, seq) < drop_rate;
                    if !dropped
                        && let Err(e) = publ
                            .send(message(vec![topic.clone(), seq_bytes, payload.clone()]))
                            .await
                    {
                        tracing::warn!(engine = engine_index, error = %e, "KV event publish failed");
                    }
                    if ring.len() == buffer_batches {
                        ring.pop_front();
                    }
                    ring.push_back((seq, payload));
                    seq += 1;
                }
                req = replay_rx.recv() => {
                    let Ok(req) = req else { continue };
                    let frames = req.into_vec();
                    // [identity, b"", start_seq]: anything else is ignored, as vLLM does.
                    let [identity, delim, start] = frames.as_slice() else { continue };
                    let (true, Ok(start)) = (delim.is_empty(), <[u8; 8]>::try_from(start.as_ref()))
                    else {
                        continue;
                    };
                    let start = u64::from_be_bytes(start);
                    for (s, payload) in ring.iter().filter(|(s, _)| *s >= start) {
                        let m = message(vec![
                            identity.clone(),
                            Bytes::new(),
                            Bytes::copy_from_slice(&s.to_be_bytes()),
                            payload.clone(),
                        ]);
                        if replay_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                    let end = message(vec![
                        identity.clone(),
                        Bytes::new(),
                        Bytes::copy_from_slice(&END_SEQ),
                        Bytes::new(),
                    ]);
                    let _ = replay_tx.send(end).await;
                }
            }
        }
        drop(replay_tx);
        drop(replay_rx);
        let _ = publ.close().await;
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
        }
    }

    #[test]
    fn array_encoding_follows_vllm_field_order() {
        let b = Batch {
            ts: 1.5,
            events: vec![
                stored(),
                KvEvent::BlockRemoved {
                    block_hashes: vec![7],
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
        assert_eq!(s[0].as_str(), Some("BlockStored"));
        assert_eq!(s[1].as_array().unwrap()[0].as_u64(), Some(u64::MAX));
        assert!(s[2].is_nil());
        assert_eq!(s[3].as_array().unwrap().len(), 4);
        assert_eq!(s[4].as_u64(), Some(2));
        assert_eq!(s[5].as_u64(), Some(1));
        assert_eq!(s[6].as_str(), Some("GPU"));
        assert_eq!(s[7].as_str(), Some("a"));
        let r = ev[1].as_array().unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].as_str(), Some("GPU"));
        assert_eq!(ev[2].as_array().unwrap().len(), 1);
    }

    #[test]
    fn map_encoding_is_tagged_by_type() {
        let b = Batch {
            ts: 2.0,
            events: vec![stored(), KvEvent::AllBlocksCleared],
        };
        let bytes = encode_batch(&b, KvEncoding::Map, &LoraIds(vec![]));
        let v = rmpv::decode::read_value(&mut bytes.as_slice()).unwrap();
        let get = |m: &Value, k: &str| {
            m.as_map()
                .unwrap()
                .iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .map(|(_, v)| v.clone())
        };
        let events = get(&v, "events").unwrap();
        let e0 = &events.as_array().unwrap()[0];
        assert_eq!(get(e0, "type").unwrap().as_str(), Some("BlockStored"));
        assert!(
            get(e0, "lora_id").unwrap().is_nil(),
            "unknown adapter has no id"
        );
        assert_eq!(get(e0, "lora_name").unwrap().as_str(), Some("a"));
        let e1 = &events.as_array().unwrap()[1];
        assert_eq!(e1.as_map().unwrap().len(), 1);
        assert_eq!(get(&v, "data_parallel_rank").unwrap().as_u64(), Some(0));
    }
}
