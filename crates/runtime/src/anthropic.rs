//! The Anthropic Messages API (`POST /v1/messages`) as vLLM serves it: what routing reads from
//! a request, and the error shape its clients expect.
//!
//! vLLM answers `/v1/messages` by converting the request to a chat completion
//! (`vllm/entrypoints/anthropic/serving.py`) and rendering it with the model's chat template, so
//! the prompt a router must key is that chat: one `system` message made of the top-level
//! `system` (a string, or text blocks) followed by any `system`-role messages, all text joined
//! with no separator (blocks starting with Claude Code's `x-anthropic-billing-header`, which
//! carry a per-request hash, are dropped, as vLLM drops them); then the `user`/`assistant`
//! messages with their text blocks (one text block becomes a plain string, several stay parts);
//! `tool_use` blocks become `tool_calls`, a user's `tool_result` blocks become `tool` messages,
//! and `tools` become OpenAI function tools. The converted chat body is what the gateway
//! renders (or sends to an engine's `/tokenize`), so a conversation reaches the same prefix
//! keys whether it arrives as chat or as messages.
//!
//! Errors on this API use Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`,
//! with the `type` vLLM puts there: the OpenAI error type of the same status
//! (`translate_error_response` in vLLM's `anthropic/api_router.py`).

use serde_json::{Map, Value, json};

use crate::openai::{ApiError, Message};

/// Claude Code's per-request attribution block, which vLLM strips from system text.
const BILLING_HEADER_PREFIX: &str = "x-anthropic-billing-header";

/// What routing needs from a Messages request: its chat messages (role and text) and the
/// equivalent OpenAI chat body for the chat template.
#[derive(Clone, Debug, PartialEq)]
pub struct MessagesPrompt {
    /// The conversation as chat messages.
    pub messages: Vec<Message>,
    /// `{"messages": [...], "tools"?: [...], "chat_template_kwargs"?: {...}}`, as vLLM builds it.
    pub chat_body: Value,
}

fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_param(param, message)
}

/// Text of the text blocks of `content` (a string or an array of blocks), billing blocks
/// dropped; used for system text.
fn system_text(content: &Value, param: &'static str) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for b in blocks {
                let Value::Object(o) = b else {
                    return Err(bad(param, "content blocks must be objects"));
                };
                if o.get("type").and_then(Value::as_str) == Some("text")
                    && let Some(Value::String(t)) = o.get("text")
                    && !t.starts_with(BILLING_HEADER_PREFIX)
                {
                    out.push_str(t);
                }
            }
            Ok(out)
        }
        _ => Err(bad(
            param,
            "`system` must be a string or an array of blocks",
        )),
    }
}

/// One user/assistant message converted as vLLM converts it; `tool` messages produced by a
/// user's `tool_result` blocks are pushed to `out` first.
fn convert_message(
    role: &str,
    content: &Value,
    out: &mut Vec<Value>,
    texts: &mut Vec<Message>,
) -> Result<(), ApiError> {
    let mut msg = Map::new();
    msg.insert("role".into(), json!(role));
    let mut parts: Vec<Value> = Vec::new();
    let mut tool_calls: Vec<Value> = Vec::new();
    let mut text = String::new();
    match content {
        Value::String(s) => {
            msg.insert("content".into(), json!(s));
            text.push_str(s);
        }
        Value::Array(blocks) => {
            for b in blocks {
                let Value::Object(o) = b else {
                    return Err(bad("messages", "content blocks must be objects"));
                };
                match o.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(Value::String(t)) = o.get("text")
                            && !t.is_empty()
                        {
                            parts.push(json!({"type": "text", "text": t}));
                            text.push_str(t);
                        }
                    }
                    Some("tool_use") => tool_calls.push(json!({
                        "id": o.get("id").cloned().unwrap_or(json!("")),
                        "type": "function",
                        "function": {
                            "name": o.get("name").cloned().unwrap_or(json!("")),
                            "arguments": o.get("input").cloned().unwrap_or(json!({})).to_string(),
                        },
                    })),
                    Some("tool_result") if role == "user" => {
                        let result = match o.get("content") {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Array(items)) => items
                                .iter()
                                .filter(|i| i.get("type").and_then(Value::as_str) == Some("text"))
                                .filter_map(|i| i.get("text").and_then(Value::as_str))
                                .collect::<Vec<_>>()
                                .join("\n"),
                            _ => String::new(),
                        };
                        texts.push(Message {
                            role: "tool".into(),
                            content: result.clone(),
                        });
                        out.push(json!({
                            "role": "tool",
                            "tool_call_id": o.get("tool_use_id").cloned().unwrap_or(json!("")),
                            "content": result,
                        }));
                    }
                    Some(_) => {}
                    None => return Err(bad("messages", "each content block needs a `type`")),
                }
            }
        }
        _ => {
            return Err(bad(
                "messages",
                "`content` must be a string or an array of blocks",
            ));
        }
    }
    if !tool_calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    match parts.len() {
        0 => {}
        1 => {
            msg.insert("content".into(), parts[0]["text"].clone());
        }
        _ => {
            msg.insert("content".into(), Value::Array(parts));
        }
    }
    // vLLM drops a user message left with nothing (only tool results).
    if role == "user" && !msg.contains_key("content") {
        return Ok(());
    }
    texts.push(Message {
        role: role.to_owned(),
        content: text,
    });
    out.push(Value::Object(msg));
    Ok(())
}

/// Reads the prompt of a Messages request body (`obj`, already known to be an object).
pub fn parse_messages(obj: &Map<String, Value>) -> Result<MessagesPrompt, ApiError> {
    let Some(Value::Array(items)) = obj.get("messages") else {
        return Err(match obj.get("messages") {
            None | Some(Value::Null) => bad("messages", "missing required field `messages`"),
            Some(_) => bad("messages", "`messages` must be an array"),
        });
    };
    if items.is_empty() {
        return Err(bad("messages", "`messages` must not be empty"));
    }
    let mut system = system_text(obj.get("system").unwrap_or(&Value::Null), "system")?;
    let mut rest = Vec::with_capacity(items.len());
    for m in items {
        let Value::Object(o) = m else {
            return Err(bad("messages", "each message must be an object"));
        };
        let Some(Value::String(role)) = o.get("role") else {
            return Err(bad("messages", "each message needs a string `role`"));
        };
        let content = o.get("content").unwrap_or(&Value::Null);
        if role == "system" {
            system.push_str(&system_text(content, "messages")?);
        } else {
            rest.push((role.as_str(), content));
        }
    }
    let mut chat = Vec::with_capacity(rest.len() + 1);
    let mut messages = Vec::with_capacity(rest.len() + 1);
    if !system.is_empty() {
        chat.push(json!({"role": "system", "content": system}));
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    for (role, content) in rest {
        convert_message(role, content, &mut chat, &mut messages)?;
    }
    let mut body = Map::new();
    body.insert("messages".into(), Value::Array(chat));
    if let Some(Value::Array(tools)) = obj.get("tools") {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.get("name").cloned().unwrap_or(json!("")),
                    "description": t.get("description").cloned().unwrap_or(Value::Null),
                    "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"})),
                }})
            })
            .collect();
        if !tools.is_empty() {
            body.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(kw) = obj.get("chat_template_kwargs").filter(|v| v.is_object()) {
        body.insert("chat_template_kwargs".into(), kw.clone());
    }
    Ok(MessagesPrompt {
        messages,
        chat_body: Value::Object(body),
    })
}

/// `err` in Anthropic's error shape, with vLLM's `type` (the OpenAI type of its status).
pub fn error_body(err: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": err.error_type(), "message": err.message}})
}

/// `err` as one Anthropic SSE `error` event, for a stream that broke after it started.
pub fn error_event(err: &ApiError) -> Vec<u8> {
    format!("event: error\ndata: {}\n\n", error_body(err)).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<MessagesPrompt, ApiError> {
        parse_messages(v.as_object().unwrap())
    }

    #[test]
    fn system_string_or_blocks_becomes_one_system_message() {
        let as_string = parse(json!({
            "system": "You are terse.",
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .unwrap();
        let as_blocks = parse(json!({
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; hash=abc"},
                {"type": "text", "text": "You are "},
                {"type": "text", "text": "terse."},
            ],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        }))
        .unwrap();
        assert_eq!(as_string, as_blocks);
        assert_eq!(
            as_string.chat_body["messages"],
            json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}])
        );
    }

    #[test]
    fn tools_and_tool_results_convert_as_vllm_does() {
        let p = parse(json!({
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Oslo"}},
                ]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "rain"}]},
            ],
            "tools": [{"name": "w", "input_schema": {"type": "object"}}],
        }))
        .unwrap();
        let chat = &p.chat_body["messages"];
        assert_eq!(
            chat[1]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Oslo\"}"
        );
        assert_eq!(
            chat[2],
            json!({"role": "tool", "tool_call_id": "t1", "content": "rain"})
        );
        assert_eq!(
            chat.as_array().unwrap().len(),
            3,
            "the emptied user turn is dropped"
        );
        assert_eq!(p.chat_body["tools"][0]["function"]["name"], "w");
    }

    #[test]
    fn bad_shapes_are_400_with_param() {
        assert_eq!(parse(json!({})).unwrap_err().param, Some("messages"));
        assert_eq!(
            parse(json!({"messages": []})).unwrap_err().param,
            Some("messages")
        );
        assert_eq!(
            parse(json!({"messages": [{"role": "user", "content": 3}]}))
                .unwrap_err()
                .param,
            Some("messages")
        );
        assert_eq!(
            parse(json!({"system": 3, "messages": [{"role": "user", "content": "x"}]}))
                .unwrap_err()
                .param,
            Some("system")
        );
    }

    #[test]
    fn error_shape_is_vllms_anthropic_shape() {
        let e = ApiError::bad_param("model", "nope");
        assert_eq!(
            error_body(&e),
            json!({"type": "error", "error": {"type": "BadRequestError", "message": "nope"}})
        );
        assert!(error_event(&e).starts_with(b"event: error\ndata: {"));
    }
}
