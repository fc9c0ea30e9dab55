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
//! relayed as they come), or, when the client goes away before it, with status 499 and
//! `result="cancelled"`. Installed only when the access log is on.

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

/// What an access line says of a request, gathered before it is handled.
struct Line {
    method: axum::http::Method,
    path: String,
    request_id: String,
    started: Instant,
    booked: Booked,
}

impl Line {
    fn write(&self, status: u16, result: &str, endpoint: &str) {
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            method = %self.method,
            path = %self.path,
            status,
            result,
            routed = false,
            // As strings (quoted in text logs): a client's request id may hold spaces and `=`,
            // which unquoted would read as fields of their own.
            endpoint,
            duration_ms = self.started.elapsed().as_micros() as f64 / 1e3,
            request_id = self.request_id.as_str(),
            "request"
        );
    }
}

/// Writes the line of a request whose client went away before the response head (the
/// middleware's future is dropped then): status 499, nginx's "client closed request".
struct Cancelled(Option<Line>);

impl Drop for Cancelled {
    fn drop(&mut self) {
        if let Some(line) = self.0.take()
            && !line.booked.0.load(Ordering::Relaxed)
        {
            line.write(499, "cancelled", "");
        }
    }
}

/// The middleware: runs the request, then logs it unless a booking does.
pub(crate) async fn log_unbooked(mut req: Request, next: Next) -> Response {
    let header = |v: Option<&axum::http::HeaderValue>| {
        v.and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
    };
    let booked = Booked::default();
    req.extensions_mut().insert(booked.clone());
    let mut pending = Cancelled(Some(Line {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        request_id: header(req.headers().get(REQUEST_ID_HEADER)),
        started: Instant::now(),
        booked,
    }));
    let resp = next.run(req).await;
    if let Some(line) = pending.0.take()
        && !line.booked.0.load(Ordering::Relaxed)
    {
        let status = resp.status();
        let result = if status.is_success() { "ok" } else { "refused" };
        line.write(
            status.as_u16(),
            result,
            &header(resp.headers().get(ENDPOINT_RESPONSE_HEADER)),
        );
    }
    resp
}
