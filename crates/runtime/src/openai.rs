//! OpenAI request parsing and validation, and the OpenAI error shape.
//!
//! The gateway forwards the client's body bytes unchanged (so engines see exactly what the client
//! sent and streams stay byte-for-byte); it parses only what routing needs: the model, the prompt
//! (to tokenise and hash), the output limit, `stream` and `stream_options.include_usage`, and
//! `cache_salt`. Validation rejects what every OpenAI server would reject (not JSON, not an
//! object, missing or mistyped `model`, `messages`, `prompt`, `input`) so that a bad request costs
//! one JSON parse and never reaches an engine; anything subtler (sampling parameters, tool
//! schemas) is left for the engine to judge, whose error is passed through as is.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvgate_core::RouteError;
use serde_json::Value;

/// Which OpenAI API a request addresses; decided by the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/messages` (Anthropic Messages, as vLLM serves it: see [`crate::anthropic`]).
    Messages,
}

impl ApiKind {
    /// The upstream path of this API.
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
            Self::Messages => "/v1/messages",
        }
    }

    /// The API for a request path (`/v1/...`, as Envoy's `:path`), ignoring any query string.
    /// Matched exactly, as `kvgate serve`'s routes are: `/x/v1/chat/completions` is not the
    /// chat API, whatever its suffix.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split('?').next().unwrap_or(path);
        [
            Self::Chat,
            Self::Completions,
            Self::Embeddings,
            Self::Responses,
            Self::Messages,
        ]
        .into_iter()
        .find(|k| path == k.path())
    }

    /// Short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Messages => "messages",
        }
    }
}

/// One chat message, reduced to what the chat template reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// Text content (text parts concatenated; non-text parts skipped).
    pub content: String,
}

/// What the prompt of a request is, as routing needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Chat messages, to be rendered with the chat template.
    Messages(Vec<Message>),
    /// Plain text (completions, embeddings, responses).
    Text(String),
    /// Token ids given by the client (completions, embeddings).
    Tokens(Vec<u32>),
}

/// The parts of an OpenAI request body that routing uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedRequest {
    /// Which API.
    pub api: ApiKind,
    /// `model` as sent: a base model or a LoRA adapter name.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// `max_completion_tokens`, else `max_tokens` (`max_output_tokens` for responses).
    pub max_tokens: Option<u32>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// vLLM's `cache_salt` (isolates prefix-cache entries; part of the first block's hash).
    pub cache_salt: Option<String>,
    /// Sequences generated side by side: `n` (chat, completions) times the prompts of a
    /// completions batch. Usage counts the tokens of all of them, so a token's time is measured
    /// per sequence ([`crate::meter::ResponseMeter::with_sequences`]).
    pub sequences: u32,
    /// The whole body of a chat request, for rendering with the model's own template
    /// (`messages` as sent, `tools`, `chat_template_kwargs`, …); for a Messages request, the
    /// chat body vLLM converts it to.
    pub chat_body: Option<std::sync::Arc<Value>>,
}

/// `Retry-After` (seconds) on a 429 that carries none, from either data plane: a shed request
/// is one that arrived while every endpoint was saturated, which lasts about as long as a few
/// decode batches drain (a second or so), and a whole second keeps a retrying client from
/// adding to the overload.
pub const SHED_RETRY_AFTER_S: u32 = 1;

/// A request the gateway refuses or could not serve, rendered in the OpenAI error shape
/// `{"error": {"message", "type", "param", "code"}}` with the HTTP status as `code`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable explanation.
    pub message: String,
    /// The offending request field, if one is to blame.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// An error with no `param`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// A 400 blaming `param`.
    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param),
        }
    }

    /// The OpenAI `type` for this status (the names the OpenAI SDKs map statuses to).
    pub fn error_type(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::PAYLOAD_TOO_LARGE => "RequestTooLargeError",
            StatusCode::REQUEST_TIMEOUT => "RequestTimeoutError",
            StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            StatusCode::BAD_GATEWAY => "BadGatewayError",
            _ => "InternalServerError",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.error_type(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }

    /// The body as one SSE event (`data: {...}\n\n`), for errors after a stream has started.
    pub fn sse_event(&self) -> Vec<u8> {
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(self.body().to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
        out
    }
}

/// How a routing refusal reads to an OpenAI client, the same through `kvgate serve` and
/// `kvgate epp`: an unknown model is the client's mistake (404 on `model`), no usable endpoint is
/// the service's (503), load shedding asks the client to back off (429).
impl From<&RouteError> for ApiError {
    fn from(e: &RouteError) -> Self {
        let status = match e {
            RouteError::UnknownModel { .. } => StatusCode::NOT_FOUND,
            RouteError::NoEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
            RouteError::Shed { .. } => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: e.to_string(),
            param: matches!(e, RouteError::UnknownModel { .. }).then_some("model"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn optional_u32(
    obj: &serde_json::Map<String, Value>,
    key: &'static str,
) -> Result<Option<u32>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(u32::try_from(v).unwrap_or(u32::MAX))),
            None => Err(ApiError::bad_param(
                key,
                format!("`{key}` must be a non-negative integer, got {n}"),
            )),
        },
        Some(other) => Err(ApiError::bad_param(
            key,
            format!("`{key}` must be an integer, got {}", type_name(other)),
        )),
    }
}

fn optional_bool(
    obj: &serde_json::Map<String, Value>,
    key: &'static str,
) -> Result<bool, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad_param(
            key,
            format!("`{key}` must be a boolean, got {}", type_name(other)),
        )),
    }
}

/// Text of a message `content`: a string, or an array of parts whose `text` parts are joined.
fn content_text(v: &Value, param: &'static str) -> Result<String, ApiError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match p {
                    Value::Object(o) => {
                        if let Some(Value::String(t)) = o.get("text") {
                            out.push_str(t);
                        }
                    }
                    Value::String(s) => out.push_str(s),
                    other => {
                        return Err(ApiError::bad_param(
                            param,
                            format!("content parts must be objects, got {}", type_name(other)),
                        ));
                    }
                }
            }
            Ok(out)
        }
        other => Err(ApiError::bad_param(
            param,
            format!(
                "`content` must be a string or an array, got {}",
                type_name(other)
            ),
        )),
    }
}

fn messages(v: &Value, param: &'static str) -> Result<Vec<Message>, ApiError> {
    let Value::Array(items) = v else {
        return Err(ApiError::bad_param(
            param,
            format!("`{param}` must be an array, got {}", type_name(v)),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for m in items {
        let Value::Object(o) = m else {
            return Err(ApiError::bad_param(
                param,
                format!("each message must be an object, got {}", type_name(m)),
            ));
        };
        let role = match o.get("role") {
            Some(Value::String(r)) => r.clone(),
            // The Responses API allows items without a role (e.g. function-call outputs).
            None if param == "input" => String::from("user"),
            _ => {
                return Err(ApiError::bad_param(
                    param,
                    "each message needs a string `role`",
                ));
            }
        };
        let content = content_text(o.get("content").unwrap_or(&Value::Null), param)?;
        out.push(Message { role, content });
    }
    Ok(out)
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

/// A completions `prompt` or embeddings `input`: string, array of strings, token ids, or an
/// array of token-id arrays. Batches are routed by their first element (one engine serves the
/// whole batch, and batch members usually share a prefix).
fn text_or_tokens(v: &Value, param: &'static str) -> Result<Prompt, ApiError> {
    let bad = |what: &str| ApiError::bad_param(param, format!("`{param}` {what}"));
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(items) if items.is_empty() => Err(bad("must not be empty")),
        Value::Array(items) => match &items[0] {
            Value::String(_) => {
                let mut texts = items.iter().map(Value::as_str);
                let first = texts.next().flatten().unwrap_or_default().to_owned();
                if texts.any(|t| t.is_none()) {
                    return Err(bad("must not mix strings and other types"));
                }
                Ok(Prompt::Text(first))
            }
            Value::Number(_) => token_ids(items)
                .map(Prompt::Tokens)
                .ok_or_else(|| bad("token ids must be non-negative 32-bit integers")),
            Value::Array(first) => {
                if items.iter().any(|i| !i.is_array()) {
                    return Err(bad("must not mix token arrays and other types"));
                }
                token_ids(first)
                    .map(Prompt::Tokens)
                    .ok_or_else(|| bad("token ids must be non-negative 32-bit integers"))
            }
            other => Err(bad(&format!(
                "must be a string or an array of strings or token ids, got an array of {}",
                type_name(other)
            ))),
        },
        other => Err(bad(&format!(
            "must be a string or an array, got {}",
            type_name(other)
        ))),
    }
}

/// Most JSON values a request body may hold: a prompt of a million token ids, or any real
/// chat request. The body's byte limit does not bound its parsed size: each value is a 72-byte
/// `serde_json::Value` here (`preserve_order`), so 32 MiB of `0,` would take over a gigabyte
/// (and twice that while its array grows) before anything was checked.
pub const MAX_JSON_VALUES: usize = 1 << 20;

/// Refuses a body with more than [`MAX_JSON_VALUES`] JSON values, before it is parsed.
///
/// Hand-written because serde_json has no limit on the values it builds. A body of `n` bytes
/// holds at most about `n / 2` values (one byte and a separator each), so only bodies of more
/// than twice the limit in bytes are scanned; the scan counts, outside strings, the bytes that
/// precede every value but the first (`,`, `[`, `:`), an upper bound of the values.
pub fn check_json_values(body: &[u8]) -> Result<(), ApiError> {
    if body.len() <= 2 * MAX_JSON_VALUES {
        return Ok(());
    }
    let mut values = 1usize;
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b',' | b'[' | b':' => values += 1,
            _ => {}
        }
    }
    if values > MAX_JSON_VALUES {
        tracing::debug!(
            bytes = body.len(),
            values,
            limit = MAX_JSON_VALUES,
            "request body refused: too many JSON values"
        );
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body holds about {values} JSON values, more than the limit of \
                 {MAX_JSON_VALUES}"
            ),
        ));
    }
    Ok(())
}

/// Parses and validates the body of a request to `api`.
pub fn parse_request(api: ApiKind, body: &[u8]) -> Result<ParsedRequest, ApiError> {
    check_json_values(body)?;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    let Value::Object(obj) = &v else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("request body must be a JSON object, got {}", type_name(&v)),
        ));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::bad_param("model", "`model` must not be empty"));
        }
        None | Some(Value::Null) => {
            return Err(ApiError::bad_param(
                "model",
                "missing required field `model`",
            ));
        }
        Some(other) => {
            return Err(ApiError::bad_param(
                "model",
                format!("`model` must be a string, got {}", type_name(other)),
            ));
        }
    };
    let required = |key: &'static str| {
        obj.get(key)
            .filter(|v| !v.is_null())
            .ok_or_else(|| ApiError::bad_param(key, format!("missing required field `{key}`")))
    };
    let mut chat_body = None;
    let prompt = match api {
        ApiKind::Chat => {
            let m = messages(required("messages")?, "messages")?;
            if m.is_empty() {
                return Err(ApiError::bad_param(
                    "messages",
                    "`messages` must not be empty",
                ));
            }
            Prompt::Messages(m)
        }
        ApiKind::Completions => text_or_tokens(required("prompt")?, "prompt")?,
        ApiKind::Embeddings => text_or_tokens(required("input")?, "input")?,
        ApiKind::Responses => {
            let input = required("input")?;
            let mut msgs = Vec::new();
            if let Some(Value::String(i)) = obj.get("instructions") {
                msgs.push(Message {
                    role: "system".into(),
                    content: i.clone(),
                });
            }
            match input {
                Value::String(s) => msgs.push(Message {
                    role: "user".into(),
                    content: s.clone(),
                }),
                other => msgs.extend(messages(other, "input")?),
            }
            Prompt::Messages(msgs)
        }
        ApiKind::Messages => {
            let m = crate::anthropic::parse_messages(obj)?;
            chat_body = Some(std::sync::Arc::new(m.chat_body));
            Prompt::Messages(m.messages)
        }
    };
    let max_tokens = match api {
        ApiKind::Chat => {
            optional_u32(obj, "max_completion_tokens")?.or(optional_u32(obj, "max_tokens")?)
        }
        ApiKind::Completions => optional_u32(obj, "max_tokens")?,
        ApiKind::Responses => optional_u32(obj, "max_output_tokens")?,
        ApiKind::Embeddings => Some(0),
        // Required by the Messages API (vLLM refuses a request without it).
        ApiKind::Messages => match optional_u32(obj, "max_tokens")? {
            Some(n) if n > 0 => Some(n),
            _ => {
                return Err(ApiError::bad_param(
                    "max_tokens",
                    "`max_tokens` must be a positive integer",
                ));
            }
        },
    };
    let stream = optional_bool(obj, "stream")?;
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => optional_bool(o, "include_usage")?,
        Some(other) => {
            return Err(ApiError::bad_param(
                "stream_options",
                format!(
                    "`stream_options` must be an object, got {}",
                    type_name(other)
                ),
            ));
        }
    };
    let cache_salt = match obj.get("cache_salt") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(ApiError::bad_param(
                "cache_salt",
                format!("`cache_salt` must be a string, got {}", type_name(other)),
            ));
        }
    };
    let sequences = match api {
        ApiKind::Chat | ApiKind::Completions => {
            // A malformed `n` is the engine's to refuse; here it only scales a measurement.
            let n = obj
                .get("n")
                .and_then(Value::as_u64)
                .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX));
            let prompts = match obj.get("prompt") {
                Some(Value::Array(items)) if api == ApiKind::Completions => {
                    if items.iter().all(Value::is_number) {
                        1
                    } else {
                        u32::try_from(items.len()).unwrap_or(u32::MAX)
                    }
                }
                _ => 1,
            };
            n.saturating_mul(prompts).max(1)
        }
        _ => 1,
    };
    if api == ApiKind::Chat {
        chat_body = Some(std::sync::Arc::new(v));
    }
    Ok(ParsedRequest {
        api,
        model,
        prompt,
        max_tokens,
        stream,
        include_usage,
        cache_salt,
        sequences,
        chat_body,
    })
}

/// Usage figures read from a response body or the final SSE usage chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<u32>,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<u32>,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: Option<u32>,
}

/// Reads `usage` from a JSON object (a full response or one stream chunk); `None` if it has none.
pub fn usage_of(json: &[u8]) -> Option<Usage> {
    let [usage] = members(json, ["usage"])?;
    usage_from(usage.as_ref()?.as_object()?)
}

/// The last `"usage":{…}` object in `tail`, the end of a stream whose final event may be too
/// long to keep whole: a Responses stream ends with `response.completed`, which carries the
/// whole response, its `usage` near the end. Occurrences inside JSON strings (after a `\`)
/// are skipped.
pub fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\":";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        if at > 0 && tail[at - 1] == b'\\' {
            continue;
        }
        let rest = &tail[at + KEY.len()..];
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Value>();
        if let Some(Ok(Value::Object(u))) = values.next()
            && let Some(usage) = usage_from(&u)
        {
            return Some(usage);
        }
    }
    None
}

/// [`Usage`] from a `usage` object of any of the APIs.
fn usage_from(u: &serde_json::Map<String, Value>) -> Option<Usage> {
    let num = |v: Option<&Value>| {
        v.and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    // Anthropic Messages usage counts only the uncached part as `input_tokens`, beside
    // `cache_read_input_tokens` and `cache_creation_input_tokens` (vLLM's
    // `_build_anthropic_usage` too); the Responses API's `input_tokens` is the whole prompt,
    // its cached part in `input_tokens_details`.
    let anthropic_cache = ["cache_read_input_tokens", "cache_creation_input_tokens"]
        .iter()
        .filter_map(|k| num(u.get(*k)))
        .reduce(u32::saturating_add);
    let prompt_tokens = match (num(u.get("prompt_tokens")), num(u.get("input_tokens"))) {
        (Some(p), _) => Some(p),
        (None, Some(input)) => Some(input.saturating_add(anthropic_cache.unwrap_or(0))),
        (None, None) => None,
    };
    Some(Usage {
        prompt_tokens,
        completion_tokens: num(u
            .get("completion_tokens")
            .or_else(|| u.get("output_tokens"))),
        cached_tokens: num(u
            .get("prompt_tokens_details")
            .or_else(|| u.get("input_tokens_details"))
            .and_then(|d| d.get("cached_tokens")))
        .or_else(|| num(u.get("cache_read_input_tokens"))),
    })
}

/// Whether `json` is a stream's usage chunk: an object with `choices: []` and a `usage` object
/// (what vLLM sends last when `stream_options.include_usage` is set).
pub fn is_usage_chunk(json: &[u8]) -> bool {
    let Some([choices, usage]) = members(json, ["choices", "usage"]) else {
        return false;
    };
    choices
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && usage.as_ref().is_some_and(Value::is_object)
}

/// The members named `keys` of the JSON object `json`, every other member skipped unbuilt: a
/// non-streaming response's `choices` (content, logprobs) parsed into a [`Value`] only to be
/// dropped cost a quarter of the gateway's CPU for a small request. Same answers as parsing
/// the whole object into a `Value` and looking the keys up (the last of a repeated key); `None`
/// if `json` is not one JSON object.
fn members<const N: usize>(json: &[u8], keys: [&str; N]) -> Option<[Option<Value>; N]> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(json);
    let picked = Members(keys).deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(picked)
}

/// [`members`]' parse.
struct Members<'k, const N: usize>([&'k str; N]);

impl<'de, const N: usize> serde::de::DeserializeSeed<'de> for Members<'_, N> {
    type Value = [Option<Value>; N];
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, const N: usize> serde::de::Visitor<'de> for Members<'_, N> {
    type Value = [Option<Value>; N];
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut picked = [const { None }; N];
        while let Some(at) = map.next_key_seed(KeyIn(&self.0))? {
            match at {
                Some(i) => picked[i] = Some(map.next_value::<Value>()?),
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(picked)
    }
}

/// Which of the keys an object key is, if any (read without allocating).
struct KeyIn<'a, 'k>(&'a [&'k str]);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIn<'_, '_> {
    type Value = Option<usize>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for KeyIn<'_, '_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|k| *k == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(api: ApiKind, body: &str) -> ApiError {
        parse_request(api, body.as_bytes()).unwrap_err()
    }

    /// A body of many tiny values is refused before it is parsed (it would take ~70× its
    /// size), with the OpenAI shape; commas inside strings are text, not values; a prompt of
    /// a million token ids passes.
    #[test]
    fn bodies_of_too_many_json_values_are_refused_unparsed() {
        let ids = |n: usize| vec!["7"; n].join(",");
        let body = format!(r#"{{"model":"m","prompt":[{}]}}"#, ids(MAX_JSON_VALUES + 1));
        let e = err(ApiKind::Completions, &body);
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("JSON values"), "{}", e.message);
        let body = format!(r#"{{"model":"m","prompt":[{}]}}"#, ids(MAX_JSON_VALUES - 8));
        let p = parse_request(ApiKind::Completions, body.as_bytes()).unwrap();
        assert!(matches!(p.prompt, Prompt::Tokens(t) if t.len() == MAX_JSON_VALUES - 8));
        let text = format!(r#"{{"model":"m","prompt":"{}\" ,,"}}"#, ",".repeat(3 << 20));
        assert!(parse_request(ApiKind::Completions, text.as_bytes()).is_ok());
    }

    #[test]
    fn sequences_count_choices_and_batched_prompts() {
        let seq = |api, body: &str| parse_request(api, body.as_bytes()).unwrap().sequences;
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(seq(ApiKind::Chat, &format!("{chat}}}")), 1);
        assert_eq!(seq(ApiKind::Chat, &format!(r#"{chat},"n":3}}"#)), 3);
        assert_eq!(seq(ApiKind::Chat, &format!(r#"{chat},"n":"x"}}"#)), 1);
        let c = |prompt: &str, n: &str| format!(r#"{{"model":"m","prompt":{prompt}{n}}}"#);
        assert_eq!(seq(ApiKind::Completions, &c(r#""a""#, "")), 1);
        assert_eq!(seq(ApiKind::Completions, &c("[1,2,3]", "")), 1);
        assert_eq!(
            seq(ApiKind::Completions, &c(r#"["a","b"]"#, r#","n":2"#)),
            4
        );
        assert_eq!(seq(ApiKind::Completions, &c("[[1],[2],[3]]", "")), 3);
    }

    #[test]
    fn paths_were_matched_by_suffix() {
        assert_eq!(
            ApiKind::from_path("/v1/chat/completions"),
            Some(ApiKind::Chat)
        );
        assert_eq!(
            ApiKind::from_path("/v1/completions?x=1"),
            Some(ApiKind::Completions)
        );
        for other in [
            "/x/v1/chat/completions",
            "/v2/v1/completions",
            "/v1/chat/completions/",
            "/v1/chat",
        ] {
            assert_eq!(ApiKind::from_path(other), None, "{other}");
        }
    }

    #[test]
    fn chat_request_parses() {
        let r = parse_request(
            ApiKind::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"cache_salt":"s"}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(
            r.prompt,
            Prompt::Messages(vec![Message {
                role: "user".into(),
                content: "hi".into()
            }])
        );
        assert!(r.stream && r.include_usage);
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.cache_salt.as_deref(), Some("s"));
    }

    #[test]
    fn bad_inputs_are_400_with_param() {
        assert_eq!(
            err(ApiKind::Chat, "{not json").status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(err(ApiKind::Chat, "[1]").param, None);
        assert_eq!(
            err(ApiKind::Chat, r#"{"messages":[]}"#).param,
            Some("model")
        );
        assert_eq!(
            err(ApiKind::Chat, r#"{"model":3,"messages":[]}"#).param,
            Some("model")
        );
        assert_eq!(
            err(ApiKind::Chat, r#"{"model":"m"}"#).param,
            Some("messages")
        );
        assert_eq!(
            err(ApiKind::Chat, r#"{"model":"m","messages":"x"}"#).param,
            Some("messages")
        );
        assert_eq!(
            err(ApiKind::Completions, r#"{"model":"m"}"#).param,
            Some("prompt")
        );
        assert_eq!(
            err(ApiKind::Completions, r#"{"model":"m","prompt":5}"#).param,
            Some("prompt")
        );
        assert_eq!(
            err(
                ApiKind::Completions,
                r#"{"model":"m","prompt":"x","max_tokens":"a"}"#
            )
            .param,
            Some("max_tokens")
        );
        assert_eq!(
            err(
                ApiKind::Completions,
                r#"{"model":"m","prompt":"x","stream":"yes"}"#
            )
            .param,
            Some("stream")
        );
        assert_eq!(
            err(ApiKind::Embeddings, r#"{"model":"m"}"#).param,
            Some("input")
        );
    }

    #[test]
    fn completions_prompt_shapes() {
        let p = |s: &str| {
            parse_request(ApiKind::Completions, s.as_bytes())
                .unwrap()
                .prompt
        };
        assert_eq!(p(r#"{"model":"m","prompt":"a"}"#), Prompt::Text("a".into()));
        assert_eq!(
            p(r#"{"model":"m","prompt":["a","b"]}"#),
            Prompt::Text("a".into())
        );
        assert_eq!(
            p(r#"{"model":"m","prompt":[1,2]}"#),
            Prompt::Tokens(vec![1, 2])
        );
        assert_eq!(
            p(r#"{"model":"m","prompt":[[3],[4]]}"#),
            Prompt::Tokens(vec![3])
        );
    }

    #[test]
    fn error_shape_is_openai() {
        let e = ApiError::bad_param("model", "x");
        let b = e.body();
        assert_eq!(b["error"]["code"], 400);
        assert_eq!(b["error"]["param"], "model");
        assert_eq!(b["error"]["type"], "BadRequestError");
        assert!(e.sse_event().starts_with(b"data: {"));
    }

    #[test]
    fn usage_is_read_from_chunks() {
        let u = usage_of(
            br#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}"#,
        )
        .unwrap();
        assert_eq!(u.cached_tokens, Some(8));
        assert_eq!(u.completion_tokens, Some(3));
        assert!(usage_of(br#"{"choices":[],"usage":null}"#).is_none());
        // As a `Value` lookup would answer: the last `usage` wins, escaped keys are keys,
        // anything but an object (or not JSON) has no usage.
        let last = usage_of(
            br#"{"usage":{"prompt_tokens":1},"choices":[{"text":"a\"b","logprobs":null}],"us\u0061ge":{"prompt_tokens":2}}"#,
        )
        .unwrap();
        assert_eq!(last.prompt_tokens, Some(2));
        let chunk = |t: &str| is_usage_chunk(t.as_bytes());
        assert!(chunk(
            r#"{"id":"x","choices":[],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(chunk(r#"{"choices":[1],"usage":{},"choices":[]}"#));
        assert!(!chunk(r#"{"choices":[],"usage":{},"choices":[1]}"#));
        assert!(!chunk(r#"{"choices":[],"usage":null}"#));
        assert!(!chunk(r#"{"choices":{},"usage":{}}"#));
        assert!(!chunk(r#"{"usage":{}}"#));
        assert!(!chunk(r#"[{"choices":[],"usage":{}}]"#));
        assert!(!chunk(r#"{"choices":[],"usage":{}"#));
        for none in [
            &br#"[{"usage":{"prompt_tokens":1}}]"#[..],
            br#"{"usage":{"prompt_tokens":1}"#,
            br#"{"usage":{"prompt_tokens":1}} x"#,
            br#"{"usage":[1]}"#,
            br#"{"choices":[]}"#,
            b"7",
        ] {
            assert!(
                usage_of(none).is_none(),
                "{}",
                String::from_utf8_lossy(none)
            );
        }
        // Anthropic's input_tokens is the uncached part (vLLM's `_build_anthropic_usage`:
        // prompt − cache read − cache creation): the prompt is their sum.
        let anthropic = usage_of(
            br#"{"type":"message_delta","usage":{"input_tokens":4,"output_tokens":2,"cache_read_input_tokens":8}}"#,
        )
        .unwrap();
        assert_eq!(
            (
                anthropic.prompt_tokens,
                anthropic.completion_tokens,
                anthropic.cached_tokens
            ),
            (Some(12), Some(2), Some(8))
        );
        let created = usage_of(
            br#"{"usage":{"input_tokens":4,"output_tokens":2,"cache_read_input_tokens":0,"cache_creation_input_tokens":5}}"#,
        )
        .unwrap();
        assert_eq!(created.prompt_tokens, Some(9));
        // The Responses API's input_tokens is the whole prompt.
        let responses = usage_of(
            br#"{"usage":{"input_tokens":12,"output_tokens":2,"input_tokens_details":{"cached_tokens":8}}}"#,
        )
        .unwrap();
        assert_eq!(
            (responses.prompt_tokens, responses.cached_tokens),
            (Some(12), Some(8))
        );
    }
}
