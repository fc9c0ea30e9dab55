//! A request booked on an endpoint, as both data planes carry it: returned by
//! [`Control::pick`](crate::control::Control::pick), it reports the request's life to the core
//! (first token, finish, failure, a move to another endpoint) and records the per-request
//! metrics, each exactly once.
//!
//! Why one type: the HTTP gateway and the Envoy picker learn the same facts about a request
//! through different wires (hyper frames vs. ext_proc messages). When each kept its own guard,
//! the two drifted (which metrics a retry counted, when TTFT was observed). Here the rules are
//! written once:
//! - **Decision metrics at booking.** `decisions{endpoint, reason}` is counted when the pick is
//!   booked, and `reason="retry"` for every later endpoint the request moves to.
//! - **TTFT once.** The first [`Booking::first_token`] records TTFT (from the instant the data
//!   plane had the request) and tells the core; later calls do nothing.
//! - **One ending.** [`Booking::finish`] and [`Booking::fail`] consume the booking. A booking
//!   dropped without either (client gone, stream reset, task cancelled) is reported to the core
//!   as [`FailureKind::Cancelled`], which carries no penalty, and counted as a client
//!   cancellation.
//! - **Moves are bookings too.** When a request is served elsewhere (a retry on a fallback, or
//!   Envoy reporting another endpoint), the attempt that did not serve is reported with its
//!   failure kind and the request is booked afresh (under a new request id) on the new endpoint,
//!   never on one it already tried.
//!
//! Failure mapping lives here as well, so both data planes penalise an engine's answer alike:
//! [`status_failure`] (5xx → server error, 429 → overloaded).

use std::sync::Arc;

use kvgate_core::endpoint::EndpointId;
use kvgate_core::request::{Decision, FailureKind, RoutingRequest};
use tokio::time::Instant;

use crate::control::{Control, Target};
use crate::meter::Measured;
use crate::metrics::{DecisionLabels, EndpointLabels, UpstreamErrorLabels};

/// Decision reason label of a request moved to another endpoint after its first one failed.
pub const RETRY_REASON: &str = "retry";

/// How an engine's response status counts against it, with its metrics label: 5xx (the pod is
/// broken or restarting) is a server error, 429 (the pod is overloaded) is overload; anything
/// else is not a failure of the engine.
pub fn status_failure(status: u16) -> Option<(&'static str, FailureKind)> {
    match status {
        500..=599 => Some(("status_5xx", FailureKind::ServerError)),
        429 => Some(("status_429", FailureKind::Overloaded)),
        _ => None,
    }
}

/// A request booked on one endpoint (see the module docs).
pub struct Booking {
    control: Arc<Control>,
    req: RoutingRequest,
    decision: Decision,
    target: Target,
    /// Endpoints this request was booked on, primary first.
    tried: Vec<EndpointId>,
    /// When the data plane had the request (TTFT runs from here).
    started: Instant,
    first_token_seen: bool,
    /// The current attempt has been reported to the core (finished or failed).
    ended: bool,
}

impl std::fmt::Debug for Booking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Booking")
            .field("request_id", &self.req.id)
            .field("endpoint", &self.target.address)
            .field("tried", &self.tried)
            .finish_non_exhaustive()
    }
}

impl Booking {
    /// Wraps a fresh booking of `req` on `target` (the core already booked it) and counts the
    /// decision.
    pub(crate) fn new(
        control: Arc<Control>,
        req: RoutingRequest,
        decision: Decision,
        target: Target,
        started: Instant,
    ) -> Self {
        let reason = decision.reason.as_str();
        let booking = Self {
            tried: vec![target.id],
            control,
            req,
            decision,
            target,
            started,
            first_token_seen: false,
            ended: false,
        };
        booking.on_booked(reason);
        booking
    }

    fn on_booked(&self, reason: &str) {
        self.control
            .metrics
            .decisions
            .get_or_create(&DecisionLabels {
                endpoint: self.target.address.to_string(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The endpoint the request is booked on now.
    pub fn endpoint(&self) -> EndpointId {
        self.target.id
    }

    /// The `host:port` of that endpoint.
    pub fn address(&self) -> &Arc<str> {
        &self.target.address
    }

    /// The decision the request was first booked with (primary and ranked fallbacks).
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The routing request as booked (its id changes with every move).
    pub fn request(&self) -> &RoutingRequest {
        &self.req
    }

    /// Records the first streamed token, seen at `now`: TTFT in the metrics and the core's
    /// calibration. Only the first call counts.
    pub fn first_token(&mut self, now: Instant) {
        if std::mem::replace(&mut self.first_token_seen, true) {
            return;
        }
        self.control
            .metrics
            .ttft_seconds
            .get_or_create(&self.endpoint_labels())
            .observe(now.duration_since(self.started).as_secs_f64());
        self.control.on_first_token(self.req.id);
    }

    /// The response ended normally: records what was measured and reports the outcome.
    pub fn finish(mut self, measured: &Measured) {
        self.ended = true;
        measured.observe(&self.control.metrics, &self.endpoint_labels());
        self.control.on_finish(self.req.id, &measured.outcome);
    }

    /// The request failed on its endpoint with `kind` (`label` names it in
    /// `upstream_errors{kind}`); the core penalises the endpoint accordingly.
    pub fn fail(mut self, label: &'static str, kind: FailureKind) {
        self.fail_attempt(label, kind);
    }

    fn fail_attempt(&mut self, label: &'static str, kind: FailureKind) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.control
            .metrics
            .upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                endpoint: self.target.address.to_string(),
                kind: label,
            })
            .inc();
        self.control.on_failure(self.req.id, kind);
    }

    /// The request is served by `endpoint` instead (a retry, or the proxy reporting where it
    /// went): the current attempt is reported as failed with `kind` (`label` in the metrics)
    /// and the request is booked afresh on `endpoint`. Returns false, changing nothing, when
    /// `endpoint` was already tried or is no longer a member.
    pub fn move_to(
        &mut self,
        endpoint: EndpointId,
        label: &'static str,
        kind: FailureKind,
    ) -> bool {
        if self.tried.contains(&endpoint) {
            return false;
        }
        let mut req = self.req.clone();
        req.id = self.control.next_request_id();
        let Some(target) = self.control.book_fallback(&req, &self.decision, endpoint) else {
            return false;
        };
        self.fail_attempt(label, kind);
        self.tried.push(endpoint);
        self.req = req;
        self.target = target;
        self.ended = false;
        self.on_booked(RETRY_REASON);
        true
    }

    /// Moves the request to the next of the decision's fallbacks it has not tried yet (see
    /// [`Booking::move_to`]); false when none is left.
    pub fn retry(&mut self, label: &'static str, kind: FailureKind) -> bool {
        let untried: Vec<EndpointId> = self
            .decision
            .fallbacks
            .iter()
            .copied()
            .filter(|id| !self.tried.contains(id))
            .collect();
        for id in untried {
            if self.move_to(id, label, kind) {
                return true;
            }
            // Gone from membership since the pick: never offer it again.
            self.tried.push(id);
        }
        false
    }

    fn endpoint_labels(&self) -> EndpointLabels {
        EndpointLabels {
            endpoint: self.target.address.to_string(),
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        if !self.ended {
            self.control.metrics.client_cancellations.inc();
            self.control.on_failure(self.req.id, FailureKind::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;
    use crate::meter::ResponseMeter;
    use crate::metrics::GatewayMetrics;
    use crate::openai::{ApiKind, parse_request};

    fn sum(text: &str, prefix: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn control() -> Arc<Control> {
        let cfg = GatewayConfig::from_yaml(
            "policy: round-robin\nendpoints:\n  - {url: 'http://127.0.0.1:9', models: [m]}\n  - {url: 'http://127.0.0.1:10', models: [m]}\n",
        )
        .unwrap();
        let control = Control::start(&cfg, Arc::new(GatewayMetrics::new())).unwrap();
        control.set_endpoints(&cfg.endpoints);
        control
    }

    fn book(control: &Arc<Control>) -> Booking {
        let parsed =
            parse_request(ApiKind::Completions, br#"{"model":"m","prompt":"hi"}"#).unwrap();
        let req = control.routing_request(&parsed, None, None, None).unwrap();
        control.pick(req, Instant::now()).unwrap()
    }

    #[tokio::test]
    async fn a_booking_records_each_metric_once_and_a_dropped_one_is_cancelled() {
        let control = control();
        let mut b = book(&control);
        let now = Instant::now();
        b.first_token(now);
        b.first_token(now);
        let m = control.metrics.encode();
        assert_eq!(sum(&m, "kvgate_gateway_ttft_seconds_count"), 1.0, "{m}");
        assert_eq!(sum(&m, "kvgate_gateway_decisions_total{"), 1.0, "{m}");
        b.finish(&ResponseMeter::new(true, false).finish());
        let m = control.metrics.encode();
        assert_eq!(sum(&m, "kvgate_gateway_client_cancellations_total"), 0.0);
        assert_eq!(control.with_router(|r| r.in_flight()), 0);

        let dropped = book(&control);
        assert_eq!(control.with_router(|r| r.in_flight()), 1);
        drop(dropped);
        let m = control.metrics.encode();
        assert_eq!(sum(&m, "kvgate_gateway_client_cancellations_total"), 1.0);
        assert_eq!(control.with_router(|r| r.in_flight()), 0);

        let failed = book(&control);
        failed.fail("status_5xx", FailureKind::ServerError);
        let m = control.metrics.encode();
        assert_eq!(sum(&m, "kvgate_gateway_client_cancellations_total"), 1.0);
        assert_eq!(sum(&m, "kvgate_gateway_upstream_errors_total{"), 1.0);
    }

    #[tokio::test]
    async fn a_booking_moves_once_to_each_untried_endpoint() {
        let control = control();
        let mut b = book(&control);
        let first = b.endpoint();
        let first_id = b.request().id;
        assert!(!b.move_to(first, "connect", FailureKind::Connect));
        assert!(b.retry("connect", FailureKind::Connect));
        assert_ne!(b.endpoint(), first);
        assert_ne!(
            b.request().id,
            first_id,
            "a move books under a fresh request id"
        );
        assert!(
            !b.retry("connect", FailureKind::Connect),
            "both endpoints tried"
        );
        assert_eq!(control.with_router(|r| r.in_flight()), 1);
        let m = control.metrics.encode();
        assert_eq!(sum(&m, "kvgate_gateway_decisions_total{"), 2.0, "{m}");
        assert!(m.contains(r#"reason="retry"} 1"#), "{m}");
        assert_eq!(sum(&m, "kvgate_gateway_upstream_errors_total{"), 1.0, "{m}");
        drop(b);
        assert_eq!(control.with_router(|r| r.in_flight()), 0);
    }

    #[test]
    fn engine_statuses_map_to_failure_kinds() {
        assert_eq!(
            status_failure(503),
            Some(("status_5xx", FailureKind::ServerError))
        );
        assert_eq!(
            status_failure(500),
            Some(("status_5xx", FailureKind::ServerError))
        );
        assert_eq!(
            status_failure(429),
            Some(("status_429", FailureKind::Overloaded))
        );
        assert_eq!(status_failure(200), None);
        assert_eq!(status_failure(404), None);
    }
}
