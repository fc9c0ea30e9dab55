//! The HTTP data plane: reads and validates a request, asks [`Control`] where to send it, sends
//! it (retrying on another endpoint when the first one fails before answering), and streams the
//! answer back while measuring it.
//!
//! **Retry policy.** An attempt is retried on the next of the decision's fallbacks (endpoints
//! the core ranked after the primary, never one already tried) when the engine refused or
//! dropped the connection, the connect timed out ([`kvgate_runtime::config::DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS`]),
//! or it answered 5xx or 429 — all before a single response byte reached the client, so a retry
//! is invisible to it. At most `retry.max_attempts` attempts ([`kvgate_runtime::config::DEFAULT_MAX_ATTEMPTS`])
//! are made. Each failed attempt is reported to the core with its [`FailureKind`], which
//! penalises that endpoint for later picks. When every attempt fails, the last engine error
//! response is passed through as is, or a 502 if no engine answered at all. Once the response
//! head has been forwarded nothing is retried: a stream that breaks gets an OpenAI error event
//! (`data: {"error": ...}`) and `data: [DONE]`, so SDKs see a clean end and an error, and the
//! failure is counted and reported to the core.
//!
//! **Pass-through.** The request body is forwarded byte for byte, with one exception: a
//! streaming chat/completions request whose client did not ask for
//! `stream_options.include_usage` gets it set upstream (`inject_stream_usage`, on by default), and
//! the usage chunk is removed again from what that client receives, so every stream reports its
//! token counts and cached tokens to the metrics and the core's calibration. Streams whose client
//! asked for usage, and all other requests, are relayed untouched. Response bodies are relayed
//! frame by frame as they arrive from the engine, with no buffering (when stripping, only the
//! incomplete SSE event at the end of a frame waits for the rest of its bytes, which a client
//! could not act on anyway); a copy of the last few KiB of a stream (or of a non-streaming body up
//! to [`USAGE_WINDOW_BYTES`]) is kept to read `usage` at the end. Only an allow-list of request
//! headers is forwarded: routing headers a client might send (`x-gateway-destination-endpoint`
//! and the like) are dropped, and the gateway only ever connects to configured endpoints.
//!
//! **TTFT and TPOT.** TTFT is measured from the moment the gateway has the request head to the
//! first body frame of a successful streaming response (vLLM sends the first chunk when the
//! first token exists), so it includes retries and queueing, as a client sees it. TPOT is
//! `(last frame − first frame) / (completion tokens − 1)`, with completion tokens from the final
//! usage chunk when present, else the number of SSE `data:` events carrying tokens. Both go to
//! the metrics histograms and to the core's calibration through the request's
//! [`Booking`] (shared with the Envoy picker, so both record them alike).
//! Non-streaming responses report no TTFT (the engine answers only when done).
//!
//! **Cancellation.** Dropping a request (the client went away) drops the upstream response
//! future or body, which closes the upstream connection at once; vLLM (and `kvgate sim`) abort
//! the request when its connection closes. Dropping the [`Booking`] reports it to the core as
//! [`FailureKind::Cancelled`], which carries no penalty.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use kvgate_core::request::FailureKind;
use kvgate_runtime::booking::{Booking, status_failure};
use serde_json::Value;
use tokio::time::Instant;

use kvgate_runtime::config::{
    LLMD_OBJECTIVE_HEADER, Limits, OBJECTIVE_HEADER, SESSION_HEADER, UpstreamProtocol,
};
use kvgate_runtime::control::Control;
use kvgate_runtime::decision_log::{Recorder, RequestInfo};
use kvgate_runtime::meter::{ResponseMeter, USAGE_WINDOW_BYTES, find_byte};
use kvgate_runtime::metrics::{DataPlaneMetrics, RequestLabels};
use kvgate_runtime::openai::{ApiError, ApiKind, ParsedRequest, parse_request};

/// Budget for one endpoint's `/v1/models` during aggregation: the list is served from memory,
/// so a slow answer means a sick engine, which must not stall the client's listing.
const MODELS_TIMEOUT_MS: u64 = 2_000;

/// Request headers forwarded to engines; everything else (hop-by-hop, routing hints such as
/// `x-gateway-destination-endpoint`, cookies) stays at the gateway.
const FORWARDED_REQUEST_HEADERS: [HeaderName; 9] = [
    header::AUTHORIZATION,
    header::ACCEPT,
    header::USER_AGENT,
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    // What Anthropic SDKs send on /v1/messages (their API key, the API version and betas).
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
];

/// Response headers relayed to clients.
const FORWARDED_RESPONSE_HEADERS: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CACHE_CONTROL,
    HeaderName::from_static("x-request-id"),
    header::RETRY_AFTER,
];

/// Response header naming the endpoint that served the request (for operators and tests).
pub const ENDPOINT_RESPONSE_HEADER: &str = "x-kvgate-endpoint";

/// Shared state of the HTTP handlers.
pub struct App {
    /// Routing state.
    pub control: Arc<Control>,
    /// Metrics.
    pub metrics: Arc<DataPlaneMetrics>,
    /// Limits.
    pub limits: Limits,
    /// Attempts per request.
    pub max_attempts: u32,
    /// Whether to request usage upstream for streams whose client did not (stripped again).
    pub inject_stream_usage: bool,
    /// Per-request records (decision log, captured trace, access log), when any is on.
    pub recorder: Option<Arc<Recorder>>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// HTTP/2 prior knowledge, for `h2c://` endpoints: one multiplexed connection each.
    h2c_client: Client<HttpConnector, Full<Bytes>>,
    /// Turn for breaking ties between equally loaded endpoints of pass-through requests.
    pub(crate) passthrough_turn: std::sync::atomic::AtomicUsize,
}

impl App {
    /// Builds the handlers' state with a pooled HTTP/1.1 client to the engines.
    pub fn new(
        control: Arc<Control>,
        limits: Limits,
        max_attempts: u32,
        inject_stream_usage: bool,
        recorder: Option<Arc<Recorder>>,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(
            limits.upstream_connect_timeout_ms,
        )));
        connector.set_nodelay(true);
        // Idle connections are closed on a timer (hyper-util only expires them when it has a
        // timer; without one an engine that gets no more traffic keeps every connection of the
        // last burst forever). hyper never follows redirects: an engine's 3xx is relayed as
        // its answer, never fetched.
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_millis(limits.upstream_idle_timeout_ms))
            .build(connector.clone());
        let h2c_client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_millis(limits.upstream_idle_timeout_ms))
            .timer(hyper_util::rt::TokioTimer::new())
            .http2_only(true)
            .build(connector);
        Arc::new(Self {
            metrics: control.metrics.clone(),
            control,
            limits,
            max_attempts,
            inject_stream_usage,
            recorder,
            client,
            h2c_client,
            passthrough_turn: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The client for the endpoint at `address`: HTTP/2 prior knowledge for `h2c://` ones.
    pub(crate) fn client_for(&self, address: &str) -> &Client<HttpConnector, Full<Bytes>> {
        match self.control.upstream_protocol(address) {
            UpstreamProtocol::H2c => &self.h2c_client,
            UpstreamProtocol::Http1 => &self.client,
        }
    }
}

/// The OpenAI API router (plus `/health` and `/ready`).
pub fn api_router(app: Arc<App>) -> axum::Router {
    use axum::routing::{get, post};
    let router = axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(|s, r| handle(s, ApiKind::Chat, r)),
        )
        .route(
            "/v1/completions",
            post(|s, r| handle(s, ApiKind::Completions, r)),
        )
        .route(
            "/v1/embeddings",
            post(|s, r| handle(s, ApiKind::Embeddings, r)),
        )
        .route(
            "/v1/responses",
            post(|s, r| handle(s, ApiKind::Responses, r)),
        )
        .route("/v1/messages", post(|s, r| handle(s, ApiKind::Messages, r)))
        .merge(crate::passthrough::routes())
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/ready", get(ready))
        .fallback(|uri: Uri| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no route for {}", uri.path()),
            )
            .into_response()
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {}", uri.path()),
            )
            .into_response()
        });
    let access_log = app.recorder.as_ref().is_some_and(|r| r.access_log());
    let router = if access_log {
        router.layer(axum::middleware::from_fn(crate::access::log_unbooked))
    } else {
        router
    };
    router.with_state(app)
}

/// The admin router: `/metrics` (the runtime's), `/health`, `/ready`.
pub fn admin_router(app: Arc<App>) -> axum::Router {
    use axum::routing::get;
    let control = app.control.clone();
    axum::Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/ready", get(ready))
        .with_state(app)
        .merge(kvgate_runtime::metrics::router(control))
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    if app.control.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no endpoint that knows its models answers its scrapes, or shutting down",
        )
            .into_response()
    }
}

pub(crate) fn count(metrics: &DataPlaneMetrics, api: &'static str, status: StatusCode) {
    metrics
        .requests
        .get_or_create(&RequestLabels {
            api,
            status: status.as_u16(),
        })
        .inc();
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let lists = futures::future::join_all(app.control.endpoint_addresses().into_iter().map(|a| {
        let app = app.clone();
        async move {
            tokio::time::timeout(
                Duration::from_millis(MODELS_TIMEOUT_MS),
                fetch_models(&app, &a),
            )
            .await
        }
    }))
    .await;
    let mut seen = std::collections::BTreeMap::new();
    let mut any = false;
    for list in lists.into_iter().filter_map(|r| r.ok().flatten()) {
        any = true;
        for card in list {
            if let Some(id) = card.get("id").and_then(Value::as_str) {
                seen.entry(id.to_owned()).or_insert(card);
            }
        }
    }
    let resp = if any {
        axum::Json(
            serde_json::json!({"object": "list", "data": seen.into_values().collect::<Vec<_>>()}),
        )
        .into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no endpoint answered /v1/models",
        )
        .into_response()
    };
    count(&app.metrics, "models", resp.status());
    resp
}

/// How long an engine gets to answer `/v1/models` (a small JSON list): one that has not
/// answered by then counts as not answering, so `/v1/models` and `/v1/models/{id}` never hang on
/// a silent engine.
const MODELS_FETCH_TIMEOUT_MS: u64 = 5_000;

pub(crate) async fn fetch_models(app: &App, address: &str) -> Option<Vec<Value>> {
    let req = hyper::Request::get(format!("http://{address}/v1/models"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let fetch = async {
        let resp = app.client_for(address).request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = Limited::new(resp.into_body(), USAGE_WINDOW_BYTES)
            .collect()
            .await
            .ok()?
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).ok()?;
        v.get("data")?.as_array().cloned()
    };
    tokio::time::timeout(Duration::from_millis(MODELS_FETCH_TIMEOUT_MS), fetch)
        .await
        .ok()
        .flatten()
}

async fn handle(State(app): State<Arc<App>>, api: ApiKind, req: Request) -> Response {
    let t0 = Instant::now();
    let resp = match serve(&app, api, req, t0).await {
        Ok(r) => r,
        // vLLM answers the Messages API's errors in Anthropic's shape.
        Err(e) if api == ApiKind::Messages => (
            e.status,
            axum::Json(kvgate_runtime::anthropic::error_body(&e)),
        )
            .into_response(),
        Err(e) => e.into_response(),
    };
    count(&app.metrics, api.label(), resp.status());
    resp
}

pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limits: &Limits,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body exceeds the limit of {} bytes",
                limits.max_body_bytes
            ),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limits.max_body_bytes as u64
    {
        return Err(too_large());
    }
    let read = Limited::new(body, limits.max_body_bytes).collect();
    match tokio::time::timeout(Duration::from_millis(limits.body_read_timeout_ms), read).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} ms",
                limits.body_read_timeout_ms
            ),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read request body: {e}"),
        )),
    }
}

pub(crate) enum AttemptError {
    Connect,
    Timeout,
    /// No response body byte within `limits.first_byte_timeout_ms`.
    FirstByte,
}

async fn send(
    app: &App,
    address: &str,
    api: ApiKind,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<hyper::Response<Incoming>, AttemptError> {
    send_to(app, address, Method::POST, api.path(), headers, body).await
}

/// Sends `method path` with `body` and the forwarded subset of the client's `headers` to the
/// endpoint at `address`, over the protocol it speaks.
pub(crate) async fn send_to(
    app: &App,
    address: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<hyper::Response<Incoming>, AttemptError> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"));
    if let Some(h) = req.headers_mut() {
        for name in &FORWARDED_REQUEST_HEADERS {
            for v in headers.get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let req = req
        .body(Full::new(body))
        .map_err(|_| AttemptError::Connect)?;
    app.client_for(address).request(req).await.map_err(|e| {
        if timed_out(&e) {
            AttemptError::Timeout
        } else {
            AttemptError::Connect
        }
    })
}

/// Whether an error was caused by a timeout anywhere down its chain of sources: the client's
/// error wraps a connect error, which wraps the `TimedOut` I/O error of a connect timeout.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

async fn serve(
    app: &Arc<App>,
    api: ApiKind,
    req: Request,
    t0: Instant,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, &app.limits).await?;
    let parsed = parse_request(api, &body)?;
    let header_str = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    // The rarer paths' futures are boxed (here and for prefill/decode below): the handler's
    // future is as large as its largest await, and every request moved all of it into its box.
    let engine_tokens = if app.control.tokenizes_remotely() {
        Box::pin(app.control.engine_tokens(&parsed)).await
    } else {
        None
    };
    let mut rr = app.control.routing_request(
        &parsed,
        engine_tokens,
        header_str(OBJECTIVE_HEADER).or_else(|| header_str(LLMD_OBJECTIVE_HEADER)),
        header_str(SESSION_HEADER),
    )?;
    if let Some(r) = &app.recorder {
        r.prepare(&mut rr);
    }
    // A fleet with prefill pods plans each generation request (split or whole) with the
    // prefill/decode decider; other APIs are served whole on a decode or aggregated pod.
    let disaggregated =
        matches!(api, ApiKind::Chat | ApiKind::Completions) && app.control.disaggregated();
    let (mut booking, pd) = if disaggregated {
        let pd = app
            .control
            .pick_pd(rr, t0)
            .map_err(|e| ApiError::from(&e))?;
        (pd.decode, Some((pd.prefill, pd.reason)))
    } else {
        let b = app.control.pick(rr, t0).map_err(|e| ApiError::from(&e))?;
        (b, None)
    };
    if let Some(r) = &app.recorder {
        let info = RequestInfo {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            request_id: header_str("x-request-id").map(str::to_owned),
        };
        booking.record_to(r, info);
        if let Some(b) = parts.extensions.get::<crate::access::Booked>() {
            b.mark();
        }
    }
    // Ask for the usage chunk even when the client did not (it carries the token counts and
    // cached tokens the metrics and calibration want); it is stripped again on the way back.
    let inject = app.inject_stream_usage
        && parsed.stream
        && !parsed.include_usage
        && matches!(api, ApiKind::Chat | ApiKind::Completions);
    let upstream_body = if inject {
        with_include_usage(&body, &parsed).unwrap_or_else(|| body.clone())
    } else {
        body.clone()
    };
    if let Some((prefill, reason)) = pd {
        return Box::pin(crate::pd::serve(
            app,
            api,
            &parts.headers,
            upstream_body,
            &parsed,
            booking,
            prefill,
            reason,
            inject,
        ))
        .await;
    }
    forward(
        app,
        api,
        &parts.headers,
        upstream_body,
        &parsed,
        booking,
        inject,
    )
    .await
}

/// Sends `upstream_body` to the booked endpoint, retrying on the decision's fallbacks (see the
/// module docs), and relays the answer measured through `booking`.
pub(crate) async fn forward(
    app: &Arc<App>,
    api: ApiKind,
    headers: &HeaderMap,
    upstream_body: Bytes,
    parsed: &ParsedRequest,
    mut booking: Booking,
    inject: bool,
) -> Result<Response, ApiError> {
    let mut attempt = 1;
    loop {
        let address = booking.address().clone();
        let sent = send(app, &address, api, headers, upstream_body.clone());
        let result = match app.limits.first_byte_timeout_ms {
            None => sent.await.map(|r| (r, None)),
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), first_byte(sent))
                .await
                .unwrap_or(Err(AttemptError::FirstByte)),
        };
        // The engine's error response, kept in case no other endpoint is left to try.
        let ((cause, kind), refused) = match result {
            Ok((resp, first)) => match status_failure(resp.status().as_u16()) {
                None => {
                    booking.set_status(resp.status().as_u16());
                    return Ok(respond(resp, first, booking, parsed, inject));
                }
                Some(failure) => (failure, Some(resp)),
            },
            Err(AttemptError::Connect) => (("connect", FailureKind::Connect), None),
            Err(AttemptError::Timeout) => (("timeout", FailureKind::Timeout), None),
            Err(AttemptError::FirstByte) => {
                tracing::warn!(endpoint = %address, timeout_ms = ?app.limits.first_byte_timeout_ms, "no response byte from the engine in time; giving up on it");
                (("first_byte_timeout", FailureKind::Timeout), None)
            }
        };
        if attempt < app.max_attempts && booking.retry(cause, kind) {
            app.metrics.count_retry(cause);
            tracing::debug!(from = %address, to = %booking.address(), cause, "retrying on another endpoint");
            attempt += 1;
            continue;
        }
        if let Some(resp) = &refused {
            // The engine's error is what the client gets: receipts and the access log say so.
            booking.set_status(resp.status().as_u16());
        }
        booking.fail(cause, kind);
        let unreachable = app.control.unreachable_endpoints();
        return match refused {
            // Out of attempts: the engine's own error (OpenAI-shaped) is the best answer.
            Some(resp) => Ok(relay_plain(resp, &address)),
            // Nothing to send to: the model's endpoints are down, say which (as readiness does).
            None if cause == "connect" && !unreachable.is_empty() => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no reachable endpoint serves the model `{}` ({attempt} attempt(s)); \
                     unreachable: {}",
                    parsed.model,
                    unreachable.join(", ")
                ),
            )),
            None => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("no endpoint could be reached after {attempt} attempt(s)"),
            )),
        };
    }
}

/// The response head and, for a successful response, its first body frame (so a first-byte
/// timeout covers engines that send headers at once and then hang, as vLLM's streams may).
pub(crate) async fn first_byte(
    sent: impl std::future::Future<Output = Result<hyper::Response<Incoming>, AttemptError>>,
) -> Result<(hyper::Response<Incoming>, Option<Frame<Bytes>>), AttemptError> {
    let mut resp = sent.await?;
    if !resp.status().is_success() || hyper::body::Body::is_end_stream(resp.body()) {
        return Ok((resp, None));
    }
    match resp.body_mut().frame().await {
        Some(Ok(frame)) => Ok((resp, Some(frame))),
        // Ended without a frame: relay the (empty) rest as it is.
        None => Ok((resp, None)),
        Some(Err(_)) => Err(AttemptError::Connect),
    }
}

/// The request body with `stream_options.include_usage` set (other fields unchanged).
fn with_include_usage(body: &[u8], parsed: &ParsedRequest) -> Option<Bytes> {
    // A chat body with no `stream_options` (what SDKs send) gets the member written in front
    // of its first one: the rest stays byte for byte, and the body is not parsed a second time
    // and re-serialised (which cost as much as the rest of the request's parsing).
    if let Some(chat) = &parsed.chat_body
        && chat.get("stream_options").is_none()
        && let Some(open) = body.iter().position(|b| !b.is_ascii_whitespace())
        && body[open] == b'{'
    {
        const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
        let empty = body[open + 1..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'}');
        let mut out = Vec::with_capacity(body.len() + MEMBER.len() + 1);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(MEMBER);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(&body[open + 1..]);
        return Some(Bytes::from(out));
    }
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object_mut()?;
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !opts.is_object() {
        *opts = Value::Object(serde_json::Map::new());
    }
    opts.as_object_mut()?
        .insert("include_usage".into(), Value::Bool(true));
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

fn response_head(
    status: StatusCode,
    upstream: &HeaderMap,
    address: &str,
) -> axum::http::response::Builder {
    let mut b = Response::builder().status(status);
    if let Some(h) = b.headers_mut() {
        for name in &FORWARDED_RESPONSE_HEADERS {
            if let Some(v) = upstream.get(name) {
                h.insert(name.clone(), v.clone());
            }
        }
        if let Ok(v) = HeaderValue::from_str(address) {
            h.insert(HeaderName::from_static(ENDPOINT_RESPONSE_HEADER), v);
        }
    }
    b
}

pub(crate) fn relay_plain(resp: hyper::Response<Incoming>, address: &str) -> Response {
    let (parts, body) = resp.into_parts();
    response_head(parts.status, &parts.headers, address)
        .body(Body::new(body))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

pub(crate) fn respond(
    resp: hyper::Response<Incoming>,
    first: Option<Frame<Bytes>>,
    booking: Booking,
    parsed: &kvgate_runtime::openai::ParsedRequest,
    injected_usage: bool,
) -> Response {
    let (parts, body) = resp.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let head = response_head(parts.status, &parts.headers, booking.address());
    let metered = Metered {
        inner: body,
        first,
        booking: Some(booking),
        sse,
        meter: ResponseMeter::new(sse, parsed.api == ApiKind::Chat)
            .with_sequences(parsed.sequences)
            .responses(parsed.api == ApiKind::Responses),
        ended: false,
        strip: sse.then(|| {
            if injected_usage && parts.status.is_success() {
                UsageStripper::default()
            } else {
                UsageStripper::events_only()
            }
        }),
        anthropic: parsed.api == ApiKind::Messages,
    };
    head.body(Body::new(metered))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// The upstream response body, relayed frame by frame, measured on the way.
struct Metered {
    inner: Incoming,
    /// A frame already read from `inner` (by the first-byte timeout), relayed first.
    first: Option<Frame<Bytes>>,
    /// Until the response ends (taken by `finish` or a mid-stream failure).
    booking: Option<Booking>,
    sse: bool,
    meter: ResponseMeter,
    /// The body is over (upstream finished, or a mid-stream error event was sent).
    ended: bool,
    /// For an SSE body: relays whole events only, and removes the usage chunk again when the
    /// gateway injected `include_usage`.
    strip: Option<UsageStripper>,
    /// An Anthropic Messages stream: a mid-stream error is an `event: error`, with no `[DONE]`.
    anthropic: bool,
}

/// Largest incomplete SSE event held back while looking for a usage chunk to strip. An event is
/// a few hundred bytes; a stream with no recognisable event boundary in 64 KiB is not SSE as we
/// know it and is relayed as is rather than buffered.
const MAX_PENDING_EVENT_BYTES: usize = 64 * 1024;

/// Relays an SSE stream as whole events, and removes the final usage chunk (`choices: []` with
/// a `usage` object) from a stream whose client did not ask for it. The incomplete tail of a
/// frame is held until its event completes, which delays nothing a client could use (an SSE
/// parser acts only on complete events) and means a mid-stream error event always starts on an
/// event boundary: glued to half an event, it was one malformed event that clients' JSON
/// parsers reject, losing the error. (A tail of over [`MAX_PENDING_EVENT_BYTES`] is relayed
/// as it is.)
#[derive(Debug, Default)]
struct UsageStripper {
    pending: Vec<u8>,
    /// Relay usage chunks too (the client asked for them, or the gateway did not inject them).
    keep_usage: bool,
}

/// Whether `data` ends an SSE event (with a blank line).
fn ends_an_event(data: &[u8]) -> bool {
    data.ends_with(b"\n\n") || data.ends_with(b"\n\r\n")
}

/// End offset (exclusive) of the first complete SSE event in `buf` at or after `from` (an event
/// ends with a blank line: `\n\n`, or `\n\r\n` as in `\r\n\r\n`). Line ends are found with
/// `memchr`: this runs over every byte the relay streams.
fn next_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        let nl = i + find_byte(&buf[i..], b'\n')?;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            (Some(_), _) => i = nl + 1,
            (None, _) => return None,
        }
    }
}

/// End offsets (exclusive) of the complete SSE events in `buf`, in order.
fn event_ends(buf: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    while let Some(end) = next_event_end(buf, ends.last().copied().unwrap_or(0)) {
        ends.push(end);
    }
    ends
}

/// Whether `buf` contains the key `"usage"` anywhere: only an event that does can be the usage
/// chunk, so a frame without it is relayed as it is.
fn mentions_usage(buf: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut from = 0;
    // Anchored on `g`, rarer in JSON than the quote.
    while let Some(g) = find_byte(&buf[from..], b'g') {
        let at = from + g;
        if at >= 4 && buf[at - 4..].starts_with(KEY) {
            return true;
        }
        from = at + 1;
    }
    false
}

fn is_usage_event(event: &[u8]) -> bool {
    let Some(json) = event
        .strip_prefix(b"data: ")
        .or_else(|| event.strip_prefix(b"data:"))
    else {
        return false;
    };
    mentions_usage(json) && kvgate_runtime::openai::is_usage_chunk(json.trim_ascii())
}

impl UsageStripper {
    /// Whole events only, usage chunks included.
    fn events_only() -> Self {
        Self {
            pending: Vec::new(),
            keep_usage: true,
        }
    }

    fn push(&mut self, data: &Bytes) -> Bytes {
        // The common frame: whole events, none of them the usage chunk, nothing held back.
        // Relayed as the same buffer (what the general path below would copy out of `pending`).
        if self.pending.is_empty() && self.keep_usage && ends_an_event(data) {
            return data.clone();
        }
        if self.pending.is_empty() && !self.keep_usage && !mentions_usage(data) {
            let mut end = 0;
            while let Some(next) = next_event_end(data, end) {
                end = next;
            }
            if end == data.len() {
                return data.clone();
            }
        }
        self.pending.extend_from_slice(data);
        let ends = event_ends(&self.pending);
        let Some(&complete) = ends.last() else {
            if self.pending.len() > MAX_PENDING_EVENT_BYTES {
                return self.flush();
            }
            return Bytes::new();
        };
        let mut out = Vec::with_capacity(complete);
        let mut start = 0;
        for end in ends {
            let event = &self.pending[start..end];
            if self.keep_usage || !is_usage_event(event) {
                out.extend_from_slice(event);
            }
            start = end;
        }
        self.pending.drain(..complete);
        Bytes::from(out)
    }

    fn flush(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }
}

impl Metered {
    fn on_data(&mut self, data: &Bytes) {
        let now = Instant::now();
        if self.meter.on_chunk(data, now)
            && let Some(b) = &mut self.booking
        {
            b.first_token(now);
        }
    }

    fn finish(&mut self) {
        if let Some(booking) = self.booking.take() {
            booking.finish(&self.meter.finish());
        }
    }

    fn fail_mid_stream(&mut self, error: &hyper::Error) -> Option<Bytes> {
        let booking = self.booking.take()?;
        tracing::warn!(endpoint = %booking.address(), %error, "upstream failed mid-response");
        booking.fail("mid_stream", FailureKind::ServerError);
        if !self.sse {
            return None;
        }
        let err = ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("the model server failed mid-stream: {error}"),
        );
        if self.anthropic {
            return Some(Bytes::from(kvgate_runtime::anthropic::error_event(&err)));
        }
        let mut out = err.sse_event();
        out.extend_from_slice(b"data: [DONE]\n\n");
        Some(Bytes::from(out))
    }
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let polled = match this.first.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => Pin::new(&mut this.inner).poll_frame(cx),
            };
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    // hyper stops polling once the body says it has ended, so account now.
                    let last = this.inner.is_end_stream();
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            this.on_data(&data);
                            let data = match &mut this.strip {
                                None => data,
                                Some(s) if last => {
                                    let mut out = s.push(&data).to_vec();
                                    out.extend_from_slice(&s.flush());
                                    Bytes::from(out)
                                }
                                Some(s) => s.push(&data),
                            };
                            if last {
                                this.finish();
                                this.ended = true;
                            }
                            if data.is_empty() {
                                continue;
                            }
                            Frame::data(data)
                        }
                        Err(other) => {
                            if last {
                                this.finish();
                            }
                            other
                        }
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    return match this.fail_mid_stream(&e) {
                        // Send the error event, then end the body cleanly.
                        Some(event) => {
                            this.ended = true;
                            Poll::Ready(Some(Ok(Frame::data(event))))
                        }
                        None => Poll::Ready(Some(Err(e))),
                    };
                }
                Poll::Ready(None) => {
                    this.finish();
                    this.ended = true;
                    let rest = this
                        .strip
                        .as_mut()
                        .map(UsageStripper::flush)
                        .unwrap_or_default();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        if self.strip.is_some() || self.first.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connect timeout is two sources down (client error → connect error → I/O error).
    #[test]
    fn a_timeout_is_found_down_the_error_chain() {
        #[derive(Debug)]
        struct Wrap(Box<dyn std::error::Error + Send + Sync>);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&*self.0)
            }
        }
        let io = |kind| std::io::Error::new(kind, "x");
        let deep = Wrap(Box::new(Wrap(Box::new(io(std::io::ErrorKind::TimedOut)))));
        assert!(timed_out(&deep));
        let refused = Wrap(Box::new(Wrap(Box::new(io(
            std::io::ErrorKind::ConnectionRefused,
        )))));
        assert!(!timed_out(&refused));
    }

    /// Without stripping, whole events pass as they come (the usage chunk included) and an
    /// incomplete tail waits for the rest of its event.
    #[test]
    fn only_whole_events_are_relayed() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n",
        );
        let bytes = Bytes::from_static(stream.as_bytes());
        for split in 0..stream.len() {
            let mut s = UsageStripper::events_only();
            let first = s.push(&bytes.slice(..split));
            assert!(
                first.is_empty() || ends_an_event(&first),
                "split at {split}"
            );
            let mut out = first.to_vec();
            out.extend_from_slice(&s.push(&bytes.slice(split..)));
            assert!(s.flush().is_empty());
            assert_eq!(String::from_utf8(out).unwrap(), stream, "split at {split}");
        }
    }

    #[test]
    fn usage_chunk_is_stripped_across_frame_boundaries() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n",
        );
        let want = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: [DONE]\n\n"
        );
        let bytes = Bytes::from_static(stream.as_bytes());
        for split in 0..stream.len() {
            let mut s = UsageStripper::default();
            let mut out = s.push(&bytes.slice(..split)).to_vec();
            out.extend_from_slice(&s.push(&bytes.slice(split..)));
            out.extend_from_slice(&s.flush());
            assert_eq!(String::from_utf8(out).unwrap(), want, "split at {split}");
        }
        let mut s = UsageStripper::default();
        assert!(
            s.push(&Bytes::from_static(b"data: {\"choices\":[]"))
                .is_empty(),
            "incomplete event held back"
        );
        let crlf = s.push(&Bytes::from_static(
            b",\"usage\":{}}\r\n\r\ndata: [DONE]\r\n\r\n",
        ));
        assert_eq!(&crlf[..], b"data: [DONE]\r\n\r\n");
    }

    #[test]
    fn event_ends_are_found_as_a_byte_by_byte_scan_finds_them() {
        fn reference(buf: &[u8]) -> Vec<usize> {
            let mut ends = Vec::new();
            let mut i = 0;
            while i + 1 < buf.len() {
                if buf[i] == b'\n' {
                    if buf[i + 1] == b'\n' {
                        ends.push(i + 2);
                        i += 2;
                        continue;
                    }
                    if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                        ends.push(i + 3);
                        i += 3;
                        continue;
                    }
                }
                i += 1;
            }
            ends
        }
        let text: &[u8] = b"data: a\n\n\ndata: b\r\n\r\n\n\r\rdata: c\nx\n\n\r\n\n";
        for start in 0..text.len() {
            for end in start..=text.len() {
                let buf = &text[start..end];
                assert_eq!(
                    event_ends(buf),
                    reference(buf),
                    "{:?}",
                    String::from_utf8_lossy(buf)
                );
            }
        }
        assert!(mentions_usage(br#"{"usage":{}}"#));
        assert!(mentions_usage(br#"x"usage""#));
        assert!(!mentions_usage(br#"{"usages":1,"usage_x":2,"usg":3}"#));
        assert!(!mentions_usage(b"usage\"g"));
    }

    #[test]
    fn a_frame_of_whole_events_without_usage_is_relayed_as_the_same_buffer() {
        let frame = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{}}]}\n\n");
        let mut s = UsageStripper::default();
        let out = s.push(&frame);
        assert_eq!(out, frame);
        assert_eq!(out.as_ptr(), frame.as_ptr(), "no copy");
        // A frame ending mid-event still holds the tail back.
        let out = s.push(&Bytes::from_static(b"data: {}\n\ndata: {"));
        assert_eq!(&out[..], b"data: {}\n\n");
        assert_eq!(&s.flush()[..], b"data: {");
    }

    #[test]
    fn include_usage_is_set_without_touching_the_rest() {
        let body = br#"{"model":"m","prompt":"p","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"x":1}}"#;
        for api in [ApiKind::Chat, ApiKind::Completions] {
            let parsed = parse_request(api, body).unwrap();
            let b = with_include_usage(body, &parsed).unwrap();
            let v: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true);
            assert_eq!(v["stream_options"]["x"], 1);
            assert_eq!(v["model"], "m");
        }
    }

    #[test]
    fn include_usage_is_written_into_a_chat_body_without_stream_options() {
        let body = b" {\"model\":\"m\", \"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}";
        let parsed = parse_request(ApiKind::Chat, body).unwrap();
        let b = with_include_usage(body, &parsed).unwrap();
        assert_eq!(
            &b[..],
            &b" {\"stream_options\":{\"include_usage\":true},\"model\":\"m\", \"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}"[..]
        );
        let mut want: Value = serde_json::from_slice(body).unwrap();
        want["stream_options"] = serde_json::json!({"include_usage": true});
        assert_eq!(serde_json::from_slice::<Value>(&b).unwrap(), want);
    }
}
