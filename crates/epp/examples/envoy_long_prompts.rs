//! Issue 15.4's measurement: what `kvgate epp` adds to time to first token behind Envoy when
//! many clients stream long prompts at once (llm-d's picker adds over a second at concurrency
//! 150-200 with 220 KB prompts), and what the picker spends in CPU per request.
//!
//! Everything is a separate process from the release binary, as in a deployment: `kvgate sim`
//! (N engines, fast simulated time), `kvgate epp`, and one Envoy with two listeners
//! ([`kvgate_testkit::envoy`]): "picked" goes through the picker over ext_proc (the reference
//! FULL_DUPLEX_STREAMED config), "direct" has ext_proc disabled and routes by the
//! `x-gateway-destination-endpoint` header that the client sets itself, round-robin over the
//! engines. Same Envoy, same engines, same client: the difference between the arms is the
//! picker (the body's round trip through ext_proc, parsing, tokenising, hashing, deciding) and
//! what its routing changes: the picked arm sends shared documents to the engines that hold
//! them, so with `shared` prompts its engines prefill less than the direct arm's round-robin
//! does (the report gives each arm's cached-token share), and the added TTFT understates the
//! picker's own cost by that much.
//!
//! The client runs `--streams` closed-loop workers, each sending streaming chat completions
//! whose user message is `--prompt-kb` KB of English-like text. `shared` prompts (the default:
//! RAG / long-document Q&A, where prefix routing matters) are one of `--documents` fixed
//! documents followed by a unique question; `unique` prompts are fresh text every time. TTFT is
//! measured from just before the request is sent to the first SSE `data:` event whose delta
//! carries generated content (not the role-only first event), so it includes the upload of the
//! prompt, the picker's decision, the engine's prefill and the relay back. A non-200 answer, a
//! stream without `data: [DONE]` or without content, and a transport error or timeout are
//! failures: they are counted, listed, and make the run exit non-zero.
//!
//! The arms are interleaved to cancel drift on a noisy machine: after a warm-up, `--rounds`
//! rounds each run one window per arm (ABBA order), and the report quotes per arm the median
//! over rounds of each window's p50 and p99. CPU per request of the picker, Envoy, the engines
//! and this load generator come from `utime + stime` in `/proc/<pid>/stat` around each window.
//!
//! The simulator renders chats with kvgate's built-in template, so with a real tokenizer the
//! picker is given the model's `tokenizer.json` (the same file the engines tokenise with) and
//! that template: its tokenizer probe then agrees with the engines and prefix keys match their
//! caches, while the tokenising work is the real model's.
//!
//! Run (needs Envoy: scripts/setup-envoy.sh, and `cargo build --release` for the binary):
//! `cargo run --release -p kvgate-epp --example envoy_long_prompts -- [--streams 200]
//! [--prompts shared|unique] [--tokenizer DIR|builtin] [--json out.json]`

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use kvgate_testkit::envoy::{Envoy, EnvoyOptions};
use kvgate_testkit::process::{Proc, SimEngine, TempDir, free_port, kvgate, spawn_sim};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Where scripts/setup-vllm.sh leaves the SmolLM2 tokenizer, the default real tokenizer.
const SMOLLM2_DIR: &str = ".cache/kvgate/smollm2-135m-instruct";

/// kvgate's built-in chat template (`kvgate_tokens::render_chat`) as Jinja, which is what the
/// simulator renders, so the picker's HF tokenizer sees the same text the engines tokenise.
const BUILTIN_TEMPLATE_JINJA: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// How long the picker may take to discover the engines and probe their tokenizers.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Words the prompt generator draws from: common English words of varied length, so a real
/// BPE tokeniser does the work it does on prose (a repeated phrase would be cached or merged).
const WORDS: &str = "\
    the of and to in is was that for on with as by at from this which or be are an not it \
    were have has had their its but also more than other after during between into system \
    memory network request latency throughput engine cluster gateway schedule cache prefix \
    token model river mountain village harbour market winter summer history council treaty \
    merchant bridge library garden machine factory railway station province kingdom century \
    language literature painting music theatre science experiment measurement temperature \
    pressure velocity population agriculture economy government election parliament \
    committee report analysis evidence argument question answer problem solution method \
    result observation although however therefore because whereas nevertheless meanwhile \
    quickly slowly carefully significantly approximately entirely rarely bright ancient \
    modern northern southern distant narrow wide heavy light remarkable ordinary complex \
    simple uncertain reliable fragile built described reported measured observed founded \
    destroyed restored travelled discovered published translated negotiated constructed \
    shipped copper timber grain wool salt silver coal glass paper stone 1848 1920 seventeen \
    hundred thousand several many few each every";

/// One word of [`WORDS`], drawn uniformly.
fn word(rng: &mut Rng) -> &'static str {
    static LIST: LazyLock<Vec<&'static str>> =
        LazyLock::new(|| WORDS.split_ascii_whitespace().collect());
    LIST[rng.below(LIST.len())]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EngineTokenizer {
    /// The picker's tokenizer.
    Same,
    /// kvgate's built-in tokenizer.
    Builtin,
}

impl EngineTokenizer {
    fn as_str(self) -> &'static str {
        match self {
            EngineTokenizer::Same => "same",
            EngineTokenizer::Builtin => "builtin",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Prompts {
    /// One of `--documents` fixed documents plus a unique question (RAG, long-document Q&A).
    Shared,
    /// Fresh random text for every request (no prefix to reuse anywhere).
    Unique,
}

impl Prompts {
    fn as_str(self) -> &'static str {
        match self {
            Prompts::Shared => "shared",
            Prompts::Unique => "unique",
        }
    }
}

/// kvgate epp behind Envoy at many concurrent streams of long prompts, against Envoy routing
/// directly (issue 15.4).
#[derive(Parser, Debug)]
struct Args {
    /// The kvgate release binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kvgate")]
    bin: PathBuf,
    /// Simulated engines.
    #[arg(long, default_value_t = 4)]
    engines: usize,
    /// The simulator's time scale: high, so that the engines themselves are fast.
    #[arg(long, default_value_t = 1000.0)]
    time_scale: f64,
    /// A HuggingFace model directory (its tokenizer.json) for the engines and the picker, or
    /// `builtin`. Default: the SmolLM2 tokenizer scripts/setup-vllm.sh fetches, if present,
    /// else builtin.
    #[arg(long)]
    tokenizer: Option<String>,
    /// The engines' tokenizer: `same` as the picker's, or `builtin`. Real engines tokenise on
    /// their own hosts; here they share the cores with the picker and Envoy, and with a real
    /// tokenizer their tokenising (~55 ms of CPU per 220 KB prompt) can saturate a small
    /// machine in both arms alike. `builtin` makes them cheap, so the difference between the
    /// arms stands out; the picker's tokenizer probe then disagrees with the engines, so its
    /// prefix keys do not match their caches (it still tokenises and hashes every prompt).
    #[arg(long, value_enum, default_value_t = EngineTokenizer::Same)]
    engine_tokenizer: EngineTokenizer,
    /// Concurrent closed-loop client streams.
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Size of each prompt's user message, KB (1000 bytes).
    #[arg(long, default_value_t = 220)]
    prompt_kb: usize,
    /// Prompt shape.
    #[arg(long, value_enum, default_value_t = Prompts::Shared)]
    prompts: Prompts,
    /// Distinct documents with `--prompts shared`.
    #[arg(long, default_value_t = 8)]
    documents: usize,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 8)]
    max_tokens: u32,
    /// Rounds; each runs one window per arm.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests per window.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Run each window for this many seconds instead of `--requests`.
    #[arg(long)]
    seconds: Option<f64>,
    /// A request taking longer than this fails, seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Envoy worker threads.
    #[arg(long, default_value_t = EnvoyOptions::default().concurrency)]
    envoy_concurrency: u32,
    /// Seed of the prompt generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write every figure and setting here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The tokenizer the run uses.
enum Tok {
    Builtin,
    Hf(PathBuf),
}

impl Tok {
    fn resolve(arg: Option<&str>) -> Tok {
        match arg {
            Some("builtin") => Tok::Builtin,
            Some(dir) => Tok::Hf(PathBuf::from(dir)),
            None => match std::env::var_os("HOME").map(|h| Path::new(&h).join(SMOLLM2_DIR)) {
                Some(d) if d.join("tokenizer.json").is_file() => Tok::Hf(d),
                _ => Tok::Builtin,
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Tok::Builtin => "builtin".into(),
            Tok::Hf(d) => d.display().to_string(),
        }
    }
}

/// SplitMix64: a small deterministic generator, so a seed names a workload exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// About `bytes` bytes of English-like prose: sentences of 6-24 words, capitalised, with commas
/// and paragraph breaks, drawn from [`WORDS`].
fn prose(rng: &mut Rng, bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 64);
    let mut sentence = 0usize;
    while out.len() < bytes {
        let words = 6 + rng.below(19);
        for w in 0..words {
            let next = word(rng);
            if w == 0 {
                let mut c = next.chars();
                let first = c.next().unwrap_or(' ').to_ascii_uppercase();
                out.push(first);
                out.push_str(c.as_str());
            } else {
                out.push_str(next);
            }
            if w + 1 < words {
                out.push_str(if rng.below(9) == 0 { ", " } else { " " });
            }
        }
        out.push('.');
        sentence += 1;
        out.push_str(if sentence.is_multiple_of(7) {
            "\n\n"
        } else {
            " "
        });
    }
    out.truncate(bytes);
    out
}

/// JSON-escapes `s` without the surrounding quotes.
fn escaped(s: &str) -> String {
    let q = serde_json::to_string(s).expect("a string serialises");
    q[1..q.len() - 1].to_owned()
}

/// Builds request bodies: the JSON around the prompt is written once, documents are escaped
/// once, and a body is assembled by concatenation (a 220 KB body costs a copy, not a
/// serialisation).
struct Bodies {
    head: String,
    tail: String,
    prompts: Prompts,
    prompt_bytes: usize,
    /// Escaped shared documents.
    documents: Vec<String>,
    seed: u64,
}

impl Bodies {
    fn new(args: &Args, model: &str) -> Bodies {
        let head = format!(
            r#"{{"model":{},"stream":true,"stream_options":{{"include_usage":true}},"max_tokens":{},"messages":[{{"role":"user","content":""#,
            serde_json::to_string(model).expect("model"),
            args.max_tokens
        );
        let prompt_bytes = args.prompt_kb * 1000;
        let documents = match args.prompts {
            Prompts::Shared => (0..args.documents.max(1))
                .map(|d| {
                    let mut rng = Rng(args.seed ^ (0xD0C0_0000 + d as u64));
                    escaped(&prose(&mut rng, prompt_bytes.saturating_sub(100)))
                })
                .collect(),
            Prompts::Unique => Vec::new(),
        };
        Bodies {
            head,
            tail: r#""}]}"#.into(),
            prompts: args.prompts,
            prompt_bytes,
            documents,
            seed: args.seed,
        }
    }

    /// The body of request `n` (a global counter: every request differs).
    fn body(&self, n: u64) -> Vec<u8> {
        let mut rng = Rng(self.seed.wrapping_mul(0x5851_F42D_4C95_7F2D) ^ n);
        let question = format!(
            "\n\nQuestion {n}: what does the text above say about the {} and the {}? Answer briefly.",
            word(&mut rng),
            word(&mut rng)
        );
        let fresh;
        let text: &str = match self.prompts {
            Prompts::Shared => &self.documents[rng.below(self.documents.len())],
            Prompts::Unique => {
                fresh = escaped(&prose(&mut rng, self.prompt_bytes.saturating_sub(100)));
                &fresh
            }
        };
        let question = escaped(&question);
        let mut b =
            Vec::with_capacity(self.head.len() + text.len() + question.len() + self.tail.len());
        b.extend_from_slice(self.head.as_bytes());
        b.extend_from_slice(text.as_bytes());
        b.extend_from_slice(question.as_bytes());
        b.extend_from_slice(self.tail.as_bytes());
        b
    }

    /// The body of a warm-up request for document `d` (shared) or any fresh prompt (unique).
    fn warmup(&self, d: usize, n: u64) -> Vec<u8> {
        match self.prompts {
            Prompts::Shared => {
                let q = escaped(&format!("\n\nWarm-up {n}: summarise the text above."));
                let mut b = self.head.clone().into_bytes();
                b.extend_from_slice(self.documents[d].as_bytes());
                b.extend_from_slice(q.as_bytes());
                b.extend_from_slice(self.tail.as_bytes());
                b
            }
            Prompts::Unique => self.body(u64::MAX - n),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    Direct,
    Picked,
}

impl Arm {
    fn as_str(self) -> &'static str {
        match self {
            Arm::Direct => "direct",
            Arm::Picked => "picked",
        }
    }
}

/// What one request saw.
struct Outcome {
    ttft_us: u64,
    served: String,
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// Sends one streaming request and reads it to the end.
async fn one(
    client: &reqwest::Client,
    url: &str,
    destination: Option<&str>,
    body: Vec<u8>,
) -> Result<Outcome, String> {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(d) = destination {
        req = req.header("x-gateway-destination-endpoint", d);
    }
    let start = Instant::now();
    let mut resp = req.send().await.map_err(|e| format!("transport: {e}"))?;
    let status = resp.status().as_u16();
    let served = resp
        .headers()
        .get("x-gateway-destination-endpoint-served")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!(
            "status {status}: {}",
            &text[..text.floor_char_boundary(200)]
        ));
    }
    let mut ttft = None;
    let mut done = false;
    let mut usage = (0, 0);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err(format!("stream: {e}")),
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            let data = data.trim_ascii_end();
            if data == b"[DONE]" {
                done = true;
                continue;
            }
            let v: Value =
                serde_json::from_slice(data).map_err(|e| format!("bad SSE event: {e}"))?;
            if ttft.is_none()
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            {
                ttft = Some(start.elapsed());
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                usage = (
                    u["prompt_tokens"].as_u64().unwrap_or(0),
                    u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0),
                );
            }
        }
    }
    if !done {
        return Err("truncated stream (no data: [DONE])".into());
    }
    let ttft = ttft.ok_or("no generated content in the stream")?;
    Ok(Outcome {
        ttft_us: u64::try_from(ttft.as_micros()).unwrap_or(u64::MAX),
        served,
        prompt_tokens: usage.0,
        cached_tokens: usage.1,
    })
}

/// The processes whose CPU time is accounted.
#[derive(Clone, Copy)]
struct Pids {
    epp: u32,
    envoy: u32,
    sim: u32,
    client: u32,
}

/// CPU seconds (user + system) per process, in the order of [`CPU_NAMES`].
type Cpu = [f64; 4];
const CPU_NAMES: [&str; 4] = ["picker", "envoy", "engines", "client"];

/// `utime + stime` of `pid`, seconds.
fn cpu_seconds(pid: u32, ticks_per_s: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the parenthesised command name (which may hold spaces): state is field 3,
    // utime 14 and stime 15 (proc(5)).
    let rest = &stat[stat.rfind(')').expect("stat has a comm field") + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f[i].parse::<f64>().expect("a tick count");
    (tick(11) + tick(12)) / ticks_per_s
}

fn cpu_now(p: Pids, ticks: f64) -> Cpu {
    [
        cpu_seconds(p.epp, ticks),
        cpu_seconds(p.envoy, ticks),
        cpu_seconds(p.sim, ticks),
        cpu_seconds(p.client, ticks),
    ]
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, Linux's USER_HZ, if that fails).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The picker's own decision-time histogram: (sum seconds, count).
async fn decision_time(client: &reqwest::Client, metrics: SocketAddr) -> (f64, f64) {
    let text = match client.get(format!("http://{metrics}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (
        value("kvgate_epp_decision_seconds_sum "),
        value("kvgate_epp_decision_seconds_count "),
    )
}

/// One measured window of one arm.
struct Window {
    arm: Arm,
    round: usize,
    ok: usize,
    failures: Vec<String>,
    wall_s: f64,
    /// Sorted.
    ttft_us: Vec<u64>,
    cpu_s: Cpu,
    served: BTreeMap<String, usize>,
    prompt_tokens: u64,
    cached_tokens: u64,
    /// Mean of the picker's `kvgate_epp_decision_seconds` over the window (picked arm).
    decision_mean_us: Option<f64>,
}

fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Window {
    fn p(&self, q: f64) -> f64 {
        quantile(&self.ttft_us, q) / 1000.0
    }

    fn cpu_ms_per_request(&self, i: usize) -> f64 {
        self.cpu_s[i] * 1000.0 / self.ok.max(1) as f64
    }

    fn json(&self) -> Value {
        let cpu: serde_json::Map<String, Value> = CPU_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    (*n).to_owned(),
                    json!({"cpu_s": self.cpu_s[i], "cpu_ms_per_request": self.cpu_ms_per_request(i)}),
                )
            })
            .collect();
        json!({
            "arm": self.arm.as_str(),
            "round": self.round,
            "ok": self.ok,
            "failures": self.failures.len(),
            "failure_examples": self.failures.iter().take(5).collect::<Vec<_>>(),
            "wall_s": self.wall_s,
            "requests_per_s": self.ok as f64 / self.wall_s,
            "ttft_ms": {"p50": self.p(0.5), "p90": self.p(0.9), "p99": self.p(0.99), "max": self.p(1.0)},
            "cpu": cpu,
            "served": self.served,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "decision_mean_us": self.decision_mean_us,
        })
    }
}

/// Everything a window needs.
struct Bench {
    client: reqwest::Client,
    bodies: Arc<Bodies>,
    engines: Vec<String>,
    picked_url: String,
    direct_url: String,
    streams: usize,
    pids: Pids,
    ticks: f64,
    metrics: SocketAddr,
    timeout: Duration,
    /// Numbers requests across the whole run, so every question is unique.
    counter: Arc<AtomicUsize>,
}

enum Stop {
    Requests(usize),
    Deadline(Duration),
}

impl Bench {
    fn target(&self, arm: Arm, n: usize) -> (String, Option<String>) {
        match arm {
            Arm::Picked => (self.picked_url.clone(), None),
            Arm::Direct => (
                self.direct_url.clone(),
                Some(self.engines[n % self.engines.len()].clone()),
            ),
        }
    }

    /// Runs `streams` closed-loop workers on `arm` until `stop`.
    async fn window(&self, arm: Arm, round: usize, stop: &Stop) -> Window {
        let issued = Arc::new(AtomicUsize::new(0));
        let results = Arc::new(Mutex::new(Vec::<Result<Outcome, String>>::new()));
        let decisions_before = decision_time(&self.client, self.metrics).await;
        let cpu_before = cpu_now(self.pids, self.ticks);
        let start = Instant::now();
        let deadline = match stop {
            Stop::Deadline(d) => Some(start + *d),
            Stop::Requests(_) => None,
        };
        let limit = match stop {
            Stop::Requests(n) => *n,
            Stop::Deadline(_) => usize::MAX,
        };
        let mut workers = Vec::with_capacity(self.streams);
        for _ in 0..self.streams {
            let (issued, results, counter) =
                (issued.clone(), results.clone(), self.counter.clone());
            let (client, bodies) = (self.client.clone(), self.bodies.clone());
            let targets: Vec<(String, Option<String>)> = (0..self.engines.len())
                .map(|i| self.target(arm, i))
                .collect();
            let timeout = self.timeout;
            workers.push(tokio::spawn(async move {
                loop {
                    if issued.fetch_add(1, Ordering::Relaxed) >= limit
                        || deadline.is_some_and(|d| Instant::now() >= d)
                    {
                        return;
                    }
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let body = bodies.body(n as u64);
                    let (url, dest) = &targets[n % targets.len()];
                    let r = tokio::time::timeout(timeout, one(&client, url, dest.as_deref(), body))
                        .await
                        .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")));
                    results.lock().await.push(r);
                }
            }));
        }
        for w in workers {
            w.await.expect("a load worker panicked");
        }
        let wall_s = start.elapsed().as_secs_f64();
        let cpu_after = cpu_now(self.pids, self.ticks);
        let decisions_after = decision_time(&self.client, self.metrics).await;
        let results = std::mem::take(&mut *results.lock().await);
        let mut w = Window {
            arm,
            round,
            ok: 0,
            failures: Vec::new(),
            wall_s,
            ttft_us: Vec::with_capacity(results.len()),
            cpu_s: std::array::from_fn(|i| cpu_after[i] - cpu_before[i]),
            served: BTreeMap::new(),
            prompt_tokens: 0,
            cached_tokens: 0,
            decision_mean_us: None,
        };
        for r in results {
            match r {
                Ok(o) => {
                    w.ok += 1;
                    w.ttft_us.push(o.ttft_us);
                    *w.served.entry(o.served).or_default() += 1;
                    w.prompt_tokens += o.prompt_tokens;
                    w.cached_tokens += o.cached_tokens;
                }
                Err(e) => w.failures.push(e),
            }
        }
        w.ttft_us.sort_unstable();
        if arm == Arm::Picked {
            let n = decisions_after.1 - decisions_before.1;
            if n > 0.0 {
                w.decision_mean_us = Some((decisions_after.0 - decisions_before.0) / n * 1e6);
            }
        }
        w
    }

    /// Unmeasured requests: one per document (or engine) one at a time, which fills the
    /// engines' caches and the picker's index, then one burst at full concurrency, which opens
    /// the connection pools.
    async fn warm_up(&self, arm: Arm) -> Vec<String> {
        let mut failures = Vec::new();
        let docs = self.bodies.documents.len().max(self.engines.len());
        for d in 0..docs {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let (url, dest) = self.target(arm, n);
            let body = self
                .bodies
                .warmup(d % self.bodies.documents.len().max(1), n as u64);
            if let Err(e) = one(&self.client, &url, dest.as_deref(), body).await {
                failures.push(e);
            }
        }
        let burst = self.window(arm, 0, &Stop::Requests(self.streams)).await;
        failures.extend(burst.failures);
        failures
    }
}

/// The picker's address flags for each engine, and a temp dir holding the picker's tokenizer.
fn epp_command(
    bin: &Path,
    engines: &[SimEngine],
    ports: (u16, u16, u16),
    tokenizer: Option<&Path>,
) -> std::process::Command {
    let mut cmd = kvgate(bin);
    cmd.args(["epp", "--host", "127.0.0.1"])
        .args(["--grpc-port", &ports.0.to_string()])
        .args(["--grpc-health-port", &ports.1.to_string()])
        .args(["--metrics-port", &ports.2.to_string()]);
    for e in engines {
        cmd.args(e.flags());
    }
    if let Some(t) = tokenizer {
        cmd.arg("--tokenizer").arg(t);
    }
    cmd
}

/// A model directory for the picker: `dir`'s tokenizer files with the simulator's chat
/// template (see the module docs).
fn picker_tokenizer_dir(dir: &Path) -> TempDir {
    let out = TempDir::new("epp-tokenizer");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, out.path().join(f))
                .unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        }
    }
    // A chat template inside tokenizer_config.json would win over the file; drop it.
    let cfg = out.path().join("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&cfg)
        && let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(&text)
        && m.remove("chat_template").is_some()
    {
        std::fs::write(&cfg, Value::Object(m).to_string()).expect("write tokenizer_config.json");
    }
    std::fs::write(
        out.path().join("chat_template.jinja"),
        BUILTIN_TEMPLATE_JINJA,
    )
    .expect("write chat_template.jinja");
    out
}

/// Waits until the picker has discovered every engine and probed its tokenizer; returns each
/// engine's probe verdict (`agree` or `mismatch`).
async fn wait_ready(
    client: &reqwest::Client,
    epp: &mut Proc,
    metrics: SocketAddr,
    engines: &[SimEngine],
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = epp.try_wait() {
            panic!("kvgate epp exited with {status}\n{}", epp.tail());
        }
        let text = match client.get(format!("http://{metrics}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let verdicts: BTreeMap<String, String> = engines
            .iter()
            .filter_map(|e| {
                ["agree", "mismatch"].into_iter().find_map(|v| {
                    let line = format!(
                        "kvgate_gateway_tokenizer_probe{{endpoint=\"{}\",result=\"{v}\"}} 1",
                        e.http
                    );
                    text.lines()
                        .any(|l| l == line)
                        .then(|| (e.http.clone(), v.to_owned()))
                })
            })
            .collect();
        if verdicts.len() == engines.len() {
            return verdicts;
        }
        assert!(
            Instant::now() < deadline,
            "the picker did not discover and probe all {} engines within {READY_WITHIN:?} \
             (probed: {verdicts:?})\n{}",
            engines.len(),
            epp.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn served_model(client: &reqwest::Client, engine: &str) -> String {
    let v: Value = client
        .get(format!("http://{engine}/v1/models"))
        .send()
        .await
        .expect("engine /v1/models")
        .json()
        .await
        .expect("/v1/models JSON");
    v["data"][0]["id"]
        .as_str()
        .expect("a served model")
        .to_owned()
}

fn fmt_ms(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// Per-arm medians over rounds: p50, p99, requests/s and CPU ms per request per process.
struct Summary {
    p50: f64,
    p99: f64,
    rps: f64,
    cpu_ms: Cpu,
    cached_share: f64,
}

fn summarise(windows: &[&Window]) -> Summary {
    let m = |f: &dyn Fn(&Window) -> f64| median(windows.iter().map(|w| f(w)).collect());
    let prompt: u64 = windows.iter().map(|w| w.prompt_tokens).sum();
    let cached: u64 = windows.iter().map(|w| w.cached_tokens).sum();
    Summary {
        p50: m(&|w| w.p(0.5)),
        p99: m(&|w| w.p(0.99)),
        rps: m(&|w| w.ok as f64 / w.wall_s),
        cpu_ms: std::array::from_fn(|i| m(&|w| w.cpu_ms_per_request(i))),
        cached_share: cached as f64 / prompt.max(1) as f64,
    }
}

async fn run(args: Args) -> bool {
    let bin = if args.bin.is_absolute() {
        args.bin.clone()
    } else {
        // Relative to the workspace root, where `cargo run` is usually started from; fall back
        // to the current directory.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let p = root.join(&args.bin);
        if p.is_file() { p } else { args.bin.clone() }
    };
    if !bin.is_file() {
        eprintln!(
            "error: {} not found: build the release binary first with `cargo build --release` \
             (or point --bin at a kvgate binary)",
            bin.display()
        );
        return false;
    }
    kvgate_testkit::envoy::envoy_binary();
    let tok = Tok::resolve(args.tokenizer.as_deref());
    if let Tok::Hf(d) = &tok {
        assert!(
            d.join("tokenizer.json").is_file(),
            "--tokenizer {}: no tokenizer.json there (give a HuggingFace model directory, or \
             `builtin`)",
            d.display()
        );
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.streams + 16)
        .build()
        .expect("HTTP client");

    // Engines.
    let time_scale = args.time_scale.to_string();
    let mut sim_args = vec![
        "--time-scale",
        &time_scale,
        // Usage carries cached tokens, so each arm's prefix-cache hit share is reported.
        "--enable-prompt-tokens-details",
    ];
    let tokenizer_json;
    if let (Tok::Hf(d), EngineTokenizer::Same) = (&tok, args.engine_tokenizer) {
        tokenizer_json = d.join("tokenizer.json").display().to_string();
        sim_args.extend(["--tokenizer", &tokenizer_json]);
    }
    eprintln!(
        "starting {} engines (time scale {time_scale})…",
        args.engines
    );
    let (sim, engines) = spawn_sim(&bin, args.engines, &sim_args);
    let model = served_model(&client, &engines[0].http).await;

    // Picker.
    let picker_tok = match &tok {
        Tok::Hf(d) => Some(picker_tokenizer_dir(d)),
        Tok::Builtin => None,
    };
    let ports = (free_port(), free_port(), free_port());
    let grpc: SocketAddr = format!("127.0.0.1:{}", ports.0).parse().unwrap();
    let health: SocketAddr = format!("127.0.0.1:{}", ports.1).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", ports.2).parse().unwrap();
    let mut epp = Proc::spawn(
        "kvgate epp",
        epp_command(
            &bin,
            &engines,
            ports,
            picker_tok.as_ref().map(TempDir::path),
        ),
    );
    let probes = wait_ready(&client, &mut epp, metrics, &engines).await;
    if args.engine_tokenizer == EngineTokenizer::Same && probes.values().any(|v| v != "agree") {
        eprintln!(
            "warning: the picker's tokens differ from the engines' ({probes:?}): its prefix keys \
             will not match their caches"
        );
    }

    // Envoy.
    let envoy = Envoy::launch(
        grpc,
        health,
        EnvoyOptions {
            concurrency: args.envoy_concurrency,
            ..EnvoyOptions::default()
        },
    )
    .await;
    let bench = Bench {
        client: client.clone(),
        bodies: Arc::new(Bodies::new(&args, &model)),
        engines: engines.iter().map(|e| e.http.clone()).collect(),
        picked_url: format!("http://{}/v1/chat/completions", envoy.picked),
        direct_url: format!("http://{}/v1/chat/completions", envoy.direct),
        streams: args.streams,
        pids: Pids {
            epp: epp.id(),
            envoy: envoy.pid(),
            sim: sim.id(),
            client: std::process::id(),
        },
        ticks: clock_ticks(),
        metrics,
        timeout: Duration::from_secs(args.timeout_s),
        counter: Arc::new(AtomicUsize::new(0)),
    };
    let body_bytes = bench.bodies.body(0).len();
    eprintln!(
        "model {model}, tokenizer {}, {} prompts of {} KB (bodies ~{body_bytes} B), {} streams, \
         {} rounds × {{direct, picked}} × {}",
        tok.describe(),
        args.prompts.as_str(),
        args.prompt_kb,
        args.streams,
        args.rounds,
        match args.seconds {
            Some(s) => format!("{s} s"),
            None => format!("{} requests", args.requests),
        }
    );

    let mut warmup_failures = Vec::new();
    for arm in [Arm::Direct, Arm::Picked] {
        eprintln!("warm-up: {}", arm.as_str());
        warmup_failures.extend(bench.warm_up(arm).await);
    }
    let stop = match args.seconds {
        Some(s) => Stop::Deadline(Duration::from_secs_f64(s)),
        None => Stop::Requests(args.requests),
    };
    let mut windows = Vec::new();
    for round in 1..=args.rounds {
        let order = if round % 2 == 1 {
            [Arm::Direct, Arm::Picked]
        } else {
            [Arm::Picked, Arm::Direct]
        };
        for arm in order {
            let w = bench.window(arm, round, &stop).await;
            eprintln!(
                "round {round} {:<6}: {} ok, {} failed, {:.1} req/s, TTFT p50 {} ms p99 {} ms, picker {:.2} ms CPU/req, envoy {:.2}, engines {:.2}, client {:.2}",
                arm.as_str(),
                w.ok,
                w.failures.len(),
                w.ok as f64 / w.wall_s,
                fmt_ms(w.p(0.5)),
                fmt_ms(w.p(0.99)),
                w.cpu_ms_per_request(0),
                w.cpu_ms_per_request(1),
                w.cpu_ms_per_request(2),
                w.cpu_ms_per_request(3),
            );
            windows.push(w);
        }
    }

    // Report.
    let of = |arm: Arm| windows.iter().filter(|w| w.arm == arm).collect::<Vec<_>>();
    let (d, p) = (summarise(&of(Arm::Direct)), summarise(&of(Arm::Picked)));
    let failures: Vec<&String> = warmup_failures
        .iter()
        .chain(windows.iter().flat_map(|w| &w.failures))
        .collect();
    let decision = median(windows.iter().filter_map(|w| w.decision_mean_us).collect());
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nkvgate epp behind Envoy: {} streams × {} KB {} prompts, {} engines (time scale {}), tokenizer {} (engines: {}), {} rounds (medians over rounds)",
        args.streams,
        args.prompt_kb,
        args.prompts.as_str(),
        args.engines,
        args.time_scale,
        tok.describe(),
        args.engine_tokenizer.as_str(),
        args.rounds
    );
    let _ = writeln!(
        t,
        "{:<8} {:>11} {:>11} {:>8} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "arm",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "req/s",
        "picker ms",
        "envoy ms",
        "engines ms",
        "client ms",
        "cached"
    );
    for (name, s) in [("direct", &d), ("picked", &p)] {
        let _ = writeln!(
            t,
            "{name:<8} {:>11} {:>11} {:>8.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>7.1}%",
            fmt_ms(s.p50),
            fmt_ms(s.p99),
            s.rps,
            s.cpu_ms[0],
            s.cpu_ms[1],
            s.cpu_ms[2],
            s.cpu_ms[3],
            s.cached_share * 100.0
        );
    }
    let _ = writeln!(
        t,
        "added    {:>11} {:>11}   (picked − direct; CPU columns are CPU ms per request)",
        fmt_ms(p.p50 - d.p50),
        fmt_ms(p.p99 - d.p99)
    );
    let _ = writeln!(
        t,
        "picker's own decision time (kvgate_epp_decision_seconds), mean per request: {:.0} µs",
        decision
    );
    let _ = writeln!(t, "failures: {}", failures.len());
    for f in failures.iter().take(10) {
        let _ = writeln!(t, "  {f}");
    }
    print!("{t}");

    if let Some(path) = &args.json {
        let arm_json = |s: &Summary| {
            json!({
                "ttft_p50_ms": s.p50, "ttft_p99_ms": s.p99, "requests_per_s": s.rps,
                "cpu_ms_per_request": CPU_NAMES.iter().zip(s.cpu_ms).map(|(n, v)| ((*n).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "cached_token_share": s.cached_share,
            })
        };
        let out = json!({
            "benchmark": "envoy_long_prompts",
            "settings": {
                "engines": args.engines, "time_scale": args.time_scale, "tokenizer": tok.describe(),
                "engine_tokenizer": args.engine_tokenizer.as_str(),
                "streams": args.streams, "prompt_kb": args.prompt_kb, "prompts": args.prompts.as_str(),
                "documents": args.documents, "max_tokens": args.max_tokens, "rounds": args.rounds,
                "requests": args.requests, "seconds": args.seconds, "envoy_concurrency": args.envoy_concurrency,
                "seed": args.seed, "model": model, "body_bytes": body_bytes,
                "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "ttft": "send to the first SSE event whose delta carries generated content",
            },
            "tokenizer_probe": probes,
            "direct": arm_json(&d),
            "picked": arm_json(&p),
            "added_ttft_p50_ms": p.p50 - d.p50,
            "added_ttft_p99_ms": p.p99 - d.p99,
            "picker_decision_mean_us": decision,
            "failures": failures.len(),
            "failure_examples": failures.iter().take(20).collect::<Vec<_>>(),
            "windows": windows.iter().map(Window::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&out).unwrap())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
    }
    // Children (engines, picker, Envoy) are killed as `sim`, `epp` and `envoy` drop.
    drop(envoy);
    drop(epp);
    drop(sim);
    failures.is_empty()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Ctrl-C, SIGTERM (`timeout`) and SIGHUP return from main, so the children are killed as
    // their guards drop.
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("cannot install signal handlers");
        return std::process::ExitCode::FAILURE;
    };
    let ok = tokio::select! {
        ok = run(args) => ok,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted");
            false
        }
        _ = term.recv() => {
            eprintln!("terminated");
            false
        }
        _ = hup.recv() => {
            eprintln!("hung up");
            false
        }
    };
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
