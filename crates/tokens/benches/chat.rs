//! Chat rendering + tokenisation cost per request with SmolLM2's template and tokenizer, for a
//! short (~1k tokens) and a long (~32k tokens) multi-turn conversation: the work the router
//! adds to every chat request to compute the engine's prefix keys. Whole (a conversation's
//! first request) and next turn (its history's pieces cached), and a 220 KB document (whole,
//! unseen, and again with a new question: its chunks cached).
//!
//! `cargo bench -p kvgate-tokens --features hf --bench chat -- --warm-up-time 1 --measurement-time 3`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvgate_tokens::{ChatInput, ModelTokenizer};
use serde_json::json;
use std::hint::black_box;
use std::path::Path;

/// The kvgate binary's allocator (HuggingFace's tokenizer allocates per pre-token, so the
/// allocator is a large part of what is measured).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    // A 220 KB completions prompt (llm-d's long-prompt benchmark size), tokenised whole: the
    // cost without the piece cache, and the cost of a document never seen before.
    let doc = text(9, 220 * 1024 / 6);
    let len = model.encode_prompt_whole(&doc).unwrap().len();
    group.throughput(Throughput::Elements(len as u64));
    group.bench_with_input(
        BenchmarkId::new("encode_prompt_whole", "220KB"),
        &doc,
        |b, p| b.iter(|| model.encode_prompt_whole(black_box(p)).unwrap()),
    );
    // The same document with a new question each time (long-document Q&A): its chunks come
    // from the cache.
    let mut q = 0u64;
    group.bench_with_input(
        BenchmarkId::new("encode_prompt_new_question", "220KB"),
        &doc,
        |b, d| {
            b.iter(|| {
                q += 1;
                let prompt = format!("{d}\nQuestion {q}: {}", text(q, 12));
                model.encode_prompt(black_box(&prompt)).unwrap()
            })
        },
    );
    // And as a chat: the document in the user's message, a new question after it.
    group.bench_with_input(
        BenchmarkId::new("render+encode_new_question", "220KB"),
        &doc,
        |b, d| {
            b.iter(|| {
                q += 1;
                let content = format!("{d}\nQuestion {q}: {}", text(q, 12));
                let input = ChatInput::new(vec![json!({"role": "user", "content": content})]);
                model.encode_chat(black_box(&input)).unwrap()
            })
        },
    );
    // A fresh document every time: nothing is found, so this is whole tokenisation plus the
    // cost of cutting and caching.
    let mut seed = 100u64;
    group.bench_function(BenchmarkId::new("encode_prompt_unseen", "220KB"), |b| {
        b.iter_batched(
            || {
                seed += 1;
                text(seed, 220 * 1024 / 6)
            },
            |p| model.encode_prompt(black_box(&p)).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
