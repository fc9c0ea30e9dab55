//! Decoder conformance against frames a real vLLM 0.32 published (captured byte for byte by
//! `fixtures/vllm032/capture.py`, once with vLLM's default pickle `sha256` and once with
//! `sha256_cbor`): every live message and replay reply decodes, and the router, fed those
//! batches, keys the engine's own `/tokenize` tokens of the captured requests to exactly the
//! blocks the engine published, salt included, whatever the engine's hash algorithm.

use kvgate_core::{
    EndpointSpec, KeyScope, KvEvent, PromptKeys, Router, RouterConfig, RoutingRequest,
};
use kvgate_signals::decode_frames;
use kvgate_signals::kv_events::decode_seq;
use rand::SeedableRng;
use serde_json::Value;

fn dir(algo: &str) -> String {
    format!(
        "{}/tests/fixtures/vllm032/{algo}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn lines(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn frames(v: &Value) -> Vec<Vec<u8>> {
    v["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| hex(f.as_str().unwrap()))
        .collect()
}

#[test]
fn real_vllm_frames_decode_and_key_the_engines_tokens() {
    for algo in ["sha256", "sha256_cbor"] {
        let live = lines(&format!("{}/live.jsonl", dir(algo)));
        let mut r = Router::new(RouterConfig::for_policy("kvgate").unwrap()).unwrap();
        let id = r.add_endpoint(0, EndpointSpec::new("127.0.0.1:8000", "smollm2"));
        let mut stored = 0;
        let mut head = Vec::new();
        for msg in &live {
            let f = frames(msg);
            let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
            let (topic, seq, batch) =
                decode_frames(&refs).unwrap_or_else(|e| panic!("{algo} seq {}: {e}", msg["seq"]));
            assert!(topic.starts_with("kv@127.0.0.1:"), "{topic}");
            assert_eq!(seq, msg["seq"].as_u64().unwrap());
            for e in &batch.events {
                if let KvEvent::BlockStored {
                    block_size,
                    token_ids,
                    block_hashes,
                    ..
                } = e
                {
                    assert_eq!(*block_size, 128, "the CPU backend's block size");
                    assert_eq!(token_ids.len(), block_hashes.len() * 128);
                    stored += block_hashes.len();
                }
            }
            // The contiguous head of the capture (the rest was trimmed to keep it small).
            if seq == head.len() as u64 {
                head.push(batch);
            }
        }
        assert!(stored > 0, "{algo}: BlockStored events captured");

        // The engine's own tokens of each captured request (its /tokenize answer) key to the
        // blocks it published, under the request's salt and only under it.
        let requests: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{}/requests.json", dir(algo))).unwrap(),
        )
        .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut checked = 0;
        let mut applied = 0;
        for q in requests.as_array().unwrap() {
            // Messages received before and after the request: apply the batches up to its end,
            // as the router would have by then (a later reset clears them again).
            let Some(until) = q["messages_received"][1].as_u64() else {
                continue;
            };
            if until > head.len() as u64 {
                break;
            }
            while applied < until {
                r.observe_kv_batch(id, applied + 1, &head[applied as usize]);
                applied += 1;
            }
            let Some(tokens) = q["tokenize"]["tokens"].as_array() else {
                continue;
            };
            let tokens: Vec<u32> = tokens.iter().map(|t| t.as_u64().unwrap() as u32).collect();
            let salt = q["request"]["cache_salt"].as_str();
            let pick = |salt: Option<&str>, rng: &mut rand_chacha::ChaCha8Rng| {
                let keys = PromptKeys::from_tokens(
                    &tokens,
                    128,
                    KeyScope {
                        lora: None,
                        cache_salt: salt,
                    },
                );
                let req = RoutingRequest::new(1, "smollm2", tokens.len() as u32, keys);
                r.pick(100, &req, rng, None).unwrap().precise_matched_blocks
            };
            let full = (tokens.len() / 128) as u32;
            assert_eq!(
                pick(salt, &mut rng),
                Some(full),
                "{algo} {}: every full block of the engine's tokens is known",
                q["name"]
            );
            assert_eq!(
                pick(Some("another-tenant"), &mut rng),
                Some(0),
                "{algo} {}: nothing under another salt",
                q["name"]
            );
            checked += 1;
        }
        assert!(checked >= 2, "{algo}: {checked} captured requests checked");

        // Replay replies: four frames [b"", topic, seq, payload] (byte-equal to the live
        // message), then the end marker [b"", b"", 0xFF×8, b""].
        for msg in lines(&format!("{}/replay.jsonl", dir(algo))) {
            let f = frames(&msg);
            assert_eq!(f.len(), 4, "{msg}");
            assert!(f[0].is_empty());
            let seq = decode_seq(&f[2]).unwrap();
            if seq == u64::MAX {
                assert!(f[1].is_empty() && f[3].is_empty(), "end marker");
            } else {
                let refs: Vec<&[u8]> = f[1..].iter().map(Vec::as_slice).collect();
                decode_frames(&refs).unwrap();
            }
        }
    }
}
