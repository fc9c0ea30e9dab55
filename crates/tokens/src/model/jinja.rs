//! A minijinja environment configured as transformers configures jinja2 for chat templates.
//!
//! transformers (`utils/chat_template_utils.py`, `_cached_compile_jinja_template`) renders with
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[AssistantTracker, loopcontrols])`, a `tojson` filter that is `json.dumps` with
//! `ensure_ascii=False`, and the globals `raise_exception` and `strftime_now`. On top of that,
//! jinja2 evaluates Python objects, so strings and dicts have Python methods (`.strip()`,
//! `.items()`, …: minijinja-contrib's `pycompat`) and values print as Python prints them
//! ([`super::pyfmt`]). The `{% generation %}` tag of `AssistantTracker` only marks assistant
//! spans for training masks and renders its body unchanged; it becomes an always-true `if`.

use super::pyfmt::{self, JsonOptions};
use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State};
use std::time::{SystemTime, UNIX_EPOCH};

/// Context variable carrying the render's clock (microseconds since the Unix epoch), so that
/// `strftime_now` is deterministic under test. A Python template cannot name it.
pub(crate) const NOW_VAR: &str = "__kvgate_now_us";

/// The environment every model template is compiled into.
pub(crate) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("default delimiters are valid");
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson);
    env.add_filter("string", string);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// Rewrites transformers' `{% generation %}…{% endgeneration %}` into `{% if true %}…{% endif %}`,
/// keeping whitespace-control modifiers so trim/lstrip behave as they do around the original tag.
pub(crate) fn rewrite_generation_tags(source: &str) -> std::borrow::Cow<'_, str> {
    if !source.contains("generation") {
        return source.into();
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..end];
        let (open_mod, body) = split_modifier_front(inner);
        let (body, close_mod) = split_modifier_back(body);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(open_mod);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(close_mod);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out.into()
}

fn split_modifier_front(s: &str) -> (&str, &str) {
    match s.chars().next() {
        Some('-' | '+') => s.split_at(1),
        _ => ("", s),
    }
}

fn split_modifier_back(s: &str) -> (&str, &str) {
    match s.chars().last() {
        Some('-' | '+') => s.split_at(s.len() - 1),
        _ => (s, ""),
    }
}

/// Prints values as `str()` does in Python (see [`super::pyfmt`]).
fn python_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    let write_err = |_| Error::new(ErrorKind::WriteFailure, "formatter write failed");
    match value.kind() {
        ValueKind::String => out
            .write_str(value.as_str().unwrap_or_default())
            .map_err(write_err),
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            pyfmt::py_str(value, &mut s);
            out.write_str(&s).map_err(write_err)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// jinja2's `string` filter is Python's `str()`.
fn string(value: &Value) -> Value {
    if value.kind() == ValueKind::String {
        return value.clone();
    }
    let mut s = String::new();
    pyfmt::py_str(value, &mut s);
    Value::from(s)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 options",
        ));
    }
    let arg = |i: usize| -> Result<Option<Value>, Error> {
        match args.get(i) {
            Some(_) if kwargs.has(NAMES[i]) => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson got multiple values for `{}`", NAMES[i]),
            )),
            Some(v) => Ok(Some(v.clone())),
            None => kwargs.get::<Option<Value>>(NAMES[i]),
        }
    };
    let bad = |what: &str| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: invalid {what}"),
        )
    };
    let mut opts = JsonOptions {
        ensure_ascii: arg(0)?.is_some_and(|v| v.is_true()),
        sort_keys: arg(3)?.is_some_and(|v| v.is_true()),
        ..Default::default()
    };
    opts.indent = match arg(1)? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
        Some(v) => {
            let n = i64::try_from(v).map_err(|_| bad("indent"))?;
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    opts.separators = match arg(2)? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            let parts: Vec<Value> = v.try_iter().map_err(|_| bad("separators"))?.collect();
            match parts.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => Some((a.to_owned(), b.to_owned())),
                    _ => return Err(bad("separators")),
                },
                _ => return Err(bad("separators")),
            }
        }
    };
    kwargs.assert_all_used()?;
    pyfmt::json_dumps(value, &opts)
        .map(Value::from_safe_string)
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {} is not JSON serializable", e.0),
            )
        })
}

/// The template's own error (`jinja2.exceptions.TemplateError(message)`), which vLLM returns to
/// the client as a 400.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `datetime.now().strftime(format)`, in UTC, at the render's clock ([`NOW_VAR`]).
fn strftime_now(state: &State, format: &str) -> String {
    let now = state
        .lookup(NOW_VAR)
        .and_then(|v| i64::try_from(v).ok())
        .unwrap_or_else(|| unix_micros(SystemTime::now()));
    pyfmt::strftime(format, now)
}

/// Microseconds since the Unix epoch (negative before it).
pub(crate) fn unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, ctx: Value) -> String {
        let mut env = environment();
        env.add_template_owned("t", src.to_owned()).unwrap();
        env.get_template("t").unwrap().render(ctx).unwrap()
    }

    #[test]
    fn prints_and_serialises_like_python() {
        let ctx = Value::from_pairs([
            ("n", Value::from(())),
            ("b", Value::from(true)),
            (
                "d",
                Value::from_pairs([("k", Value::from("é")), ("x", Value::from(1.0))]),
            ),
        ]);
        assert_eq!(
            render(
                "{{ n }} {{ b }} {{ d }} {{ d|tojson }} {{ d|tojson(indent=2) }} {{ n|string }}",
                ctx
            ),
            "None True {'k': 'é', 'x': 1.0} {\"k\": \"é\", \"x\": 1.0} {\n  \"k\": \"é\",\n  \"x\": 1.0\n} None"
        );
    }

    #[test]
    fn python_methods_and_whitespace_control() {
        // Expected strings are jinja2's, with transformers' settings.
        let ctx = || Value::from_pairs([("msgs", Value::from(vec![" a ", "b "]))]);
        let src = "{% for m in msgs %}\n  {{ m.strip() }}{% if not loop.last %},{% endif %}\n{% endfor %}\n";
        assert_eq!(render(src, ctx()), "  a,  b");
        let src =
            "{% for m in msgs %}\n  {{ m.strip() }}{{ ',' if not loop.last }}\n{% endfor %}\n";
        assert_eq!(render(src, ctx()), "  a,\n  b\n");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = rewrite_generation_tags(
            "{%- generation -%} x {%- endgeneration %}\n{% if true %}y{% endif %}",
        );
        assert_eq!(
            src,
            "{%- if true -%} x {%- endif %}\n{% if true %}y{% endif %}"
        );
    }

    #[test]
    fn strftime_now_reads_the_injected_clock() {
        let ctx = Value::from_pairs([(NOW_VAR, Value::from(1_721_999_109_123_456_i64))]);
        assert_eq!(render("{{ strftime_now('%d %b %Y') }}", ctx), "26 Jul 2024");
    }
}
