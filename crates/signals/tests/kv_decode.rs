//! KV-event decoding against payloads written by Python `msgpack`
//! (`tests/fixtures/gen_kv_fixtures.py`) in every encoding engines use, plus hostile input.

use kvgate_core::endpoint::Tier;
use kvgate_core::observe::{BlockExtra, KvEvent, KvEventBatch};
use kvgate_signals::{KvDecodeError, decode_event_batch, decode_frames};
use proptest::prelude::*;
use serde_json::Value as Json;

const FIXTURES: [&str; 5] = [
    "vllm_map",
    "vllm_array_batch_map_events",
    "vllm_array",
    "vllm_bytes_hashes",
    "sglang",
];

fn dir() -> String {
    format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"))
}

fn payload(name: &str) -> Vec<u8> {
    let path = format!("{}/{name}.msgpack", dir());
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn u64s(v: &Json) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn tier(v: &Json) -> Tier {
    match v.as_str().unwrap() {
        "gpu" => Tier::Gpu,
        "cpu" => Tier::Cpu,
        "disk" => Tier::Disk,
        other => panic!("unknown tier {other}"),
    }
}

/// The batch the generator says the payload encodes.
/// Expected extra keys, written in the `.expected.json` files as a list with one entry per
/// block: `null`, `{"salt": "..."}` or `"opaque"` (a fingerprint the test cannot predict, so
/// it only checks that there is one).
fn extra(v: &Json) -> Vec<BlockExtra> {
    v.as_array()
        .map(|blocks| {
            blocks
                .iter()
                .map(|b| match b {
                    Json::Object(o) => BlockExtra {
                        cache_salt: o["salt"].as_str().map(str::to_owned),
                        opaque: 0,
                    },
                    Json::String(s) if s == "opaque" => BlockExtra {
                        cache_salt: None,
                        opaque: OPAQUE,
                    },
                    _ => BlockExtra::default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Stand-in for "some opaque fingerprint" in expectations; see [`normalise`].
const OPAQUE: u64 = u64::MAX;

/// Replaces every opaque fingerprint by [`OPAQUE`] so expectations can name it.
fn normalise(mut b: KvEventBatch) -> KvEventBatch {
    for e in &mut b.events {
        if let KvEvent::BlockStored { extra_keys, .. } = e {
            for x in extra_keys {
                if x.opaque != 0 {
                    x.opaque = OPAQUE;
                }
            }
        }
    }
    b
}

fn expected(name: &str, seq: u64) -> KvEventBatch {
    let path = format!("{}/{name}.expected.json", dir());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let j: Json = serde_json::from_str(&text).unwrap();
    let events = j["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e["type"].as_str().unwrap() {
            "BlockStored" => KvEvent::BlockStored {
                block_hashes: u64s(&e["block_hashes"]),
                parent: e["parent"].as_u64(),
                token_ids: e["token_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| u32::try_from(t.as_u64().unwrap()).unwrap())
                    .collect(),
                block_size: u32::try_from(e["block_size"].as_u64().unwrap()).unwrap(),
                lora_name: e["lora_name"].as_str().map(str::to_owned),
                extra_keys: extra(&e["extra_keys"]),
                tier: tier(&e["tier"]),
            },
            "BlockRemoved" => KvEvent::BlockRemoved {
                block_hashes: u64s(&e["block_hashes"]),
                tier: tier(&e["tier"]),
            },
            "AllBlocksCleared" => KvEvent::AllBlocksCleared,
            other => panic!("unknown expected type {other}"),
        })
        .collect();
    KvEventBatch {
        seq,
        ts: j["ts"].as_f64().unwrap(),
        events,
        data_parallel_rank: j["data_parallel_rank"]
            .as_u64()
            .map(|r| u32::try_from(r).unwrap()),
    }
}

#[test]
fn every_fixture_decodes_to_what_the_generator_meant() {
    for (i, name) in FIXTURES.iter().enumerate() {
        let seq = 100 + i as u64;
        let got = decode_event_batch(seq, &payload(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(normalise(got), expected(name, seq), "fixture {name}");
    }
}

#[test]
fn signed_hashes_are_reinterpreted_bit_for_bit() {
    let got = decode_event_batch(0, &payload("sglang")).unwrap();
    let KvEvent::BlockStored {
        block_hashes,
        parent,
        ..
    } = &got.events[1]
    else {
        panic!("expected BlockStored");
    };
    // -1 as i64 is all ones; the child's parent link must equal the parent's own key.
    assert_eq!(*parent, Some(u64::MAX));
    let KvEvent::BlockStored {
        block_hashes: first,
        ..
    } = &got.events[0]
    else {
        panic!("expected BlockStored");
    };
    assert_eq!(first[1], u64::MAX);
    assert_eq!(block_hashes, &vec![42]);
}

#[test]
fn frames_are_topic_seq_payload() {
    let p = payload("vllm_map");
    let seq = 0x0102_0304_0506_0708u64.to_be_bytes();
    let (topic, s, batch) =
        decode_frames(&[b"kv@10.0.0.7:8000@llama".as_slice(), &seq, &p]).unwrap();
    assert_eq!(topic, "kv@10.0.0.7:8000@llama");
    assert_eq!(s, 0x0102_0304_0506_0708);
    assert_eq!(batch.seq, s);
}

#[test]
fn bad_frames_are_typed_errors() {
    let p = payload("vllm_map");
    assert_eq!(
        decode_frames(&[b"t".as_slice(), &p]).unwrap_err(),
        KvDecodeError::FrameCount { got: 2 }
    );
    assert_eq!(
        decode_frames(&[b"t".as_slice(), &[0, 1, 2], &p]).unwrap_err(),
        KvDecodeError::SeqFrameLength { len: 3 }
    );
    assert_eq!(
        decode_frames(&[[0xffu8, 0xfe].as_slice(), &[0; 8], &p]).unwrap_err(),
        KvDecodeError::TopicNotUtf8
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut p = payload("vllm_array");
    p.push(0xc0);
    assert_eq!(
        decode_event_batch(0, &p).unwrap_err(),
        KvDecodeError::TrailingBytes { count: 1 }
    );
}

#[test]
fn missing_required_field_is_named() {
    // A map-form BlockStored without token_ids.
    let p = rmp_serde::to_vec_named(&serde_json::json!({
        "ts": 1.0,
        "events": [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": null,
                    "block_size": 16}]
    }))
    .unwrap();
    assert_eq!(
        decode_event_batch(0, &p).unwrap_err(),
        KvDecodeError::MissingField {
            what: "BlockStored",
            field: "token_ids"
        }
    );
}

#[test]
fn negative_token_id_is_out_of_range() {
    let p = rmp_serde::to_vec(&serde_json::json!([
        1.0,
        [["BlockStored", [1], null, [5, -3], 16, null, "GPU", null]]
    ]))
    .unwrap();
    assert!(matches!(
        decode_event_batch(0, &p).unwrap_err(),
        KvDecodeError::OutOfRange { .. }
    ));
}

#[test]
fn empty_bytes_hash_is_rejected() {
    #[derive(serde::Serialize)]
    struct Ev(
        &'static str,
        Vec<serde_bytes_like::Bin>,
        Option<u64>,
        Vec<u32>,
        u32,
    );
    mod serde_bytes_like {
        /// Serialises as msgpack bin.
        pub struct Bin(pub Vec<u8>);
        impl serde::Serialize for Bin {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }
    }
    let ev = Ev(
        "BlockStored",
        vec![serde_bytes_like::Bin(Vec::new())],
        None,
        vec![],
        16,
    );
    let p = rmp_serde::to_vec(&(1.0f64, vec![ev])).unwrap();
    assert_eq!(
        decode_event_batch(0, &p).unwrap_err(),
        KvDecodeError::EmptyHash
    );
}

#[test]
fn not_a_batch_is_wrong_type() {
    let p = rmp_serde::to_vec(&"hello").unwrap();
    assert!(matches!(
        decode_event_batch(0, &p).unwrap_err(),
        KvDecodeError::WrongType { what: "batch", .. }
    ));
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    // 100 000 nested one-element arrays.
    let mut p = vec![0x91u8; 100_000];
    p.push(0xc0);
    assert!(matches!(
        decode_event_batch(0, &p).unwrap_err(),
        KvDecodeError::Msgpack { .. }
    ));
}

#[test]
fn huge_length_header_with_no_data_is_an_error_not_an_allocation() {
    // array32 claiming 4 billion elements, then nothing.
    let p = [0xddu8, 0xff, 0xff, 0xff, 0xff];
    assert!(decode_event_batch(0, &p).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_event_batch(0, &bytes);
        let _ = decode_frames(&[b"t".as_slice(), &[0; 8], &bytes]);
    }

    #[test]
    fn every_strict_truncation_of_a_fixture_is_an_error(which in 0usize..5, cut in 0usize..4096) {
        let p = payload(FIXTURES[which]);
        let cut = cut % p.len();
        prop_assert!(decode_event_batch(0, &p[..cut]).is_err());
    }

    #[test]
    fn single_byte_corruption_never_panics(which in 0usize..5, at in 0usize..4096, byte in any::<u8>()) {
        let mut p = payload(FIXTURES[which]);
        let at = at % p.len();
        p[at] = byte;
        let _ = decode_event_batch(0, &p);
    }
}

#[test]
fn checked_in_fixtures_match_their_generator() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import msgpack"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with msgpack is required; run scripts/setup-test-deps.sh"
    );
    let out = std::env::temp_dir().join(format!("kvgate-kv-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let status = std::process::Command::new("python3")
        .arg(format!("{}/gen_kv_fixtures.py", dir()))
        .arg(&out)
        .status()
        .expect("run generator");
    assert!(status.success());
    for name in FIXTURES {
        for ext in ["msgpack", "expected.json"] {
            let file = format!("{name}.{ext}");
            let fresh = std::fs::read(out.join(&file)).unwrap();
            let checked_in = std::fs::read(format!("{}/{file}", dir())).unwrap();
            assert!(
                fresh == checked_in,
                "{file} differs from its generator's output"
            );
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}
