//! Disaggregated requests: a prefill pod computes the prompt, its KV cache moves to a decode
//! pod, and the decode pod generates, with the client seeing one ordinary response.
//!
//! The plan (split or whole, and the pods) is the core's ([`kvgate_core::pd`], booked by
//! [`kvgate_runtime::control::Control::pick_pd`]); this module runs it over the wire the decode
//! pod speaks ([`PdProtocol`], ../shared/DESIGN.md "Prefill/decode disaggregation"):
//! - **vllm-nixl** (vLLM's NixlConnector): the prefill pod gets the request as a non-streaming,
//!   one-token request with `kv_transfer_params.do_remote_decode`; its answer's
//!   `kv_transfer_params` (engine id, block ids, host, port) go with the client's request to
//!   the decode pod, which pulls the blocks and generates. The legs run one after the other.
//! - **sglang-bootstrap**: both legs carry the prefill pod's `bootstrap_host`/`bootstrap_port`
//!   and a fresh random `bootstrap_room` and are sent at once; the decode pod waits for the
//!   prefill pod to push the room's KV. The prefill leg (non-streaming, so its usage can be
//!   read) runs beside the decode leg and finishes on its own once the client has its first
//!   byte.
//!
//! **Failures.** A prefill leg that fails (refused, 5xx, 429, timeout) is retried on the
//! decision's other prefill pods; when none is left, or when a vLLM prefill pod answers without
//! `kv_transfer_params` (it was started without a KV connector), the decode pod serves the
//! request whole, as an aggregated request (vLLM and SGLang decode pods compute a prompt
//! themselves when asked without transfer parameters). A decode leg that fails before its
//! first byte is retried on the next decode pod with a fresh prefill (its KV was meant for the
//! pod that failed). A prefill pod's 4xx other than 429 is the engine's verdict on the request
//! itself and is passed to the client. Nothing is retried after the first byte.
//!
//! **Cancellation.** Dropping the client's request drops whatever leg is awaited; the
//! sglang-bootstrap prefill leg is aborted with it until the decode leg has answered, so a
//! client that leaves cancels both sides.
//!
//! **Accounting.** Each leg is its own booking: the prefill leg's first token is the prefill
//! pod's answer (so its TTFT teaches that pod's cost model), the decode leg's first token is the
//! client's. `kvgate_gateway_pd_decisions_total{phase,reason}` counts each request once, by
//! the plan it was served with; `pd_transfers_total{protocol,outcome}` and
//! `pd_transfer_seconds` the split ones.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, Method};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use kvgate_core::PdReason;
use kvgate_core::request::{FailureKind, Phase};
use kvgate_runtime::booking::{Booking, status_failure};
use kvgate_runtime::config::{DEFAULT_BOOTSTRAP_PORT, PdProtocol};
use kvgate_runtime::meter::{ResponseMeter, USAGE_WINDOW_BYTES};
use kvgate_runtime::metrics::{PdTransferLabels, RetryLabels};
use kvgate_runtime::openai::{ApiError, ApiKind, ParsedRequest};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::proxy::{App, AttemptError, first_byte, forward, relay_plain, respond, send_to};

/// What a prefill leg came to.
enum Prefilled {
    /// The prefill pod answered; for vllm-nixl, with these transfer parameters.
    Ready(Option<Value>),
    /// No prefill pod could do it (the cause, as in `retries{cause}`): serve whole.
    Failed(&'static str),
    /// The prefill pod rejected the request itself (4xx): the client gets that answer.
    Rejected(hyper::Response<Incoming>, Arc<str>),
}

/// Serves a request booked by `pick_pd` (see the module docs). `upstream_body` is the client's
/// body as the decode pod gets it (with `include_usage` injected when `inject`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    app: &Arc<App>,
    api: ApiKind,
    headers: &HeaderMap,
    upstream_body: Bytes,
    parsed: &ParsedRequest,
    decode: Booking,
    prefill: Option<Booking>,
    reason: PdReason,
    inject: bool,
) -> Result<Response, ApiError> {
    let Some(prefill) = prefill else {
        count_decision(app, "aggregated", reason.as_str());
        return forward(app, api, headers, upstream_body, parsed, decode, inject).await;
    };
    let protocol = app
        .control
        .pd_protocol_of(decode.endpoint())
        .map_or(PdProtocol::default(), |(p, _)| p);
    let mut run = Split {
        app,
        api,
        headers,
        upstream_body,
        parsed,
        inject,
        protocol,
        reason,
    };
    run.serve(decode, prefill).await
}

struct Split<'a> {
    app: &'a Arc<App>,
    api: ApiKind,
    headers: &'a HeaderMap,
    upstream_body: Bytes,
    parsed: &'a ParsedRequest,
    inject: bool,
    protocol: PdProtocol,
    reason: PdReason,
}

impl Split<'_> {
    async fn serve(&mut self, mut decode: Booking, prefill: Booking) -> Result<Response, ApiError> {
        let mut prefill = Some(prefill);
        let mut attempt = 1;
        loop {
            let leg = match prefill.take() {
                Some(p) => p,
                // A retried decode leg needs its own prefill (see the module docs).
                None => match self.fresh_prefill(&decode) {
                    Some(p) => p,
                    None => return self.whole(decode, "prefill").await,
                },
            };
            let sent = match self.protocol {
                PdProtocol::VllmNixl => self.nixl(&decode, leg).await,
                PdProtocol::SglangBootstrap => self.bootstrap(&decode, leg).await,
            };
            let result = match sent {
                Leg::Whole(cause) => return self.whole(decode, cause).await,
                Leg::Rejected(resp, address) => {
                    decode.fail("prefill_rejected", FailureKind::Cancelled);
                    return Ok(relay_plain(resp, &address));
                }
                Leg::Decode(sent) => sent,
            };
            let (result, handoff) = result;
            let address = decode.address().clone();
            let ((cause, kind), refused) = match result {
                Ok((resp, first)) => match status_failure(resp.status().as_u16()) {
                    None => {
                        let m = &self.app.metrics.pd;
                        m.transfer_seconds.observe(handoff.elapsed().as_secs_f64());
                        self.count_transfer("ok");
                        if attempt == 1 {
                            count_decision(self.app, "disaggregated", self.reason.as_str());
                        } else {
                            count_decision(self.app, "disaggregated", "decode_retried");
                        }
                        decode.set_status(resp.status().as_u16());
                        return Ok(respond(resp, first, decode, self.parsed, self.inject));
                    }
                    Some(failure) => (failure, Some(resp)),
                },
                Err(AttemptError::Connect) => (("connect", FailureKind::Connect), None),
                Err(AttemptError::Timeout) => (("timeout", FailureKind::Timeout), None),
                Err(AttemptError::FirstByte) => {
                    (("first_byte_timeout", FailureKind::Timeout), None)
                }
            };
            self.count_transfer("decode");
            if attempt < self.app.max_attempts && decode.retry(cause, kind) {
                self.app
                    .metrics
                    .retries
                    .get_or_create(&RetryLabels { cause })
                    .inc();
                tracing::debug!(from = %address, to = %decode.address(), cause, "decode leg failed; retrying with a fresh prefill");
                attempt += 1;
                continue;
            }
            if let Some(resp) = &refused {
                decode.set_status(resp.status().as_u16());
            }
            decode.fail(cause, kind);
            return match refused {
                Some(resp) => Ok(relay_plain(resp, &address)),
                None => Err(ApiError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    format!("no decode endpoint could be reached after {attempt} attempt(s)"),
                )),
            };
        }
    }

    /// The prefill leg failed everywhere: the decode pod serves the request whole.
    async fn whole(&self, mut decode: Booking, cause: &'static str) -> Result<Response, ApiError> {
        self.count_transfer(cause);
        count_decision(self.app, "aggregated", "prefill_failed");
        tracing::warn!(decode = %decode.address(), cause, "prefill leg failed; serving the request whole on its decode pod");
        decode.serve_whole();
        forward(
            self.app,
            self.api,
            self.headers,
            self.upstream_body.clone(),
            self.parsed,
            decode,
            self.inject,
        )
        .await
    }

    /// A new prefill leg for a decode leg that moved to another pod.
    fn fresh_prefill(&self, decode: &Booking) -> Option<Booking> {
        let control = &self.app.control;
        let req = decode
            .request()
            .leg(Phase::Prefill, control.next_request_id());
        control.pick(req, Instant::now()).ok()
    }

    fn count_transfer(&self, outcome: &'static str) {
        self.app
            .metrics
            .pd
            .transfers
            .get_or_create(&PdTransferLabels {
                protocol: self.protocol.as_str(),
                outcome,
            })
            .inc();
    }

    /// vllm-nixl: the prefill leg, then the decode leg with its transfer parameters.
    async fn nixl(&self, decode: &Booking, prefill: Booking) -> Leg {
        let body = match rewrite(&self.upstream_body, prefill_fields) {
            Some(b) => b,
            None => return Leg::Whole("prefill"),
        };
        let params = match run_prefill(self.app, self.api, self.headers, body, prefill).await {
            Prefilled::Ready(Some(params)) => params,
            Prefilled::Ready(None) => return Leg::Whole("no_transfer_params"),
            Prefilled::Failed(cause) => return Leg::Whole(cause),
            Prefilled::Rejected(resp, address) => return Leg::Rejected(resp, address),
        };
        let handoff = Instant::now();
        let Some(body) = rewrite(&self.upstream_body, |o| {
            o.insert("kv_transfer_params".into(), params.clone());
        }) else {
            return Leg::Whole("prefill");
        };
        let result = self.send_decode(decode, body).await;
        Leg::Decode((result, handoff))
    }

    /// sglang-bootstrap: both legs at once, with the same bootstrap room.
    async fn bootstrap(&self, decode: &Booking, prefill: Booking) -> Leg {
        let (_, port) = self
            .app
            .control
            .pd_protocol_of(prefill.endpoint())
            .unwrap_or_default();
        let port = port.unwrap_or(DEFAULT_BOOTSTRAP_PORT);
        let address = prefill.address().clone();
        let host = address
            .rsplit_once(':')
            .map_or(&*address, |(h, _)| h)
            .to_owned();
        // SGLang's rooms are random non-negative 63-bit integers.
        let room = rand::random::<u64>() >> 1;
        let bootstrap = |o: &mut serde_json::Map<String, Value>| {
            o.insert("bootstrap_host".into(), json!(host));
            o.insert("bootstrap_port".into(), json!(port));
            o.insert("bootstrap_room".into(), json!(room));
        };
        let (Some(prefill_body), Some(decode_body)) = (
            rewrite(&self.upstream_body, |o| {
                bootstrap(o);
                o.insert("stream".into(), Value::Bool(false));
                o.remove("stream_options");
            }),
            rewrite(&self.upstream_body, bootstrap),
        ) else {
            return Leg::Whole("prefill");
        };
        let handoff = Instant::now();
        let app = self.app.clone();
        let (api, headers) = (self.api, self.headers.clone());
        let mut task = tokio::spawn(async move {
            // One prefill pod per room: a retry would need a new room for the decode leg too.
            run_prefill_once(&app, api, &headers, prefill_body, prefill).await
        });
        let mut guard = AbortOnDrop(Some(task.abort_handle()));
        let decode_leg = self.send_decode(decode, decode_body);
        tokio::pin!(decode_leg);
        tokio::select! {
            result = &mut decode_leg => {
                // The decode pod answered (or failed): the prefill leg finishes on its own.
                guard.detach();
                Leg::Decode((result, handoff))
            }
            prefilled = &mut task => {
                guard.detach();
                match prefilled {
                    Ok(Prefilled::Ready(_)) => Leg::Decode((decode_leg.await, handoff)),
                    Ok(Prefilled::Rejected(resp, address)) => Leg::Rejected(resp, address),
                    Ok(Prefilled::Failed(cause)) => Leg::Whole(cause),
                    Err(_) => Leg::Whole("prefill"),
                }
            }
        }
    }

    /// Sends the decode leg to the booked decode pod, within the first-byte timeout.
    async fn send_decode(
        &self,
        decode: &Booking,
        body: Bytes,
    ) -> Result<(hyper::Response<Incoming>, Option<hyper::body::Frame<Bytes>>), AttemptError> {
        let address = decode.address().clone();
        let sent = send_to(
            self.app,
            &address,
            Method::POST,
            self.api.path(),
            self.headers,
            body,
        );
        match self.app.limits.first_byte_timeout_ms {
            None => sent.await.map(|r| (r, None)),
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), first_byte(sent))
                .await
                .unwrap_or(Err(AttemptError::FirstByte)),
        }
    }
}

type DecodeResult =
    Result<(hyper::Response<Incoming>, Option<hyper::body::Frame<Bytes>>), AttemptError>;

/// What one try of the split plan came to.
enum Leg {
    /// The decode leg's answer, and when the handoff to it began.
    Decode((DecodeResult, Instant)),
    /// The prefill could not be done (cause): serve whole.
    Whole(&'static str),
    /// The prefill pod rejected the request itself.
    Rejected(hyper::Response<Incoming>, Arc<str>),
}

/// Aborts a spawned prefill leg when the request is dropped before the decode leg answered.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn detach(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

fn count_decision(app: &App, phase: &'static str, reason: &'static str) {
    app.metrics.pd.count_decision(phase, reason);
}

/// The client's JSON body with `edit` applied to its top-level object.
fn rewrite(body: &[u8], edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Option<Bytes> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    edit(v.as_object_mut()?);
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// What vLLM's NixlConnector expects of a prefill request: one token, not streamed, and the
/// transfer parameters asking the engine to keep the blocks for a remote decode.
fn prefill_fields(o: &mut serde_json::Map<String, Value>) {
    o.insert(
        "kv_transfer_params".into(),
        json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    o.insert("stream".into(), Value::Bool(false));
    o.remove("stream_options");
    o.insert("max_tokens".into(), json!(1));
    if o.contains_key("max_completion_tokens") {
        o.insert("max_completion_tokens".into(), json!(1));
    }
}

/// The prefill leg, retried on the decision's other prefill pods.
async fn run_prefill(
    app: &Arc<App>,
    api: ApiKind,
    headers: &HeaderMap,
    body: Bytes,
    mut booking: Booking,
) -> Prefilled {
    let mut attempt = 1;
    loop {
        let (cause, kind) = match prefill_attempt(app, api, headers, body.clone(), booking).await {
            Attempt::Done(p) => return p,
            Attempt::Failed(cause, kind, b) => {
                booking = *b;
                (cause, kind)
            }
        };
        if attempt < app.max_attempts && booking.retry(cause, kind) {
            app.metrics
                .pd
                .prefill_retries
                .get_or_create(&RetryLabels { cause })
                .inc();
            attempt += 1;
            continue;
        }
        booking.fail(cause, kind);
        return Prefilled::Failed(cause);
    }
}

/// One prefill pod, no retry (sglang-bootstrap: the room is bound to this pod).
async fn run_prefill_once(
    app: &Arc<App>,
    api: ApiKind,
    headers: &HeaderMap,
    body: Bytes,
    booking: Booking,
) -> Prefilled {
    match prefill_attempt(app, api, headers, body, booking).await {
        Attempt::Done(p) => p,
        Attempt::Failed(cause, kind, booking) => {
            booking.fail(cause, kind);
            Prefilled::Failed(cause)
        }
    }
}

enum Attempt {
    Done(Prefilled),
    /// Failed with this cause; the booking comes back for a retry or to be failed.
    Failed(&'static str, FailureKind, Box<Booking>),
}

/// One prefill request: on success the booking is finished with the pod's usage and the
/// answer's `kv_transfer_params` returned.
async fn prefill_attempt(
    app: &Arc<App>,
    api: ApiKind,
    headers: &HeaderMap,
    body: Bytes,
    mut booking: Booking,
) -> Attempt {
    let address = booking.address().clone();
    let sent = send_to(app, &address, Method::POST, api.path(), headers, body);
    let resp = match app.limits.first_byte_timeout_ms {
        None => sent.await,
        Some(ms) => tokio::time::timeout(Duration::from_millis(ms), sent)
            .await
            .unwrap_or(Err(AttemptError::FirstByte)),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(AttemptError::Connect) => {
            return Attempt::Failed("connect", FailureKind::Connect, Box::new(booking));
        }
        Err(AttemptError::Timeout | AttemptError::FirstByte) => {
            return Attempt::Failed("timeout", FailureKind::Timeout, Box::new(booking));
        }
    };
    let status = resp.status();
    if let Some((cause, kind)) = status_failure(status.as_u16()) {
        return Attempt::Failed(cause, kind, Box::new(booking));
    }
    if !status.is_success() {
        // The engine's verdict on the request itself: no fault of the pod's.
        booking.set_status(status.as_u16());
        booking.fail("client_error", FailureKind::Cancelled);
        return Attempt::Done(Prefilled::Rejected(resp, address));
    }
    // The prefill pod's answer is its first (and only) token.
    booking.first_token(Instant::now());
    let read = Limited::new(resp.into_body(), USAGE_WINDOW_BYTES).collect();
    let bytes = match read.await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Attempt::Failed("connect", FailureKind::Connect, Box::new(booking)),
    };
    let mut meter = ResponseMeter::new(false, api == ApiKind::Chat);
    meter.on_chunk(&bytes, Instant::now());
    let params = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|mut v| v.get_mut("kv_transfer_params").map(Value::take))
        .filter(Value::is_object);
    booking.set_status(status.as_u16());
    booking.finish(&meter.finish());
    if params.is_none() {
        tracing::warn!(prefill = %address, "the prefill pod answered without kv_transfer_params; is it started with a KV connector (--kv-transfer-config)?");
    }
    Attempt::Done(Prefilled::Ready(params))
}
