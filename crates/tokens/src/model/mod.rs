//! A model's own tokenizer and chat template, loaded from its HuggingFace directory, rendering
//! and tokenising chat requests byte for byte as vLLM 0.32 does.
//!
//! vLLM's chat path (`vllm/renderers/hf.py`, `HfRenderer.render_messages`): normalise the
//! request's messages into a "conversation" ([`vllm`]), render it with
//! `tokenizer.apply_chat_template(conversation, tools=…, tokenize=False, **kwargs)`, then
//! tokenise the text with `add_special_tokens=False` (the chat request's default: the template
//! already writes BOS and friends), whereas a completions prompt is tokenised with
//! `add_special_tokens=True` (`ChatCompletionRequest.add_special_tokens` defaults to false,
//! `CompletionRequest.add_special_tokens` to true; `TokenizeParams.get_encode_kwargs`).
//!
//! What transformers 5 contributes (`tokenization_utils_base.py`, `chat_template_utils.py`):
//! - which template: `chat_template.jinja` and `additional_chat_templates/*.jinja` win over
//!   `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`);
//!   with several, a request with `tools` (even an empty list) uses `tool_use` when it exists,
//!   otherwise `default` (`get_chat_template`);
//! - the template's variables: `messages`, `tools`, `documents`, `add_generation_prompt`, the
//!   named special tokens (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`,
//!   `cls_token`, `mask_token`, plus any other string `*_token` key, all as plain strings) and
//!   the request's `chat_template_kwargs`, which override special tokens;
//! - `continue_final_message`: a marker is appended to the final message's text (its last text
//!   part for list content), the chat is rendered, and the text is cut at the marker (then
//!   right-stripped if the template trimmed the marker's trailing space).
//!
//! The template is compiled once, at load; a render converts the conversation to template
//! values and runs the compiled template.

mod jinja;
mod pyfmt;
mod segments;
mod vllm;

pub use segments::SEGMENT_CACHE_TOKENS;

pub use vllm::ContentFormat;

/// Python's `repr` of a JSON value as Python holds it (`None`, `True`, single-quoted strings,
/// shortest round-trip floats): what vLLM prints when it formats a parsed request field with
/// `str(...)`. Keys keep the JSON object's order.
pub fn python_repr(v: &Json) -> String {
    let mut out = String::new();
    pyfmt::py_repr(&to_value(v), &mut out);
    out
}

use crate::TokenizerError as E;
use minijinja::Environment;
use minijinja::machinery::parse;
use minijinja::value::Value;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The chat-request fields that decide the prompt, as vLLM's `ChatCompletionRequest` reads them.
///
/// Deserialises straight from an OpenAI chat request body (other fields are ignored). Key order
/// inside `tools` and tool-call arguments reaches the prompt through `tojson`, so parse bodies
/// with `serde_json`'s `preserve_order` (the `hf` feature turns it on).
#[derive(Clone, Debug, Deserialize)]
pub struct ChatInput {
    /// `messages`: OpenAI chat messages.
    pub messages: Vec<Json>,
    /// `tools`: function tools, dumped as vLLM's `ChatCompletionToolsParam` before rendering.
    #[serde(default)]
    pub tools: Option<Vec<Json>>,
    /// `documents`: retrieval documents for templates that support them.
    #[serde(default)]
    pub documents: Option<Vec<Json>>,
    /// `add_generation_prompt` (vLLM's default: true).
    #[serde(default = "default_true")]
    pub add_generation_prompt: bool,
    /// `continue_final_message` (vLLM's default: false); requires `add_generation_prompt: false`.
    #[serde(default)]
    pub continue_final_message: bool,
    /// `chat_template_kwargs`: extra template variables.
    #[serde(default)]
    pub chat_template_kwargs: Option<Map<String, Json>>,
    /// `reasoning_effort`, which vLLM passes to the template (and as `enable_thinking`).
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    /// The clock `strftime_now` reads; `None` reads the system clock (UTC) at render time.
    #[serde(skip)]
    pub now: Option<SystemTime>,
}

fn default_true() -> bool {
    true
}

impl ChatInput {
    /// A request with just `messages` and vLLM's defaults for everything else.
    pub fn new(messages: Vec<Json>) -> Self {
        ChatInput {
            messages,
            tools: None,
            documents: None,
            add_generation_prompt: true,
            continue_final_message: false,
            chat_template_kwargs: None,
            reasoning_effort: None,
            now: None,
        }
    }
}

/// What vLLM knows about one compiled template.
#[derive(Debug)]
struct TemplateInfo {
    /// Its name in the environment.
    key: &'static str,
    format: ContentFormat,
    developer_role: bool,
    /// transformers refuses `continue_final_message` unless the source mentions `content`.
    mentions_content: bool,
}

#[derive(Debug)]
enum Templates {
    None,
    Single(TemplateInfo),
    Named {
        default: Option<TemplateInfo>,
        tool_use: Option<TemplateInfo>,
        names: Vec<String>,
    },
}

/// A model's tokenizer and chat template (see module docs).
pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
    env: Environment<'static>,
    templates: Templates,
    special_tokens: Vec<(String, String)>,
    dir: PathBuf,
    /// Piece-wise tokenisation of rendered chats with a cache of pieces ([`segments`]), when
    /// the tokenizer was found to tokenise pieces as it does the whole.
    segments: Option<segments::Segmenter>,
    /// What `add_special_tokens=True` puts before and after a completions prompt's own ids
    /// (a BOS, say), when the probe at load found it the same for every text; completions
    /// prompts then use the piece cache too.
    prompt_affixes: Option<(Vec<u32>, Vec<u32>)>,
    /// Whether a template rejects a system message after the first turn (measured at load).
    system_first: bool,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("dir", &self.dir)
            .field("templates", &self.templates)
            .finish_non_exhaustive()
    }
}

const TEMPLATE_MARKER: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// Parameters of transformers' `apply_chat_template`: a kwarg with one of these names is
/// consumed by the call and never reaches the template.
const APPLY_PARAMS: [&str; 14] = [
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
];

const STANDARD_SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

fn read(path: &Path) -> Result<Option<String>, E> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(E::ReadFile {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Json>>, E> {
    let Some(text) = read(path)? else {
        return Ok(None);
    };
    match serde_json::from_str(&text) {
        Ok(Json::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(E::InvalidConfigField {
            path: path.to_owned(),
            field: String::new(),
            reason: "the file must hold a JSON object",
        }),
        Err(source) => Err(E::InvalidJson {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A special token's text: a string, or an AddedToken object's `content`.
fn token_text(v: &Json, require_type_tag: bool) -> Option<&str> {
    match v {
        Json::String(s) => Some(s),
        Json::Object(o)
            if !require_type_tag
                || o.get("__type").and_then(Json::as_str) == Some("AddedToken") =>
        {
            o.get("content").and_then(Json::as_str)
        }
        _ => None,
    }
}

/// The special tokens transformers 5 puts in the template context (`special_tokens_map`).
fn special_tokens(
    config_path: &Path,
    config: &Map<String, Json>,
    legacy: Option<&Map<String, Json>>,
) -> Result<Vec<(String, String)>, E> {
    // `special_tokens_map.json` is read only when the config has no `added_tokens_decoder`, and
    // then overrides the config's entries.
    let mut merged = config.clone();
    if !config.contains_key("added_tokens_decoder")
        && let Some(legacy) = legacy
    {
        for (k, v) in legacy {
            // transformers builds an AddedToken from any object here, tagged or not.
            let v = match v {
                Json::Object(o) if !o.contains_key("__type") => {
                    let mut o = o.clone();
                    o.insert("__type".into(), Json::String("AddedToken".into()));
                    Json::Object(o)
                }
                v => v.clone(),
            };
            merged.insert(k.clone(), v);
        }
    }
    let mut out = Vec::new();
    for key in STANDARD_SPECIAL_TOKENS {
        match merged.get(key) {
            None | Some(Json::Null) => {}
            Some(v) => match token_text(v, false) {
                Some(t) => out.push((key.to_owned(), t.to_owned())),
                None => {
                    return Err(E::InvalidConfigField {
                        path: config_path.to_owned(),
                        field: key.to_owned(),
                        reason: "must be a string or an AddedToken object with `content`",
                    });
                }
            },
        }
    }
    // Model-specific tokens: other `*_token` keys holding a token, then `extra_special_tokens`
    // when it is a map of names.
    for (k, v) in &merged {
        if k.ends_with("_token")
            && !STANDARD_SPECIAL_TOKENS.contains(&k.as_str())
            && let Some(t) = token_text(v, true)
        {
            out.push((k.clone(), t.to_owned()));
        }
    }
    if let Some(Json::Object(extra)) = merged.get("extra_special_tokens") {
        for (k, v) in extra {
            if let Some(t) = token_text(v, false) {
                out.retain(|(name, _)| name != k);
                out.push((k.clone(), t.to_owned()));
            }
        }
    }
    Ok(out)
}

impl ModelTokenizer {
    /// Loads `tokenizer.json`, the chat template(s) and the special tokens of a HuggingFace
    /// model directory. A directory without a chat template loads (completions still work);
    /// rendering a chat then fails with [`TokenizerError::NoChatTemplate`](crate::TokenizerError).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, E> {
        let dir = dir.as_ref().to_owned();
        let tok_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path).map_err(|source| E::ReadFile {
            path: tok_path.clone(),
            source,
        })?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|source| {
            E::InvalidTokenizerFile {
                path: tok_path.clone(),
                source,
            }
        })?;
        // transformers clears the file's truncation and padding on every call unless asked
        // (`set_truncation_and_padding`), so vLLM never truncates or pads a prompt.
        tokenizer.with_padding(None);
        let _ = tokenizer.with_truncation(None);

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?.unwrap_or_default();
        let legacy = read_json_object(&dir.join("special_tokens_map.json"))?;
        let special_tokens = special_tokens(&config_path, &config, legacy.as_ref())?;

        let mut env = jinja::environment();
        let templates = load_templates(&dir, &config_path, &config, &mut env)?;
        let segmenter = segments::Segmenter::new(&tokenizer);
        let mut model = ModelTokenizer {
            tokenizer,
            env,
            templates,
            special_tokens,
            dir,
            segments: None,
            prompt_affixes: None,
            system_first: false,
        };
        model.system_first = model.rejects_inline_system();
        model.segments = segmenter
            .filter(|s| model.pieces_tokenise_as_the_whole(s))
            .map(|mut s| {
                s.cut_words = model.words_tokenise_as_the_whole(&s);
                s
            });
        if model.segments.is_some() {
            model.prompt_affixes = model.prompt_affixes();
        }
        Ok(model)
    }

    /// Whether the chat template (with or without tools) refuses a system message after the
    /// first turn, as vLLM's Anthropic Messages API finds out (`_detect_merge_inline_system`:
    /// it renders `[system, user, system, user]`): vLLM then merges a Messages request's inline
    /// system messages into its leading system prompt, and keeps them in place otherwise.
    pub fn requires_system_first(&self) -> bool {
        self.system_first
    }

    fn rejects_inline_system(&self) -> bool {
        let probe: Vec<Json> = ["system", "user", "system", "user"]
            .iter()
            .map(|role| serde_json::json!({"role": role, "content": "t"}))
            .collect();
        [None, Some(Vec::new())].into_iter().any(|tools| {
            let input = ChatInput {
                tools,
                add_generation_prompt: false,
                ..ChatInput::new(probe.clone())
            };
            // No template at all is a merge for vLLM too (`if not chat_template: return True`).
            self.render_chat(&input).is_err()
        })
    }

    /// Whether long pieces are also cut at word cuts (the probe at load found it exact for
    /// this tokenizer; see [`segments`]).
    pub fn cuts_long_pieces(&self) -> bool {
        self.segments.as_ref().is_some_and(|s| s.cut_words)
    }

    /// Whether rendered chats are tokenised piece by piece with a cache of the pieces (the
    /// probe at load found it exact for this tokenizer; see [`segments`]).
    pub fn reuses_pieces(&self) -> bool {
        self.segments.is_some()
    }

    /// Tokens held by the piece cache.
    pub fn cached_piece_tokens(&self) -> usize {
        self.segments.as_ref().map_or(0, |s| s.cached_tokens())
    }

    /// The load-time probe of [`segments`]: text around every special token cut at, and a
    /// rendered probe conversation when the template renders one, tokenised both ways.
    fn pieces_tokenise_as_the_whole(&self, seg: &segments::Segmenter) -> bool {
        const FILLER: [&str; 8] = [
            "Hello, world!",
            "  two leading spaces",
            "trailing space ",
            "\n\nnew lines\n",
            "ünïcödé 日本語 ✓ — done.",
            "1234 5678.9",
            "<not a token> <|",
            "a",
        ];
        let mut synthetic = String::new();
        for (i, t) in seg.token_texts(&self.tokenizer).iter().enumerate() {
            synthetic.push_str(FILLER[i % FILLER.len()]);
            synthetic.push_str(t);
        }
        synthetic.push_str(FILLER[0]);
        let mut probes = vec![synthetic];
        let conversation = ChatInput::new(vec![
            serde_json::json!({"role": "system", "content": "You are a terse assistant.\n  Indented line."}),
            serde_json::json!({"role": "user", "content": " leading space, then ünïcödé and 42 numbers "}),
            serde_json::json!({"role": "assistant", "content": "Sure:\n\n- one\n- two"}),
            serde_json::json!({"role": "user", "content": "And the rest?"}),
        ]);
        if let Ok(rendered) = self.render_chat(&conversation) {
            probes.push(rendered);
        }
        probes.iter().all(|p| {
            matches!(
                (seg.encode(p, |s| self.encode(s, false)), self.encode(p, false)),
                (Ok(a), Ok(b)) if a == b
            )
        })
    }

    /// The load-time check of word cuts ([`segments`]): no token of the vocabulary may span
    /// one (an ASCII letter followed by a space, `Ġ` or `▁`: such a token could only be
    /// produced across a cut, and a probe text would have to contain exactly its words to
    /// see it), no added token the cache does not cut at may strip spaces or contain one,
    /// and varied text cut at every word cut must tokenise as the whole.
    fn words_tokenise_as_the_whole(&self, seg: &segments::Segmenter) -> bool {
        let spans_a_cut = |t: &str| {
            let mut prev_letter = false;
            t.chars().any(|c| {
                let hit = prev_letter && matches!(c, ' ' | '\u{120}' | '\u{2581}');
                prev_letter = c.is_ascii_alphabetic();
                hit
            })
        };
        if self
            .tokenizer
            .get_vocab(false)
            .keys()
            .any(|t| spans_a_cut(t))
        {
            return false;
        }
        let cut_at = seg.token_ids();
        let added_in_the_way = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(id, _)| !cut_at.contains(id))
            .any(|(_, t)| t.lstrip || t.rstrip || t.single_word || spans_a_cut(&t.content));
        if added_in_the_way {
            return false;
        }
        const PROBE: &str = "It's a plain   sentence, isn't it? Don't stop: we'll see.\n\
            Most of the time it is in the middle of the text, on a page, at the end, for the\n\
            reader: to the point, as an aside, by the way, is a word, was the one that did it.\n\
            The quick brown fox jumps over the lazy dog; dogs' bones and cats' toys.\n\n\
            \tIndented with a tab and   three spaces, then CamelCase WordsLike ThisOne.\n\
            Numbers 12345 and 3.14159 sit beside words like v2 and x86 64bit data.\n\
            fn main() { let answer = compute(42); println!(\"{answer}\"); } // code here\n\
            Visit https://example.com/a b?c=d or mail someone@example.org soon.\n\
            ünïcödé wörds, naïve café résumé, 日本語 テキスト, Ελληνικά λέξεις, emoji ✓ done.\n\
            UPPER lower Mixed aB cD eF gh ij kl mn op qr st uv wx yz A B C a b c.\n\
            trailing letters then spaces   \n  leading spaces before words here";
        let cuts: Vec<usize> = segments::word_cuts(PROBE).collect();
        let mut parts = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&PROBE.len())) {
            match self.encode(&PROBE[last..c], false) {
                Ok(ids) => parts.extend(ids),
                Err(_) => return false,
            }
            last = c;
        }
        cuts.len() > 50 && self.encode(PROBE, false).is_ok_and(|whole| whole == parts)
    }

    /// The ids `add_special_tokens=True` adds around a prompt's own, if they are the same
    /// around every one of a few short probe texts.
    fn prompt_affixes(&self) -> Option<(Vec<u32>, Vec<u32>)> {
        let probes = [
            "Hello, world!",
            " leading space",
            "a",
            "1234 ünïcödé\n",
            "x y z",
        ];
        let mut found: Option<(Vec<u32>, Vec<u32>)> = None;
        for p in probes {
            let bare = self.encode(p, false).ok()?;
            let full = self.encode(p, true).ok()?;
            let extra = full.len().checked_sub(bare.len())?;
            let at = (0..=extra).find(|&a| full[a..a + bare.len()] == bare[..])?;
            let affixes = (full[..at].to_vec(), full[at + bare.len()..].to_vec());
            match &found {
                Some(f) if *f != affixes => return None,
                Some(_) => {}
                None => found = Some(affixes),
            }
        }
        found
    }

    /// The special tokens templates see, in transformers' order (name, text).
    pub fn special_tokens(&self) -> impl Iterator<Item = (&str, &str)> {
        self.special_tokens
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The content format vLLM detects for the template a request with (or without) tools
    /// uses; `None` when there is no such template.
    pub fn content_format(&self, with_tools: bool) -> Option<ContentFormat> {
        self.template(with_tools).ok().map(|t| t.format)
    }

    fn template(&self, with_tools: bool) -> Result<&TemplateInfo, E> {
        match &self.templates {
            Templates::None => Err(E::NoChatTemplate {
                dir: self.dir.clone(),
            }),
            Templates::Single(t) => Ok(t),
            Templates::Named {
                default,
                tool_use,
                names,
            } => match (with_tools, tool_use, default) {
                (true, Some(t), _) | (_, _, Some(t)) => Ok(t),
                _ => Err(E::NoDefaultChatTemplate {
                    names: names.clone(),
                }),
            },
        }
    }

    /// The prompt text vLLM renders for a chat request.
    pub fn render_chat(&self, input: &ChatInput) -> Result<String, E> {
        // Keyword arguments, merged as vLLM merges them (`ChatParams`, `merge_kwargs`): the
        // request's own fields win over `chat_template_kwargs`, whose null and "auto" values
        // are dropped, and which win over the request's `tools`.
        let raw_kwargs = input.chat_template_kwargs.as_ref();
        let mut kwargs: Vec<(&str, Json)> = raw_kwargs
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null() && v.as_str() != Some("auto"))
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let take = |kwargs: &mut Vec<(&str, Json)>, key: &str| {
            kwargs
                .iter()
                .position(|(k, _)| *k == key)
                .map(|i| kwargs.remove(i).1)
        };
        let tools = match take(&mut kwargs, "tools") {
            Some(t) => Some(t),
            None => match &input.tools {
                None => None,
                Some(tools) => Some(Json::Array(
                    tools
                        .iter()
                        .enumerate()
                        .map(|(i, t)| vllm::normalize_tool(i, t))
                        .collect::<Result<_, _>>()?,
                )),
            },
        };
        let documents = match &input.documents {
            Some(d) => Some(Json::Array(d.clone())),
            None => take(&mut kwargs, "documents"),
        };
        if let Some(docs) = &documents
            && !docs
                .as_array()
                .is_some_and(|d| d.iter().all(Json::is_object))
        {
            return Err(E::InvalidDocuments);
        }
        if let Some(effort) = &input.reasoning_effort {
            take(&mut kwargs, "reasoning_effort");
            kwargs.push(("reasoning_effort", Json::String(effort.clone())));
            if !raw_kwargs.is_some_and(|k| k.contains_key("enable_thinking")) {
                kwargs.push(("enable_thinking", Json::Bool(effort != "none")));
            }
        }
        if let Some((key, _)) = kwargs.iter().find(|(k, _)| *k == "messages") {
            return Err(E::TemplateKwargConflict {
                key: (*key).to_owned(),
            });
        }

        let template = self.template(tools.is_some())?;
        let mut conversation = vllm::parse_messages(&input.messages, template.format)?;
        if !template.developer_role
            && conversation
                .iter()
                .any(|m| m.get("role").and_then(Json::as_str) == Some("developer"))
        {
            conversation = vllm::developer_to_system(conversation);
        }
        if conversation.is_empty() {
            return Err(E::EmptyConversation);
        }

        let final_text = if input.continue_final_message {
            Some(self.mark_final_message(template, input, &mut conversation)?)
        } else {
            None
        };

        let mut ctx: Vec<(&str, Value)> =
            Vec::with_capacity(self.special_tokens.len() + kwargs.len() + 5);
        for (k, v) in &self.special_tokens {
            ctx.push((k, Value::from(v.as_str())));
        }
        for (k, v) in &kwargs {
            if !APPLY_PARAMS.contains(k) {
                ctx.push((k, to_value(v)));
            }
        }
        ctx.push((
            "messages",
            Value::from(conversation.iter().map(to_value).collect::<Vec<_>>()),
        ));
        ctx.push(("tools", tools.as_ref().map_or(Value::from(()), to_value)));
        ctx.push((
            "documents",
            documents.as_ref().map_or(Value::from(()), to_value),
        ));
        ctx.push((
            "add_generation_prompt",
            Value::from(input.add_generation_prompt),
        ));
        let now = input.now.unwrap_or_else(SystemTime::now);
        ctx.push((jinja::NOW_VAR, Value::from(jinja::unix_micros(now))));

        let rendered = self
            .env
            .get_template(template.key)
            .and_then(|t| t.render(Value::from_pairs(ctx)))
            .map_err(|source| E::TemplateRender { source })?;
        match final_text {
            None => Ok(rendered),
            Some(final_text) => cut_at_marker(rendered, &final_text),
        }
    }

    /// transformers' `continue_final_message` preparation: appends the marker to the final
    /// message's text and returns that text as it was.
    fn mark_final_message(
        &self,
        template: &TemplateInfo,
        input: &ChatInput,
        conversation: &mut [Json],
    ) -> Result<String, E> {
        let bad = |reason| Err(E::ContinueFinalMessage { reason });
        if input.add_generation_prompt {
            return bad("cannot be combined with add_generation_prompt");
        }
        let Some(content) = conversation.last_mut().and_then(|m| m.get_mut("content")) else {
            return bad("the final message has no content to continue");
        };
        if content.is_null() {
            return bad("the final message has no content to continue");
        }
        if !template.mentions_content {
            return bad("the chat template has no `content` field to continue");
        }
        match content {
            Json::String(s) => {
                let original = s.clone();
                s.push_str(TEMPLATE_MARKER);
                Ok(original)
            }
            Json::Array(parts) => {
                for part in parts.iter_mut().rev() {
                    if let Some(Json::String(text)) = part.get_mut("text") {
                        let original = text.clone();
                        text.push_str(TEMPLATE_MARKER);
                        return Ok(original);
                    }
                }
                bad("the final message has no text to continue")
            }
            _ => bad("the final message's content is not text"),
        }
    }

    /// Token ids vLLM computes for a chat request (rendered, then encoded without special
    /// tokens: the template writes them).
    pub fn encode_chat(&self, input: &ChatInput) -> Result<Vec<u32>, E> {
        let text = self.render_chat(input)?;
        match &self.segments {
            Some(seg) => seg.encode(&text, |s| self.encode(s, false)),
            None => self.encode(&text, false),
        }
    }

    /// [`ModelTokenizer::encode_chat`] without the piece cache: the whole rendered text at once.
    pub fn encode_chat_whole(&self, input: &ChatInput) -> Result<Vec<u32>, E> {
        let text = self.render_chat(input)?;
        self.encode(&text, false)
    }

    /// Token ids vLLM computes for a completions prompt (special tokens added, as its
    /// `add_special_tokens=True` default).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, E> {
        match (&self.segments, &self.prompt_affixes) {
            (Some(seg), Some((before, after))) => {
                let ids = seg.encode(prompt, |s| self.encode(s, false))?;
                Ok([before.as_slice(), &ids, after.as_slice()].concat())
            }
            _ => self.encode(prompt, true),
        }
    }

    /// [`ModelTokenizer::encode_prompt`] without the piece cache: the whole prompt at once.
    pub fn encode_prompt_whole(&self, prompt: &str) -> Result<Vec<u32>, E> {
        self.encode(prompt, true)
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, E> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| E::EncodeFailed {
                message: e.to_string(),
            })
    }

    /// The text of `ids`, special tokens included, for diagnostics (an undecodable sequence
    /// reads as the decoder's error).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer
            .decode(ids, false)
            .unwrap_or_else(|e| format!("<undecodable: {e}>"))
    }
}

/// transformers' cut after rendering with the marker.
fn cut_at_marker(mut rendered: String, final_text: &str) -> Result<String, E> {
    let marker = TEMPLATE_MARKER.trim_end();
    let Some(at) = rendered
        .rfind(marker)
        .filter(|_| rendered.contains(pyfmt::py_strip(final_text)))
    else {
        return Err(E::ContinueFinalMessage {
            reason: "the final message does not appear in the rendered chat",
        });
    };
    if rendered[at..].starts_with(TEMPLATE_MARKER) {
        rendered.truncate(at);
    } else {
        // The template trimmed the marker's trailing space: strip as Python's rstrip() does.
        let kept = rendered[..at].trim_end_matches(pyfmt::is_py_space).len();
        rendered.truncate(kept);
    }
    Ok(rendered)
}

/// JSON to template values; maps keep their key order.
fn to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::from(a.iter().map(to_value).collect::<Vec<_>>()),
        Json::Object(o) => Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), to_value(v)))),
    }
}

/// Reads and compiles the templates vLLM can pick without a per-request template.
fn load_templates(
    dir: &Path,
    config_path: &Path,
    config: &Map<String, Json>,
    env: &mut Environment<'static>,
) -> Result<Templates, E> {
    // (name, source, file it came from)
    let mut found: Vec<(String, String, PathBuf)> = Vec::new();
    let jinja_path = dir.join("chat_template.jinja");
    if let Some(src) = read(&jinja_path)? {
        found.push(("default".into(), src, jinja_path));
    }
    let extra_dir = dir.join("additional_chat_templates");
    if let Ok(entries) = std::fs::read_dir(&extra_dir) {
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
            .collect();
        paths.sort();
        for p in paths {
            let name = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if let Some(src) = read(&p)? {
                found.push((name, src, p));
            }
        }
    }
    let single = if found.is_empty() {
        match config.get("chat_template") {
            None | Some(Json::Null) => return Ok(Templates::None),
            Some(Json::String(s)) => {
                found.push(("default".into(), s.clone(), config_path.to_owned()));
                true
            }
            Some(Json::Array(list)) => {
                for t in list {
                    match (
                        t.get("name").and_then(Json::as_str),
                        t.get("template").and_then(Json::as_str),
                    ) {
                        (Some(n), Some(src)) => {
                            found.push((n.to_owned(), src.to_owned(), config_path.to_owned()))
                        }
                        _ => {
                            return Err(E::InvalidConfigField {
                                path: config_path.to_owned(),
                                field: "chat_template".into(),
                                reason: "list entries must be {\"name\": string, \"template\": string}",
                            });
                        }
                    }
                }
                false
            }
            Some(_) => {
                return Err(E::InvalidConfigField {
                    path: config_path.to_owned(),
                    field: "chat_template".into(),
                    reason: "must be a string or a list of {name, template}",
                });
            }
        }
    } else {
        found.len() == 1 && found[0].0 == "default"
    };

    let mut compile =
        |key: &'static str, name: &str, source: &str, path: &Path| -> Result<TemplateInfo, E> {
            let invalid = |source| E::InvalidChatTemplate {
                path: path.to_owned(),
                name: name.to_owned(),
                source,
            };
            let source = jinja::rewrite_generation_tags(source).into_owned();
            // vLLM falls back to "string" when jinja2 cannot parse the template; minijinja then
            // fails to compile it below anyway.
            let format = parse(&source, name, Default::default())
                .map(|ast| vllm::detect_content_format(&ast))
                .unwrap_or(ContentFormat::String);
            let info = TemplateInfo {
                key,
                format,
                developer_role: vllm::supports_developer_role(&source),
                mentions_content: source.contains("content"),
            };
            env.add_template_owned(key, source).map_err(invalid)?;
            Ok(info)
        };

    if single {
        let (name, src, path) = &found[0];
        return compile("default", name, src, path).map(Templates::Single);
    }
    let mut default = None;
    let mut tool_use = None;
    for (name, src, path) in &found {
        match name.as_str() {
            "default" => default = Some(compile("default", name, src, path)?),
            "tool_use" => tool_use = Some(compile("tool_use", name, src, path)?),
            _ => {}
        }
    }
    Ok(Templates::Named {
        default,
        tool_use,
        names: found.into_iter().map(|(n, _, _)| n).collect(),
    })
}
