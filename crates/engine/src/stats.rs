//! Prometheus-shaped statistics with vLLM's histogram bucket bounds.

/// Bucket upper bounds of `vllm:time_to_first_token_seconds` (vLLM v1 `metrics/loggers.py`).
pub const TTFT_BUCKETS_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Bucket upper bounds of `vllm:inter_token_latency_seconds`.
pub const ITL_BUCKETS_S: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Bucket upper bounds of `vllm:e2e_request_latency_seconds`.
pub const E2E_BUCKETS_S: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A fixed-bucket histogram (Prometheus `le` semantics: a value equal to a bound falls in it).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Upper bounds, seconds, ascending.
    pub bounds_s: &'static [f64],
    /// Per-bucket counts, non-cumulative; `len = bounds_s.len() + 1`, the last is `+Inf`.
    pub counts: Vec<u64>,
    /// Sum of observed values, seconds.
    pub sum_s: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds_s`.
    pub fn new(bounds_s: &'static [f64]) -> Self {
        Self {
            bounds_s,
            counts: vec![0; bounds_s.len() + 1],
            sum_s: 0.0,
            count: 0,
        }
    }

    /// Records one value given in microseconds.
    pub fn observe_us(&mut self, us: u64) {
        let s = us as f64 / 1e6;
        let i = self.bounds_s.partition_point(|&b| b < s);
        self.counts[i] += 1;
        self.sum_s += s;
        self.count += 1;
    }

    /// Cumulative counts per bound plus `+Inf`, as Prometheus exposes `_bucket` series.
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |acc, &c| {
                *acc += c;
                Some(*acc)
            })
            .collect()
    }
}

/// A snapshot of an engine's gauges, counters and histograms (the vLLM `/metrics` set).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineStats {
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// `vllm:kv_cache_usage_perc`, 0..1 (cached-but-unreferenced blocks count as free).
    pub kv_usage: f64,
    /// `cache_config_info{num_gpu_blocks}`.
    pub num_gpu_blocks: u64,
    /// `cache_config_info{block_size}`.
    pub block_size: u32,
    /// `vllm:prefix_cache_queries_total`, tokens.
    pub prefix_cache_queries_tokens: u64,
    /// `vllm:prefix_cache_hits_total`, tokens.
    pub prefix_cache_hits_tokens: u64,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens_total: u64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens_total: u64,
    /// `vllm:num_preemptions_total`.
    pub preemptions_total: u64,
    /// `vllm:request_success_total{finished_reason="length"}`.
    pub finished_length: u64,
    /// Requests aborted (`finished_reason="abort"`).
    pub finished_abort: u64,
    /// Requests failed in the engine (`finished_reason="error"`): remote KV loads under the
    /// `fail` policy.
    pub finished_error: u64,
    /// `vllm:prompt_tokens_by_source_total{source="local_compute"}`: prompt tokens prefilled here.
    pub prompt_tokens_local_compute: u64,
    /// `...{source="local_cache_hit"}`: prompt tokens from this engine's prefix cache.
    pub prompt_tokens_local_cache_hit: u64,
    /// `...{source="external_kv_transfer"}`: prompt tokens loaded from a prefill engine.
    pub prompt_tokens_external_kv_transfer: u64,
    /// `vllm:prompt_tokens_cached_total`: prompt tokens not prefilled (the requests' `cached_tokens`).
    pub prompt_tokens_cached: u64,
    /// `vllm:prompt_tokens_recomputed_total`: cached tokens prefilled anyway (the last prompt
    /// token of a full-prompt hit).
    pub prompt_tokens_recomputed: u64,
    /// `vllm:external_prefix_cache_queries_total`, tokens: prompts of remote-prefill requests.
    pub external_prefix_cache_queries_tokens: u64,
    /// `vllm:external_prefix_cache_hits_total`, tokens: prompt tokens to load from remote.
    pub external_prefix_cache_hits_tokens: u64,
    /// Requests waiting for remote KV (vLLM `WAITING_FOR_REMOTE_KVS`), included in `waiting`.
    pub waiting_for_remote_kv: u32,
    /// Finished remote-decode requests whose blocks are held for a decode engine.
    pub kv_holds: u32,
    /// Blocks those holds keep referenced.
    pub kv_hold_blocks: u64,
    /// Holds freed by the timeout, unread.
    pub kv_holds_expired: u64,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `vllm:inter_token_latency_seconds`.
    pub itl: Histogram,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_inclusive_and_overflow_goes_to_inf() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe_us(100_000);
        h.observe_us(100_001);
        h.observe_us(5_000_000);
        assert_eq!(h.counts, vec![1, 1, 1]);
        assert_eq!(h.cumulative(), vec![1, 2, 3]);
        assert_eq!(h.count, 3);
        assert!((h.sum_s - 5.200001).abs() < 1e-9);
    }

    #[test]
    fn bucket_lists_are_ascending() {
        for b in [TTFT_BUCKETS_S, ITL_BUCKETS_S, E2E_BUCKETS_S] {
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
