//! `ModelTokenizer` against renderings and token ids produced by vLLM 0.32 and transformers
//! (`fixtures/gen_chat_fixtures.py`) for SmolLM2-135M-Instruct's own files and for a harder
//! test template (`fixtures/templates/tools_and_dates.jinja`).
#![cfg(feature = "hf")]

use kvgate_tokens::{ChatInput, ContentFormat, ModelTokenizer, TokenizerError};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases() -> Json {
    let text = std::fs::read_to_string(fixtures().join("chat_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A scratch model directory: SmolLM2's tokenizer files, with `files` added or replaced.
fn model_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvgate-tokens-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("smollm2").join(f), dir.join(f)).unwrap();
    }
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

fn smollm2() -> ModelTokenizer {
    ModelTokenizer::from_dir(fixtures().join("smollm2")).unwrap()
}

fn hard() -> ModelTokenizer {
    let template =
        std::fs::read_to_string(fixtures().join("templates/tools_and_dates.jinja")).unwrap();
    ModelTokenizer::from_dir(model_dir("hard", &[("chat_template.jinja", &template)])).unwrap()
}

fn input(case: &Json) -> ChatInput {
    let mut input: ChatInput = serde_json::from_value(case["request"].clone()).unwrap();
    input.now = Some(UNIX_EPOCH + Duration::from_micros(case["now_us"].as_u64().unwrap()));
    input
}

#[test]
fn renders_and_tokenises_as_vllm() {
    let models = [("smollm2", smollm2()), ("tools_and_dates", hard())];
    let data = cases();
    let mut checked = 0;
    for case in data["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = &models
            .iter()
            .find(|(n, _)| case["template"] == *n)
            .unwrap()
            .1;
        let input = input(case);
        match (case.get("vllm"), case.get("vllm_error")) {
            (Some(want), _) => {
                let text = model
                    .render_chat(&input)
                    .unwrap_or_else(|e| panic!("{name}: {e:?}"));
                assert_eq!(text, want["text"].as_str().unwrap(), "{name}: rendering");
                let ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
                assert_eq!(model.encode_chat(&input).unwrap(), ids, "{name}: token ids");
                // Where transformers renders the raw messages the same way, it agrees too.
                if let Some(tf) = case.get("transformers").filter(|tf| *tf == want) {
                    assert_eq!(text, tf["text"].as_str().unwrap(), "{name}: transformers");
                }
                checked += 1;
            }
            (None, Some(why)) => {
                let err = model.render_chat(&input).expect_err(name);
                assert!(err.is_request_error(), "{name}: {err:?} (vLLM: {why})");
            }
            _ => panic!("{name}: fixture has neither a rendering nor an error"),
        }
    }
    assert!(checked >= 15, "only {checked} renderings checked");
}

#[test]
fn template_errors_carry_the_templates_message() {
    let data = cases();
    let case = data["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hard_raises")
        .unwrap();
    let err = hard().render_chat(&input(case)).unwrap_err();
    let TokenizerError::TemplateRender { source } = &err else {
        panic!("{err:?}");
    };
    assert!(
        source.to_string().contains("Unsupported role: wizard"),
        "{source}"
    );
}

#[test]
fn completions_prompts_get_special_tokens_as_vllm_adds_them() {
    let model = smollm2();
    for p in cases()["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
        assert_eq!(
            model.encode_prompt(p["text"].as_str().unwrap()).unwrap(),
            ids,
            "{p}"
        );
    }
}

#[test]
fn decodes_as_transformers() {
    let d = &cases()["decode"];
    let ids: Vec<u32> = serde_json::from_value(d["ids"].clone()).unwrap();
    assert_eq!(smollm2().decode(&ids), d["text"].as_str().unwrap());
}

#[test]
fn special_tokens_match_transformers() {
    let want: Vec<(String, String)> = cases()["special_tokens"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    let got: Vec<(String, String)> = smollm2()
        .special_tokens()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn content_format_is_detected_per_template() {
    assert_eq!(smollm2().content_format(false), Some(ContentFormat::String));
    assert_eq!(hard().content_format(true), Some(ContentFormat::OpenAi));
}

#[test]
fn special_tokens_come_from_added_token_objects_and_the_legacy_map() {
    let config = r#"{"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>",
        "image_token": "<img>", "add_bos_token": true, "chat_template": "{{ bos_token }}{{ image_token }}|{{ eos_token }}|{{ unk_token }}|{{ audio_token }}"}"#;
    let legacy = r#"{"unk_token": {"content": "<unk>", "lstrip": false}, "eos_token": "<eos>",
        "audio_token": {"content": "<aud>"}}"#;
    let dir = model_dir(
        "specials",
        &[
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", legacy),
        ],
    );
    let model = ModelTokenizer::from_dir(&dir).unwrap();
    let text = model
        .render_chat(&ChatInput::new(vec![
            serde_json::json!({"role": "user", "content": "x"}),
        ]))
        .unwrap();
    // special_tokens_map.json overrides the config when the config has no added_tokens_decoder.
    // Expected: transformers 5.19's apply_chat_template on the same directory.
    assert_eq!(text, "<s><img>|<eos>|<unk>|<aud>");
}

#[test]
fn named_templates_pick_tool_use_when_tools_are_given() {
    let config = r#"{"chat_template": [
        {"name": "default", "template": "default:{{ messages|length }}"},
        {"name": "tool_use", "template": "tools:{{ tools|length }}"},
        {"name": "rag", "template": "rag"}]}"#;
    let model =
        ModelTokenizer::from_dir(model_dir("named", &[("tokenizer_config.json", config)])).unwrap();
    let mut input = ChatInput::new(vec![serde_json::json!({"role": "user", "content": "x"})]);
    assert_eq!(model.render_chat(&input).unwrap(), "default:1");
    // An empty list still counts as "tools given", as in transformers' `tools is not None`.
    input.tools = Some(vec![]);
    assert_eq!(model.render_chat(&input).unwrap(), "tools:0");
}

#[test]
fn chat_template_jinja_wins_over_the_config() {
    let dir = model_dir("jinja-wins", &[("chat_template.jinja", "file\n")]);
    let model = ModelTokenizer::from_dir(dir).unwrap();
    // jinja2 drops one trailing newline of the template source, as minijinja does.
    let text = model.render_chat(&ChatInput::new(vec![
        serde_json::json!({"role": "user", "content": "x"}),
    ]));
    assert_eq!(text.unwrap(), "file");
}

#[test]
fn load_errors_name_the_file() {
    let missing = ModelTokenizer::from_dir("/nonexistent/kvgate-model").unwrap_err();
    assert!(
        matches!(&missing, TokenizerError::ReadFile { path, .. } if path.ends_with("tokenizer.json")),
        "{missing:?}"
    );

    let dir = model_dir(
        "bad-config",
        &[("tokenizer_config.json", r#"{"chat_template": 3}"#)],
    );
    let err = ModelTokenizer::from_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::InvalidConfigField { field, .. } if field == "chat_template"),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    let dir = model_dir(
        "bad-template",
        &[("chat_template.jinja", "{% for m in messages %}")],
    );
    let err = ModelTokenizer::from_dir(&dir).unwrap_err();
    assert!(
        matches!(err, TokenizerError::InvalidChatTemplate { .. }),
        "{err:?}"
    );

    let dir = model_dir("bad-json", &[("tokenizer_config.json", "{")]);
    let err = ModelTokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::InvalidJson { .. }), "{err:?}");

    let dir = model_dir("no-template", &[("tokenizer_config.json", "{}")]);
    let model = ModelTokenizer::from_dir(&dir).unwrap();
    let err = model.render_chat(&ChatInput::new(vec![])).unwrap_err();
    assert!(
        matches!(err, TokenizerError::NoChatTemplate { .. }),
        "{err:?}"
    );
    assert!(!model.encode_prompt("still tokenises").unwrap().is_empty());
}

#[test]
fn multimodal_parts_are_refused() {
    let input = ChatInput::new(vec![serde_json::json!({"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]})]);
    let err = smollm2().render_chat(&input).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::UnsupportedContentPart { index: 0, part_type } if part_type == "image_url"),
        "{err:?}"
    );
}

// ---------------------------------------------------------------- piece cache

/// A conversation of `turns` turns whose messages are drawn from `texts`.
fn conversation(texts: &[String]) -> ChatInput {
    let mut messages = vec![serde_json::json!({"role": "system", "content": texts[0]})];
    for (i, t) in texts[1..].iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(serde_json::json!({"role": role, "content": t}));
    }
    if texts.len() % 2 == 1 {
        messages.push(serde_json::json!({"role": "user", "content": "next"}));
    }
    ChatInput::new(messages)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Tokenising a rendered chat piece by piece, with pieces reused across turns, gives the ids
    /// of tokenising it whole, for any message text (whitespace, unicode, text that looks like
    /// markup), turn after turn.
    #[test]
    fn pieces_tokenise_as_the_whole_turn_after_turn(
        texts in proptest::collection::vec(
            "(\\PC| |\\n|<\\|im_|\\t|<\\|im_start\\|>|<\\|im_end\\|>){0,80}",
            2..7,
        ),
    ) {
        let model = smollm2_shared();
        for turn in 2..=texts.len() {
            let input = conversation(&texts[..turn]);
            let whole = model.encode_chat_whole(&input).unwrap();
            proptest::prop_assert_eq!(model.encode_chat(&input).unwrap(), whole.clone());
            // Again, now from the cache.
            proptest::prop_assert_eq!(model.encode_chat(&input).unwrap(), whole);
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]

    /// Long pieces cut at word cuts tokenise as the whole, for chats and completions prompts,
    /// first from scratch and then from the cache, on text mixing words, punctuation,
    /// contractions, digits, unicode and whitespace runs.
    #[test]
    fn long_pieces_cut_at_words_tokenise_as_the_whole(
        parts in proptest::collection::vec(
            "([a-zA-Z]{1,9}|[ ]{1,3}|\\n|\\t|'s|n't|[0-9]{1,5}|[.,;:!?()\\[\\]{}\"/-]|\\PC|<\\|im_end\\|>)",
            300..900,
        ),
        question in "[a-z ?]{0,40}",
    ) {
        let model = smollm2_shared();
        let doc: String = parts.concat();
        let prompt = format!("{doc}{question}");
        let whole = model.encode_prompt_whole(&prompt).unwrap();
        proptest::prop_assert_eq!(model.encode_prompt(&prompt).unwrap(), whole.clone());
        proptest::prop_assert_eq!(model.encode_prompt(&prompt).unwrap(), whole);
        let chat = conversation(&["sys".to_string(), doc.clone(), question.clone()]);
        let whole = model.encode_chat_whole(&chat).unwrap();
        proptest::prop_assert_eq!(model.encode_chat(&chat).unwrap(), whole.clone());
        proptest::prop_assert_eq!(model.encode_chat(&chat).unwrap(), whole);
    }
}

/// A long document asked about again with another question, after another introduction, is
/// looked up chunk by chunk: only the chunks around the changes are tokenised again (llm-d's
/// long-prompt case, where one 220 KB message is a single piece).
#[test]
fn a_long_document_with_a_new_question_reuses_its_chunks() {
    let model = smollm2();
    assert!(
        model.cuts_long_pieces(),
        "SmolLM2's byte-level BPE never crosses a word cut"
    );
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    ];
    let mut x = 7u64;
    let doc: String = (0..20_000)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let w = words[(x >> 33) as usize % words.len()];
            if x >> 60 == 0 {
                format!("{w}. ")
            } else {
                format!("{w} ")
            }
        })
        .collect();
    let ask = |intro: &str, question: &str| {
        ChatInput::new(vec![
            serde_json::json!({"role": "user", "content": format!("{intro}\n\n{doc}\n\nQuestion: {question}")}),
        ])
    };
    let first = ask("Read this.", "what comes after golf?");
    let before = model.cached_piece_tokens();
    assert_eq!(
        model.encode_chat(&first).unwrap(),
        model.encode_chat_whole(&first).unwrap()
    );
    let after_first = model.cached_piece_tokens();
    assert!(after_first - before > 20_000, "{before} → {after_first}");
    let second = ask(
        "Please read the following text carefully.",
        "how many deltas are there?",
    );
    assert_eq!(
        model.encode_chat(&second).unwrap(),
        model.encode_chat_whole(&second).unwrap()
    );
    let added = model.cached_piece_tokens() - after_first;
    assert!(
        added < (after_first - before) / 10,
        "the document was tokenised again: {added} new cached tokens after {}",
        after_first - before
    );
    // The same for a completions prompt, whose text is cut the same way.
    let prompt = format!("Summarise:\n{doc}\nSummary:");
    let whole = model.encode_prompt_whole(&prompt).unwrap();
    let cached = model.cached_piece_tokens();
    assert_eq!(model.encode_prompt(&prompt).unwrap(), whole);
    assert!(model.cached_piece_tokens() - cached < whole.len() / 10);
}

/// SmolLM2's `tokenizer.json` with `edit` applied, in a scratch model directory.
fn smollm2_edited(name: &str, edit: impl FnOnce(&mut Json)) -> ModelTokenizer {
    let json = std::fs::read_to_string(fixtures().join("smollm2/tokenizer.json")).unwrap();
    let mut v: Json = serde_json::from_str(&json).unwrap();
    edit(&mut v);
    let dir = model_dir(
        name,
        &[("tokenizer.json", &serde_json::to_string(&v).unwrap())],
    );
    ModelTokenizer::from_dir(&dir).unwrap()
}

/// A normaliser that prepends to its input applies to every piece between special tokens (so
/// pieces still tokenise as the whole) but would apply to every chunk of a cut piece: the
/// probe keeps long pieces whole.
#[test]
fn a_tokenizer_that_changes_each_chunk_alone_keeps_long_pieces_whole() {
    let model = smollm2_edited("prepend", |v| {
        v["normalizer"] = serde_json::json!({"type": "Prepend", "prepend": "x"});
    });
    assert!(model.reuses_pieces());
    assert!(!model.cuts_long_pieces());
    let long = "alpha bravo charlie delta ".repeat(200);
    assert_eq!(
        model.encode_prompt(&long).unwrap(),
        model.encode_prompt_whole(&long).unwrap()
    );
}

/// An added token holding a word cut (`of the`, matched by HuggingFace inside whatever text
/// it is given) would be split by a cut: long pieces stay whole for such a vocabulary.
#[test]
fn an_added_token_spanning_a_word_cut_keeps_long_pieces_whole() {
    let model = smollm2_edited("added-span", |v| {
        v["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
            "id": 49152, "content": "of the", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": false}));
    });
    assert!(model.reuses_pieces());
    assert!(!model.cuts_long_pieces());
}

/// A tokenizer that adds a BOS to completions prompts (Llama-3's post-processor): the cached
/// path adds the same ids around the prompt as tokenising it whole, also when the prompt
/// holds the BOS's own text.
#[test]
fn completions_prompts_keep_their_bos_through_the_cache() {
    let model = smollm2_edited("bos", |v| {
        v["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                 "tokens": ["<|endoftext|>"]}}});
    });
    assert!(model.cuts_long_pieces());
    let doc = "the kettle boils water slowly today and ".repeat(120);
    for prompt in [
        format!("{doc}what boils?"),
        format!("<|endoftext|>{doc}<|endoftext|> again"),
        "short".to_string(),
    ] {
        let whole = model.encode_prompt_whole(&prompt).unwrap();
        assert_eq!(whole[0], 0, "the post-processor adds the BOS");
        assert_eq!(model.encode_prompt(&prompt).unwrap(), whole);
        assert_eq!(
            model.encode_prompt(&prompt).unwrap(),
            whole,
            "from the cache"
        );
    }
}

fn smollm2_shared() -> &'static ModelTokenizer {
    static MODEL: std::sync::OnceLock<ModelTokenizer> = std::sync::OnceLock::new();
    MODEL.get_or_init(smollm2)
}

#[test]
fn a_multi_turn_conversation_reuses_its_history() {
    let model = smollm2();
    assert!(
        model.reuses_pieces(),
        "SmolLM2's byte-level BPE tokenises pieces as the whole"
    );
    let long: Vec<String> = (0..12)
        .map(|i| format!("message {i}: {}", "lorem ipsum dolor sit amet ".repeat(40)))
        .collect();
    let before = model.cached_piece_tokens();
    model.encode_chat(&conversation(&long[..11])).unwrap();
    let after_first = model.cached_piece_tokens();
    assert!(after_first > before + 11 * 200, "{before} → {after_first}");
    // The next turn adds only its new message's pieces (one message of twelve).
    model.encode_chat(&conversation(&long)).unwrap();
    let added = model.cached_piece_tokens() - after_first;
    assert!(
        added < (after_first - before) / 5,
        "the history was tokenised again: {added} new cached tokens after {after_first}"
    );
}

/// A SentencePiece-style pre-tokenizer that prepends `▁` only to the input's first piece
/// (`prepend_scheme: first`, as Llama-2 and Mistral tokenizers have) tokenises a piece after a
/// special token differently on its own: the cache must stay off for it.
#[test]
fn a_tokenizer_whose_pieces_differ_alone_keeps_the_cache_off() {
    let tokenizer = r#"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": true}],
      "normalizer": null,
      "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                        "split": true},
      "post_processor": null, "decoder": null,
      "model": {"type": "WordLevel", "unk_token": "<unk>",
                "vocab": {"<s>": 0, "<unk>": 1, "▁Hello,": 2, "Hello,": 3, "▁world!": 4}}
    }"#;
    let dir = model_dir("metaspace-first", &[("tokenizer.json", tokenizer)]);
    let model = ModelTokenizer::from_dir(&dir).unwrap();
    assert!(!model.reuses_pieces());
    assert!(!model.cuts_long_pieces());
}

/// A `tokenizer.json` that ships truncation or padding is used without them, as transformers
/// (and so vLLM) calls it: a prompt is never cut, whole or piece by piece.
#[test]
fn the_files_truncation_and_padding_are_not_applied() {
    let json = std::fs::read_to_string(fixtures().join("smollm2/tokenizer.json")).unwrap();
    let mut v: Json = serde_json::from_str(&json).unwrap();
    v["truncation"] = serde_json::json!({"direction": "Right", "max_length": 8,
        "strategy": "LongestFirst", "stride": 0});
    v["padding"] = serde_json::json!({"strategy": {"Fixed": 64}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"});
    let dir = model_dir(
        "truncating",
        &[("tokenizer.json", &serde_json::to_string(&v).unwrap())],
    );
    let model = ModelTokenizer::from_dir(&dir).unwrap();
    let text = "one two three four five six seven eight nine ten eleven twelve";
    let ids = model.encode_prompt(text).unwrap();
    assert_eq!(ids, smollm2().encode_prompt(text).unwrap());
    assert!(ids.len() > 8 && ids.len() < 64, "{}", ids.len());
}

/// vLLM's Anthropic Messages API merges inline system messages into the leading one only when
/// the template refuses a system message after the first turn (`_detect_merge_inline_system`
/// renders `[system, user, system, user]`): SmolLM2's ChatML template accepts it; a template
/// with Qwen's `loop.first` guard refuses it.
#[test]
fn templates_that_refuse_a_later_system_message_are_detected() {
    assert!(!smollm2().requires_system_first());
    let guarded = "{% for m in messages %}{% if m.role == 'system' and not loop.first %}\
        {{ raise_exception('System message must be at the beginning.') }}{% endif %}\
        {{ m.role }}: {{ m.content }}\n{% endfor %}";
    let model = ModelTokenizer::from_dir(model_dir(
        "system-first",
        &[("chat_template.jinja", guarded)],
    ))
    .unwrap();
    assert!(model.requires_system_first());
}
