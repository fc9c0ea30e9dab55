//! The data plane's own Prometheus metrics, kept separate from the engines' metrics it scrapes,
//! and the one `/metrics` handler both data planes serve them with ([`router`]).
//!
//! Everything here is an atomic counter, gauge or histogram from `prometheus-client`, updated on
//! the request path without locks; per-endpoint signal ages are computed when `/metrics` is
//! rendered, so they are exact at scrape time rather than as of the last request. The series are
//! named `kvgate_gateway_*` whichever data plane exports them (dashboards and alerts query one
//! name); a data plane adds its own under its own prefix ([`DataPlaneMetrics::with_extra`]), in
//! the same OpenMetrics document.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of `kvgate_gateway_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `chat`, `completions`, `embeddings`, `responses`, `models`.
    pub api: &'static str,
    /// HTTP status returned to the client.
    pub status: u16,
}

/// Labels of `kvgate_gateway_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Endpoint address.
    pub endpoint: String,
    /// Why it was chosen (`prefix_hit`, `least_cost`, ..., `retry`).
    pub reason: String,
}

/// Labels of `kvgate_gateway_request_records_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    /// `decision_log` or `capture_trace`.
    pub log: &'static str,
}

/// Labels keyed by endpoint only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Endpoint address.
    pub endpoint: String,
}

/// Labels of `kvgate_gateway_upstream_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    /// Endpoint address.
    pub endpoint: String,
    /// `connect`, `timeout`, `status_5xx`, `status_429`, `mid_stream`.
    pub kind: &'static str,
}

/// Labels of `kvgate_gateway_retries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// What made the previous attempt fail.
    pub cause: &'static str,
}

/// Labels of `kvgate_gateway_signal_age_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabels {
    /// Endpoint address.
    pub endpoint: String,
    /// `metrics` or `kv_events`.
    pub signal: &'static str,
}

/// Labels of `kvgate_gateway_kv_index_mode`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    /// Endpoint address.
    pub endpoint: String,
    /// `precise` or `approximate`.
    pub mode: &'static str,
}

/// Labels of `kvgate_gateway_tokenizer_probe`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// Endpoint address.
    pub endpoint: String,
    /// `agree` or `mismatch`.
    pub result: &'static str,
}

/// Labels of `kvgate_gateway_kv_index_blocks`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IndexLabels {
    /// Endpoint address.
    pub endpoint: String,
    /// `precise` (from KV events) or `approximate` (the gateway's own bookings).
    pub source: &'static str,
}

/// Labels of `kvgate_gateway_step_coefficient_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepTermLabels {
    /// Endpoint address.
    pub endpoint: String,
    /// `step_base` (β0, per engine step), `prefill_token` (β1, per prefill token) or
    /// `decode_sequence` (β2, per running sequence in a step).
    pub term: &'static str,
}

/// Labels of `kvgate_gateway_speed_factor`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpeedLabels {
    /// Endpoint address.
    pub endpoint: String,
    /// `prefill` (from first tokens) or `decode` (from TPOT).
    pub phase: &'static str,
}

/// Buckets of the TTFT histogram, seconds: 5 ms to ~41 s in ×2 steps, covering a cached short
/// prompt on an idle H100 up to a long prompt behind a deep queue.
fn ttft_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 14)
}

/// Buckets of the TTFT prediction error (relative): 5% to 10×, finer where a usable model
/// lives (below 50%).
const PREDICTION_ERROR_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0,
];

/// Buckets of the TPOT histogram, seconds: 1 ms to ~0.5 s in ×2 steps (decode steps are
/// 5-50 ms on current GPUs; the tails show batching and preemption).
fn tpot_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 10)
}

/// Every metric a data plane exports (`kvgate serve` and `kvgate epp`; the `kvgate_gateway_`
/// prefix is kept so dashboards and alerts built on it keep working).
pub struct DataPlaneMetrics {
    registry: Registry,
    /// Requests answered, by API and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Routing decisions, by endpoint and reason.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Time from request arrival to the first response byte of a stream, by endpoint.
    pub ttft_seconds: Family<EndpointLabels, Histogram>,
    /// Mean time per output token of a finished stream, by endpoint.
    pub tpot_seconds: Family<EndpointLabels, Histogram>,
    /// |predicted − measured| / measured TTFT of streams served where they were first booked,
    /// by endpoint: how honest the cost model is (MAPE = `_sum / _count`).
    pub ttft_prediction_error: Family<EndpointLabels, Histogram>,
    /// Prompt tokens reported in usage.
    pub prompt_tokens: Counter,
    /// Of those, tokens served from the engines' prefix caches.
    pub cached_prompt_tokens: Counter,
    /// `cached_prompt_tokens / prompt_tokens` over the gateway's lifetime.
    pub prefix_hit_ratio: Gauge<f64, AtomicU64>,
    /// Retries on another endpoint, by cause.
    pub retries: Family<RetryLabels, Counter>,
    /// Upstream failures, by endpoint and kind.
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    /// Age of the newest signal per endpoint (metrics scrape, KV event), seconds.
    pub signal_age_seconds: Family<SignalLabels, Gauge<f64, AtomicU64>>,
    /// Requests in flight per endpoint.
    pub in_flight: Family<EndpointLabels, Gauge>,
    /// Current interval between metrics scrapes per endpoint, seconds (see
    /// [`kvgate_signals::ScrapePace`]).
    pub scrape_interval_seconds: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    /// Size of the latest metrics page read per endpoint, bytes (a vLLM's is narrowed to the
    /// samples the router reads; see [`kvgate_signals::metrics::narrowed_metrics_url`]).
    pub scrape_body_bytes: Family<EndpointLabels, Gauge>,
    /// Client disconnects that cancelled an upstream request.
    pub client_cancellations: Counter,
    /// 1 for each endpoint's current prefix-tracking mode, 0 for the other.
    pub kv_index_mode: Family<ModeLabels, Gauge>,
    /// Outcome of the latest tokenizer probe per endpoint (1 on the current result).
    pub tokenizer_probe: Family<ProbeLabels, Gauge>,
    /// Prefix-index entries per endpoint and source, blocks.
    pub kv_index_blocks: Family<IndexLabels, Gauge>,
    /// Cached tokens routing predicted, for responses that reported cached tokens.
    pub cached_tokens_predicted: Family<EndpointLabels, Counter>,
    /// Cached tokens the engines reported, for the same responses.
    pub cached_tokens_reported: Family<EndpointLabels, Counter>,
    /// Per-request records dropped because their writer fell behind, by log.
    pub records_dropped: Family<RecordLabels, Counter>,
    /// The step-time coefficients the cost model prices each endpoint with (learnt online from
    /// its first tokens, the hardware prior until then), seconds.
    pub step_coefficient_seconds: Family<StepTermLabels, Gauge<f64, AtomicU64>>,
    /// First tokens each endpoint's coefficients were learnt from.
    pub step_model_observations: Family<EndpointLabels, Gauge>,
    /// Each endpoint's calibrated speed factor: the transient the learnt coefficients do not
    /// explain (1 = as learnt; ages back to 1 without evidence).
    pub speed_factor: Family<SpeedLabels, Gauge<f64, AtomicU64>>,
    /// Prefill/decode disaggregation.
    pub pd: PdMetrics,
}

/// Labels of `kvgate_gateway_pd_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PdDecisionLabels {
    /// `disaggregated` (prefill pod, transfer, decode pod) or `aggregated` (whole on the
    /// decode pod).
    pub phase: &'static str,
    /// The decider's reason ([`kvgate_core::PdReason::as_str`]), or `prefill_failed` for a
    /// request served whole after its prefill legs failed.
    pub reason: &'static str,
}

/// Labels of `kvgate_gateway_pd_transfers_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PdTransferLabels {
    /// `vllm-nixl` or `sglang-bootstrap`.
    pub protocol: &'static str,
    /// `ok` (the decode pod answered) or what failed: `prefill`, `no_transfer_params`,
    /// `decode`.
    pub outcome: &'static str,
}

/// The prefill/decode metrics of a data plane.
#[derive(Clone, Debug)]
pub struct PdMetrics {
    /// Requests by the plan they were served with and why.
    pub decisions: Family<PdDecisionLabels, Counter>,
    /// Disaggregated requests by protocol and outcome.
    pub transfers: Family<PdTransferLabels, Counter>,
    /// From the prefill pod's answer (vllm-nixl; for sglang-bootstrap, from sending both legs)
    /// to the decode pod's first response byte: the transfer plus the decode pod's start.
    pub transfer_seconds: Histogram,
    /// Prefill legs retried on another prefill pod, by cause.
    pub prefill_retries: Family<RetryLabels, Counter>,
}

impl PdMetrics {
    fn new() -> Self {
        Self {
            decisions: Family::default(),
            transfers: Family::default(),
            transfer_seconds: Histogram::new(ttft_buckets()),
            prefill_retries: Family::default(),
        }
    }

    /// Counts one prefill leg retried because of `cause`.
    pub fn count_prefill_retry(&self, cause: &'static str) {
        self.prefill_retries
            .get_or_create(&RetryLabels { cause })
            .inc();
    }

    /// Counts one request served with plan `phase` (`disaggregated` or `aggregated`) for
    /// `reason`.
    pub fn count_decision(&self, phase: &'static str, reason: &'static str) {
        self.decisions
            .get_or_create(&PdDecisionLabels { phase, reason })
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "pd_decisions",
            "Prefill/decode plans chosen, by phase (disaggregated or aggregated) and reason",
            self.decisions.clone(),
        );
        registry.register(
            "pd_transfers",
            "Disaggregated requests by KV transfer protocol and outcome",
            self.transfers.clone(),
        );
        registry.register(
            "pd_transfer_seconds",
            "From the prefill pod's answer to the decode pod's first byte, seconds",
            self.transfer_seconds.clone(),
        );
        registry.register(
            "pd_prefill_retries",
            "Prefill legs retried on another prefill pod, by cause",
            self.prefill_retries.clone(),
        );
    }
}

impl std::fmt::Debug for DataPlaneMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneMetrics").finish_non_exhaustive()
    }
}

impl Default for DataPlaneMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DataPlaneMetrics {
    /// Removes the series that describe `endpoint`'s current state (gauges: signal ages, in
    /// flight, scrape interval, index blocks and mode, tokenizer probe, learnt coefficients,
    /// speed factors) once it has left: frozen at their last values they kept alerts such as
    /// "signal older than 30 s" firing for an endpoint that no longer exists, and their number
    /// grew with every pod address ever seen. Counters and histograms (requests, decisions,
    /// TTFT, …) stay: what happened is still true, and `rate()` ends with them.
    pub fn forget_endpoint(&self, endpoint: &str) {
        let e = || endpoint.to_owned();
        for signal in ["metrics", "kv_events"] {
            self.signal_age_seconds.remove(&SignalLabels {
                endpoint: e(),
                signal,
            });
        }
        let labels = EndpointLabels { endpoint: e() };
        self.in_flight.remove(&labels);
        self.scrape_interval_seconds.remove(&labels);
        self.scrape_body_bytes.remove(&labels);
        self.step_model_observations.remove(&labels);
        for mode in ["precise", "approximate"] {
            self.kv_index_mode.remove(&ModeLabels {
                endpoint: e(),
                mode,
            });
            self.kv_index_blocks.remove(&IndexLabels {
                endpoint: e(),
                source: mode,
            });
        }
        for result in ["agree", "mismatch"] {
            self.tokenizer_probe.remove(&ProbeLabels {
                endpoint: e(),
                result,
            });
        }
        for term in [
            "step_base",
            "prefill_token",
            "decode_sequence",
            "attention_pair",
        ] {
            self.step_coefficient_seconds.remove(&StepTermLabels {
                endpoint: e(),
                term,
            });
        }
        for phase in ["prefill", "decode"] {
            self.speed_factor.remove(&SpeedLabels {
                endpoint: e(),
                phase,
            });
        }
    }

    /// Every metric registered under the `kvgate_gateway` prefix.
    pub fn new() -> Self {
        Self::with_extra(|_| {})
    }

    /// Every metric under `kvgate_gateway`, plus what `extra` registers in the same document (a
    /// data plane's own metrics, under its own prefix via `sub_registry_with_prefix`).
    pub fn with_extra(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut root = Registry::default();
        extra(&mut root);
        let registry = root.sub_registry_with_prefix("kvgate_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        let ttft_seconds = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(ttft_buckets()) as Histogram
        });
        let tpot_seconds = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(tpot_buckets()) as Histogram
        });
        let ttft_prediction_error =
            Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(PREDICTION_ERROR_BUCKETS) as Histogram
            });
        let prompt_tokens = Counter::default();
        let cached_prompt_tokens = Counter::default();
        let prefix_hit_ratio = Gauge::<f64, AtomicU64>::default();
        let retries = Family::<RetryLabels, Counter>::default();
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let signal_age_seconds = Family::<SignalLabels, Gauge<f64, AtomicU64>>::default();
        let in_flight = Family::<EndpointLabels, Gauge>::default();
        let scrape_interval_seconds = Family::<EndpointLabels, Gauge<f64, AtomicU64>>::default();
        let scrape_body_bytes = Family::<EndpointLabels, Gauge>::default();
        let client_cancellations = Counter::default();
        let kv_index_mode = Family::<ModeLabels, Gauge>::default();
        let cached_tokens_predicted = Family::<EndpointLabels, Counter>::default();
        let kv_index_blocks = Family::<IndexLabels, Gauge>::default();
        let tokenizer_probe = Family::<ProbeLabels, Gauge>::default();
        let records_dropped = Family::<RecordLabels, Counter>::default();
        let step_coefficient_seconds = Family::<StepTermLabels, Gauge<f64, AtomicU64>>::default();
        let step_model_observations = Family::<EndpointLabels, Gauge>::default();
        let speed_factor = Family::<SpeedLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "step_coefficient_seconds",
            "Step-time coefficients the cost model prices each endpoint with, learnt online from its first tokens (the hardware prior until then): step_base per engine step, prefill_token per prefill token, decode_sequence per running sequence in a step, attention_pair per pair of a prefill token and an earlier token of its sequence",
            step_coefficient_seconds.clone(),
        );
        registry.register(
            "step_model_observations",
            "First tokens each endpoint's step-time coefficients were learnt from",
            step_model_observations.clone(),
        );
        registry.register(
            "speed_factor",
            "Calibrated speed factor per endpoint and phase: what the learnt coefficients do not explain (1 = as learnt; a stall shows here and ages back to 1)",
            speed_factor.clone(),
        );
        let pd = PdMetrics::new();
        pd.register(registry);
        registry.register(
            "request_records_dropped",
            "Decision-log and captured-trace records dropped because the writer fell behind (the request itself was served)",
            records_dropped.clone(),
        );
        registry.register(
            "tokenizer_probe",
            "Latest comparison of the gateway's tokens with the engine's /tokenize for a probe conversation (1 on the result: agree or mismatch)",
            tokenizer_probe.clone(),
        );
        registry.register(
            "kv_index_blocks",
            "Prefix-index entries per endpoint: precise (learnt from KV events) and approximate (the gateway's own bookings)",
            kv_index_blocks.clone(),
        );
        let cached_tokens_reported = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "kv_index_mode",
            "Prefix tracking per endpoint: 1 on the current mode (precise: KV events trusted and agreeing with the engine's cached tokens; approximate: the router's own bookings)",
            kv_index_mode.clone(),
        );
        registry.register(
            "cached_tokens_predicted",
            "Cached prompt tokens the router predicted, over responses that reported cached tokens",
            cached_tokens_predicted.clone(),
        );
        registry.register(
            "cached_tokens_reported",
            "Cached prompt tokens the engines reported (usage.prompt_tokens_details.cached_tokens)",
            cached_tokens_reported.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by API and HTTP status",
            requests.clone(),
        );
        registry.register(
            "decisions",
            "Routing decisions, by endpoint and reason",
            decisions.clone(),
        );
        registry.register(
            "ttft_seconds",
            "Time to first token as seen by the gateway (request arrival to first streamed byte)",
            ttft_seconds.clone(),
        );
        registry.register(
            "tpot_seconds",
            "Mean time per output token of finished streams, as seen by the gateway",
            tpot_seconds.clone(),
        );
        registry.register(
            "ttft_prediction_error_ratio",
            "Relative error |predicted - measured| / measured of the TTFT the routing decision \
             predicted, for streams served where they were first booked (MAPE = sum / count)",
            ttft_prediction_error.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens reported in response usage",
            prompt_tokens.clone(),
        );
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens served from engine prefix caches (usage.prompt_tokens_details.cached_tokens)",
            cached_prompt_tokens.clone(),
        );
        registry.register(
            "prefix_hit_ratio",
            "Cached prompt tokens / prompt tokens over responses that reported usage",
            prefix_hit_ratio.clone(),
        );
        registry.register(
            "retries",
            "Retries on another endpoint, by cause",
            retries.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures, by endpoint and kind",
            upstream_errors.clone(),
        );
        registry.register(
            "signal_age_seconds",
            "Age of the newest metrics sample / KV event per endpoint",
            signal_age_seconds.clone(),
        );
        registry.register(
            "in_flight",
            "Requests in flight per endpoint",
            in_flight.clone(),
        );
        registry.register(
            "scrape_interval_seconds",
            "Current interval between metrics scrapes per endpoint (longer while its samples \
             hold only this gateway's requests)",
            scrape_interval_seconds.clone(),
        );
        registry.register(
            "scrape_body_bytes",
            "Size of the latest metrics page read per endpoint (a vLLM's is narrowed to the \
             samples the router reads)",
            scrape_body_bytes.clone(),
        );
        registry.register(
            "client_cancellations",
            "Client disconnects that cancelled an upstream request",
            client_cancellations.clone(),
        );
        Self {
            registry: root,
            requests,
            decisions,
            ttft_seconds,
            tpot_seconds,
            ttft_prediction_error,
            prompt_tokens,
            cached_prompt_tokens,
            prefix_hit_ratio,
            retries,
            upstream_errors,
            signal_age_seconds,
            in_flight,
            scrape_interval_seconds,
            scrape_body_bytes,
            client_cancellations,
            kv_index_mode,
            kv_index_blocks,
            tokenizer_probe,
            cached_tokens_predicted,
            cached_tokens_reported,
            records_dropped,
            step_coefficient_seconds,
            step_model_observations,
            speed_factor,
            pd,
        }
    }

    /// Counts one request retried on another endpoint because of `cause`.
    pub fn count_retry(&self, cause: &'static str) {
        self.retries.get_or_create(&RetryLabels { cause }).inc();
    }

    /// Counts usage figures into the hit-ratio metrics.
    pub fn observe_usage(&self, prompt_tokens: u32, cached_tokens: u32) {
        self.prompt_tokens.inc_by(u64::from(prompt_tokens));
        self.cached_prompt_tokens
            .inc_by(u64::from(cached_tokens.min(prompt_tokens)));
        let total = self.prompt_tokens.get();
        if total > 0 {
            self.prefix_hit_ratio
                .set(self.cached_prompt_tokens.get() as f64 / total as f64);
        }
    }

    /// Renders the OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Content type of the rendered document.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics` for either data plane: refreshes the gauges read at scrape time (signal ages,
/// in-flight, index sizes) and renders every metric of `control`.
pub fn router(control: Arc<crate::control::Control>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let control = control.clone();
            async move {
                control.refresh_gauges();
                (
                    [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
                    control.metrics.encode(),
                )
                    .into_response()
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_and_names_render() {
        let m = DataPlaneMetrics::new();
        m.observe_usage(100, 75);
        m.decisions
            .get_or_create(&DecisionLabels {
                endpoint: "a:1".into(),
                reason: "prefix_hit".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("kvgate_gateway_prefix_hit_ratio 0.75"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"kvgate_gateway_decisions_total{endpoint="a:1",reason="prefix_hit"} 1"#
            )
        );
    }

    #[test]
    fn extra_metrics_share_the_document_and_its_single_eof() {
        let extra = Counter::<u64>::default();
        let m = DataPlaneMetrics::with_extra(|root| {
            root.sub_registry_with_prefix("kvgate_epp").register(
                "streams",
                "Streams",
                extra.clone(),
            );
        });
        extra.inc();
        m.observe_usage(10, 5);
        let text = m.encode();
        assert!(text.contains("kvgate_epp_streams_total 1"), "{text}");
        assert!(
            text.contains("kvgate_gateway_prompt_tokens_total 10"),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
