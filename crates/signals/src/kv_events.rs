//! KV-event decoding: vLLM/SGLang ZMQ messages in, [`KvEventBatch`] out.
//!
//! Engines serialise their `EventBatch` with msgspec, and the encoding has changed over time:
//! older vLLM and SGLang declare the structs `array_like`, so a batch is `[ts, events, dp_rank?]`
//! and an event is `["BlockStored", field, field, …]` (tag first, fields in declaration order);
//! newer vLLM drops `array_like` for the events, which become maps with a `"type"` tag and named
//! fields, and the batch may be either form. We decode into a generic msgpack tree first and
//! then read fields by name (maps) or by declared position (arrays), which handles all four
//! combinations with one code path and lets us ignore what we do not know: unknown map keys,
//! extra trailing array elements (fields added by later versions) and unknown event types
//! (skipped, so a new event kind cannot stall the stream). Fields an older encoder never wrote
//! (SGLang has no `medium` or `lora_name`) are optional and take their documented defaults.
//!
//! Block hashes arrive in three shapes. vLLM sends unsigned 64-bit ints by default, or raw
//! bytes (a full digest) when configured so; we key on the last 8 bytes read big-endian, which
//! is what vLLM itself publishes as the int form of a sha256 hash, shorter byte strings being
//! left-padded with zeros. Some engines (SGLang, older vLLM builds using Python's `hash()`) send
//! *signed* 64-bit ints: msgpack then carries a negative int64. We reinterpret its two's
//! complement bits as `u64`, which is a bijection, so equal engine hashes stay equal keys and
//! the parent links of the chain still match.
//!
//! Everything here is pure and total: any byte string yields a batch or a typed
//! [`KvDecodeError`], never a panic. Msgpack is read with a depth limit, and the reader never
//! preallocates from untrusted length headers.

use kvgate_core::endpoint::Tier;
use kvgate_core::observe::{BlockExtra, KvEvent, KvEventBatch};
use rmpv::Value;

/// Maximum msgpack nesting accepted. The deepest legitimate path is
/// batch → events → event → extra_keys → per-block tuple → key: six levels; rmpv counts two
/// per container level, and 64 leaves room for richer extra keys while stopping hostile
/// nesting long before stack depth matters.
const MSGPACK_MAX_DEPTH: usize = 64;

/// The sequence number a replay server sends to mark the end of a replay (`-1` as 8 bytes).
pub const REPLAY_END_SEQ: u64 = u64::MAX;

/// Why a KV-event message could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvDecodeError {
    /// The payload is not well-formed msgpack (truncated, bad marker, too deep).
    #[error("payload is not valid msgpack: {reason}")]
    Msgpack {
        /// The msgpack reader's description.
        reason: String,
    },
    /// Bytes were left after the batch value: the payload was corrupted or concatenated.
    #[error("{count} trailing bytes after the event batch")]
    TrailingBytes {
        /// How many bytes were left unread.
        count: usize,
    },
    /// A value had the wrong msgpack type.
    #[error("{what}: expected {expected}")]
    WrongType {
        /// What was being decoded (`"batch"`, `"BlockStored.token_ids"`, …).
        what: &'static str,
        /// What was expected there.
        expected: &'static str,
    },
    /// A required field is absent.
    #[error("{what} is missing required field `{field}`")]
    MissingField {
        /// The struct being decoded.
        what: &'static str,
        /// The absent field.
        field: &'static str,
    },
    /// An integer does not fit the field (a negative token id, a block size over `u32`).
    #[error("{what}: value out of range")]
    OutOfRange {
        /// The field being decoded.
        what: &'static str,
    },
    /// A block hash given as an empty byte string.
    #[error("block hash is an empty byte string")]
    EmptyHash,
    /// A ZMQ message did not have the three frames topic, sequence, payload.
    #[error("expected 3 frames (topic, seq, payload), got {got}")]
    FrameCount {
        /// Frames received.
        got: usize,
    },
    /// The sequence frame was not 8 bytes.
    #[error("sequence frame must be 8 bytes, got {len}")]
    SeqFrameLength {
        /// Its length.
        len: usize,
    },
    /// The topic frame is not UTF-8.
    #[error("topic frame is not UTF-8")]
    TopicNotUtf8,
}

/// Decodes the 3-frame ZMQ message `[topic, seq (8 bytes BE), payload]` of a KV-event publisher.
pub fn decode_frames(frames: &[&[u8]]) -> Result<(String, u64, KvEventBatch), KvDecodeError> {
    let [topic, seq, payload] = frames else {
        return Err(KvDecodeError::FrameCount { got: frames.len() });
    };
    let topic = std::str::from_utf8(topic)
        .map_err(|_| KvDecodeError::TopicNotUtf8)?
        .to_owned();
    let seq = decode_seq(seq)?;
    let batch = decode_event_batch(seq, payload)?;
    Ok((topic, seq, batch))
}

/// Reads an 8-byte big-endian sequence frame.
pub fn decode_seq(frame: &[u8]) -> Result<u64, KvDecodeError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| KvDecodeError::SeqFrameLength { len: frame.len() })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decodes one msgpack `EventBatch` payload (either encoding) published with sequence `seq`.
pub fn decode_event_batch(seq: u64, payload: &[u8]) -> Result<KvEventBatch, KvDecodeError> {
    let mut reader = payload;
    let value =
        rmpv::decode::read_value_with_max_depth(&mut reader, MSGPACK_MAX_DEPTH).map_err(|e| {
            KvDecodeError::Msgpack {
                reason: e.to_string(),
            }
        })?;
    if !reader.is_empty() {
        return Err(KvDecodeError::TrailingBytes {
            count: reader.len(),
        });
    }
    let fields = Fields::of(&value, "batch", &["ts", "events", "data_parallel_rank"])?;
    let ts = as_f64(fields.required(0, "ts")?, "batch.ts")?;
    let events_value = fields.required(1, "events")?;
    let Value::Array(raw_events) = events_value else {
        return Err(KvDecodeError::WrongType {
            what: "batch.events",
            expected: "array",
        });
    };
    let data_parallel_rank = match fields.optional(2) {
        None => None,
        Some(v) => Some(as_u32(v, "batch.data_parallel_rank")?),
    };
    let mut events = Vec::with_capacity(raw_events.len());
    for raw in raw_events {
        if let Some(event) = decode_event(raw)? {
            events.push(event);
        }
    }
    Ok(KvEventBatch {
        seq,
        ts,
        events,
        data_parallel_rank,
    })
}

/// Decodes one event; `Ok(None)` for an event type this version does not know.
fn decode_event(value: &Value) -> Result<Option<KvEvent>, KvDecodeError> {
    let tag = match value {
        Value::Array(items) => items.first(),
        Value::Map(entries) => map_get(entries, "type"),
        _ => {
            return Err(KvDecodeError::WrongType {
                what: "event",
                expected: "array or map",
            });
        }
    };
    let Some(tag) = tag.and_then(Value::as_str) else {
        return Err(KvDecodeError::MissingField {
            what: "event",
            field: "type",
        });
    };
    match tag {
        "BlockStored" => {
            let f = Fields::of_event(
                value,
                "BlockStored",
                &[
                    "block_hashes",
                    "parent_block_hash",
                    "token_ids",
                    "block_size",
                    "lora_id",
                    "medium",
                    "lora_name",
                    "extra_keys",
                ],
            )?;
            let block_hashes = hashes(f.required(0, "block_hashes")?, "BlockStored.block_hashes")?;
            let parent = match f.optional(1) {
                None => None,
                Some(v) => Some(hash(v, "BlockStored.parent_block_hash")?),
            };
            let token_ids = token_ids(f.required(2, "token_ids")?)?;
            let block_size = as_u32(f.required(3, "block_size")?, "BlockStored.block_size")?;
            let tier = tier(f.optional(5), "BlockStored.medium")?;
            let lora_name = match f.optional(6) {
                None => None,
                Some(v) => Some(
                    v.as_str()
                        .ok_or(KvDecodeError::WrongType {
                            what: "BlockStored.lora_name",
                            expected: "string",
                        })?
                        .to_owned(),
                ),
            };
            let extra_keys = match f.optional(7) {
                None => Vec::new(),
                Some(v) => extra_keys(v, parent.is_none(), lora_name.as_deref())?,
            };
            Ok(Some(KvEvent::BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora_name,
                extra_keys,
                tier,
            }))
        }
        "BlockRemoved" => {
            let f = Fields::of_event(value, "BlockRemoved", &["block_hashes", "medium"])?;
            let block_hashes = hashes(f.required(0, "block_hashes")?, "BlockRemoved.block_hashes")?;
            let tier = tier(f.optional(1), "BlockRemoved.medium")?;
            Ok(Some(KvEvent::BlockRemoved { block_hashes, tier }))
        }
        "AllBlocksCleared" => Ok(Some(KvEvent::AllBlocksCleared)),
        other => {
            tracing::debug!(event_type = other, "skipping unknown KV event type");
            Ok(None)
        }
    }
}

/// Reads `BlockStored.extra_keys`: per block, nil or a list of the values the engine hashed
/// besides the tokens, *untagged* (vLLM hashes `("cache_salt", s)` but publishes `s`). String
/// values are read by the core's rule ([`BlockExtra::from_untagged`]: the adapter name is
/// dropped, a lone string on a chain's first block is the salt); a block carrying anything else
/// (bytes or numbers from a multimodal input) becomes opaque to text prompts.
fn extra_keys(v: &Value, root: bool, lora: Option<&str>) -> Result<Vec<BlockExtra>, KvDecodeError> {
    let Value::Array(blocks) = v else {
        return Err(KvDecodeError::WrongType {
            what: "BlockStored.extra_keys",
            expected: "array",
        });
    };
    let mut out = Vec::with_capacity(blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        let values: &[Value] = match block {
            Value::Nil => &[],
            Value::Array(items) => items,
            // A single bare value instead of a list: the same thing, one element.
            other => std::slice::from_ref(other),
        };
        let strings: Option<Vec<String>> = values
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect();
        out.push(match strings {
            Some(strings) => BlockExtra::from_untagged(&strings, root && i == 0, lora),
            None => {
                let mut buf = Vec::new();
                for x in values {
                    // Writing to a Vec cannot fail.
                    let _ = rmpv::encode::write_value(&mut buf, x);
                }
                BlockExtra {
                    cache_salt: None,
                    opaque: xxhash_rust::xxh3::xxh3_64(&buf) | 1,
                }
            }
        });
    }
    Ok(out)
}

/// Field access that works for both encodings: by position in an array, by name in a map.
/// `names` lists the fields in declaration order (for arrays, after the tag if any).
struct Fields<'a> {
    values: Vec<Option<&'a Value>>,
    what: &'static str,
}

impl<'a> Fields<'a> {
    /// A struct without a tag (the batch).
    fn of(value: &'a Value, what: &'static str, names: &[&str]) -> Result<Self, KvDecodeError> {
        Self::build(value, what, names, 0)
    }

    /// A tagged event: in array form the tag occupies position 0.
    fn of_event(
        value: &'a Value,
        what: &'static str,
        names: &[&str],
    ) -> Result<Self, KvDecodeError> {
        Self::build(value, what, names, 1)
    }

    fn build(
        value: &'a Value,
        what: &'static str,
        names: &[&str],
        array_offset: usize,
    ) -> Result<Self, KvDecodeError> {
        let values = match value {
            Value::Array(items) => (0..names.len())
                .map(|i| items.get(i + array_offset))
                .collect(),
            Value::Map(entries) => names.iter().map(|n| map_get(entries, n)).collect(),
            _ => {
                return Err(KvDecodeError::WrongType {
                    what,
                    expected: "array or map",
                });
            }
        };
        Ok(Self { values, what })
    }

    /// A field that must be present and not nil.
    fn required(&self, index: usize, field: &'static str) -> Result<&'a Value, KvDecodeError> {
        self.optional(index).ok_or(KvDecodeError::MissingField {
            what: self.what,
            field,
        })
    }

    /// A field that may be absent or nil (both mean "not given").
    fn optional(&self, index: usize) -> Option<&'a Value> {
        self.values
            .get(index)
            .copied()
            .flatten()
            .filter(|v| !v.is_nil())
    }
}

fn map_get<'a>(entries: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    entries
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn as_f64(v: &Value, what: &'static str) -> Result<f64, KvDecodeError> {
    let x = match v {
        Value::F64(x) => *x,
        Value::F32(x) => f64::from(*x),
        Value::Integer(i) => i.as_f64().ok_or(KvDecodeError::OutOfRange { what })?,
        _ => {
            return Err(KvDecodeError::WrongType {
                what,
                expected: "number",
            });
        }
    };
    if x.is_finite() {
        Ok(x)
    } else {
        Err(KvDecodeError::OutOfRange { what })
    }
}

fn as_u32(v: &Value, what: &'static str) -> Result<u32, KvDecodeError> {
    let Value::Integer(i) = v else {
        return Err(KvDecodeError::WrongType {
            what,
            expected: "integer",
        });
    };
    i.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or(KvDecodeError::OutOfRange { what })
}

fn token_ids(v: &Value) -> Result<Vec<u32>, KvDecodeError> {
    const WHAT: &str = "BlockStored.token_ids";
    let Value::Array(items) = v else {
        return Err(KvDecodeError::WrongType {
            what: WHAT,
            expected: "array",
        });
    };
    items.iter().map(|t| as_u32(t, WHAT)).collect()
}

fn hashes(v: &Value, what: &'static str) -> Result<Vec<u64>, KvDecodeError> {
    let Value::Array(items) = v else {
        return Err(KvDecodeError::WrongType {
            what,
            expected: "array",
        });
    };
    items.iter().map(|h| hash(h, what)).collect()
}

/// One block hash as a 64-bit key (see the module docs for the three accepted shapes).
fn hash(v: &Value, what: &'static str) -> Result<u64, KvDecodeError> {
    match v {
        Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => Ok(u),
            // Two's-complement reinterpretation, documented in the module docs.
            (None, Some(s)) => Ok(s as u64),
            (None, None) => Err(KvDecodeError::OutOfRange { what }),
        },
        Value::Binary(bytes) => {
            if bytes.is_empty() {
                return Err(KvDecodeError::EmptyHash);
            }
            let tail = &bytes[bytes.len().saturating_sub(8)..];
            let mut buf = [0u8; 8];
            buf[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(buf))
        }
        _ => Err(KvDecodeError::WrongType {
            what,
            expected: "integer or bytes",
        }),
    }
}

/// Maps an engine's `medium` string to a tier. Absent means GPU (vLLM's default medium, and
/// the only one SGLang had). Names are matched case-insensitively; any medium other than GPU
/// or host memory (`"DISK"`, remote stores such as LMCache backends) is the slow tier, since
/// what the router needs to know is only how costly a hit is.
fn tier(v: Option<&Value>, what: &'static str) -> Result<Tier, KvDecodeError> {
    let Some(v) = v else {
        return Ok(Tier::Gpu);
    };
    let name = v.as_str().ok_or(KvDecodeError::WrongType {
        what,
        expected: "string",
    })?;
    Ok(if name.eq_ignore_ascii_case("gpu") {
        Tier::Gpu
    } else if name.eq_ignore_ascii_case("cpu") {
        Tier::Cpu
    } else {
        Tier::Disk
    })
}
