//! KV events received by real libzmq sockets and decoded with a generic msgpack decoder, in
//! both of vLLM's socket arrangements (engine binds / engine connects), both event encodings and
//! both replay formats; plus an independent Python checker (pyzmq, msgpack, cbor2).

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, fleet};
use kvgate_engine::HashAlgo;
use kvgate_sim::{Fleet, FleetConfig, KvEncoding, ReplayFormat, SocketRole};
use kvgate_tokens::{BlockHash, BlockHasher, ExtraKeys};
use rmpv::Value;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A libzmq socket the async tests drive from blocking threads (sockets are `Send`, not `Sync`).
#[derive(Clone)]
struct Sock(Arc<Mutex<zmq::Socket>>);

impl Sock {
    fn new(kind: zmq::SocketType) -> Self {
        let s = zmq::Context::new().socket(kind).unwrap();
        s.set_linger(0).unwrap();
        Self(Arc::new(Mutex::new(s)))
    }

    fn sub_connected(endpoint: &str, topic: &str) -> Self {
        let s = Self::new(zmq::SUB);
        s.with(|z| {
            z.connect(endpoint).unwrap();
            z.set_subscribe(topic.as_bytes()).unwrap();
        });
        s
    }

    /// A SUB socket bound on an ephemeral port of 127.0.0.1, and its concrete endpoint.
    fn sub_bound() -> (Self, String) {
        let s = Self::new(zmq::SUB);
        let ep = s.with(|z| {
            z.bind("tcp://127.0.0.1:*").unwrap();
            z.set_subscribe(b"").unwrap();
            z.get_last_endpoint().unwrap().unwrap()
        });
        (s, ep)
    }

    fn with<T>(&self, f: impl FnOnce(&zmq::Socket) -> T) -> T {
        f(&self.0.lock().unwrap())
    }

    /// One multipart message, or None after `timeout`.
    async fn recv(&self, timeout: Duration) -> Option<Vec<Vec<u8>>> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            s.with(|z| {
                z.poll(zmq::POLLIN, timeout.as_millis() as i64)
                    .ok()
                    .filter(|&n| n > 0)?;
                z.recv_multipart(0).ok()
            })
        })
        .await
        .unwrap()
    }
}

/// A decoded event, by field name, whatever the encoding; `keys` keeps a map event's key order.
#[derive(Debug)]
struct Event {
    tag: String,
    keys: Vec<String>,
    fields: HashMap<String, Value>,
}

fn decode_batch(payload: &[u8]) -> (&'static str, f64, Vec<Event>, Value) {
    let v = rmpv::decode::read_value(&mut &payload[..]).expect("payload is msgpack");
    let a = v.as_array().expect("the batch is [ts, events, rank]");
    assert_eq!(a.len(), 3);
    let mut enc = "";
    let events = a[1]
        .as_array()
        .expect("events is an array")
        .iter()
        .map(|e| match e {
            Value::Array(a) => {
                enc = "array";
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
                    keys: Vec::new(),
                    fields: names
                        .iter()
                        .map(|n| n.to_string())
                        .zip(a[1..].iter().cloned())
                        .collect(),
                }
            }
            Value::Map(m) => {
                enc = "map";
                let keys: Vec<String> = m
                    .iter()
                    .map(|(k, _)| k.as_str().unwrap().to_owned())
                    .collect();
                let fields: HashMap<String, Value> = m
                    .iter()
                    .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.clone()))
                    .collect();
                Event {
                    tag: fields["type"].as_str().unwrap().to_owned(),
                    keys,
                    fields,
                }
            }
            other => panic!("event is {other:?}"),
        })
        .collect();
    (
        enc,
        a[0].as_f64().expect("ts is a float"),
        events,
        a[2].clone(),
    )
}

/// Checks every BlockStored hash against vLLM 0.32's tagged `sha256_cbor` chain recomputed from
/// its token ids (adapter paths: the adapter names, the simulator's default).
struct ChainChecker {
    hasher: BlockHasher,
    full: HashMap<u64, BlockHash>,
    checked: usize,
}

impl ChainChecker {
    fn new(seed: &str, block_size: usize) -> Self {
        Self {
            hasher: BlockHasher::new(seed, block_size),
            full: HashMap::new(),
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
        let (mut parent, first) = match e.fields["parent_block_hash"].as_u64() {
            None => (self.hasher.root(), 0),
            Some(k) => (*self.full.get(&k).expect("parent was stored earlier"), 1),
        };
        let lora = e.fields["lora_name"].as_str();
        // The salt is only in the published (untagged) extra keys of block 0.
        let salt = e
            .fields
            .get("extra_keys")
            .and_then(|k| k.as_array()?.first()?.as_array()?.last()?.as_str())
            .filter(|s| Some(*s) != lora);
        let extra = ExtraKeys {
            lora_name: lora,
            lora_path: lora,
            cache_salt: salt,
        };
        for (i, want) in hashes.iter().enumerate() {
            let h = self
                .hasher
                .hash_block(&parent, first + i, &toks[i * bs..(i + 1) * bs], extra);
            assert_eq!(h.key(), *want, "block {i}");
            self.full.insert(*want, h);
            parent = h;
            self.checked += 1;
        }
    }
}

fn cbor_engines(c: &mut FleetConfig, seed: &str) {
    for e in &mut c.engines {
        e.engine.prefix_caching_hash_algo = HashAlgo::Sha256Cbor;
        e.engine.hash_seed = seed.to_owned();
    }
}

async fn completion_on(f: &Fleet, engine: usize, prompt: Vec<u32>, extra: serde_json::Value) {
    let mut body = json!({"prompt": prompt, "max_tokens": 2});
    if let (Some(b), Some(x)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(x.clone());
    }
    let r = client()
        .post(format!(
            "http://{}/v1/completions",
            f.engines[engine].http_addr
        ))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn completion(f: &Fleet, prompt: Vec<u32>, model: Option<&str>) {
    let extra = model.map_or(json!({}), |m| json!({ "model": m }));
    completion_on(f, 0, prompt, extra).await;
}

fn prompt(salt: u32, len: u32) -> Vec<u32> {
    (0..len).map(|i| 1000 + salt * 7919 + i).collect()
}

/// Asks a replay socket for every batch from `start`, checking the reply frames of `format`.
async fn replay_at(
    endpoint: &str,
    topic: &str,
    start: u64,
    format: ReplayFormat,
) -> Vec<(u64, Vec<u8>)> {
    let dealer = Sock::new(zmq::DEALER);
    dealer.with(|z| {
        z.connect(endpoint).unwrap();
        let frames: [&[u8]; 2] = [b"", &start.to_be_bytes()];
        z.send_multipart(frames, 0).unwrap();
    });
    let mut out = Vec::new();
    loop {
        let m = dealer
            .recv(Duration::from_secs(10))
            .await
            .expect("replay answers");
        assert!(m[0].is_empty(), "the DEALER's empty delimiter frame");
        let (t, seq, payload) = match format {
            ReplayFormat::V0_32 => {
                assert_eq!(m.len(), 4, "[b\"\", topic, seq, payload]");
                (Some(&m[1]), &m[2], &m[3])
            }
            ReplayFormat::Legacy => {
                assert_eq!(m.len(), 3, "[b\"\", seq, payload]");
                (None, &m[1], &m[2])
            }
        };
        let seq: [u8; 8] = seq.as_slice().try_into().unwrap();
        if seq == [0xff; 8] {
            assert!(payload.is_empty(), "the end marker has an empty payload");
            if let Some(t) = t {
                assert!(t.is_empty(), "the end marker has an empty topic");
            }
            return out;
        }
        if let Some(t) = t {
            assert_eq!(t.as_slice(), topic.as_bytes());
        }
        out.push((u64::from_be_bytes(seq), payload.clone()));
    }
}

async fn replay_from(f: &Fleet, start: u64) -> Vec<(u64, Vec<u8>)> {
    let e = &f.engines[0];
    replay_at(
        &e.kv_replay_endpoint,
        &e.kv_topic,
        start,
        ReplayFormat::V0_32,
    )
    .await
}

/// Replays from 0 until at least `n` batches are buffered: a batch reaches the replay ring on
/// the PUB thread shortly after the response that ended its step.
async fn replay_at_least(
    endpoint: &str,
    topic: &str,
    format: ReplayFormat,
    n: usize,
) -> Vec<(u64, Vec<u8>)> {
    for _ in 0..1000 {
        let all = replay_at(endpoint, topic, 0, format).await;
        if all.len() >= n {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} batches buffered after 10 s");
}

/// Sends requests until a first batch arrives (the subscription reaches the publisher
/// asynchronously), then collects what follows the adapter request.
async fn collect(f: &Fleet, sub: &Sock) -> Vec<Vec<Vec<u8>>> {
    let mut received = Vec::new();
    for attempt in 0..200 {
        completion(f, prompt(attempt, 40), None).await;
        if let Some(m) = sub.recv(Duration::from_millis(50)).await {
            received.push(m);
            break;
        }
    }
    assert!(!received.is_empty(), "no KV event arrived");
    completion(f, prompt(1000, 40), Some("sql")).await;
    while let Some(m) = sub.recv(Duration::from_millis(500)).await {
        received.push(m);
        if received.len() > 4 {
            break;
        }
    }
    received
}

async fn pub_frames_decode(encoding: KvEncoding) {
    let f = fleet(1, |c| {
        c.kv_encoding = encoding;
        c.lora_adapters = vec!["sql".into()];
        cbor_engines(c, "0");
    })
    .await;
    let e = &f.engines[0];
    assert_eq!(e.kv_pub_role, SocketRole::Bind);
    let sub = Sock::sub_connected(&e.kv_pub_endpoint, &e.kv_topic);
    let received = collect(&f, &sub).await;
    let want = match encoding {
        KvEncoding::Array => "array",
        KvEncoding::Map => "map",
    };
    let mut last_seq = None;
    let mut saw_lora = false;
    for frames in &received {
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].as_slice(), e.kv_topic.as_bytes());
        assert_eq!(
            e.kv_topic,
            format!("kv@{}:{}@{}", e.http_addr.ip(), e.http_addr.port(), e.model)
        );
        let seq = u64::from_be_bytes(frames[1].as_slice().try_into().unwrap());
        if let Some(prev) = last_seq {
            assert_eq!(seq, prev + 1, "sequence numbers are consecutive");
        }
        last_seq = Some(seq);
        let (enc, ts, events, rank) = decode_batch(&frames[2]);
        assert_eq!(enc, want);
        assert!(ts > 1.7e9, "ts is a unix time");
        assert_eq!(rank.as_u64(), Some(0));
        for ev in &events {
            if ev.tag == "BlockStored" && ev.fields["lora_name"].as_str() == Some("sql") {
                saw_lora = true;
                assert_eq!(ev.fields["lora_id"].as_u64(), Some(1));
                if encoding == KvEncoding::Map {
                    let extra = ev.fields["extra_keys"].as_array().unwrap();
                    assert!(
                        extra
                            .iter()
                            .all(|k| k.as_array().unwrap()[0].as_str() == Some("sql"))
                    );
                }
            }
            if encoding == KvEncoding::Map && ev.tag == "BlockStored" {
                assert_eq!(
                    ev.keys,
                    [
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
                        "kv_cache_spec_kind"
                    ]
                );
            }
        }
    }
    assert!(saw_lora, "the adapter request's blocks carry lora_name");
    // The full history, from replay, forms verifiable chains.
    let mut checker = ChainChecker::new("0", 16);
    let history = replay_from(&f, 0).await;
    for (i, (seq, payload)) in history.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        for ev in decode_batch(payload).2 {
            checker.check(&ev);
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

/// vLLM's rule: a concrete endpoint makes the engine's PUB socket connect, so one SUB socket
/// bound by the router hears every engine and tells them apart by topic.
#[tokio::test]
async fn with_a_concrete_endpoint_engines_connect_to_one_bound_subscriber() {
    let (sub, endpoint) = Sock::sub_bound();
    let f = fleet(2, |c| c.kv_events_endpoint = Some(endpoint.clone())).await;
    for e in &f.engines {
        assert_eq!(e.kv_pub_role, SocketRole::Connect);
        assert_eq!(e.kv_pub_endpoint, endpoint);
        assert_ne!(e.kv_replay_endpoint, endpoint);
    }
    assert_ne!(f.engines[0].kv_topic, f.engines[1].kv_topic);
    let mut topics = HashMap::new();
    for attempt in 0..200 {
        for i in 0..2 {
            completion_on(&f, i, prompt(attempt * 2 + i as u32, 40), json!({})).await;
        }
        while let Some(m) = sub.recv(Duration::from_millis(50)).await {
            assert_eq!(m.len(), 3);
            *topics
                .entry(String::from_utf8(m[0].clone()).unwrap())
                .or_insert(0) += 1;
        }
        if topics.len() == 2 {
            break;
        }
    }
    for e in &f.engines {
        assert!(topics.contains_key(&e.kv_topic), "{topics:?}");
    }
    // Each engine still binds its own replay socket.
    for e in &f.engines {
        replay_at_least(&e.kv_replay_endpoint, &e.kv_topic, ReplayFormat::V0_32, 1).await;
    }
    f.shutdown().await;
}

#[tokio::test]
async fn replay_returns_every_buffered_batch_then_the_end_marker() {
    let f = fleet(1, |c| c.engines[0].faults.kv_drop_rate = 1.0).await;
    for i in 0..4 {
        completion(&f, prompt(i, 33), None).await;
    }
    let e = &f.engines[0];
    // One batch per prefill (two full blocks each); decode never fills a block.
    let all = replay_at_least(&e.kv_replay_endpoint, &e.kv_topic, ReplayFormat::V0_32, 4).await;
    assert_eq!(all.len(), 4);
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..all.len() as u64).collect::<Vec<_>>());
    let tail = replay_from(&f, 2).await;
    assert_eq!(tail.first().map(|(s, _)| *s), Some(2));
    assert_eq!(tail.len(), all.len() - 2);
    let none = replay_from(&f, 1 << 40).await;
    assert!(none.is_empty());
    f.shutdown().await;
}

#[tokio::test]
async fn legacy_replay_answers_in_three_frames() {
    let f = fleet(1, |c| {
        c.replay_format = ReplayFormat::Legacy;
        c.engines[0].faults.kv_drop_rate = 1.0;
    })
    .await;
    completion(&f, prompt(0, 33), None).await;
    let e = &f.engines[0];
    replay_at_least(&e.kv_replay_endpoint, &e.kv_topic, ReplayFormat::Legacy, 1).await;
    f.shutdown().await;
}

#[tokio::test]
async fn all_blocks_cleared_is_published_with_the_step_after_a_reset() {
    let f = fleet(1, |c| c.engines[0].faults.kv_drop_rate = 1.0).await;
    completion(&f, prompt(0, 40), None).await;
    let url = format!("http://{}/reset_prefix_cache", f.engines[0].http_addr);
    let r: serde_json::Value = client()
        .post(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r, json!({"success": true}));
    completion(&f, prompt(0, 40), None).await;
    let batch = Arc::new(Mutex::new(Vec::new()));
    common::eventually("a batch with AllBlocksCleared", || {
        let (f, batch) = (&f, batch.clone());
        async move {
            let found = replay_from(f, 0)
                .await
                .into_iter()
                .map(|(_, p)| decode_batch(&p).2)
                .find(|ev| ev.iter().any(|e| e.tag == "AllBlocksCleared"));
            let done = found.is_some();
            *batch.lock().unwrap() = found.unwrap_or_default();
            done
        }
    })
    .await;
    let events = std::mem::take(&mut *batch.lock().unwrap());
    assert_eq!(
        events[0].tag, "AllBlocksCleared",
        "queued before the step's own events"
    );
    assert_eq!(events[0].keys, ["type"]);
    assert!(
        events[1..].iter().any(|e| e.tag == "BlockStored"),
        "the same prompt is stored again in that step: the cache was empty"
    );
    f.shutdown().await;
}

/// The same prompt published by an engine on vLLM's default algorithm and by one on
/// `sha256_cbor` has different hashes: the default is not the reproducible chain.
#[tokio::test]
async fn the_default_algorithm_is_not_sha256_cbor() {
    let f = fleet(2, |c| {
        c.engines[1].engine.prefix_caching_hash_algo = HashAlgo::Sha256Cbor;
        for e in &mut c.engines {
            e.faults.kv_drop_rate = 1.0;
        }
    })
    .await;
    let mut stored = Vec::new();
    for i in 0..2 {
        completion_on(&f, i, prompt(9, 48), json!({})).await;
        let e = &f.engines[i];
        let h = replay_at_least(&e.kv_replay_endpoint, &e.kv_topic, ReplayFormat::V0_32, 1).await;
        let ev = decode_batch(&h[0].1).2;
        stored.push(ev[0].fields["block_hashes"].clone());
    }
    let want =
        BlockHasher::new(BlockHasher::DEFAULT_SEED, 16).keys(&prompt(9, 48), ExtraKeys::default());
    let cbor: Vec<u64> = stored[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect();
    assert_eq!(cbor, want, "sha256_cbor on vLLM's default seed");
    assert_ne!(stored[0], stored[1]);
    f.shutdown().await;
}

fn python_deps() {
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
}

/// The Python checker (pyzmq + msgpack + cbor2) is an implementation of the wire format and the
/// hash chain that shares no code with ours; a checker with the wrong seed must fail, proof the
/// check can fail.
#[tokio::test]
async fn python_checker_recomputes_tagged_hash_chains() {
    python_deps();
    for (encoding, name) in [(KvEncoding::Map, "map"), (KvEncoding::Array, "array")] {
        let f = fleet(1, |c| {
            c.kv_encoding = encoding;
            c.lora_adapters = vec!["sql".into()];
            c.lora_paths.insert("sql".into(), "/adapters/sql".into());
            cbor_engines(c, "0");
        })
        .await;
        let common = Checker::for_engine(&f)
            .expect_encoding(name)
            .lora_path("sql=/adapters/sql");
        let mut good = common.clone().seed("0").spawn().await;
        let mut wrong = common.seed("1").spawn().await;
        // Shared prefixes (parents published in earlier batches), a LoRA chain, and enough
        // blocks (4 + 2 new + 3 = 9) for --min-blocks; the checker stops once it has seen them.
        let base = prompt(5, 64);
        completion(&f, base.clone(), None).await;
        completion(&f, [base.clone(), prompt(6, 40)].concat(), None).await;
        completion(&f, prompt(7, 50), Some("sql")).await;
        let v = good.passes().await;
        assert!(v["blocks_checked"].as_u64().unwrap() >= 9, "{v}");
        wrong.fails_recomputing().await;
        f.shutdown().await;
    }
}

/// A salted prompt: vLLM hashes `("cache_salt", salt)` into block 0 and publishes the bare salt.
#[tokio::test]
async fn python_checker_recomputes_salted_chains_with_the_tag() {
    python_deps();
    let f = fleet(1, |c| cbor_engines(c, "vllm-none-hash")).await;
    let mut good = Checker::for_engine(&f)
        .expect_salt("tenant-a")
        .spawn()
        .await;
    let mut untagged = Checker::for_engine(&f).untagged().spawn().await;
    for i in 0..3 {
        completion_on(&f, 0, prompt(20 + i, 64), json!({"cache_salt": "tenant-a"})).await;
    }
    let v = good.passes().await;
    assert_eq!(v["salts"], json!(["tenant-a"]), "{v}");
    untagged.fails_recomputing().await;
    f.shutdown().await;
}

/// Connect mode end to end: the checker binds a concrete address, the engine connects, early
/// batches lost to the slow joiner come back through four-frame replay.
#[tokio::test]
async fn python_checker_binds_and_the_engine_connects() {
    python_deps();
    let endpoint = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("tcp://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let topic = "kv@sim-connect";
    let replay = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut checker = Checker {
        endpoint: endpoint.clone(),
        bind: true,
        replay: format!("tcp://127.0.0.1:{replay}"),
        topic: topic.into(),
        ..Checker::default()
    }
    .spawn()
    .await;
    let f = fleet(1, |c| {
        c.kv_events_endpoint = Some(endpoint.clone());
        c.kv_replay_port = Some(replay);
        c.kv_topic = Some(topic.into());
        cbor_engines(c, "vllm-none-hash");
    })
    .await;
    assert_eq!(f.engines[0].kv_pub_role, SocketRole::Connect);
    for i in 0..3 {
        completion(&f, prompt(30 + i, 64), None).await;
    }
    let v = checker.passes().await;
    assert!(v["blocks_checked"].as_u64().unwrap() >= 9, "{v}");
    f.shutdown().await;
}

/// The simulator's default algorithm stands in for vLLM's pickle-based `sha256`: an outsider
/// recomputing `sha256_cbor` on the same seed must fail.
#[tokio::test]
async fn python_checker_cannot_recompute_the_default_algorithm() {
    python_deps();
    let f = fleet(1, |_| {}).await;
    let mut checker = Checker::for_engine(&f).spawn().await;
    for i in 0..3 {
        completion(&f, prompt(40 + i, 64), None).await;
    }
    checker.fails_recomputing().await;
    f.shutdown().await;
}

#[derive(Clone, Default)]
struct Checker {
    endpoint: String,
    bind: bool,
    replay: String,
    topic: String,
    args: Vec<String>,
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

struct RunningChecker {
    child: tokio::process::Child,
    lines: Lines,
}

impl Checker {
    fn for_engine(f: &Fleet) -> Self {
        let e = &f.engines[0];
        Self {
            endpoint: e.kv_pub_endpoint.clone(),
            bind: false,
            replay: e.kv_replay_endpoint.clone(),
            topic: e.kv_topic.clone(),
            args: Vec::new(),
        }
    }

    fn arg(mut self, k: &str, v: &str) -> Self {
        self.args.extend([k.to_owned(), v.to_owned()]);
        self
    }

    fn seed(self, s: &str) -> Self {
        self.arg("--seed", s)
    }

    fn expect_encoding(self, e: &str) -> Self {
        self.arg("--expect-encoding", e)
    }

    fn expect_salt(self, s: &str) -> Self {
        self.arg("--expect-salt", s)
    }

    fn lora_path(self, p: &str) -> Self {
        self.arg("--lora-path", p)
    }

    fn untagged(self) -> Self {
        self.arg("--tagging", "untagged")
    }

    async fn spawn(self) -> RunningChecker {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_kv_events.py");
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg(script)
            .args(["--endpoint", &self.endpoint])
            .args(["--replay", &self.replay])
            .args(["--topic", &self.topic])
            .args(["--min-blocks", "9"])
            .args(&self.args);
        if self.bind {
            cmd.arg("--bind");
        }
        let mut child = cmd
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
        RunningChecker { child, lines }
    }
}

impl RunningChecker {
    async fn finish(&mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("checker finishes")
            .unwrap();
        let summary = self.lines.next_line().await.unwrap().unwrap_or_default();
        (status, summary)
    }

    async fn passes(&mut self) -> serde_json::Value {
        let (status, summary) = self.finish().await;
        assert!(status.success(), "checker failed: {summary}");
        let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(v["ok"], true);
        v
    }

    async fn fails_recomputing(&mut self) {
        let (status, summary) = self.finish().await;
        assert!(
            !status.success(),
            "a wrong chain must not verify: {summary}"
        );
        assert!(summary.contains("recomputed"), "{summary}");
    }
}

#[tokio::test]
async fn dropped_batches_leave_gaps_that_replay_fills() {
    let f = fleet(1, |c| {
        c.engines[0].faults.kv_drop_rate = 0.5;
        c.fault_seed = 3;
    })
    .await;
    let sub = Sock::sub_connected(&f.engines[0].kv_pub_endpoint, "");
    let mut seen: Vec<u64> = Vec::new();
    // Bounded: with half the batches dropped a gap shows within a few requests.
    for n in 0..200 {
        completion(&f, prompt(n, 20), None).await;
        while let Some(frames) = sub.recv(Duration::from_millis(20)).await {
            seen.push(u64::from_be_bytes(frames[1].as_slice().try_into().unwrap()));
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
