//! The Anthropic Messages API (`POST /v1/messages`) as vLLM serves it: what routing reads from
//! a request, and the error shape its clients expect.
//!
//! vLLM answers `/v1/messages` by converting the request to a chat completion
//! (`vllm/entrypoints/anthropic/serving.py`) and rendering it with the model's chat template, so
//! the prompt a router must key is that chat: one `system` message made of the top-level
//! `system` (a string, or text blocks) followed by any `system`-role messages, all text joined
//! with no separator (blocks starting with Claude Code's `x-anthropic-billing-header`, which
//! carry a per-request hash, are dropped, as vLLM drops them); then the `user`/`assistant`
//! messages with their text and image blocks (one text block becomes a plain string; several
//! blocks, or any image, stay parts, images as `image_url` parts); `thinking` blocks become the
//! message's `reasoning`; `tool_use` blocks become `tool_calls`; a user's `tool_result` blocks
//! become `tool` messages (and a `user` message of the result's images), another role's become
//! `Tool result: …` text; `tools` become OpenAI function tools and `tool_choice` OpenAI's
//! choice. The converted chat body is what the gateway
//! renders (or sends to an engine's `/tokenize`), so a conversation reaches the same prefix
//! keys whether it arrives as chat or as messages. A chat with images cannot be rendered
//! locally (kvgate renders text only), so it is keyed as the same OpenAI chat request is.
//!
//! Errors on this API use Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`,
//! with the `type` vLLM puts there: the OpenAI error type of the same status
//! (`translate_error_response` in vLLM's `anthropic/api_router.py`); a stream that breaks after
//! it started ends with an `internal_error` event, as vLLM's `message_stream_converter` does.

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

/// vLLM's `_convert_image_source_to_url`: a `url` source is its URL, anything else a base64
/// data URI (media type defaulting to JPEG).
fn image_url(source: &Map<String, Value>) -> String {
    let field = |k: &str| source.get(k).and_then(Value::as_str);
    if field("type") == Some("url") {
        return field("url").unwrap_or("").to_owned();
    }
    format!(
        "data:{};base64,{}",
        field("media_type").unwrap_or("image/jpeg"),
        field("data").unwrap_or("")
    )
}

/// vLLM's `_convert_user_tool_result`: a `tool` message with the result's text (text items
/// joined with `"\n"`, a missing `text` counting as empty), then a `user` message with the
/// result's images, then a `tool` message with its tool references.
fn convert_user_tool_result(
    block: &Map<String, Value>,
    out: &mut Vec<Value>,
    texts: &mut Vec<Message>,
) {
    let mut text = String::new();
    let mut images: Vec<Value> = Vec::new();
    let mut references: Vec<Value> = Vec::new();
    match block.get("content") {
        Some(Value::String(s)) => text.clone_from(s),
        Some(Value::Array(items)) => {
            let mut text_parts: Vec<&str> = Vec::new();
            for item in items {
                let Value::Object(item) = item else { continue };
                match item.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text_parts.push(item.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    Some("image") => {
                        let url = match item.get("source") {
                            Some(Value::Object(source)) => image_url(source),
                            _ => image_url(&Map::new()),
                        };
                        if !url.is_empty() {
                            images.push(json!({"type": "image_url", "image_url": {"url": url}}));
                        }
                    }
                    Some("tool_reference") => {
                        let name = [item.get("tool_name"), item.get("name")]
                            .into_iter()
                            .flatten()
                            .find(|n| !matches!(n, Value::Null) && *n != "");
                        if let Some(name) = name {
                            references.push(json!({"type": "tool_reference", "name": name}));
                        }
                    }
                    _ => {}
                }
            }
            text = text_parts.join("\n");
        }
        _ => {}
    }
    let id = block.get("tool_use_id").cloned().unwrap_or(json!(""));
    texts.push(Message {
        role: "tool".into(),
        content: text.clone(),
    });
    out.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
    if !images.is_empty() {
        texts.push(Message {
            role: "user".into(),
            content: String::new(),
        });
        out.push(json!({"role": "user", "content": images}));
    }
    if !references.is_empty() {
        texts.push(Message {
            role: "tool".into(),
            content: String::new(),
        });
        out.push(json!({"role": "tool", "tool_call_id": id, "content": references}));
    }
}

/// One user/assistant message converted as vLLM converts it (`_convert_message_content`);
/// messages produced by a user's `tool_result` blocks are pushed to `out` first.
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
    let mut reasoning: Option<String> = None;
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
                    Some("image") => match o.get("source") {
                        Some(Value::Object(source)) if !source.is_empty() => {
                            parts.push(
                                json!({"type": "image_url", "image_url": {"url": image_url(source)}}),
                            );
                        }
                        None | Some(Value::Null | Value::Object(_)) => {}
                        Some(_) => {
                            return Err(bad("messages", "an image `source` must be an object"));
                        }
                    },
                    Some("thinking") => match o.get("thinking") {
                        Some(Value::String(t)) => reasoning.get_or_insert_default().push_str(t),
                        None | Some(Value::Null) => {}
                        Some(_) => {
                            return Err(bad("messages", "`thinking` must be a string"));
                        }
                    },
                    Some("tool_use") => tool_calls.push(json!({
                        "id": o.get("id").cloned().unwrap_or(json!("")),
                        "type": "function",
                        "function": {
                            "name": o.get("name").cloned().unwrap_or(json!("")),
                            "arguments": o.get("input").cloned().unwrap_or(json!({})).to_string(),
                        },
                    })),
                    Some("tool_result") if role == "user" => {
                        convert_user_tool_result(o, out, texts);
                    }
                    Some("tool_result") => {
                        // vLLM keeps another role's tool result as text: `str(block.content)`.
                        let mut result = String::from("Tool result: ");
                        match o.get("content") {
                            Some(Value::String(s)) => result.push_str(s),
                            Some(v @ Value::Array(items)) if !items.is_empty() => {
                                result.push_str(&kvgate_tokens::python_repr(v));
                            }
                            _ => {}
                        }
                        text.push_str(&result);
                        parts.push(json!({"type": "text", "text": result}));
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
    if let Some(r) = reasoning {
        msg.insert("reasoning".into(), Value::String(r));
    }
    if !tool_calls.is_empty() {
        msg.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    match parts.as_slice() {
        [] => {}
        [only] if only["type"] == "text" => {
            msg.insert("content".into(), only["text"].clone());
        }
        _ => {
            msg.insert("content".into(), Value::Array(parts));
        }
    }
    // vLLM drops a user message left with no content (only tool results, or only thinking).
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

/// vLLM's `_convert_tool_choice`: Anthropic's `auto` / `any` / `none` / `tool` as OpenAI's
/// `auto` / `required` / `none` / named function.
fn tool_choice(choice: &Value) -> Result<Option<Value>, ApiError> {
    let Value::Object(o) = choice else {
        return match choice {
            Value::Null => Ok(None),
            _ => Err(bad("tool_choice", "`tool_choice` must be an object")),
        };
    };
    Ok(match o.get("type").and_then(Value::as_str) {
        Some("auto") => Some(json!("auto")),
        Some("any") => Some(json!("required")),
        Some("none") => Some(json!("none")),
        Some("tool") => Some(json!({"type": "function", "function": {
            "name": o.get("name").cloned().unwrap_or(Value::Null),
        }})),
        _ => {
            return Err(bad(
                "tool_choice",
                "`tool_choice.type` must be auto, any, none or tool",
            ));
        }
    })
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
    let system = system_text(obj.get("system").unwrap_or(&Value::Null), "system")?;
    let mut chat = Vec::with_capacity(items.len() + 1);
    let mut messages = Vec::with_capacity(items.len() + 1);
    let push_system = |text: String, chat: &mut Vec<Value>, messages: &mut Vec<Message>| {
        chat.push(json!({"role": "system", "content": text}));
        messages.push(Message {
            role: "system".into(),
            content: text,
        });
    };
    if !system.is_empty() {
        push_system(system, &mut chat, &mut messages);
    }
    for m in items {
        let Value::Object(o) = m else {
            return Err(bad("messages", "each message must be an object"));
        };
        let Some(Value::String(role)) = o.get("role") else {
            return Err(bad("messages", "each message needs a string `role`"));
        };
        let content = o.get("content").unwrap_or(&Value::Null);
        if role == "system" {
            // In place, as vLLM converts it (`_convert_messages`) when the template accepts a
            // system message after the first turn; where it does not, the tokenizer merges
            // them into the leading one as vLLM then does (`merge_inline_system`). A billing
            // header as the whole string is dropped (`_extract_system_text`).
            let text = match content {
                Value::String(t) if t.starts_with(BILLING_HEADER_PREFIX) => String::new(),
                _ => system_text(content, "messages")?,
            };
            if !text.is_empty() {
                push_system(text, &mut chat, &mut messages);
            }
        } else {
            convert_message(role, content, &mut chat, &mut messages)?;
        }
    }
    let mut body = Map::new();
    body.insert("messages".into(), Value::Array(chat));
    let choice = tool_choice(obj.get("tool_choice").unwrap_or(&Value::Null))?;
    if let Some(Value::Array(tools)) = obj.get("tools") {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut function = json!({
                    "name": t.get("name").cloned().unwrap_or(json!("")),
                    "description": t.get("description").cloned().unwrap_or(Value::Null),
                    "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"})),
                });
                // Dumped only when set, as vLLM's `FunctionDefinition` is.
                for key in ["strict", "defer_loading"] {
                    if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                        function[key] = v.clone();
                    }
                }
                json!({"type": "function", "function": function})
            })
            .collect();
        if !tools.is_empty() {
            body.insert("tools".into(), Value::Array(tools));
        }
    }
    // vLLM defaults to `auto` once tools are declared. Its renderer ignores the choice unless
    // started with `--exclude-tools-when-tool-choice-none`, as the chat path does here; it is
    // carried so the body is the request vLLM builds.
    let has_tools = matches!(obj.get("tools"), Some(Value::Array(_)));
    if let Some(choice) = choice.or_else(|| has_tools.then(|| json!("auto"))) {
        body.insert("tool_choice".into(), choice);
    }
    if let Some(kw) = obj.get("chat_template_kwargs").filter(|v| v.is_object()) {
        body.insert("chat_template_kwargs".into(), kw.clone());
    }
    Ok(MessagesPrompt {
        messages,
        chat_body: Value::Object(body),
    })
}

/// A Messages request's chat body (from [`parse_messages`]) with every system message merged,
/// in order, into one leading system message, as vLLM converts the request when the model's
/// chat template refuses a system message after the first turn
/// (`ModelTokenizer::requires_system_first`); `None` when there is nothing to merge.
pub fn merge_inline_system(chat_body: &Value) -> Option<Value> {
    let messages = chat_body.get("messages")?.as_array()?;
    let is_system = |m: &Value| m.get("role").and_then(Value::as_str) == Some("system");
    let inline = messages.iter().skip(1).any(is_system);
    if !inline {
        return None;
    }
    let system: String = messages
        .iter()
        .filter(|m| is_system(m))
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .collect();
    let mut merged = vec![json!({"role": "system", "content": system})];
    merged.extend(messages.iter().filter(|m| !is_system(m)).cloned());
    let mut body = chat_body.clone();
    body["messages"] = Value::Array(merged);
    Some(body)
}

/// `err` in Anthropic's error shape, with vLLM's `type` (the OpenAI type of its status).
pub fn error_body(err: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": err.error_type(), "message": err.message}})
}

/// `err` as one Anthropic SSE `error` event, for a stream that broke after it started. Its
/// `type` is `internal_error` whatever the status, as vLLM's `message_stream_converter` sends.
pub fn error_event(err: &ApiError) -> Vec<u8> {
    let body =
        json!({"type": "error", "error": {"type": "internal_error", "message": err.message}});
    format!("event: error\ndata: {body}\n\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A system message inside `messages` stays in place (vLLM's conversion when the template
    /// accepts it), a billing-header string is dropped, and `merge_inline_system` gives vLLM's
    /// merged form for templates that refuse it.
    #[test]
    fn inline_system_messages_stay_in_place_unless_merged() {
        let body = json!({
            "system": "lead. ",
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "system", "content": "reminder"},
                {"role": "system", "content": "x-anthropic-billing-header: cc=1"},
                {"role": "user", "content": "c"},
            ],
        });
        let p = parse_messages(body.as_object().unwrap()).unwrap();
        let roles: Vec<&str> = p.chat_body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "system", "user"]);
        assert_eq!(p.chat_body["messages"][3]["content"], "reminder");
        let merged = merge_inline_system(&p.chat_body).unwrap();
        assert_eq!(
            merged["messages"],
            json!([
                {"role": "system", "content": "lead. reminder"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ])
        );
        let plain = parse_messages(
            json!({"messages": [{"role": "user", "content": "a"}]})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert!(merge_inline_system(&plain.chat_body).is_none());
    }

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

    /// `body` converted, checked against the chat vLLM 0.32's `to_chat_completion_request`
    /// builds for it (`messages`, plus `tools` / `tool_choice` where given).
    fn assert_converts_as_vllm(body: Value, vllm_chat: Value) {
        let p = parse(body).unwrap();
        let mut got = p.chat_body.as_object().unwrap().clone();
        got.remove("chat_template_kwargs");
        assert_eq!(Value::Object(got), vllm_chat);
    }

    #[test]
    fn image_blocks_become_image_url_parts_not_dropped() {
        assert_converts_as_vllm(
            json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.jpg"}},
                {"type": "image", "source": {"data": "AAAA"}},
            ]}]}),
            json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.jpg"}},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
            ]}]}),
        );
        // An image alone is still a parts list, never a plain string.
        assert_converts_as_vllm(
            json!({"messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "u"}},
            ]}]}),
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "u"}},
            ]}]}),
        );
    }

    #[test]
    fn thinking_blocks_become_the_assistants_reasoning_not_dropped() {
        assert_converts_as_vllm(
            json!({"messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "two and ", "signature": "s"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "thinking", "thinking": "two"},
                    {"type": "text", "text": "4"},
                ]},
                {"role": "user", "content": "thanks"},
            ]}),
            json!({"messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "reasoning": "two and two", "content": "4"},
                {"role": "user", "content": "thanks"},
            ]}),
        );
    }

    #[test]
    fn an_assistants_tool_result_is_tool_result_text_not_dropped() {
        assert_converts_as_vllm(
            json!({"messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "rain"},
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "so:"},
                    {"type": "tool_result", "tool_use_id": "t2",
                     "content": [{"type": "text", "text": "it's \"wet\""}, {"n": 1, "ok": true, "x": null}]},
                    {"type": "tool_result", "tool_use_id": "t3"},
                ]},
            ]}),
            json!({"messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": "Tool result: rain"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "so:"},
                    // Python's `str()` of the list pydantic holds.
                    {"type": "text", "text": "Tool result: [{'type': 'text', 'text': 'it\\'s \"wet\"'}, {'n': 1, 'ok': True, 'x': None}]"},
                    {"type": "text", "text": "Tool result: "},
                ]},
            ]}),
        );
    }

    #[test]
    fn tool_result_items_without_text_join_as_empty_not_skipped() {
        assert_converts_as_vllm(
            json!({"messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [
                        {"type": "text", "text": "a"},
                        {"type": "text"},
                        "not an object",
                        {"type": "image", "source": {"type": "url", "url": "https://x/p.png"}},
                        {"type": "tool_reference", "tool_name": "g"},
                        {"type": "text", "text": "b"},
                    ]},
                    {"type": "text", "text": "next"},
                ]},
            ]}),
            json!({"messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "t1", "content": "a\n\nb"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/p.png"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": [{"type": "tool_reference", "name": "g"}]},
                {"role": "user", "content": "next"},
            ]}),
        );
    }

    #[test]
    fn tool_choice_none_is_carried_as_none_not_dropped() {
        let tools = json!([{"name": "w", "description": "weather", "input_schema": {"type": "object"}, "strict": true}]);
        let vllm_tools = json!([{"type": "function", "function": {
            "name": "w", "description": "weather", "parameters": {"type": "object"}, "strict": true,
        }}]);
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for (anthropic, openai) in [
            (json!({"type": "none"}), json!("none")),
            (json!({"type": "auto"}), json!("auto")),
            (
                json!({"type": "any", "disable_parallel_tool_use": true}),
                json!("required"),
            ),
            (
                json!({"type": "tool", "name": "w"}),
                json!({"type": "function", "function": {"name": "w"}}),
            ),
        ] {
            assert_converts_as_vllm(
                json!({"messages": msgs, "tools": tools, "tool_choice": anthropic}),
                json!({"messages": msgs, "tools": vllm_tools, "tool_choice": openai}),
            );
        }
        // Tools without a choice get vLLM's default; no tools, no choice.
        assert_converts_as_vllm(
            json!({"messages": msgs, "tools": tools}),
            json!({"messages": msgs, "tools": vllm_tools, "tool_choice": "auto"}),
        );
        assert_converts_as_vllm(json!({"messages": msgs}), json!({"messages": msgs}));
        assert_eq!(
            parse(json!({"messages": msgs, "tool_choice": {"type": "sometimes"}}))
                .unwrap_err()
                .param,
            Some("tool_choice")
        );
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

    #[test]
    fn a_mid_stream_error_event_is_internal_error_as_vllm_sends() {
        let e = ApiError::new(axum::http::StatusCode::BAD_GATEWAY, "engine gone");
        let event = String::from_utf8(error_event(&e)).unwrap();
        let data = event
            .strip_prefix("event: error\ndata: ")
            .and_then(|d| d.strip_suffix("\n\n"))
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(data).unwrap(),
            json!({"type": "error", "error": {"type": "internal_error", "message": "engine gone"}})
        );
    }
}
