//! Workloads: what requests arrive when, and what their prompts are.
//!
//! A prompt is a list of [`Segment`]s, each the first `tokens` words of a numbered synthetic
//! block. Block `id`'s word `j` is the text ` b<id>x<j>` (base 36), which the built-in tokenizer
//! reads as exactly one token, so
//! - the same block id gives the same tokens (and text) wherever it appears, which turns the
//!   trace's shared `hash_ids` into shared token prefixes and thus real prefix-cache hits;
//! - a prompt's length in tokens is exactly the sum of its segment lengths (`input_length` is
//!   honoured exactly);
//! - the text form concatenates to the same tokens, so live mode (over HTTP, text prompts) and
//!   discrete-event mode (token ids) present the engines with identical work.
//!
//! Tokens are materialised per request when it is needed, never for the whole trace at once: a
//! full Mooncake replay is ~145M prompt tokens. Workloads small enough are the exception: the
//! discrete-event runs cache each request's derived prompt in [`Workload::cache`] (see
//! [`crate::prepared`]).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::trace::{MOONCAKE_BLOCK_TOKENS, TraceRecord};

/// Block-id namespaces so generated workloads never collide with each other's blocks.
/// Ids stay below 36^8 so every word fits one built-in token (≤ 15 characters after the space).
const NAMESPACE_STRIDE: u64 = 100_000_000_000;
const NS_SYSTEM: u64 = NAMESPACE_STRIDE;
const NS_QUESTION: u64 = 2 * NAMESPACE_STRIDE;
const NS_TURN: u64 = 3 * NAMESPACE_STRIDE;
const NS_ANSWER: u64 = 4 * NAMESPACE_STRIDE;
const NS_PAD: u64 = 5 * NAMESPACE_STRIDE;

/// The first `tokens` words of block `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Synthetic block id.
    pub id: u64,
    /// Number of words (= tokens) taken from the start of the block.
    pub tokens: u32,
}

/// One request of a workload.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkloadRequest {
    /// Arrival time, µs from the start of the run.
    pub arrival_us: u64,
    /// The prompt.
    pub segments: Vec<Segment>,
    /// Tokens to generate.
    pub output_tokens: u32,
    /// Conversation this request belongs to, if any.
    pub session: Option<u64>,
}

fn push_base36(out: &mut String, mut v: u64) {
    let mut buf = [0u8; 13];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdefghijklmnopqrstuvwxyz"[(v % 36) as usize];
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&buf[i..]).expect("ascii"));
}

fn word(out: &mut String, id: u64, j: u32) {
    out.push_str(" b");
    push_base36(out, id);
    out.push('x');
    push_base36(out, u64::from(j));
}

impl WorkloadRequest {
    /// Prompt length in tokens.
    pub fn prompt_tokens(&self) -> u32 {
        self.segments.iter().map(|s| s.tokens).sum()
    }

    /// The prompt as token ids of the built-in tokenizer.
    pub fn tokens(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.prompt_tokens() as usize);
        let mut w = String::with_capacity(24);
        for s in &self.segments {
            for j in 0..s.tokens {
                w.clear();
                word(&mut w, s.id, j);
                out.push(kvgate_tokens::piece_id(&w));
            }
        }
        out
    }

    /// The prompt as text; the built-in tokenizer turns it into exactly [`Self::tokens`].
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.prompt_tokens() as usize * 10);
        for s in &self.segments {
            for j in 0..s.tokens {
                word(&mut out, s.id, j);
            }
        }
        out
    }
}

/// A named list of requests in arrival order.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Workload {
    /// Human-readable description, shown in reports.
    pub name: String,
    /// Requests sorted by arrival.
    pub requests: Vec<WorkloadRequest>,
    /// Derived prompts shared by every run of this workload and its clones.
    #[serde(skip)]
    pub cache: crate::prepared::PromptCache,
}

impl Workload {
    /// A workload of `requests` (sorted by arrival) named `name`.
    pub fn new(name: impl Into<String>, requests: Vec<WorkloadRequest>) -> Self {
        Self {
            name: name.into(),
            requests,
            cache: Default::default(),
        }
    }

    /// Prompt tokens of every request together.
    pub fn total_prompt_tokens(&self) -> u64 {
        self.requests
            .iter()
            .map(|r| u64::from(r.prompt_tokens()))
            .sum()
    }
}

/// How much of a trace to replay and how fast.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplayOptions {
    /// Arrival times are divided by this (2.0 = twice as fast). Must be positive.
    pub speedup: f64,
    /// Keep only the first N requests.
    pub limit: Option<usize>,
    /// Keep only requests arriving in the first T seconds of the trace (before speed-up).
    pub max_seconds: Option<f64>,
    /// Move each arrival later by a uniform random share of this many milliseconds of trace
    /// time (before speed-up), drawn from a generator seeded with `spread_seed`, and replay in
    /// the new order; 0 keeps the timestamps. For traces whose timestamps are coarse buckets:
    /// the published Mooncake conversation trace stamps its requests at 3-second marks (about
    /// ten per mark), and replayed as written they reach the router at one instant, which no
    /// production fleet sees.
    pub spread_ms: f64,
    /// Seed of the spread.
    pub spread_seed: u64,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            speedup: 1.0,
            limit: None,
            max_seconds: None,
            spread_ms: 0.0,
            spread_seed: 0,
        }
    }
}

/// Turns Mooncake trace records into a workload (see module docs for the token mapping).
pub fn from_trace(name: &str, records: &[TraceRecord], opts: ReplayOptions) -> Workload {
    let speedup = if opts.speedup > 0.0 {
        opts.speedup
    } else {
        1.0
    };
    let mut requests = Vec::with_capacity(records.len());
    let spread = opts.spread_ms.is_finite() && opts.spread_ms > 0.0;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.spread_seed);
    for r in records {
        if opts.limit.is_some_and(|n| requests.len() >= n) {
            break;
        }
        if opts
            .max_seconds
            .is_some_and(|t| r.timestamp as f64 / 1000.0 >= t)
        {
            break;
        }
        let mut segments = Vec::with_capacity(r.hash_ids.len());
        let mut left = r.input_length;
        for &id in &r.hash_ids {
            let n = left.min(MOONCAKE_BLOCK_TOKENS);
            if n == 0 {
                break;
            }
            segments.push(Segment { id, tokens: n });
            left -= n;
        }
        if left > 0 {
            // Not produced by parse_trace (it checks coverage); kept for records built in code.
            segments.push(Segment {
                id: NS_PAD + requests.len() as u64,
                tokens: left,
            });
        }
        let offset_ms = if spread {
            rng.random::<f64>() * opts.spread_ms
        } else {
            0.0
        };
        requests.push(WorkloadRequest {
            arrival_us: ((r.timestamp as f64 + offset_ms) * 1000.0 / speedup).round() as u64,
            segments,
            output_tokens: r.output_length,
            session: None,
        });
    }
    if spread {
        // Stable: requests drawn at the same microsecond keep the trace's order.
        requests.sort_by_key(|r| r.arrival_us);
        let name = format!(
            "{name}, arrivals spread over {} ms (seed {})",
            opts.spread_ms, opts.spread_seed
        );
        return Workload::new(&name, requests);
    }
    Workload::new(name, requests)
}

/// Exponential inter-arrival times at `rate_per_s`, starting at 0.
pub fn poisson_arrivals(n: usize, rate_per_s: f64, rng: &mut ChaCha8Rng) -> Vec<u64> {
    let mut t = 0.0f64;
    (0..n)
        .map(|_| {
            let at = t;
            let u: f64 = rng.random::<f64>();
            t += -(1.0 - u).ln() / rate_per_s.max(1e-9);
            (at * 1e6).round() as u64
        })
        .collect()
}

/// inference-perf's shared-prefix workload: `num_groups` system prompts, each followed by
/// `num_prompts_per_group` distinct questions, interleaved at random, Poisson arrivals.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharedPrefixConfig {
    /// Distinct system prompts.
    pub num_groups: u32,
    /// Questions per system prompt.
    pub num_prompts_per_group: u32,
    /// System prompt length, tokens.
    pub system_prompt_len: u32,
    /// Question length, tokens.
    pub question_len: u32,
    /// Output length, tokens.
    pub output_len: u32,
    /// Arrival rate, requests per second.
    pub rate_per_s: f64,
}

/// Generates the shared-prefix workload deterministically from `seed`.
pub fn shared_prefix(cfg: SharedPrefixConfig, seed: u64) -> Workload {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<(u32, u32)> = (0..cfg.num_groups)
        .flat_map(|g| (0..cfg.num_prompts_per_group).map(move |p| (g, p)))
        .collect();
    // Fisher–Yates with our seeded RNG, so the order is stable across rand versions' shuffles.
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let arrivals = poisson_arrivals(order.len(), cfg.rate_per_s, &mut rng);
    let requests = order
        .iter()
        .zip(arrivals)
        .map(|(&(g, p), arrival_us)| WorkloadRequest {
            arrival_us,
            segments: vec![
                Segment {
                    id: NS_SYSTEM + u64::from(g),
                    tokens: cfg.system_prompt_len,
                },
                Segment {
                    id: NS_QUESTION
                        + u64::from(g) * u64::from(cfg.num_prompts_per_group)
                        + u64::from(p),
                    tokens: cfg.question_len,
                },
            ],
            output_tokens: cfg.output_len,
            session: None,
        })
        .collect();
    Workload {
        name: format!(
            "shared-prefix: {} groups x {} prompts, system {} + question {} tokens, output {}, {} req/s",
            cfg.num_groups,
            cfg.num_prompts_per_group,
            cfg.system_prompt_len,
            cfg.question_len,
            cfg.output_len,
            cfg.rate_per_s
        ),
        requests,
        cache: Default::default(),
    }
}

/// Multi-turn chat sessions whose history grows turn by turn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MultiTurnConfig {
    /// Conversations.
    pub sessions: u32,
    /// Turns per conversation.
    pub turns: u32,
    /// System prompt length, tokens (shared by all sessions).
    pub system_prompt_len: u32,
    /// Each user message, tokens.
    pub user_len: u32,
    /// Each answer, tokens.
    pub output_len: u32,
    /// New sessions per second (Poisson).
    pub session_rate_per_s: f64,
    /// Seconds between a session's turns.
    pub think_time_s: f64,
}

/// Generates multi-turn sessions: turn `t` re-sends the system prompt, every earlier user message
/// and answer, and a new user message. Open loop: turn `t` arrives `t × think_time_s` after the
/// session starts, whether or not the previous answer is done (documented simplification; the
/// re-sent answers are synthetic text of the answer's length, so the engine's cache of its own
/// generated tokens does not match them: hits come from the system prompt and user turns).
pub fn multi_turn(cfg: MultiTurnConfig, seed: u64) -> Workload {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let starts = poisson_arrivals(cfg.sessions as usize, cfg.session_rate_per_s, &mut rng);
    let mut requests = Vec::new();
    for (s, start) in starts.into_iter().enumerate() {
        let s = s as u64;
        let mut history = vec![Segment {
            id: NS_SYSTEM + 1_000_000,
            tokens: cfg.system_prompt_len,
        }];
        for t in 0..u64::from(cfg.turns) {
            history.push(Segment {
                id: NS_TURN + s * 1_000 + t,
                tokens: cfg.user_len,
            });
            requests.push(WorkloadRequest {
                arrival_us: start + (t as f64 * cfg.think_time_s * 1e6).round() as u64,
                segments: history.clone(),
                output_tokens: cfg.output_len,
                session: Some(s),
            });
            history.push(Segment {
                id: NS_ANSWER + s * 1_000 + t,
                tokens: cfg.output_len,
            });
        }
    }
    requests.sort_by_key(|r| r.arrival_us);
    Workload {
        name: format!(
            "multi-turn: {} sessions x {} turns, system {} + user {} tokens/turn, output {}",
            cfg.sessions, cfg.turns, cfg.system_prompt_len, cfg.user_len, cfg.output_len
        ),
        cache: Default::default(),
        requests,
    }
}

/// Merges workloads into one, by arrival time.
pub fn merge(name: &str, parts: Vec<Workload>) -> Workload {
    let mut requests: Vec<WorkloadRequest> = parts.into_iter().flat_map(|w| w.requests).collect();
    requests.sort_by_key(|r| r.arrival_us);
    Workload::new(name, requests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvgate_tokens::BuiltinTokenizer;

    fn rec(ts: u64, len: u32, ids: &[u64]) -> TraceRecord {
        TraceRecord {
            timestamp: ts,
            input_length: len,
            output_length: 3,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn text_tokenizes_to_tokens_and_lengths_are_exact() {
        let w = from_trace(
            "t",
            &[rec(0, 1100, &[0, 1, 2]), rec(5, 700, &[0, 9])],
            ReplayOptions::default(),
        );
        for r in &w.requests {
            let toks = r.tokens();
            assert_eq!(toks.len() as u32, r.prompt_tokens());
            assert_eq!(BuiltinTokenizer.encode(&r.text()), toks);
        }
        assert_eq!(w.requests[0].prompt_tokens(), 1100);
        assert_eq!(w.requests[1].prompt_tokens(), 700);
        // Shared hash id 0 → the first 512 tokens are equal; block 1 vs 9 differ.
        let (a, b) = (w.requests[0].tokens(), w.requests[1].tokens());
        assert_eq!(a[..512], b[..512]);
        assert_ne!(a[512..600], b[512..600]);
        assert_eq!(w.requests[1].arrival_us, 5_000);
    }

    #[test]
    fn replay_options_cut_and_speed_up() {
        let recs: Vec<_> = (0..10).map(|i| rec(i * 1000, 10, &[i])).collect();
        let opts = ReplayOptions {
            speedup: 2.0,
            limit: Some(4),
            ..ReplayOptions::default()
        };
        let w = from_trace("t", &recs, opts);
        assert_eq!(w.requests.len(), 4);
        assert_eq!(w.requests[3].arrival_us, 1_500_000);
        let opts = ReplayOptions {
            max_seconds: Some(5.0),
            ..ReplayOptions::default()
        };
        assert_eq!(from_trace("t", &recs, opts).requests.len(), 5);
    }

    /// Bucketed timestamps spread over the window after each mark, in arrival order, the same
    /// way for the same seed and differently for another; the prompts are the trace's.
    #[test]
    fn spread_moves_arrivals_within_the_window_after_their_mark() {
        let recs: Vec<_> = (0..40).map(|i| rec(i / 10 * 3000, 10, &[i])).collect();
        let opts = |seed| ReplayOptions {
            speedup: 2.0,
            spread_ms: 3000.0,
            spread_seed: seed,
            ..ReplayOptions::default()
        };
        let w = from_trace("t", &recs, opts(7));
        assert_eq!(w.requests.len(), 40);
        assert!(
            w.requests
                .windows(2)
                .all(|p| p[0].arrival_us <= p[1].arrival_us)
        );
        let mut ids: Vec<u64> = w.requests.iter().map(|r| r.segments[0].id).collect();
        for r in &w.requests {
            let mark_us = r.segments[0].id / 10 * 3000 * 1000 / 2;
            assert!(
                (mark_us..mark_us + 1_500_000).contains(&r.arrival_us),
                "block {} at {} µs",
                r.segments[0].id,
                r.arrival_us
            );
        }
        let instants: std::collections::HashSet<u64> =
            w.requests.iter().map(|r| r.arrival_us).collect();
        assert_eq!(instants.len(), 40, "no two requests at one instant");
        assert_eq!(from_trace("t", &recs, opts(7)).requests, w.requests);
        assert_ne!(from_trace("t", &recs, opts(8)).requests, w.requests);
        ids.sort_unstable();
        assert_eq!(ids, (0..40).collect::<Vec<u64>>());
    }

    #[test]
    fn generators_are_deterministic_and_share_what_they_should() {
        let cfg = SharedPrefixConfig {
            num_groups: 3,
            num_prompts_per_group: 4,
            system_prompt_len: 100,
            question_len: 20,
            output_len: 8,
            rate_per_s: 10.0,
        };
        let a = shared_prefix(cfg, 7);
        assert_eq!(a, shared_prefix(cfg, 7));
        assert_ne!(a, shared_prefix(cfg, 8));
        assert_eq!(a.requests.len(), 12);
        assert!(
            a.requests
                .windows(2)
                .all(|w| w[0].arrival_us <= w[1].arrival_us)
        );
        let same_group: Vec<_> = a
            .requests
            .iter()
            .filter(|r| r.segments[0] == a.requests[0].segments[0])
            .collect();
        assert_eq!(same_group.len(), 4);
        assert_eq!(same_group[0].tokens()[..100], same_group[1].tokens()[..100]);

        let m = multi_turn(
            MultiTurnConfig {
                sessions: 2,
                turns: 3,
                system_prompt_len: 50,
                user_len: 10,
                output_len: 5,
                session_rate_per_s: 1.0,
                think_time_s: 2.0,
            },
            1,
        );
        assert_eq!(m.requests.len(), 6);
        let s0: Vec<_> = m.requests.iter().filter(|r| r.session == Some(0)).collect();
        assert_eq!(s0[0].prompt_tokens(), 60);
        assert_eq!(s0[1].prompt_tokens(), 75);
        let (t0, t1) = (s0[0].tokens(), s0[1].tokens());
        assert_eq!(
            t1[..t0.len()],
            t0[..],
            "each turn extends the previous prompt"
        );
    }

    #[test]
    fn poisson_rate_is_about_right() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = poisson_arrivals(20_000, 50.0, &mut rng);
        let secs = *a.last().unwrap() as f64 / 1e6;
        let rate = 20_000.0 / secs;
        assert!((45.0..55.0).contains(&rate), "{rate}");
    }
}
