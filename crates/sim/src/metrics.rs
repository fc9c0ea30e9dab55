//! `/metrics` in Prometheus text format (0.0.4), with vLLM v1's metric names, help strings and
//! labels (`engine`, `model_name`), written the way vLLM 0.32's `prometheus_client` writes them
//! (checked against a capture of a real engine, `crates/signals/tests/fixtures/vllm032`): labels
//! in alphabetical order, counters declared with their `_total` name, values as floats (`1.0`),
//! histograms as cumulative `_bucket{le=...}` series ending at `+Inf`, then `_count` and `_sum`.
//! `prometheus_client`'s `_created` series and the families no router reads are left out.
//! `vllm:cache_config_info` carries the full label set of vLLM 0.32's `CacheConfig` (every
//! attribute, `str()`-formatted, plus `engine`, no `model_name`), with the simulated engine's
//! values where it has them (`block_size`, `num_gpu_blocks`, `enable_prefix_caching`,
//! `prefix_caching_hash_algo`, the derived KV sizes) and vLLM's defaults elsewhere.
//! `vllm:lora_requests_info` is written only when adapters are configured; its `max_lora` is
//! the number of configured adapters (the engine model has no adapter-slot limit, so all fit),
//! and an adapter counts as running from its first token, waiting before it.
//! vLLM's NIXL transfer families (`vllm:nixl_*`, `NixlPromMetrics`) are written by every engine,
//! as by a vLLM started with the NixlConnector: the decode side records its reads (simulated
//! transfer time, bytes, failures), the prefill side the holds that expired unread.

use std::fmt::Write;

use kvgate_engine::Histogram;

use crate::actor::Snapshot;
use crate::http::EngineShared;

/// Formats a sample value as `prometheus_client` does: integers keep a `.0`.
fn num(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

struct Writer {
    out: String,
    model: String,
}

impl Writer {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample with exactly these labels, written in alphabetical order.
    fn labelled(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let mut labels = labels.to_vec();
        labels.sort_unstable_by_key(|&(k, _)| k);
        let _ = write!(self.out, "{name}{{");
        for (i, (k, val)) in labels.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(self.out, "{sep}{k}=\"{}\"", escape(val));
        }
        let _ = writeln!(self.out, "}} {}", num(v));
    }

    /// One sample with the `engine` and `model_name` labels plus `extra`.
    fn sample(&mut self, name: &str, extra: &[(&str, &str)], v: f64) {
        let model = std::mem::take(&mut self.model);
        let mut labels = vec![("engine", "0"), ("model_name", model.as_str())];
        labels.extend_from_slice(extra);
        self.labelled(name, &labels, v);
        self.model = model;
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.header(name, "gauge", help);
        self.sample(name, &[], v);
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.header(name, "counter", help);
        self.sample(name, &[], v as f64);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let cumulative = h.cumulative();
        for (i, c) in cumulative.iter().enumerate() {
            let le = h.bounds_s.get(i).map_or("+Inf".to_owned(), |&b| num(b));
            self.sample(&bucket, &[("le", &le)], *c as f64);
        }
        self.sample(&format!("{name}_count"), &[], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum_s);
    }
}

/// `text` restricted to the samples named in `names`, as `prometheus_client` restricts a page
/// asked for with `?name[]=…` (its `RestrictedRegistry`, which vLLM serves below `/metrics/`):
/// a family keeps its `# HELP`/`# TYPE` lines and those of its samples whose name is listed,
/// and a family with none left is left out.
pub fn restrict(text: &str, names: &[&str]) -> String {
    let mut out = String::new();
    // The comment lines of the family being read, written before its first kept sample.
    let mut header = String::new();
    let mut header_written = false;
    for line in text.lines() {
        if line.starts_with("# HELP ") {
            header.clear();
            header_written = false;
        }
        if line.starts_with('#') {
            let to = if header_written {
                &mut out
            } else {
                &mut header
            };
            to.push_str(line);
            to.push('\n');
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        if names.contains(&name) {
            if !header_written {
                out.push_str(&header);
                header_written = true;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Renders one engine's metrics.
pub(crate) fn render(s: &EngineShared, snap: &Snapshot) -> String {
    let st = &snap.stats;
    let mut w = Writer {
        out: String::with_capacity(8 * 1024),
        model: s.model.clone(),
    };
    w.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        f64::from(st.running),
    );
    w.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        f64::from(st.waiting),
    );
    // Requests waiting for remote KV are vLLM's `skipped_waiting`, the "deferred" reason.
    w.header(
        "vllm:num_requests_waiting_by_reason",
        "gauge",
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for \
         scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV \
         transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
    );
    for (reason, v) in [
        ("capacity", st.waiting - st.waiting_for_remote_kv),
        ("deferred", st.waiting_for_remote_kv),
    ] {
        w.sample(
            "vllm:num_requests_waiting_by_reason",
            &[("reason", reason)],
            f64::from(v),
        );
    }
    w.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        st.kv_usage,
    );
    w.counter(
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
        st.prefix_cache_queries_tokens,
    );
    w.counter(
        "vllm:prefix_cache_hits_total",
        "Prefix cache hits, in terms of number of cached tokens.",
        st.prefix_cache_hits_tokens,
    );
    w.counter(
        "vllm:num_preemptions_total",
        "Cumulative number of preemption from the engine.",
        st.preemptions_total,
    );
    w.counter(
        "vllm:prompt_tokens_total",
        "Number of prefill tokens processed.",
        st.prompt_tokens_total,
    );
    w.counter(
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
        st.generation_tokens_total,
    );
    // vLLM's split of the prompt tokens (`PromptTokenStats`): a decode engine of a
    // disaggregated pair counts the whole prompt in `prompt_tokens_total` but computes one
    // token of it; the rest arrives by KV transfer.
    w.header(
        "vllm:prompt_tokens_by_source_total",
        "counter",
        "Number of prompt tokens by source.",
    );
    for (source, v) in [
        ("local_compute", st.prompt_tokens_local_compute),
        ("local_cache_hit", st.prompt_tokens_local_cache_hit),
        (
            "external_kv_transfer",
            st.prompt_tokens_external_kv_transfer,
        ),
    ] {
        w.sample(
            "vllm:prompt_tokens_by_source_total",
            &[("source", source)],
            v as f64,
        );
    }
    w.counter(
        "vllm:prompt_tokens_cached_total",
        "Number of cached prompt tokens (local + external).",
        st.prompt_tokens_cached,
    );
    w.header(
        "vllm:prompt_tokens_cached_by_source_total",
        "counter",
        "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host \
         (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or \
         external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + \
         vllm:external_prefix_cache_hits.",
    );
    for (source, v) in [
        ("device", st.prefix_cache_hits_tokens),
        ("host", 0),
        ("p2p", st.external_prefix_cache_hits_tokens),
        ("disk", 0),
        ("external_unspecified", 0),
    ] {
        w.sample(
            "vllm:prompt_tokens_cached_by_source_total",
            &[("source", source)],
            v as f64,
        );
    }
    w.counter(
        "vllm:external_prefix_cache_queries_total",
        "External prefix cache queries from KV connector cross-instance cache sharing, in \
         terms of number of queried tokens.",
        st.external_prefix_cache_queries_tokens,
    );
    w.counter(
        "vllm:external_prefix_cache_hits_total",
        "External prefix cache hits from KV connector cross-instance cache sharing, in terms \
         of number of cached tokens.",
        st.external_prefix_cache_hits_tokens,
    );
    {
        let nixl = s
            .nixl
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        w.histogram(
            "vllm:nixl_xfer_time_seconds",
            "Histogram of transfer duration for NIXL KV Cache transfers.",
            &nixl.xfer_time,
        );
        w.histogram(
            "vllm:nixl_bytes_transferred",
            "Histogram of bytes transferred per NIXL KV Cache transfers.",
            &nixl.bytes,
        );
        w.counter(
            "vllm:nixl_num_failed_transfers_total",
            "Number of failed NIXL KV Cache transfers.",
            nixl.failed,
        );
    }
    w.counter(
        "vllm:nixl_num_kv_expired_reqs_total",
        "Number of requests that had their KV expire. NOTE: This metric is tracked on the P \
         instance.",
        st.kv_holds_expired,
    );
    w.header(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    );
    // The simulated engine has no stop strings, so every completed request ends by length.
    for (reason, v) in [
        ("stop", 0),
        ("length", st.finished_length),
        ("abort", st.finished_abort),
        ("error", st.finished_error),
        ("repetition", 0),
    ] {
        w.sample(
            "vllm:request_success_total",
            &[("finished_reason", reason)],
            v as f64,
        );
    }
    w.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &st.ttft,
    );
    w.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &st.itl,
    );
    w.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &st.e2e,
    );
    w.header(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    let c = &s.config;
    let py_bool = |b: bool| if b { "True" } else { "False" };
    let block_size = st.block_size.to_string();
    let num_gpu_blocks = st.num_gpu_blocks.to_string();
    let size_tokens = st.num_gpu_blocks * u64::from(st.block_size);
    let kv_cache_size_tokens = size_tokens.to_string();
    let max_concurrency = num(size_tokens as f64 / c.max_model_len as f64);
    let user_block_size = py_bool(c.block_size != kvgate_engine::DEFAULT_BLOCK_SIZE);
    w.labelled(
        "vllm:cache_config_info",
        &[
            ("_block_size_resolved", "True"),
            ("block_size", &block_size),
            ("cache_dtype", "auto"),
            ("cache_hit_alignment_tokens", "None"),
            ("effective_attention_block_size", &block_size),
            ("enable_mamba_shared_prefix_checkpoint", "False"),
            ("enable_prefix_caching", py_bool(c.enable_prefix_caching)),
            ("engine", "0"),
            ("gpu_memory_utilization", "0.92"),
            ("hash_block_size", "None"),
            ("is_attention_free", "False"),
            ("kv_cache_dtype_skip_layers", "[]"),
            ("kv_cache_layout", "None"),
            ("kv_cache_max_concurrency", &max_concurrency),
            ("kv_cache_memory_bytes", "None"),
            ("kv_cache_size_tokens", &kv_cache_size_tokens),
            ("kv_offloading_backend", "native"),
            ("kv_offloading_size", "None"),
            ("kv_sharing_fast_prefill", "False"),
            ("mamba_block_size", "None"),
            ("mamba_cache_dtype", "auto"),
            ("mamba_cache_mode", "none"),
            ("mamba_page_size_padded", "None"),
            ("mamba_ssm_cache_dtype", "float32"),
            ("num_cpu_blocks", "None"),
            ("num_gpu_blocks", &num_gpu_blocks),
            ("num_gpu_blocks_override", "None"),
            ("prefix_cache_retention_interval", "0"),
            (
                "prefix_caching_hash_algo",
                c.prefix_caching_hash_algo.as_str(),
            ),
            ("prefix_match_unit", "None"),
            ("replayssm_buffer_len", "16"),
            ("skip_page_size_padded", "None"),
            ("sliding_window", "None"),
            ("swa_bounded_replay", "True"),
            ("use_kda_recoverssm", "False"),
            ("use_replayssm", "False"),
            ("user_specified_block_size", user_block_size),
        ],
        1.0,
    );
    if !s.adapters.is_empty() {
        let join = |m: &std::collections::BTreeMap<String, u32>| {
            m.keys().cloned().collect::<Vec<_>>().join(",")
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let name = "vllm:lora_requests_info";
        w.header(name, "gauge", "Running stats on lora requests.");
        // vLLM writes this family without model_name/engine labels.
        let _ = writeln!(
            w.out,
            "{name}{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
            s.adapters.len(),
            escape(&join(&snap.lora.running)),
            escape(&join(&snap.lora.waiting)),
            num(now)
        );
    }
    w.out
}

#[cfg(test)]
mod tests {
    use super::num;

    #[test]
    fn numbers_look_like_prometheus_client() {
        assert_eq!(num(1.0), "1.0");
        assert_eq!(num(0.001), "0.001");
        assert_eq!(num(2560.0), "2560.0");
        assert_eq!(num(f64::INFINITY), "+Inf");
        assert_eq!(num(0.25), "0.25");
    }
}
