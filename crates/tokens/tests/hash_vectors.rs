//! Known-answer vectors from Python `hashlib` + `cbor2` (scripts/gen_hash_fixtures.py).

use kvgate_tokens::{BlockHasher, ExtraKeys, none_hash};
use serde_json::Value;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn chain_matches_python_hashlib_cbor2() {
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/sha256_cbor.json")).expect("fixture parses");
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 5);
    for case in cases {
        let seed = case["seed"].as_str().unwrap();
        let bs = case["block_size"].as_u64().unwrap() as usize;
        let tokens: Vec<u32> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let extra = ExtraKeys {
            lora_name: case["lora_name"].as_str(),
            cache_salt: case["cache_salt"].as_str(),
        };
        assert_eq!(hex(&none_hash(seed).0), case["none_hash"].as_str().unwrap());
        let hashes = BlockHasher::new(seed, bs).hashes(&tokens, extra);
        let want: Vec<&str> = case["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        let got: Vec<String> = hashes.iter().map(|h| hex(&h.0)).collect();
        assert_eq!(got, want, "case {case}");
        let keys: Vec<u64> = case["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_u64().unwrap())
            .collect();
        assert_eq!(hashes.iter().map(|h| h.key()).collect::<Vec<_>>(), keys);
    }
}
