//! The OpenAI-compatible HTTP surface of one simulated engine, shaped like vLLM's.
//!
//! Documented defaults where vLLM's own would be impractical for a simulator:
//! - completions without `max_tokens` generate [`DEFAULT_COMPLETION_MAX_TOKENS`] tokens
//!   (vLLM's default too);
//! - chat completions without `max_tokens`/`max_completion_tokens` generate
//!   `min(max_model_len - prompt, DEFAULT_CHAT_MAX_TOKENS)` tokens (vLLM has no cap).
//!
//! Request bodies are parsed by hand (not axum's `Json` extractor) so that malformed JSON,
//! wrong types and missing fields get vLLM's 400 `BadRequestError` body, never a 415/422.
//!
//! Where vLLM 0.32 is followed to the letter, because routers read it:
//! - `usage.prompt_tokens_details` is reported only when the engine runs with
//!   `--enable-prompt-tokens-details` (`vllm/entrypoints/openai/{chat_completion,completion}/
//!   serving.py`, checked against a real engine's responses in
//!   `crates/signals/tests/fixtures/vllm032`). Then a full response carries
//!   `{"cached_tokens", "created_cache_tokens", "multimodal_tokens": null}`, where chat fills
//!   `created_cache_tokens` with the prompt's full-block tokens it newly cached and completions
//!   leave it null; a streamed usage chunk is dumped with `exclude_none`, so it keeps only the
//!   non-null members. Without the flag a full response has `"prompt_tokens_details": null`
//!   and a streamed chunk no such key. Full responses also carry
//!   `"completion_tokens_details": null` (no reasoning parser).
//! - `POST /reset_prefix_cache[?reset_running_requests=true]` (vLLM's dev-mode route,
//!   `vllm/entrypoints/serve/dev/cache/api_router.py`, always on here) answers
//!   `{"success": bool}`: false while running requests hold blocks, unless they are preempted
//!   first. `reset_external` is accepted and has nothing to reset.
//! - `/v1/models` lists each LoRA adapter with its path as `root` and the base model as
//!   `parent` (`OpenAIServingModels.show_available_models`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kvgate_engine::{
    EngineConfig, EngineError, EngineRequest, FinishReason, KvHold, Output, Usage,
};
use kvgate_tokens::{ChatMessage, Tokenizer, render_chat};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::actor::{Command, Snapshot, SubmitMode};
use crate::config::Role;
use crate::fault::{DrawKind, FaultConfig, uniform};
use crate::metrics;
use crate::pd::{self, Plan};

mod anthropic;

/// vLLM's default `max_tokens` for `/v1/completions`.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;
/// Cap on the default chat `max_tokens`: vLLM would generate up to the whole context, which
/// would make a simulated request without a limit run for minutes; 256 tokens is a typical
/// chat answer.
pub const DEFAULT_CHAT_MAX_TOKENS: u32 = 256;

/// Everything one engine's handlers share.
pub(crate) struct EngineShared {
    pub index: usize,
    pub model: String,
    pub adapters: Vec<String>,
    pub tokenizer: Arc<Tokenizer>,
    pub config: EngineConfig,
    /// vLLM `--enable-prompt-tokens-details`.
    pub prompt_tokens_details: bool,
    pub faults: FaultConfig,
    pub fault_seed: u64,
    pub cmd: mpsc::UnboundedSender<Command>,
    pub next_id: AtomicU64,
    pub requests_seen: AtomicU64,
    /// `GET /metrics` requests answered or refused (what scraping costs an engine).
    pub metrics_requests: AtomicU64,
    pub started: Instant,
    pub created_unix_s: u64,
    pub crash: CancellationToken,
    /// Set when a graceful stop begins: `/health` answers 503 from then on.
    pub draining: std::sync::atomic::AtomicBool,
    pub words: Arc<HashMap<u32, String>>,
    /// Part in prefill/decode disaggregation.
    pub role: Role,
    /// vLLM's `kv_transfer_config.engine_id` (a fresh UUID per engine start).
    pub engine_id: String,
    /// Simulated µs per wall-clock µs (transfer times are simulated).
    pub time_scale: f64,
    /// The KV side channel's address, on prefill-capable engines.
    pub side_channel: Option<std::net::SocketAddr>,
    /// KV transfers served by the side channel (also the transfer-failure draw counter).
    pub transfers_served: AtomicU64,
    /// The remote KV loads this engine made (vLLM's NIXL transfer metrics).
    pub nixl: std::sync::Mutex<pd::NixlStats>,
    /// Client of the decode side's pulls.
    pub client: reqwest::Client,
    /// SGLang bootstrap rooms served by the side channel.
    pub rooms: pd::Rooms,
}

impl EngineShared {
    fn starting(&self) -> bool {
        self.started.elapsed().as_secs_f64() < self.faults.slow_start_s
    }

    /// Asks the actor for its stats; `None` when the engine is gone.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(Command::Snapshot { reply: tx }).ok()?;
        rx.await.ok()
    }
}

type Shared = Arc<EngineShared>;

/// The router of one engine.
pub(crate) fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/health", get(health))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/metrics", get(metrics_handler))
        // vLLM serves prometheus_client's own app below `/metrics/`, which honours `name[]`.
        .route("/metrics/", get(narrowed_metrics_handler))
        .with_state(shared)
}

/// An OpenAI-shaped error, rendered as vLLM renders it:
/// `{"error": {"message", "type", "param": null, "code": <status>}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        };
        let body = json!({
            "error": {
                "message": self.message,
                "type": kind,
                "param": null,
                "code": self.status.as_u16(),
            }
        });
        (self.status, axum::Json(body)).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    error(StatusCode::BAD_REQUEST, message)
}

type ApiResult<T> = Result<T, ApiError>;

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

impl RawMessage {
    fn text(&self) -> ApiResult<String> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        ("text", None) => return Err(bad("text content part without `text`")),
                        (other, _) => {
                            return Err(bad(format!(
                                "content part type {other:?} is not supported by the simulator"
                            )));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<RawMessage>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    common: GenerationFields,
}

/// Fields chat and completion requests share, handled identically by [`run_job`].
#[derive(Deserialize)]
struct GenerationFields {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    cache_salt: Option<String>,
    #[serde(default)]
    kv_transfer_params: Option<Value>,
    #[serde(flatten)]
    bootstrap: pd::Bootstrap,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenBatch(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(flatten)]
    common: GenerationFields,
}

#[derive(Deserialize)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<RawMessage>>,
}

/// Resolves `model` to the adapter it names (`None` = the base model), or a 404.
fn resolve_model(s: &EngineShared, model: Option<&str>) -> ApiResult<Option<String>> {
    match model {
        None => Ok(None),
        Some(m) if m == s.model => Ok(None),
        Some(m) if s.adapters.iter().any(|a| a == m) => Ok(Some(m.to_owned())),
        Some(m) => Err(error(
            StatusCode::NOT_FOUND,
            format!("The model `{m}` does not exist."),
        )),
    }
}

fn encode(s: &EngineShared, text: &str) -> ApiResult<Vec<u32>> {
    s.tokenizer
        .encode(text)
        .map_err(|e| bad(format!("tokenization failed: {e}")))
}

fn render_messages(s: &EngineShared, messages: &[RawMessage]) -> ApiResult<Vec<u32>> {
    if messages.is_empty() {
        return Err(bad("`messages` must not be empty"));
    }
    let texts = messages
        .iter()
        .map(RawMessage::text)
        .collect::<Result<Vec<_>, _>>()?;
    let msgs: Vec<ChatMessage<'_>> = messages
        .iter()
        .zip(&texts)
        .map(|(m, t)| ChatMessage {
            role: &m.role,
            content: t,
        })
        .collect();
    encode(s, &render_chat(&msgs))
}

fn too_long(max_model_len: usize, prompt: usize, max_tokens: u64) -> ApiError {
    bad(format!(
        "This model's maximum context length is {max_model_len} tokens. However, you requested \
         {} tokens ({prompt} in the messages, {max_tokens} in the completion). Please reduce the \
         length of the messages or completion.",
        prompt as u64 + max_tokens
    ))
}

fn check_max_tokens(v: Option<i64>) -> ApiResult<Option<u32>> {
    match v {
        None => Ok(None),
        Some(n) if n < 1 => Err(bad(format!("max_tokens must be at least 1, got {n}."))),
        Some(n) => Ok(Some(u32::try_from(n).unwrap_or(u32::MAX))),
    }
}

/// During a slow start every API route answers 503, before even reading the body.
fn ready(s: &EngineShared) -> ApiResult<()> {
    if s.starting() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is still starting",
        ));
    }
    Ok(())
}

/// Fault checks every valid inference request passes before it reaches the engine.
async fn admit_faults(s: &EngineShared) -> ApiResult<()> {
    let n = s.requests_seen.fetch_add(1, Ordering::Relaxed);
    if let Some(limit) = s.faults.crash_after_requests
        && n >= limit
    {
        // Crash like a pod: the accept loop drops this connection (and every other one) the
        // moment the token fires; this handler never answers.
        s.crash.cancel();
        std::future::pending::<()>().await;
    }
    if s.faults.error_rate > 0.0
        && uniform(s.fault_seed, s.index, DrawKind::Error, n) < s.faults.error_rate
    {
        let status = StatusCode::from_u16(s.faults.error_status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(error(status, "injected fault"));
    }
    if s.faults.added_latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(s.faults.added_latency_ms)).await;
    }
    Ok(())
}

/// Aborts the request in the engine if the response is dropped before it finished (client
/// disconnect).
struct AbortGuard {
    id: u64,
    cmd: mpsc::UnboundedSender<Command>,
    done: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cmd.send(Command::Abort { id: self.id });
        }
    }
}

/// A request admitted to the engine.
struct Admitted {
    rx: mpsc::UnboundedReceiver<Output>,
    guard: AbortGuard,
    prompt_tokens: usize,
}

async fn submit(
    s: &EngineShared,
    prompt_tokens: Vec<u32>,
    max_tokens: u32,
    lora_name: Option<String>,
    cache_salt: Option<String>,
    mode: SubmitMode,
) -> ApiResult<Admitted> {
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let n_prompt = prompt_tokens.len();
    let (tx, rx) = mpsc::unbounded_channel();
    let (atx, arx) = oneshot::channel();
    let req = EngineRequest {
        id,
        prompt_tokens,
        max_tokens,
        lora_name,
        cache_salt,
        block_hashes: None,
    };
    let gone = || error(StatusCode::SERVICE_UNAVAILABLE, "the engine is not running");
    s.cmd
        .send(Command::Submit {
            req,
            mode,
            outputs: tx,
            admitted: atx,
        })
        .map_err(|_| gone())?;
    match arx.await {
        Err(_) => Err(gone()),
        Ok(Err(EngineError::TooLong {
            prompt_tokens,
            max_tokens,
            max_model_len,
            ..
        })) => Err(too_long(
            max_model_len,
            prompt_tokens,
            u64::from(max_tokens),
        )),
        Ok(Err(e)) => Err(bad(e.to_string())),
        Ok(Ok(())) => Ok(Admitted {
            rx,
            guard: AbortGuard {
                id,
                cmd: s.cmd.clone(),
                done: false,
            },
            prompt_tokens: n_prompt,
        }),
    }
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::Error => "error",
    }
}

/// Whether a usage object goes into a streamed chunk (vLLM drops its `None` fields there) or a
/// full response (where they are `null`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum UsageIn {
    Stream,
    Response,
}

impl Job {
    fn usage(&self, prompt_tokens: usize, u: &Usage, within: UsageIn) -> Value {
        let mut v = json!({
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens as u64 + u64::from(u.completion_tokens),
            "completion_tokens": u.completion_tokens,
        });
        let mut details = Value::Null;
        if let Some(block_size) = self.details_block_size {
            details = json!({ "cached_tokens": u.cached_tokens });
            // `PrefillStats.finalize`: prompt tokens in full blocks, minus those that hit; a
            // block size of 0 stands for prefix caching off (nothing is ever cached).
            let created = (self.api == Api::Chat).then(|| {
                let cacheable = prompt_tokens
                    .checked_div(block_size)
                    .map_or(0, |blocks| blocks * block_size);
                cacheable.saturating_sub(u.cached_tokens as usize)
            });
            if within == UsageIn::Response {
                details["created_cache_tokens"] = json!(created);
                details["multimodal_tokens"] = Value::Null;
            } else if let Some(c) = created {
                details["created_cache_tokens"] = json!(c);
            }
        }
        if within == UsageIn::Response {
            v["prompt_tokens_details"] = details;
            v["completion_tokens_details"] = Value::Null;
        } else if !details.is_null() {
            v["prompt_tokens_details"] = details;
        }
        v
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

/// What a response needs besides the engine outputs.
struct Job {
    api: Api,
    /// Set when the request is admitted (from the engine request id).
    id: String,
    created: u64,
    model: String,
    words: Arc<HashMap<u32, String>>,
    /// The answer's `kv_transfer_params` (`null` unless this is a vLLM prefill leg).
    kv_transfer_params: Option<Value>,
    /// A vLLM prefill leg's held blocks, which become `kv_transfer_params` at the finish.
    hold: Option<oneshot::Receiver<KvHold>>,
    /// The engine's block size (0 with prefix caching off) when usage reports
    /// `prompt_tokens_details` (`--enable-prompt-tokens-details`); `None` when it does not.
    details_block_size: Option<usize>,
}

impl Job {
    fn word(&self, token: u32) -> &str {
        self.words.get(&token).map_or("", String::as_str)
    }

    fn chunk(&self, choices: Value) -> Value {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn content_chunk(&self, text: &str, finish: Option<&str>) -> Value {
        let choice = match self.api {
            Api::Chat => json!({
                "index": 0,
                "delta": {"content": text},
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
            }),
            Api::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
            }),
        };
        self.chunk(json!([choice]))
    }

    fn role_chunk(&self) -> Value {
        self.chunk(json!([{
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        }]))
    }

    fn full_response(&self, text: &str, finish: &str, usage: Value) -> Value {
        let choice = match self.api {
            Api::Chat => json!({
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": null,
                    "annotations": null,
                    "audio": null,
                    "function_call": null,
                    "tool_calls": [],
                    "reasoning_content": null,
                },
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
            }),
            Api::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
                "prompt_logprobs": null,
            }),
        };
        let object = match self.api {
            Api::Chat => "chat.completion",
            Api::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
            "prompt_logprobs": null,
            "kv_transfer_params": self.kv_transfer_params,
        })
    }
}

fn sse(v: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut *out, v).expect("serializing a JSON value cannot fail");
    out.extend_from_slice(b"\n\n");
}

/// vLLM's answer to a request that finished with an error (a failed KV load): its serving
/// layer raises `GenerationError`, a 500.
fn generation_error() -> ApiError {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal server error: the request's KV cache could not be loaded",
    )
}

async fn respond_full(mut job: Job, mut a: Admitted, s: &EngineShared) -> ApiResult<Response> {
    let mut text = String::new();
    while let Some(o) = a.rx.recv().await {
        match o {
            Output::Token { token, .. } => text.push_str(job.word(token)),
            Output::Finished { reason, usage, .. } => {
                a.guard.done = true;
                if reason == FinishReason::Error {
                    return Err(generation_error());
                }
                // Sent before the finish, so it is there now if the blocks are held.
                if let Some(hold) = job.hold.take().and_then(|mut h| h.try_recv().ok()) {
                    job.kv_transfer_params = Some(pd::transfer_params(s, &job.id, &hold));
                }
                let body = job.full_response(
                    &text,
                    finish_str(reason),
                    job.usage(a.prompt_tokens, &usage, UsageIn::Response),
                );
                return Ok(axum::Json(body).into_response());
            }
        }
    }
    a.guard.done = true;
    Err(error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine stopped while serving the request",
    ))
}

struct StreamState {
    job: Job,
    a: Admitted,
    include_usage: bool,
    first: bool,
    /// The token whose chunk is being written (with the finish reason if its step ended).
    pending: Option<u32>,
    /// An output taken from the engine ahead of its turn.
    held: Option<Output>,
    done: bool,
}

async fn next_sse(mut st: StreamState) -> Option<(Result<Bytes, std::io::Error>, StreamState)> {
    if st.done {
        return None;
    }
    let mut buf = Vec::new();
    loop {
        let next = match st.held.take() {
            Some(o) => Some(o),
            None => st.a.rx.recv().await,
        };
        match next {
            Some(Output::Token { token, .. }) => {
                if st.first && st.job.api == Api::Chat {
                    sse(&st.job.role_chunk(), &mut buf);
                }
                st.first = false;
                // vLLM sends each token's text as soon as it exists, the finish reason on the
                // last one's chunk (both known in the same step). The engine hands a step's
                // outputs over together, so a finish of this step is already queued; holding
                // every token back for the next one (as this did) delayed a completion's first
                // text by a decode step. (Taken by the next turn of this loop.)
                st.pending = Some(token);
                if let Ok(next) = st.a.rx.try_recv() {
                    let finished = matches!(next, Output::Finished { .. });
                    st.held = Some(next);
                    if finished {
                        continue;
                    }
                }
                if let Some(t) = st.pending.take() {
                    sse(&st.job.content_chunk(st.job.word(t), None), &mut buf);
                }
                return Some((Ok(Bytes::from(buf)), st));
            }
            Some(Output::Finished { reason, usage, .. }) => {
                st.a.guard.done = true;
                st.done = true;
                if reason == FinishReason::Error {
                    // vLLM streams the error as one more event, then ends the stream.
                    let e = generation_error();
                    let body = json!({"error": {"message": e.message, "type":
                        "InternalServerError", "param": null, "code": e.status.as_u16()}});
                    sse(&body, &mut buf);
                    buf.extend_from_slice(b"data: [DONE]\n\n");
                    return Some((Ok(Bytes::from(buf)), st));
                }
                if st.first && st.job.api == Api::Chat {
                    sse(&st.job.role_chunk(), &mut buf);
                }
                let last = st.pending.take().map_or("", |t| st.job.word(t));
                sse(
                    &st.job.content_chunk(last, Some(finish_str(reason))),
                    &mut buf,
                );
                if st.include_usage {
                    let mut c = st.job.chunk(json!([]));
                    c["usage"] = st.job.usage(st.a.prompt_tokens, &usage, UsageIn::Stream);
                    sse(&c, &mut buf);
                }
                buf.extend_from_slice(b"data: [DONE]\n\n");
                return Some((Ok(Bytes::from(buf)), st));
            }
            None => {
                // The engine died mid-stream: end the body with an error so the client sees a
                // truncated stream, not a clean end.
                st.a.guard.done = true;
                st.done = true;
                return Some((Err(std::io::Error::other("engine stopped mid-stream")), st));
            }
        }
    }
}

fn respond_stream(job: Job, a: Admitted, include_usage: bool) -> Response {
    let st = StreamState {
        job,
        a,
        include_usage,
        first: true,
        pending: None,
        held: None,
        done: false,
    };
    let body = Body::from_stream(futures::stream::unfold(st, next_sse));
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    r
}

fn include_usage(o: Option<StreamOptions>) -> bool {
    o.and_then(|o| o.include_usage).unwrap_or(false)
}

async fn chat(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    ready(&s)?;
    let req: ChatRequest = parse(&body)?;
    let lora = resolve_model(&s, req.common.model.as_deref())?;
    let tokens = render_messages(&s, &req.messages)?;
    let asked = check_max_tokens(req.max_completion_tokens.or(req.max_tokens))?;
    let max_len = s.config.max_model_len;
    if tokens.len() >= max_len {
        return Err(too_long(
            max_len,
            tokens.len(),
            u64::from(asked.unwrap_or(1)),
        ));
    }
    let room = u32::try_from(max_len - tokens.len()).unwrap_or(u32::MAX);
    let max_tokens = asked.unwrap_or(room.min(DEFAULT_CHAT_MAX_TOKENS));
    run_job(&s, Api::Chat, req.common, tokens, max_tokens, lora).await
}

async fn completions(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    ready(&s)?;
    let req: CompletionRequest = parse(&body)?;
    let lora = resolve_model(&s, req.common.model.as_deref())?;
    let tokens = match req.prompt {
        Prompt::Text(t) => encode(&s, &t)?,
        Prompt::Tokens(t) => t,
        Prompt::Texts(mut v) if v.len() == 1 => encode(&s, &v.remove(0))?,
        Prompt::TokenBatch(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Texts(_) | Prompt::TokenBatch(_) => {
            return Err(bad(
                "batched prompts are not supported by the simulator: send one prompt per request",
            ));
        }
    };
    if tokens.is_empty() {
        return Err(bad("The prompt cannot be empty."));
    }
    let max_tokens = check_max_tokens(req.max_tokens)?.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS);
    let max_len = s.config.max_model_len;
    if tokens.len() + max_tokens as usize > max_len {
        return Err(too_long(max_len, tokens.len(), u64::from(max_tokens)));
    }
    run_job(&s, Api::Completion, req.common, tokens, max_tokens, lora).await
}

async fn run_job(
    s: &Shared,
    api: Api,
    fields: GenerationFields,
    tokens: Vec<u32>,
    mut max_tokens: u32,
    lora: Option<String>,
) -> ApiResult<Response> {
    admit_faults(s).await?;
    let plan = pd::plan(
        s.role,
        fields.kv_transfer_params.as_ref(),
        &fields.bootstrap,
    );
    let (mode, hold, load) = match &plan {
        Plan::Whole => (SubmitMode::Local, None, None),
        Plan::NixlPrefill | Plan::BootstrapPrefill { .. } => {
            let (tx, rx) = oneshot::channel();
            (SubmitMode::RemoteDecode { hold: tx }, Some(rx), None)
        }
        Plan::NixlDecode(_) | Plan::BootstrapDecode { .. } => {
            let (tx, rx) = oneshot::channel();
            (SubmitMode::RemotePrefill { load: tx }, None, Some(rx))
        }
    };
    if let Plan::BootstrapPrefill { .. } = plan {
        // An SGLang prefill server computes the prompt and the first token only.
        max_tokens = 1;
    }
    let a = submit(s, tokens, max_tokens, lora, fields.cache_salt, mode).await?;
    let mut hold = hold;
    match (&plan, load) {
        (Plan::BootstrapPrefill { room }, _) => {
            pd::publish_room(s, *room, hold.take().expect("a prefill leg holds"));
        }
        (_, Some(load)) => pd::spawn_pull(s, a.guard.id, plan.clone(), load),
        _ => {}
    }
    let prefix = match api {
        Api::Chat => "chatcmpl",
        Api::Completion => "cmpl",
    };
    let job = Job {
        api,
        id: format!("{prefix}-{}-{:016x}", s.index, a.guard.id),
        created: unix_now_s(),
        model: fields.model.unwrap_or_else(|| s.model.clone()),
        words: s.words.clone(),
        kv_transfer_params: None,
        hold,
        details_block_size: s
            .prompt_tokens_details
            .then_some(if s.config.enable_prefix_caching {
                s.config.block_size
            } else {
                0
            }),
    };
    if fields.stream.unwrap_or(false) {
        Ok(respond_stream(job, a, include_usage(fields.stream_options)))
    } else {
        respond_full(job, a, s).await
    }
}

async fn models(State(s): State<Shared>) -> ApiResult<Response> {
    ready(&s)?;
    let max_len = s.config.max_model_len;
    let card = |id: &str, root: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": s.created_unix_s,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": max_len,
            "permission": [],
        })
    };
    let data: Vec<Value> = std::iter::once(card(&s.model, &s.model, None))
        .chain(s.adapters.iter().map(|a| {
            let path = s
                .config
                .lora_paths
                .get(a)
                .map_or(a.as_str(), String::as_str);
            card(a, path, Some(&s.model))
        }))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn tokenize(State(s): State<Shared>, body: Bytes) -> ApiResult<Response> {
    ready(&s)?;
    let req: TokenizeRequest = parse(&body)?;
    resolve_model(&s, req.model.as_deref())?;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(p), None) => encode(&s, p)?,
        (None, Some(m)) => render_messages(&s, m)?,
        _ => return Err(bad("exactly one of `prompt` or `messages` is required")),
    };
    Ok(axum::Json(json!({
        "count": tokens.len(),
        "max_model_len": s.config.max_model_len,
        "tokens": tokens,
        "token_strs": null,
    }))
    .into_response())
}

/// FastAPI's reading of a boolean query parameter.
fn query_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Some(true),
        "false" | "0" | "no" | "off" | "f" | "n" => Some(false),
        _ => None,
    }
}

async fn reset_prefix_cache(
    State(s): State<Shared>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let mut reset_running_requests = false;
    for pair in query.as_deref().unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "reset_running_requests" | "reset_external" => {
                let b = query_bool(v)
                    .ok_or_else(|| bad(format!("query parameter {k}: {v:?} is not a boolean")))?;
                if k == "reset_running_requests" {
                    reset_running_requests = b;
                }
            }
            _ => {}
        }
    }
    let (tx, rx) = oneshot::channel();
    let gone = || error(StatusCode::SERVICE_UNAVAILABLE, "the engine is not running");
    s.cmd
        .send(Command::ResetPrefixCache {
            reset_running_requests,
            reply: tx,
        })
        .map_err(|_| gone())?;
    let success = rx.await.map_err(|_| gone())?;
    Ok(axum::Json(json!({ "success": success })).into_response())
}

async fn health(State(s): State<Shared>) -> Response {
    if s.starting() || s.draining.load(std::sync::atomic::Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn metrics_handler(State(s): State<Shared>) -> ApiResult<Response> {
    metrics_page(&s, &[]).await
}

/// `/metrics/?name[]=…`: the page restricted to the named samples, as vLLM's
/// `prometheus_client` app restricts it (all of it when no name is given).
async fn narrowed_metrics_handler(
    State(s): State<Shared>,
    axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>,
) -> ApiResult<Response> {
    let names: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "name[]")
        .map(|(_, v)| v.as_str())
        .collect();
    metrics_page(&s, &names).await
}

/// The metrics page, restricted to `names` unless empty.
async fn metrics_page(s: &Shared, names: &[&str]) -> ApiResult<Response> {
    s.metrics_requests.fetch_add(1, Ordering::Relaxed);
    if s.faults.metrics_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(s.faults.metrics_delay_ms)).await;
    }
    if s.faults.metrics_unavailable {
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics unavailable (injected)",
        ));
    }
    let Some(snap) = s.snapshot().await else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is not running",
        ));
    };
    let mut text = metrics::render(s, &snap);
    if !names.is_empty() {
        text = metrics::restrict(&text, names);
    }
    let mut r = Response::new(Body::from(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}
