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
