//! Chat rendering + tokenisation cost per request with SmolLM2's template and tokenizer, for a
//! short (~1k tokens) and a long (~32k tokens) multi-turn conversation: the work the router
//! adds to every chat request to compute the engine's prefix keys. Whole (a conversation's
//! first request) and next turn (its history's pieces cached), and a 220 KB completions prompt.
//!
//! `cargo bench -p kvgate-tokens --features hf --bench chat -- --warm-up-time 1 --measurement-time 3`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvgate_tokens::{ChatInput, ModelTokenizer};
use serde_json::json;
use std::hint::black_box;
use std::path::Path;

const WORDS: [&str; 24] = [
    "the",
    "router",
    "keeps",
    "prefix",
    "cache",
    "blocks",
    "warm",
    "while",
    "engines",
    "decode",
    "tokens,",
    "and",
    "every",
    "request",
    "carries",
    "its",
    "own",
    "history.",
    "Latency",
    "matters",
    "because",
    "users",
    "wait;",
    "throughput",
];

/// Deterministic English-like text of `words` words.
fn text(seed: u64, words: usize) -> String {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut out = String::new();
    for i in 0..words {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
    }
    out
}

/// A conversation of alternating turns, grown until it renders to at least `tokens` tokens.
fn conversation(model: &ModelTokenizer, tokens: usize) -> (ChatInput, usize) {
    let mut messages = vec![json!({"role": "system", "content": text(0, 60)})];
    loop {
        let n = messages.len() as u64;
        let role = if n % 2 == 1 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": text(n, 150)}));
        let input = ChatInput::new(messages.clone());
        let len = model.encode_chat(&input).unwrap().len();
        if len >= tokens && role == "user" {
            return (input, len);
        }
    }
}

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2");
    let model = ModelTokenizer::from_dir(dir).unwrap();
    let mut group = c.benchmark_group("chat");
    group.sample_size(20);
    for (label, target) in [("1k", 1_000), ("32k", 32_000)] {
        let (input, len) = conversation(&model, target);
        group.throughput(Throughput::Elements(len as u64));
        // The whole rendered text tokenised at once (no piece cache): a conversation's first
        // request, or a model whose tokenizer the cache is off for.
        group.bench_with_input(
            BenchmarkId::new("render+encode_whole", label),
            &input,
            |b, input| b.iter(|| model.encode_chat_whole(black_box(input)).unwrap()),
        );
        // The next turn of a conversation whose history was seen: a new final user message
        // each iteration (includes cloning the messages to build it).
        let mut turn = 0u64;
        group.bench_with_input(
            BenchmarkId::new("render+encode_next_turn", label),
            &input,
            |b, input| {
                b.iter(|| {
                    turn += 1;
                    let mut messages = input.messages.clone();
                    messages.push(json!({"role": "assistant", "content": text(turn, 40)}));
                    messages.push(json!({"role": "user", "content": text(turn + 1, 60)}));
                    model
                        .encode_chat(black_box(&ChatInput::new(messages)))
                        .unwrap()
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("render", label), &input, |b, input| {
            b.iter(|| model.render_chat(black_box(input)).unwrap())
        });
    }
    // A 220 KB completions prompt (llm-d's long-prompt benchmark size): no template, no pieces.
    let prompt = text(9, 220 * 1024 / 6);
    let len = model.encode_prompt(&prompt).unwrap().len();
    group.throughput(Throughput::Elements(len as u64));
    group.bench_with_input(
        BenchmarkId::new("encode_prompt", "220KB"),
        &prompt,
        |b, p| b.iter(|| model.encode_prompt(black_box(p)).unwrap()),
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
