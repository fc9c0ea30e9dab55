//! Python's text forms of template values, so a minijinja rendering prints what jinja2 prints.
//!
//! jinja2 runs on Python objects: `{{ x }}` is `str(x)` (`None`, `True`, `['a', 1.0]`), and
//! transformers' `tojson` filter is `json.dumps(x, ensure_ascii=False, indent=…, separators=…,
//! sort_keys=…)`. minijinja prints `none`, `true` and JSON-ish lists instead, which would change
//! the prompt's bytes and therefore its token ids. The rules below follow CPython 3.12:
//! `float.__repr__` (shortest round-trip digits, exponent form when the decimal exponent is
//! below -4 or at least 16), `str.__repr__` (quote choice and escapes), `json.encoder`
//! (`py_encode_basestring` / `_ascii`, default separators `', '`/`': '` or `','` with an indent),
//! and `time.strftime` on glibc in the C locale.
//!
//! Known approximation: `str.__repr__` escapes non-printable non-ASCII characters by Unicode
//! category; without Unicode tables this covers controls, separators, format characters and
//! private use, but not unassigned code points.

use minijinja::value::{Value, ValueKind};
use std::fmt::Write as _;

/// Python's whitespace (`str.isspace`): Rust's definition plus the ASCII information separators.
pub(crate) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no argument.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// `float.__repr__`.
pub(crate) fn float_repr(x: f64, out: &mut String) {
    if x.is_nan() {
        out.push_str("nan");
        return;
    }
    if x.is_infinite() {
        out.push_str(if x > 0.0 { "inf" } else { "-inf" });
        return;
    }
    // `{:e}` gives the shortest digits that round-trip, like CPython's repr mode.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci
        .split_once('e')
        .expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let ndigits = digits.len() as i32;
    // Decimal point position relative to the digit string, as CPython's `decpt`.
    let decpt = exp + 1;
    if neg {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if ndigits > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        let _ = write!(out, "e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-decpt) as usize));
        out.push_str(&digits);
    } else if decpt >= ndigits {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (decpt - ndigits) as usize));
        out.push_str(".0");
    } else {
        out.push_str(&digits[..decpt as usize]);
        out.push('.');
        out.push_str(&digits[decpt as usize..]);
    }
}

fn as_float(v: &Value) -> Option<f64> {
    (v.kind() == ValueKind::Number && !v.is_integer()).then(|| f64::try_from(v.clone()).ok())?
}

/// `str(value)`: what jinja2 prints for `{{ value }}`.
pub(crate) fn py_str(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            py_repr(v, out)
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// `repr(value)`: how Python prints a value inside a list or dict.
pub(crate) fn py_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => match as_float(v) {
            Some(f) => float_repr(f, out),
            None => {
                let _ = write!(out, "{v}");
            }
        },
        ValueKind::String => str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out);
                out.push_str(": ");
                py_repr(&v.get_item(&key).unwrap_or_default(), out);
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Whether `str.isprintable()` would be false for a non-ASCII character (see module docs).
fn non_ascii_unprintable(c: char) -> bool {
    matches!(c,
        '\u{80}'..='\u{a0}' | '\u{ad}' | '\u{1680}' | '\u{2000}'..='\u{200f}'
        | '\u{2028}'..='\u{202f}' | '\u{205f}'..='\u{2064}' | '\u{2066}'..='\u{206f}'
        | '\u{3000}' | '\u{e000}'..='\u{f8ff}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}'
        | '\u{f0000}'..)
}

fn str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if !c.is_ascii() && non_ascii_unprintable(c) => {
                let n = c as u32;
                let _ = match n {
                    0..=0xff => write!(out, "\\x{n:02x}"),
                    0x100..=0xffff => write!(out, "\\u{n:04x}"),
                    _ => write!(out, "\\U{n:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Options of `json.dumps` that transformers' `tojson` filter exposes.
#[derive(Debug, Default)]
pub(crate) struct JsonOptions {
    pub ensure_ascii: bool,
    /// `None`: one line. `Some(unit)`: one item per line, nested levels indented by `unit`.
    pub indent: Option<String>,
    /// `(item_separator, key_separator)`; `None` picks Python's default for the indent mode.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

/// A value `json.dumps` rejects, with Python's type name for the message.
#[derive(Debug)]
pub(crate) struct NotJsonSerializable(pub &'static str);

/// `json.dumps(value, **opts)`.
pub(crate) fn json_dumps(v: &Value, opts: &JsonOptions) -> Result<String, NotJsonSerializable> {
    let (item_sep, key_sep) = match &opts.separators {
        Some((i, k)) => (i.as_str(), k.as_str()),
        None if opts.indent.is_some() => (",", ": "),
        None => (", ", ": "),
    };
    let mut out = String::new();
    let enc = JsonEncoder {
        opts,
        item_sep,
        key_sep,
    };
    enc.value(v, 0, &mut out)?;
    Ok(out)
}

struct JsonEncoder<'a> {
    opts: &'a JsonOptions,
    item_sep: &'a str,
    key_sep: &'a str,
}

impl JsonEncoder<'_> {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(unit) = &self.opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(unit);
            }
        }
    }

    fn value(&self, v: &Value, level: usize, out: &mut String) -> Result<(), NotJsonSerializable> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => match as_float(v) {
                Some(f) if f.is_nan() => out.push_str("NaN"),
                Some(f) if f.is_infinite() => {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
                }
                Some(f) => float_repr(f, out),
                None => {
                    let _ = write!(out, "{v}");
                }
            },
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter().into_iter().flatten().collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.value(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter().into_iter().flatten() {
                    let value = v.get_item(&key).unwrap_or_default();
                    entries.push((self.key(&key)?, value));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.opts.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(key, out);
                    out.push_str(self.key_sep);
                    self.value(value, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Undefined => return Err(NotJsonSerializable("Undefined")),
            ValueKind::Bytes => return Err(NotJsonSerializable("bytes")),
            _ => return Err(NotJsonSerializable("object")),
        }
        Ok(())
    }

    /// Dict keys as `json.dumps` coerces them.
    fn key(&self, k: &Value) -> Result<String, NotJsonSerializable> {
        let mut s = String::new();
        match k.kind() {
            ValueKind::String => s.push_str(k.as_str().unwrap_or_default()),
            ValueKind::None => s.push_str("null"),
            ValueKind::Bool => s.push_str(if k.is_true() { "true" } else { "false" }),
            ValueKind::Number => match as_float(k) {
                Some(f) => float_repr(f, &mut s),
                None => {
                    let _ = write!(s, "{k}");
                }
            },
            _ => return Err(NotJsonSerializable("key")),
        }
        Ok(s)
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.opts.ensure_ascii && (c as u32) > 0x7e => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC calendar time broken down as `struct tm`.
struct Tm {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    micros: u32,
    /// 0 = Monday
    weekday: u32,
    /// 1..=366
    yday: u32,
}

impl Tm {
    fn from_unix_micros(us: i64) -> Tm {
        let secs = us.div_euclid(1_000_000);
        let micros = us.rem_euclid(1_000_000) as u32;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUM[month as usize - 1] + day + u32::from(leap && month > 2);
        Tm {
            year,
            month,
            day,
            hour: sod / 3600,
            minute: sod / 60 % 60,
            second: sod % 60,
            micros,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as u32,
            yday,
        }
    }
}

/// `datetime.fromtimestamp(us / 1e6, UTC).strftime(format)` (naive: `%Z`/`%z` are empty).
pub(crate) fn strftime(format: &str, unix_micros: i64) -> String {
    let tm = Tm::from_unix_micros(unix_micros);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `-` flag: numbers without padding.
        let no_pad = chars.next_if_eq(&'-').is_some();
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |out: &mut String, n: i64, width: usize| {
            if no_pad {
                let _ = write!(out, "{n}");
            } else {
                let _ = write!(out, "{n:0width$}");
            }
        };
        let hour12 = match tm.hour % 12 {
            0 => 12,
            h => h,
        };
        match d {
            'a' => out.push_str(&WEEKDAYS[tm.weekday as usize][..3]),
            'A' => out.push_str(WEEKDAYS[tm.weekday as usize]),
            'b' | 'h' => out.push_str(&MONTHS[tm.month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[tm.month as usize - 1]),
            'c' => {
                let _ = write!(
                    out,
                    "{} {} {:>2} {:02}:{:02}:{:02} {}",
                    &WEEKDAYS[tm.weekday as usize][..3],
                    &MONTHS[tm.month as usize - 1][..3],
                    tm.day,
                    tm.hour,
                    tm.minute,
                    tm.second,
                    tm.year
                );
            }
            'C' => num(&mut out, tm.year.div_euclid(100), 2),
            'd' => num(&mut out, tm.day.into(), 2),
            'D' | 'x' => {
                let _ = write!(
                    out,
                    "{:02}/{:02}/{:02}",
                    tm.month,
                    tm.day,
                    tm.year.rem_euclid(100)
                );
            }
            'e' => {
                let _ = if no_pad {
                    write!(out, "{}", tm.day)
                } else {
                    write!(out, "{:>2}", tm.day)
                };
            }
            'f' => {
                let _ = write!(out, "{:06}", tm.micros);
            }
            'F' => {
                let _ = write!(out, "{}-{:02}-{:02}", tm.year, tm.month, tm.day);
            }
            'H' => num(&mut out, tm.hour.into(), 2),
            'I' => num(&mut out, hour12.into(), 2),
            'j' => num(&mut out, tm.yday.into(), 3),
            'm' => num(&mut out, tm.month.into(), 2),
            'M' => num(&mut out, tm.minute.into(), 2),
            'n' => out.push('\n'),
            'p' => out.push_str(if tm.hour < 12 { "AM" } else { "PM" }),
            'R' => {
                let _ = write!(out, "{:02}:{:02}", tm.hour, tm.minute);
            }
            'S' => num(&mut out, tm.second.into(), 2),
            't' => out.push('\t'),
            'T' | 'X' => {
                let _ = write!(out, "{:02}:{:02}:{:02}", tm.hour, tm.minute, tm.second);
            }
            'u' => num(&mut out, (tm.weekday + 1).into(), 1),
            'w' => num(&mut out, ((tm.weekday + 1) % 7).into(), 1),
            'y' => num(&mut out, tm.year.rem_euclid(100), 2),
            'Y' => {
                let _ = write!(out, "{}", tm.year);
            }
            'z' | 'Z' => {}
            '%' => out.push('%'),
            other => {
                // glibc copies an unknown conversion through unchanged.
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repr_f(x: f64) -> String {
        let mut s = String::new();
        float_repr(x, &mut s);
        s
    }

    #[test]
    fn floats_print_as_python_repr() {
        // Expected values are CPython 3.12's repr().
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-0.0, "-0.0"),
            (1e300, "1e+300"),
        ];
        for (x, want) in cases {
            assert_eq!(repr_f(x), want, "{x:e}");
        }
    }

    #[test]
    fn json_dumps_matches_python() {
        let v: Value = Value::from_pairs([
            ("b", Value::from("é\"\n\u{1}")),
            (
                "a",
                Value::from(vec![Value::from(1), Value::from(2.0), Value::from(())]),
            ),
            ("c", Value::from_pairs(Vec::<(&str, Value)>::new())),
        ]);
        let compact = json_dumps(&v, &JsonOptions::default()).unwrap();
        assert_eq!(
            compact,
            r#"{"b": "é\"\n\u0001", "a": [1, 2.0, null], "c": {}}"#
        );
        let opts = JsonOptions {
            ensure_ascii: true,
            indent: Some("  ".into()),
            sort_keys: true,
            ..Default::default()
        };
        assert_eq!(
            json_dumps(&v, &opts).unwrap(),
            "{\n  \"a\": [\n    1,\n    2.0,\n    null\n  ],\n  \"b\": \"\\u00e9\\\"\\n\\u0001\",\n  \"c\": {}\n}"
        );
    }

    #[test]
    fn str_and_repr_match_python() {
        let v = Value::from(vec![
            Value::from("it's"),
            Value::from("a'b\"c"),
            Value::from(true),
            Value::from(()),
            Value::from("\u{a0}x\u{7f}"),
        ]);
        let mut s = String::new();
        py_str(&v, &mut s);
        assert_eq!(s, r#"["it's", 'a\'b"c', True, None, '\xa0x\x7f']"#);
    }

    #[test]
    fn strftime_formats_like_glibc() {
        // 2024-07-26 13:05:09.123456 UTC, a Friday, day 208 of a leap year.
        // Expected strings are CPython's `datetime.strftime` on glibc.
        let us = 1_721_999_109_123_456;
        let t = strftime(
            "%d %b %Y|%A %B %-d %e|%H:%M:%S.%f|%j %p %I|%y %m|%%|%Q|%c|%x",
            us,
        );
        assert_eq!(
            t,
            "26 Jul 2024|Friday July 26 26|13:05:09.123456|208 PM 01|24 07|%|%Q|Fri Jul 26 13:05:09 2024|07/26/24"
        );
        let jan5 = 1_672_876_800_000_000; // 2023-01-05 00:00:00
        assert_eq!(
            strftime("%e|%-m|%I %p|%u %w|%c", jan5),
            " 5|1|12 AM|4 4|Thu Jan  5 00:00:00 2023"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
    }
}
