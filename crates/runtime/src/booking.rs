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
//! - **Records at the end.** A booking given a [`Recorder`] ([`Booking::record_to`]) writes the
//!   request's route receipt, trace line and access-log line once, when it ends, however it
//!   ends ([`crate::decision_log`]).
//!
//! Failure mapping lives here as well, so both data planes penalise an engine's answer alike:
//! [`status_failure`] (5xx → server error, 429 → overloaded).

use std::sync::Arc;

use kvgate_core::endpoint::EndpointId;
use kvgate_core::request::{Decision, FailureKind, Phase, RoutingRequest};
use tokio::time::Instant;

use crate::control::{Control, Target};
use crate::decision_log::{Ended, Ending, Recorder, Recording, RequestInfo};
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

/// A request in a disaggregated fleet, booked by [`Control::pick_pd`]: the decode pod (serving
/// it whole, or its decode leg) and, when split, the prefill pod.
#[derive(Debug)]
pub struct PdBooking {
    /// Where the client's response comes from. Its TTFT and receipt are the client's.
    pub decode: Booking,
    /// The prefill leg when split: its TTFT is the prefill pod's answer, which teaches that
    /// pod's cost model like any first token.
    pub prefill: Option<Booking>,
    /// Why the decider split the request or kept it whole.
    pub reason: kvgate_core::PdReason,
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
    /// Written when the booking ends, if the data plane records requests.
    recording: Option<Recording>,
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
            recording: None,
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

    /// Writes this request's records with `recorder` when the booking ends (`info`: what the
    /// data plane knows of the request besides routing). The routing request should have been
    /// [prepared](Recorder::prepare) before the pick, so receipts explain it.
    pub fn record_to(&mut self, recorder: &Arc<Recorder>, info: RequestInfo) {
        let mut r = recorder.open(info, self.started);
        r.attempts.push(self.target.address.clone());
        self.recording = Some(r);
    }

    /// The engine's HTTP response status, for the records.
    pub fn set_status(&mut self, status: u16) {
        if let Some(r) = &mut self.recording {
            r.status = Some(status);
        }
    }

    fn end_recording(&mut self, ending: Ending<'_>) {
        if let Some(r) = self.recording.take() {
            r.end(Ended {
                control: &self.control,
                req: &mut self.req,
                decision: &self.decision,
                started: self.started,
                ending,
            });
        }
    }

    /// Records the first streamed token, seen at `now`: TTFT in the metrics and the core's
    /// calibration. Only the first call counts.
    pub fn first_token(&mut self, now: Instant) {
        if std::mem::replace(&mut self.first_token_seen, true) {
            return;
        }
        if let Some(r) = &mut self.recording {
            r.first_token_at = Some(now);
        }
        let measured = now.duration_since(self.started).as_secs_f64();
        let labels = self.endpoint_labels();
        // A prefill leg's answer is not a first token the client saw.
        if self.req.phase != Phase::Prefill {
            self.control
                .metrics
                .ttft_seconds
                .get_or_create(&labels)
                .observe(measured);
        }
        // The prediction is the primary's; a request moved elsewhere was not predicted there.
        if self.target.id == self.decision.primary
            && let Some(predicted_us) = self.decision.predicted_ttft_us
            && measured > 0.0
        {
            let error = (predicted_us as f64 / 1e6 - measured).abs() / measured;
            self.control
                .metrics
                .ttft_prediction_error
                .get_or_create(&labels)
                .observe(error);
        }
        self.control.on_first_token(self.req.id);
    }

    /// The response ended normally: records what was measured and reports the outcome.
    pub fn finish(mut self, measured: &Measured) {
        self.ended = true;
        let labels = self.endpoint_labels();
        if self.req.phase == Phase::Decode {
            // A split request's prompt was counted by its prefill leg; the decode pod's cached
            // tokens are the transferred prompt, not cache hits.
            if let Some(t) = measured.tpot_seconds {
                self.control
                    .metrics
                    .tpot_seconds
                    .get_or_create(&labels)
                    .observe(t);
            }
        } else {
            measured.observe(&self.control.metrics, &labels);
        }
        self.control.on_finish(self.req.id, &measured.outcome);
        self.end_recording(Ending::Finished(measured));
    }

    /// The request failed on its endpoint with `kind` (`label` names it in
    /// `upstream_errors{kind}`); the core penalises the endpoint accordingly.
    pub fn fail(mut self, label: &'static str, kind: FailureKind) {
        self.fail_attempt(label, kind);
        self.end_recording(Ending::Failed(label));
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
        if let Some(r) = &mut self.recording {
            r.attempts.push(self.target.address.clone());
        }
        self.ended = false;
        self.on_booked(RETRY_REASON);
        true
    }

    /// A decode leg whose prefill failed everywhere: the same decode pod now serves the request
    /// whole (it computes the prompt itself), so the core books it as such.
    pub fn serve_whole(&mut self) {
        if self.req.phase == Phase::Aggregated {
            return;
        }
        self.req.phase = Phase::Aggregated;
        // The split plan's prediction is not this plan's.
        self.decision.predicted_ttft_us = None;
        // Booked again on its own pod, planned afresh as a whole request.
        let _ = self
            .control
            .book_fallback(&self.req, &self.decision, self.target.id);
    }

    /// The leg ended where the data plane could not watch it (the prefill leg of a request an
    /// Envoy sidecar on the decode pod runs): released from the core's accounting without
    /// teaching it anything, and without counting a cancellation.
    pub fn release(mut self) {
        self.ended = true;
        self.control.forget(self.req.id);
        self.end_recording(Ending::Cancelled);
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
            // A split request's two legs end together: one cancellation, counted by its decode leg.
            if self.req.phase != Phase::Prefill {
                self.control.metrics.client_cancellations.inc();
            }
            self.control.on_failure(self.req.id, FailureKind::Cancelled);
            self.end_recording(Ending::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataPlaneConfig;
    use crate::meter::ResponseMeter;
    use crate::metrics::DataPlaneMetrics;
    use crate::openai::{ApiKind, parse_request};

    fn sum(text: &str, prefix: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn control() -> Arc<Control> {
        let cfg = DataPlaneConfig::from_yaml(
            "policy: round-robin\nendpoints:\n  - {url: 'http://127.0.0.1:9', models: [m]}\n  - {url: 'http://127.0.0.1:10', models: [m]}\n",
        )
        .unwrap();
        let control = Control::start(&cfg, Arc::new(DataPlaneMetrics::new())).unwrap();
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

    #[tokio::test]
    async fn a_recorded_booking_writes_one_receipt_however_it_ends() {
        use crate::config::RequestLogConfig;
        let control = control();
        let path = std::env::temp_dir().join(format!(
            "kvgate-booking-receipts-{}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let cfg = RequestLogConfig {
            decision_log: Some(path.clone()),
            ..RequestLogConfig::default()
        };
        let recorder = Recorder::start(&cfg, "round-robin", &control.metrics)
            .unwrap()
            .unwrap();
        for ending in 0..3 {
            let parsed =
                parse_request(ApiKind::Completions, br#"{"model":"m","prompt":"hi"}"#).unwrap();
            let mut req = control.routing_request(&parsed, None, None, None).unwrap();
            recorder.prepare(&mut req);
            let mut b = control.pick(req, Instant::now()).unwrap();
            b.record_to(
                &recorder,
                RequestInfo {
                    request_id: Some(format!("r{ending}")),
                    ..RequestInfo::default()
                },
            );
            match ending {
                0 => {
                    b.set_status(200);
                    b.finish(&ResponseMeter::new(true, false).finish());
                }
                1 => b.fail("status_5xx", FailureKind::ServerError),
                _ => drop(b),
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let lines = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() >= 3 || std::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let receipts: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(receipts.len(), 3, "{lines}");
        let results: Vec<&str> = receipts
            .iter()
            .map(|r| r["outcome"]["result"].as_str().unwrap())
            .collect();
        assert_eq!(results, ["ok", "status_5xx", "cancelled"]);
        assert_eq!(receipts[0]["outcome"]["status"], 200);
        assert_eq!(
            receipts[0]["candidates"].as_array().unwrap().len(),
            2,
            "both endpoints are candidates until one fails"
        );
        for (i, r) in receipts.iter().enumerate() {
            assert_eq!(r["request_id"], format!("r{i}"));
            assert_eq!(r["policy"], "round-robin");
            assert!(!r["candidates"].as_array().unwrap().is_empty(), "{r}");
            assert!(
                ["127.0.0.1:9", "127.0.0.1:10"].contains(&r["chosen"].as_str().unwrap()),
                "{r}"
            );
        }
        let _ = std::fs::remove_file(&path);
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
