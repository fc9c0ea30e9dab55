//! KV events received by real ZMQ sockets and decoded with a generic msgpack decoder.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::{client, fleet};
use kvgate_sim::{Fleet, KvEncoding};
use kvgate_tokens::{BlockHash, hash_block, none_hash};
use rmpv::Value;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

/// A decoded event, by field name, whatever the encoding.
#[derive(Debug)]
struct Event {
    tag: String,
    fields: HashMap<String, Value>,
}

fn decode_batch(payload: &[u8]) -> (&'static str, f64, Vec<Event>, Value) {
    let v = rmpv::decode::read_value(&mut &payload[..]).expect("payload is msgpack");
    let (enc, ts, events, rank) = match &v {
        Value::Array(a) => ("array", a[0].clone(), a[1].clone(), a[2].clone()),
        Value::Map(m) => {
            let get = |k: &str| {
                m.iter()
                    .find(|(key, _)| key.as_str() == Some(k))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| panic!("batch lacks {k}"))
            };
            ("map", get("ts"), get("events"), get("data_parallel_rank"))
        }
        other => panic!("batch is {other:?}"),
    };
    let events = events
        .as_array()
        .expect("events is an array")
        .iter()
        .map(|e| match e {
            Value::Array(a) => {
                let tag = a[0].as_str().unwrap().to_owned();
                let names: &[&str] = match tag.as_str() {
                    "BlockStored" => &[
                        "block_hashes",
                        "parent_block_hash",
                        "token_ids",
                        "block_size",
                        "lora_id",
                        "medium",
                        "lora_name",
                    ],
                    "BlockRemoved" => &["block_hashes", "medium"],
                    "AllBlocksCleared" => &[],
                    t => panic!("unknown tag {t}"),
                };
                assert_eq!(a.len(), names.len() + 1, "{tag} arity");
                Event {
                    tag,
                    fields: names
                        .iter()
                        .map(|n| n.to_string())
                        .zip(a[1..].iter().cloned())
                        .collect(),
                }
            }
            Value::Map(m) => {
                let fields: HashMap<String, Value> = m
                    .iter()
                    .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.clone()))
                    .collect();
                Event {
                    tag: fields["type"].as_str().unwrap().to_owned(),
                    fields,
                }
            }
            other => panic!("event is {other:?}"),
        })
        .collect();
    (enc, ts.as_f64().expect("ts is a float"), events, rank)
}

/// Checks every BlockStored hash against the chain recomputed from its token ids.
struct ChainChecker {
    full: HashMap<u64, BlockHash>,
    root: BlockHash,
    checked: usize,
}

impl ChainChecker {
    fn new(seed: &str) -> Self {
        Self {
            full: HashMap::new(),
            root: none_hash(seed),
            checked: 0,
        }
    }

    fn check(&mut self, e: &Event) {
        if e.tag != "BlockStored" {
            return;
        }
        assert_eq!(e.fields["medium"].as_str(), Some("GPU"));
        let bs = e.fields["block_size"].as_u64().unwrap() as usize;
        let toks: Vec<u32> = e.fields["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let hashes: Vec<u64> = e.fields["block_hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_u64().unwrap())
            .collect();
        assert_eq!(toks.len(), bs * hashes.len());
        let mut parent = match e.fields["parent_block_hash"].as_u64() {
            None => self.root,
            Some(k) => *self.full.get(&k).expect("parent was stored earlier"),
        };
        let lora = e.fields["lora_name"].as_str().map(str::to_owned);
        let extra: Vec<&str> = lora.as_deref().into_iter().collect();
        for (i, want) in hashes.iter().enumerate() {
            let h = hash_block(&parent, &toks[i * bs..(i + 1) * bs], &extra);
            assert_eq!(h.key(), *want, "block {i}");
            self.full.insert(*want, h);
            parent = h;
            self.checked += 1;
        }
    }
}

async fn completion(f: &Fleet, prompt: Vec<u32>, model: Option<&str>) {
    let mut body = json!({"prompt": prompt, "max_tokens": 2});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let r = client()
        .post(format!("http://{}/v1/completions", f.engines[0].http_addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn prompt(salt: u32, len: u32) -> Vec<u32> {
    (0..len).map(|i| 1000 + salt * 7919 + i).collect()
}

async fn replay_from(f: &Fleet, start: u64) -> Vec<(u64, Bytes)> {
    let mut dealer = DealerSocket::new();
    dealer
        .connect(&f.engines[0].kv_replay_endpoint)
        .await
        .unwrap();
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    dealer.send(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), dealer.recv())
            .await
            .expect("replay answers")
            .unwrap()
            .into_vec();
        assert_eq!(m.len(), 3, "[b\"\", seq, payload]");
        assert!(m[0].is_empty());
        let seq: [u8; 8] = m[1].as_ref().try_into().unwrap();
        if seq == [0xff; 8] {
            assert!(m[2].is_empty(), "terminator has an empty payload");
            return out;
        }
        out.push((u64::from_be_bytes(seq), m[2].clone()));
    }
}

async fn pub_frames_decode(encoding: KvEncoding) {
    let f = fleet(1, |c| {
        c.kv_encoding = encoding;
        c.lora_adapters = vec!["sql".into()];
    })
    .await;
    let mut sub = SubSocket::new();
    sub.connect(&f.engines[0].kv_pub_endpoint).await.unwrap();
    sub.subscribe(&f.engines[0].kv_topic).await.unwrap();
    // The subscription reaches the publisher asynchronously: send requests until one batch
    // arrives, then a few more on the warmed-up subscription.
    let mut received: Vec<ZmqMessage> = Vec::new();
    for attempt in 0..200 {
        completion(&f, prompt(attempt, 40), None).await;
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
            received.push(m.unwrap());
            break;
        }
    }
    assert!(!received.is_empty(), "no KV event arrived");
    completion(&f, prompt(1000, 40), Some("sql")).await;
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(500), sub.recv()).await {
        received.push(m.unwrap());
        if received.len() > 4 {
            break;
        }
    }
    let want = match encoding {
        KvEncoding::Array => "array",
        KvEncoding::Map => "map",
    };
    let mut last_seq = None;
    let mut saw_lora = false;
    for m in &received {
        let frames = m.clone().into_vec();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].as_ref(), f.engines[0].kv_topic.as_bytes());
        assert!(
            f.engines[0]
                .kv_topic
                .starts_with(&format!("kv@{}@", f.engines[0].http_addr))
        );
        let seq = u64::from_be_bytes(frames[1].as_ref().try_into().unwrap());
        if let Some(prev) = last_seq {
            assert_eq!(seq, prev + 1, "sequence numbers are consecutive");
        }
        last_seq = Some(seq);
        let (enc, ts, events, rank) = decode_batch(&frames[2]);
        assert_eq!(enc, want);
        assert!(ts > 1.7e9, "ts is a unix time");
        assert_eq!(rank.as_u64(), Some(0));
        for e in &events {
            if e.tag == "BlockStored" && e.fields["lora_name"].as_str() == Some("sql") {
                saw_lora = true;
                assert_eq!(e.fields["lora_id"].as_u64(), Some(1));
            }
        }
    }
    assert!(saw_lora, "the adapter request's blocks carry lora_name");
    // The full history, from replay, forms verifiable chains.
    let mut checker = ChainChecker::new("0");
    let history = replay_from(&f, 0).await;
    for (i, (seq, payload)) in history.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        for e in decode_batch(payload).2 {
            checker.check(&e);
        }
    }
    assert!(checker.checked >= 3, "{} blocks checked", checker.checked);
    f.shutdown().await;
}

#[tokio::test]
async fn array_encoded_events_decode_and_hash_chains_verify() {
    pub_frames_decode(KvEncoding::Array).await;
}

#[tokio::test]
async fn map_encoded_events_decode_and_hash_chains_verify() {
    pub_frames_decode(KvEncoding::Map).await;
}

#[tokio::test]
async fn replay_returns_every_buffered_batch_then_the_terminator() {
    let f = fleet(1, |c| c.engines[0].faults.kv_drop_rate = 1.0).await;
    for i in 0..4 {
        completion(&f, prompt(i, 33), None).await;
    }
    let all = replay_from(&f, 0).await;
    assert!(
        all.len() >= 4,
        "one batch per prefill at least: {}",
        all.len()
    );
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..all.len() as u64).collect::<Vec<_>>());
    let tail = replay_from(&f, 2).await;
    assert_eq!(tail.first().map(|(s, _)| *s), Some(2));
    assert_eq!(tail.len(), all.len() - 2);
    let none = replay_from(&f, 1 << 40).await;
    assert!(none.is_empty());
    f.shutdown().await;
}

/// The Python checker (pyzmq + msgpack + cbor2) is an implementation of the hash chain that
/// shares no code with ours.
#[tokio::test]
async fn python_checker_recomputes_hash_chains() {
    let deps = std::process::Command::new("python3")
        .args(["-c", "import zmq, msgpack, cbor2"])
        .output();
    match deps {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 lacks pyzmq/msgpack/cbor2 ({}): run scripts/setup-test-deps.sh",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("python3 not found ({e}): run scripts/setup-test-deps.sh"),
    }
    for (encoding, name) in [(KvEncoding::Array, "array"), (KvEncoding::Map, "map")] {
        let f = fleet(1, |c| {
            c.kv_encoding = encoding;
            c.lora_adapters = vec!["sql".into()];
        })
        .await;
        // A second checker with the wrong seed must fail: proof the check can fail.
        let (mut good, mut good_out) = spawn_checker(&f, "0", name).await;
        let (mut wrong, mut wrong_out) = spawn_checker(&f, "1", name).await;
        // Shared prefixes (parents published in earlier batches), a LoRA chain, and enough
        // blocks (4 + 2 new + 3 = 9) for --min-blocks; the checker stops once it has seen them.
        let base = prompt(5, 64);
        completion(&f, base.clone(), None).await;
        completion(&f, [base.clone(), prompt(6, 40)].concat(), None).await;
        completion(&f, prompt(7, 50), Some("sql")).await;
        let (status, summary) = finish_checker(&mut good, &mut good_out).await;
        assert!(status.success(), "checker failed: {summary}");
        let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(v["ok"], true);
        assert!(v["blocks_checked"].as_u64().unwrap() >= 9, "{summary}");
        let (status, summary) = finish_checker(&mut wrong, &mut wrong_out).await;
        assert!(!status.success(), "a wrong seed must not verify: {summary}");
        assert!(summary.contains("recomputed"), "{summary}");
        f.shutdown().await;
    }
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

async fn spawn_checker(f: &Fleet, seed: &str, encoding: &str) -> (tokio::process::Child, Lines) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_kv_events.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--endpoint", &f.engines[0].kv_pub_endpoint])
        .args(["--replay", &f.engines[0].kv_replay_endpoint])
        .args(["--topic", &f.engines[0].kv_topic])
        .args(["--seed", seed, "--min-blocks", "9"])
        .args(["--expect-encoding", encoding])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("checker starts")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("READY"));
    (child, lines)
}

async fn finish_checker(
    child: &mut tokio::process::Child,
    lines: &mut Lines,
) -> (std::process::ExitStatus, String) {
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("checker finishes")
        .unwrap();
    let summary = lines.next_line().await.unwrap().unwrap_or_default();
    (status, summary)
}

#[tokio::test]
async fn dropped_batches_leave_gaps_that_replay_fills() {
    let f = fleet(1, |c| {
        c.engines[0].faults.kv_drop_rate = 0.5;
        c.fault_seed = 3;
    })
    .await;
    let mut sub = SubSocket::new();
    sub.connect(&f.engines[0].kv_pub_endpoint).await.unwrap();
    sub.subscribe("").await.unwrap();
    let mut seen: Vec<u64> = Vec::new();
    // Bounded: with half the batches dropped a gap shows within a few requests.
    for n in 0..200 {
        completion(&f, prompt(n, 20), None).await;
        while let Ok(m) = tokio::time::timeout(Duration::from_millis(20), sub.recv()).await {
            let frames = m.unwrap().into_vec();
            seen.push(u64::from_be_bytes(frames[1].as_ref().try_into().unwrap()));
        }
        if seen.windows(2).any(|w| w[1] > w[0] + 1) {
            break;
        }
    }
    assert!(
        seen.windows(2).any(|w| w[1] > w[0] + 1),
        "a gap between published sequence numbers: {seen:?}"
    );
    let all = replay_from(&f, 0).await;
    let max_seen = *seen.iter().max().unwrap();
    assert!(
        all.len() as u64 > max_seen,
        "replay holds the dropped batches"
    );
    f.shutdown().await;
}
