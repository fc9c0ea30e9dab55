//! Access-log lines for the requests no booking records: those answered before routing (a bad
//! body, an unknown model, no endpoint, a shed request), the pass-through routes, `/v1/models`,
//! health checks and unknown paths. A routed request's line is written when its booking ends
//! (`kvgate_runtime::decision_log`), with its endpoint, TTFT and token counts; this layer
//! writes one for every other request, so with `--access-log` each request gets exactly one
//! line.
//!
//! How the two are told apart: the layer puts a [`Booked`] flag on the request, and the proxy
//! sets it when it hands the request to a booking's recorder. The line is written when the
//! response head is ready (its `duration_ms` runs to the head; these responses are small or
//! relayed as they come). Installed only when the access log is on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use kvgate_runtime::decision_log::ACCESS_LOG_TARGET;
use tokio::time::Instant;

use crate::proxy::ENDPOINT_RESPONSE_HEADER;
use crate::stamp::REQUEST_ID_HEADER;

/// Set once a booking will write the request's access-log line.
#[derive(Clone, Debug, Default)]
pub(crate) struct Booked(Arc<AtomicBool>);

impl Booked {
    /// The booking's recorder writes the line.
    pub(crate) fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The middleware: runs the request, then logs it unless a booking does.
pub(crate) async fn log_unbooked(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let booked = Booked::default();
    req.extensions_mut().insert(booked.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_id = req.headers().get(REQUEST_ID_HEADER).cloned();
    let resp = next.run(req).await;
    if !booked.0.load(Ordering::Relaxed) {
        let header = |v: Option<&axum::http::HeaderValue>| {
            v.and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
        };
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            method = %method,
            path = %path,
            status = resp.status().as_u16(),
            result = if resp.status().is_success() { "ok" } else { "refused" },
            routed = false,
            // As strings (quoted in text logs): a client's request id may hold spaces and `=`,
            // which unquoted would read as fields of their own.
            endpoint = header(resp.headers().get(ENDPOINT_RESPONSE_HEADER)).as_str(),
            duration_ms = started.elapsed().as_micros() as f64 / 1e3,
            request_id = header(request_id.as_ref()).as_str(),
            "request"
        );
    }
    resp
}
