//! The picker's Prometheus metrics: the gateway's set (`kvgate_gateway_*`: requests, decisions,
//! TTFT/TPOT, usage, signal ages, in-flight), recorded with the same meaning, plus what only an
//! ext_proc server has (`kvgate_epp_*`: streams, immediate responses, the time spent deciding).
//! Both are registered in one registry and served as one OpenMetrics document on the metrics
//! port by the runtime's `/metrics` handler, the one `kvgate serve` uses.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use kvgate_runtime::metrics::DataPlaneMetrics;

/// Labels of `kvgate_epp_immediate_responses_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// HTTP status sent to the client instead of routing.
    pub status: u16,
}

/// Buckets of the decision-time histogram, seconds: 10 µs to ~0.65 s in ×2 steps. Parsing,
/// tokenising and picking a small request take tens of µs; a 200 KB prompt takes milliseconds.
fn decision_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_01, 2.0, 17)
}

/// Every metric the picker exports.
pub struct EppMetrics {
    /// The gateway's metrics, shared with [`kvgate_runtime::control::Control`].
    pub gateway: Arc<DataPlaneMetrics>,
    /// ext_proc streams opened by Envoy.
    pub streams: Counter,
    /// Requests answered by the picker itself, by status.
    pub immediate_responses: Family<StatusLabels, Counter>,
    /// From the end of the request body to the routing answer, seconds (parse, tokenise, pick).
    pub decision_seconds: Histogram,
}

impl std::fmt::Debug for EppMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EppMetrics").finish_non_exhaustive()
    }
}

impl Default for EppMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EppMetrics {
    /// The gateway's metric set with the picker's own registered beside it, under `kvgate_epp`.
    pub fn new() -> Self {
        let streams = Counter::default();
        let immediate_responses = Family::<StatusLabels, Counter>::default();
        let decision_seconds = Histogram::new(decision_buckets());
        let gateway = DataPlaneMetrics::with_extra(|root| {
            let registry = root.sub_registry_with_prefix("kvgate_epp");
            registry.register(
                "streams",
                "ext_proc streams opened by Envoy",
                streams.clone(),
            );
            registry.register(
                "immediate_responses",
                "Requests answered by the picker (errors, no endpoint, shed), by HTTP status",
                immediate_responses.clone(),
            );
            registry.register(
                "decision_seconds",
                "Time from the end of the request body to the routing answer",
                decision_seconds.clone(),
            );
        });
        Self {
            gateway: Arc::new(gateway),
            streams,
            immediate_responses,
            decision_seconds,
        }
    }

    /// Both metric sets as one OpenMetrics text document.
    pub fn encode(&self) -> String {
        self.gateway.encode()
    }
}
