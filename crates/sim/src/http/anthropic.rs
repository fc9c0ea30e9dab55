//! `POST /v1/messages`: the Anthropic Messages API as vLLM serves it (vLLM 0.32,
//! `vllm/entrypoints/anthropic/serving.py`). vLLM turns the request into a chat request and the
//! chat response into the Messages shape; the simulator does the same over its own chat path,
//! so a conversation sent as messages has the prompt it has as chat (and hits the same cache).
//!
//! - Request: `model`, `max_tokens` (required), `system` (a string, or text blocks joined as one
//!   system message), `messages` (`user`/`assistant`, content a string or text blocks), `stream`.
//!   Tool, image and document blocks are refused with 400: the simulator generates text only.
//! - Response: `{"id","type":"message","role":"assistant","content":[{"type":"text","text"}],
//!   "model","stop_reason","stop_sequence":null,"usage"}`; usage as vLLM derives it from the chat
//!   usage: `input_tokens` = prompt − cached − created, `cache_read_input_tokens` and
//!   `cache_creation_input_tokens` only when prompt-token details are on.
//! - Stream: `event: message_start` (usage with no output yet), `content_block_start`, one
//!   `content_block_delta` (`text_delta`) per token, `content_block_stop`, `message_delta` (stop
//!   reason and final usage), `message_stop`. A length stop is `max_tokens`, any other
//!   `end_turn`.
//! - Errors in vLLM's Anthropic shape: `{"type":"error","error":{"type","message"}}`.

use super::*;

#[derive(Deserialize)]
#[serde(untagged)]
enum System {
    Text(String),
    Blocks(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct MessagesRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    system: Option<System>,
    messages: Vec<RawMessage>,
    #[serde(default)]
    stream: Option<bool>,
}

/// The Anthropic error shape of an [`ApiError`] (vLLM keeps the OpenAI type names).
fn anthropic_error(e: ApiError) -> Response {
    let status = e.status;
    let kind = match status {
        StatusCode::BAD_REQUEST => "BadRequestError",
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
        _ => "InternalServerError",
    };
    let body = json!({"type": "error", "error": {"type": kind, "message": e.message}});
    (status, axum::Json(body)).into_response()
}

pub(super) async fn messages(State(s): State<Shared>, body: Bytes) -> Response {
    match serve(&s, &body).await {
        Ok(r) => r,
        Err(e) => anthropic_error(e),
    }
}

async fn serve(s: &EngineShared, body: &[u8]) -> ApiResult<Response> {
    ready(s)?;
    let req: MessagesRequest = parse(body)?;
    let lora = resolve_model(s, req.model.as_deref())?;
    let max_tokens = match check_max_tokens(req.max_tokens)? {
        Some(n) => n,
        None => return Err(bad("`max_tokens` is required")),
    };
    let mut chat = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system {
        let content = match system {
            System::Text(t) => Content::Text(t),
            System::Blocks(b) => Content::Parts(b),
        };
        chat.push(RawMessage {
            role: "system".into(),
            content: Some(content),
        });
    }
    for m in req.messages {
        if m.role != "user" && m.role != "assistant" {
            return Err(bad(format!(
                "message role {:?} is not one of user, assistant",
                m.role
            )));
        }
        chat.push(m);
    }
    let tokens = render_messages(s, &chat)?;
    let max_len = s.config.max_model_len;
    if tokens.len() + max_tokens as usize > max_len {
        return Err(too_long(max_len, tokens.len(), u64::from(max_tokens)));
    }
    admit_faults(s).await?;
    let a = submit(s, tokens, max_tokens, lora, None, SubmitMode::Local).await?;
    let job = Job {
        api: Api::Chat,
        id: format!("chatcmpl-{}-{:016x}", s.index, a.guard.id),
        created: unix_now_s(),
        model: req.model.unwrap_or_else(|| s.model.clone()),
        words: s.words.clone(),
        kv_transfer_params: None,
        hold: None,
        details_block_size: s
            .prompt_tokens_details
            .then_some(if s.config.enable_prefix_caching {
                s.config.block_size
            } else {
                0
            }),
    };
    if req.stream.unwrap_or(false) {
        Ok(stream(job, a))
    } else {
        full(job, a).await
    }
}

/// vLLM's `_build_anthropic_usage` over the chat usage the simulator computes.
fn usage(job: &Job, prompt_tokens: usize, u: &Usage) -> Value {
    let chat = job.usage(prompt_tokens, u, UsageIn::Response);
    let mut input = prompt_tokens as i64;
    let mut v = json!({"output_tokens": u.completion_tokens});
    if let Some(d) = chat.get("prompt_tokens_details").filter(|d| !d.is_null()) {
        if let Some(read) = d["cached_tokens"].as_i64() {
            input -= read;
            v["cache_read_input_tokens"] = json!(read);
        }
        if let Some(created) = d["created_cache_tokens"].as_i64() {
            input -= created;
            v["cache_creation_input_tokens"] = json!(created);
        }
    }
    v["input_tokens"] = json!(input.max(0));
    v
}

fn stop_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "max_tokens",
        FinishReason::Abort | FinishReason::Error => "end_turn",
    }
}

async fn full(job: Job, mut a: Admitted) -> ApiResult<Response> {
    let mut text = String::new();
    while let Some(o) = a.rx.recv().await {
        match o {
            Output::Token { token, .. } => text.push_str(job.word(token)),
            Output::Finished {
                reason, usage: u, ..
            } => {
                a.guard.done = true;
                let body = json!({
                    "id": job.id,
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": text}],
                    "model": job.model,
                    "stop_reason": stop_reason(reason),
                    "stop_sequence": null,
                    "usage": usage(&job, a.prompt_tokens, &u),
                });
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

fn event(name: &str, data: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    serde_json::to_writer(&mut *out, data).expect("serializing a JSON value cannot fail");
    out.extend_from_slice(b"\n\n");
}

struct Events {
    job: Job,
    a: Admitted,
    started: bool,
    block_open: bool,
    done: bool,
}

async fn next_event(mut st: Events) -> Option<(Result<Bytes, std::io::Error>, Events)> {
    if st.done {
        return None;
    }
    let mut buf = Vec::new();
    if !st.started {
        // vLLM sends it with the first chat chunk: usage carries no output yet.
        st.started = true;
        let message = json!({
            "id": st.job.id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": st.job.model,
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        });
        event(
            "message_start",
            &json!({"type": "message_start", "message": message}),
            &mut buf,
        );
    }
    match st.a.rx.recv().await {
        Some(Output::Token { token, .. }) => {
            if !st.block_open {
                st.block_open = true;
                event(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}),
                    &mut buf,
                );
            }
            event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": st.job.word(token)}}),
                &mut buf,
            );
        }
        Some(Output::Finished {
            reason, usage: u, ..
        }) => {
            st.a.guard.done = true;
            st.done = true;
            if st.block_open {
                event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                    &mut buf,
                );
            }
            event(
                "message_delta",
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason(reason), "stop_sequence": null},
                        "usage": usage(&st.job, st.a.prompt_tokens, &u)}),
                &mut buf,
            );
            event("message_stop", &json!({"type": "message_stop"}), &mut buf);
        }
        None => {
            st.a.guard.done = true;
            st.done = true;
            return Some((Err(std::io::Error::other("engine stopped mid-stream")), st));
        }
    }
    Some((Ok(Bytes::from(buf)), st))
}

fn stream(job: Job, a: Admitted) -> Response {
    let st = Events {
        job,
        a,
        started: false,
        block_open: false,
        done: false,
    };
    let mut r = Response::new(Body::from_stream(futures::stream::unfold(st, next_event)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    r
}
