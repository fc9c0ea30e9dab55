//! `/metrics` parsed by a real Prometheus text parser, checked against the engine's true state.

mod common;

use common::{client, fleet};
use openmetrics_parser::{PrometheusType, PrometheusValue};
use serde_json::json;

const EXPECTED: &[(&str, PrometheusType)] = &[
    ("vllm:num_requests_running", PrometheusType::Gauge),
    ("vllm:num_requests_waiting", PrometheusType::Gauge),
    ("vllm:kv_cache_usage_perc", PrometheusType::Gauge),
    ("vllm:prefix_cache_queries_total", PrometheusType::Counter),
    ("vllm:prefix_cache_hits_total", PrometheusType::Counter),
    ("vllm:request_success_total", PrometheusType::Counter),
    ("vllm:prompt_tokens_total", PrometheusType::Counter),
    ("vllm:generation_tokens_total", PrometheusType::Counter),
    ("vllm:num_preemptions_total", PrometheusType::Counter),
    (
        "vllm:time_to_first_token_seconds",
        PrometheusType::Histogram,
    ),
    (
        "vllm:inter_token_latency_seconds",
        PrometheusType::Histogram,
    ),
    (
        "vllm:e2e_request_latency_seconds",
        PrometheusType::Histogram,
    ),
    ("vllm:cache_config_info", PrometheusType::Gauge),
    ("vllm:lora_requests_info", PrometheusType::Gauge),
];

fn scalar(v: &PrometheusValue) -> f64 {
    match v {
        PrometheusValue::Gauge(g) => g.as_f64(),
        PrometheusValue::Counter(c) => c.value.as_f64(),
        PrometheusValue::Unknown(u) => u.as_f64(),
        other => panic!("not a scalar: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_parse_with_vllm_names_and_match_engine_state() {
    let f = fleet(1, |c| c.lora_adapters = vec!["sql".into()]).await;
    let url = format!("http://{}", f.engines[0].http_addr);
    let prompt = "shared prefix words for the cache ".repeat(10);
    for _ in 0..3 {
        let r = client()
            .post(format!("{url}/v1/completions"))
            .json(&json!({"prompt": prompt, "max_tokens": 5}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = client()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "sql", "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let text = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let truth = f.stats(0).await.unwrap();
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("unparseable exposition: {e:?}\n{text}"));
    for (name, kind) in EXPECTED {
        let fam = parsed
            .families
            .get(*name)
            .unwrap_or_else(|| panic!("missing family {name}\n{text}"));
        assert_eq!(&fam.family_type, kind, "{name}");
    }
    let value = |name: &str| {
        let fam = &parsed.families[name];
        let s = fam.iter_samples().next().unwrap();
        let labels = s.get_labelset().unwrap();
        assert_eq!(
            labels.get_label_value("model_name"),
            Some(kvgate_sim::config::DEFAULT_MODEL)
        );
        assert_eq!(labels.get_label_value("engine"), Some("0"));
        scalar(&s.value)
    };
    assert_eq!(value("vllm:num_requests_running"), 0.0);
    assert_eq!(value("vllm:num_requests_waiting"), 0.0);
    assert_eq!(
        value("vllm:prompt_tokens_total"),
        truth.prompt_tokens_total as f64
    );
    assert_eq!(value("vllm:generation_tokens_total"), 17.0);
    assert_eq!(
        value("vllm:prefix_cache_hits_total"),
        truth.prefix_cache_hits_tokens as f64
    );
    assert!(truth.prefix_cache_hits_tokens > 0, "repeated prompt hits");
    assert_eq!(
        value("vllm:prefix_cache_queries_total"),
        truth.prefix_cache_queries_tokens as f64
    );
    let success = &parsed.families["vllm:request_success_total"];
    let length = success
        .iter_samples()
        .find(|s| s.get_labelset().unwrap().get_label_value("finished_reason") == Some("length"))
        .unwrap();
    assert_eq!(scalar(&length.value), 4.0);

    for name in [
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
    ] {
        let fam = &parsed.families[name];
        let s = fam.iter_samples().next().unwrap();
        let PrometheusValue::Histogram(h) = &s.value else {
            panic!("{name} is not a histogram")
        };
        assert_eq!(h.count, Some(4), "{name}");
        let counts: Vec<f64> = h.buckets.iter().map(|b| b.count.as_f64()).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "cumulative");
        assert!(h.sum.as_ref().is_some_and(|s| s.as_f64() > 0.0));
    }
    let cache = &parsed.families["vllm:cache_config_info"];
    let s = cache.iter_samples().next().unwrap();
    let labels = s.get_labelset().unwrap();
    assert_eq!(labels.get_label_value("block_size"), Some("16"));
    assert_eq!(
        labels.get_label_value("num_gpu_blocks"),
        Some(truth.num_gpu_blocks.to_string().as_str())
    );
    assert_eq!(
        labels.get_label_value("enable_prefix_caching"),
        Some("True")
    );
    assert_eq!(scalar(&s.value), 1.0);
    assert_eq!(
        labels.get_label_value("prefix_caching_hash_algo"),
        Some("sha256"),
        "vLLM's default"
    );
    let lora = &parsed.families["vllm:lora_requests_info"];
    let s = lora.iter_samples().next().unwrap();
    let labels = s.get_labelset().unwrap();
    assert_eq!(labels.get_label_value("max_lora"), Some("1"));
    assert!(scalar(&s.value) > 1.7e9, "a unix timestamp");
    f.shutdown().await;
}

#[tokio::test]
async fn metrics_faults() {
    let f = fleet(1, |c| c.engines[0].faults.metrics_unavailable = true).await;
    let r = client()
        .get(format!("http://{}/metrics", f.engines[0].http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    f.shutdown().await;
}

/// The label names of `vllm:cache_config_info` on a real vLLM 0.32, in the order it writes them
/// (from `crates/signals/tests/fixtures/vllm032/sha256_cbor/metrics.txt`).
const VLLM_032_CACHE_CONFIG_LABELS: &[&str] = &[
    "_block_size_resolved",
    "block_size",
    "cache_dtype",
    "cache_hit_alignment_tokens",
    "effective_attention_block_size",
    "enable_mamba_shared_prefix_checkpoint",
    "enable_prefix_caching",
    "engine",
    "gpu_memory_utilization",
    "hash_block_size",
    "is_attention_free",
    "kv_cache_dtype_skip_layers",
    "kv_cache_layout",
    "kv_cache_max_concurrency",
    "kv_cache_memory_bytes",
    "kv_cache_size_tokens",
    "kv_offloading_backend",
    "kv_offloading_size",
    "kv_sharing_fast_prefill",
    "mamba_block_size",
    "mamba_cache_dtype",
    "mamba_cache_mode",
    "mamba_page_size_padded",
    "mamba_ssm_cache_dtype",
    "num_cpu_blocks",
    "num_gpu_blocks",
    "num_gpu_blocks_override",
    "prefix_cache_retention_interval",
    "prefix_caching_hash_algo",
    "prefix_match_unit",
    "replayssm_buffer_len",
    "skip_page_size_padded",
    "sliding_window",
    "swa_bounded_replay",
    "use_kda_recoverssm",
    "use_replayssm",
    "user_specified_block_size",
];

/// Label names of the first sample line of `family` in a Prometheus text body, in order.
fn label_names(text: &str, family: &str) -> Vec<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{family}{{")))
        .unwrap_or_else(|| panic!("no {family} sample"));
    let inner = &line[family.len() + 1..line.rfind('}').unwrap()];
    inner
        .split("\",")
        .map(|kv| kv.split_once('=').unwrap().0.to_owned())
        .collect()
}

#[tokio::test]
async fn cache_config_info_and_label_order_match_a_real_vllm_0_32() {
    let f = fleet(1, |c| {
        c.engines[0].engine.prefix_caching_hash_algo = kvgate_engine::HashAlgo::Sha256Cbor;
    })
    .await;
    let text = client()
        .get(format!("http://{}/metrics", f.engines[0].http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        label_names(&text, "vllm:cache_config_info"),
        VLLM_032_CACHE_CONFIG_LABELS
    );
    assert!(text.contains("prefix_caching_hash_algo=\"sha256_cbor\""));
    assert_eq!(
        label_names(&text, "vllm:time_to_first_token_seconds_bucket"),
        ["engine", "le", "model_name"],
        "prometheus_client sorts label names"
    );
    // When the capture of a real engine is present, compare with it directly.
    let capture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../signals/tests/fixtures/vllm032/sha256_cbor/metrics.txt"
    );
    if let Ok(real) = std::fs::read_to_string(capture) {
        assert_eq!(
            label_names(&real, "vllm:cache_config_info"),
            VLLM_032_CACHE_CONFIG_LABELS
        );
    }
    f.shutdown().await;
}
