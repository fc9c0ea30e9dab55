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

use std::sync::{Arc, OnceLock};
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
use kvgate_runtime::metrics::PdTransferLabels;
use kvgate_runtime::openai::{ApiError, ApiKind, ParsedRequest};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::proxy::{App, AttemptError, first_byte, forward, relay_plain, respond, send_to};

/// Whether a mixed-protocol pairing was logged already (once per process: it is a
/// configuration error, not a per-request event).
static MIXED_PROTOCOLS_WARNED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether a request can be split: one prompt and one completion. vLLM's completion answer
/// carries the transfer parameters of its first prompt only, and `n` completions of one
/// prompt would each read blocks the prefill pod frees after the first read (SGLang's gateway
/// refuses the same); such requests are served whole.
fn splittable(v: &Value) -> bool {
    let n_is_one = ["n", "best_of"].iter().all(|k| {
        v.get(*k)
            .is_none_or(|n| n.is_null() || n.as_u64() == Some(1))
    });
    let one_prompt = match v.get("prompt") {
        Some(Value::Array(items)) => {
            !matches!(items.first(), Some(Value::String(_) | Value::Array(_)))
        }
        _ => true,
    };
    n_is_one && one_prompt
}

/// What a prefill leg came to.
enum Prefilled {
    /// The prefill pod answered: for vllm-nixl, with these transfer parameters, or why there
    /// are none (`no_transfer_params`, `prefill_stopped` when its one token ended the
    /// generation, `prefill_answer_too_large`).
    Ready(Result<(Value, Option<u32>), &'static str>),
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
    let protocol_of = |b: &Booking| {
        app.control
            .pd_protocol_of(b.endpoint())
            .map_or(PdProtocol::default(), |(p, _)| p)
    };
    let protocol = protocol_of(&decode);
    // Parsed once here; each leg's body is this object, edited and serialised.
    let request: Value = serde_json::from_slice(&upstream_body).unwrap_or(Value::Null);
    let whole_reason = if !request.is_object() || !splittable(&request) {
        Some("not_splittable")
    } else if protocol_of(&prefill) != protocol {
        if !MIXED_PROTOCOLS_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(prefill = %prefill.address(), decode = %decode.address(), "a prefill pod and a decode pod of different pd_protocol were paired; such requests are served whole (configure one protocol per model)");
        }
        Some("protocol_mismatch")
    } else {
        None
    };
    if let Some(why) = whole_reason {
        let mut decode = decode;
        prefill.release();
        decode.serve_whole();
        count_decision(app, "aggregated", why);
        return forward(app, api, headers, upstream_body, parsed, decode, inject).await;
    }
    count_decision(app, "disaggregated", reason.as_str());
    let mut run = Split {
        app,
        api,
        headers,
        upstream_body,
        request,
        parsed,
        inject,
        protocol,
    };
    run.serve(decode, prefill).await
}

struct Split<'a> {
    app: &'a Arc<App>,
    api: ApiKind,
    headers: &'a HeaderMap,
    upstream_body: Bytes,
    /// `upstream_body` parsed, for the legs' edited bodies.
    request: Value,
    parsed: &'a ParsedRequest,
    inject: bool,
    protocol: PdProtocol,
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
                Leg::RetryPrefill(cause) => {
                    if attempt < self.app.max_attempts {
                        self.count_transfer(cause);
                        self.app.metrics.pd.count_prefill_retry(cause);
                        attempt += 1;
                        continue;
                    }
                    return self.whole(decode, cause).await;
                }
                Leg::Rejected(resp, address) => {
                    // The client gets the prefill pod's verdict; the decode pod did nothing wrong.
                    decode.set_status(resp.status().as_u16());
                    decode.release();
                    return Ok(relay_plain(resp, &address));
                }
                Leg::Decode(sent) => sent,
            };
            let (result, handoff, prefill_cached) = result;
            let address = decode.address().clone();
            let ((cause, kind), refused) = match result {
                Ok((resp, first)) => match status_failure(resp.status().as_u16()) {
                    None => {
                        let m = &self.app.metrics.pd;
                        m.transfer_seconds.observe(handoff.elapsed().as_secs_f64());
                        self.count_transfer("ok");
                        decode.set_status(resp.status().as_u16());
                        let resp = respond(resp, first, decode, self.parsed, self.inject);
                        return Ok(with_cached_tokens(resp, prefill_cached));
                    }
                    Some(failure) => (failure, Some(resp)),
                },
                Err(DecodeError::Attempt(AttemptError::Connect)) => {
                    (("connect", FailureKind::Connect), None)
                }
                Err(DecodeError::Attempt(AttemptError::Timeout)) => {
                    (("timeout", FailureKind::Timeout), None)
                }
                Err(DecodeError::Attempt(AttemptError::FirstByte)) => {
                    (("first_byte_timeout", FailureKind::Timeout), None)
                }
                Err(DecodeError::ErrorEvent) => {
                    // The decode pod answered: its KV load failed (the prefill pod died, the
                    // link broke, the blocks expired). A fresh prefill for the same decode pod,
                    // while attempts last; then the decode pod computes the prompt itself.
                    if attempt < self.app.max_attempts {
                        self.count_transfer("transfer_failed");
                        attempt += 1;
                        continue;
                    }
                    return self.whole(decode, "transfer_failed").await;
                }
            };
            if attempt < self.app.max_attempts && decode.retry(cause, kind) {
                self.count_transfer("decode_failed");
                self.app.metrics.count_retry(cause);
                tracing::debug!(from = %address, to = %decode.address(), cause, "decode leg failed; retrying with a fresh prefill");
                attempt += 1;
                continue;
            }
            if refused
                .as_ref()
                .is_some_and(|r| r.status().is_server_error())
            {
                // No other decode pod: a 5xx after a split may be the KV load it failed (vLLM
                // answers a failed load with 500). Last resort: the pod computes the prompt.
                return self.whole(decode, "decode_failed").await;
            }
            self.count_transfer("decode_failed");
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
        if cause != "prefill_stopped" {
            tracing::warn!(decode = %decode.address(), cause, "prefill leg failed; serving the request whole on its decode pod");
        }
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
        let body = match rewrite(&self.request, prefill_fields) {
            Some(b) => b,
            None => return Leg::Whole("prefill"),
        };
        let params = match run_prefill(self.app, self.api, self.headers, body, prefill).await {
            Prefilled::Ready(Ok(ready)) => ready,
            Prefilled::Ready(Err(why)) => return Leg::Whole(why),
            Prefilled::Failed(cause) => return Leg::Whole(cause),
            Prefilled::Rejected(resp, address) => return Leg::Rejected(resp, address),
        };
        let (params, cached) = params;
        let prefill_cached = Arc::new(OnceLock::new());
        if let Some(c) = cached {
            let _ = prefill_cached.set(c);
        }
        let handoff = Instant::now();
        let Some(body) = rewrite(&self.request, |o| {
            o.insert("kv_transfer_params".into(), params.clone());
        }) else {
            return Leg::Whole("prefill");
        };
        let result = self.send_decode(decode, body).await;
        Leg::Decode((result, handoff, prefill_cached))
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
            rewrite(&self.request, |o| {
                bootstrap(o);
                // Its answer is read for usage only: not streamed, nothing echoed.
                o.insert("stream".into(), Value::Bool(false));
                for k in [
                    "stream_options",
                    "echo",
                    "logprobs",
                    "top_logprobs",
                    "prompt_logprobs",
                ] {
                    o.remove(k);
                }
            }),
            rewrite(&self.request, bootstrap),
        ) else {
            return Leg::Whole("prefill");
        };
        let handoff = Instant::now();
        let app = self.app.clone();
        let (api, headers) = (self.api, self.headers.clone());
        // The prefill pod's cached tokens, for the client's usage, once its answer is in (by
        // the time the decode leg's usage comes, at its end).
        let prefill_cached = Arc::new(OnceLock::new());
        let cell = prefill_cached.clone();
        let mut task = tokio::spawn(async move {
            // One prefill pod per room: a retry would need a new room for the decode leg too.
            let done = run_prefill_once(&app, api, &headers, prefill_body, prefill).await;
            if let Prefilled::Ready(Ok((_, Some(c)))) = &done {
                let _ = cell.set(*c);
            }
            done
        });
        let mut guard = AbortOnDrop(Some(task.abort_handle()));
        let decode_leg = self.send_decode(decode, decode_body);
        tokio::pin!(decode_leg);
        tokio::select! {
            result = &mut decode_leg => {
                // The decode pod produced its first token: the prefill leg finishes on its own.
                // If it failed, the prefill leg's room has no reader: it is aborted (guard).
                if result.is_ok() {
                    guard.detach();
                }
                Leg::Decode((result, handoff, prefill_cached))
            }
            prefilled = &mut task => {
                guard.detach();
                match prefilled {
                    Ok(Prefilled::Ready(_)) => {
                        Leg::Decode((decode_leg.await, handoff, prefill_cached))
                    }
                    Ok(Prefilled::Rejected(resp, address)) => Leg::Rejected(resp, address),
                    // The decode leg waiting on this room is dropped; a new pair gets a new room.
                    Ok(Prefilled::Failed(cause)) => Leg::RetryPrefill(cause),
                    Err(_) => Leg::RetryPrefill("prefill"),
                }
            }
        }
    }

    /// Sends the decode leg to the booked decode pod and waits for its first body frame
    /// (within the first-byte timeout when one is set): engines send a stream's headers before
    /// its first token, and a KV load that fails shows only in the body, as an error event
    /// (vLLM's `kv_load_failure_policy: fail`), which is then a failure to retry, since nothing
    /// has reached the client yet.
    async fn send_decode(&self, decode: &Booking, body: Bytes) -> DecodeResult {
        let address = decode.address().clone();
        let sent = first_byte(send_to(
            self.app,
            &address,
            Method::POST,
            self.api.path(),
            self.headers,
            body,
        ));
        let (resp, first) = match self.app.limits.first_byte_timeout_ms {
            None => sent.await,
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), sent)
                .await
                .unwrap_or(Err(AttemptError::FirstByte)),
        }
        .map_err(DecodeError::Attempt)?;
        let failed = first
            .as_ref()
            .and_then(|f| f.data_ref())
            .is_some_and(|d| is_error_frame(d));
        if failed && resp.status().is_success() {
            tracing::debug!(decode = %address, "the decode leg's first frame is an error event");
            return Err(DecodeError::ErrorEvent);
        }
        Ok((resp, first))
    }
}

type DecodeResult =
    Result<(hyper::Response<Incoming>, Option<hyper::body::Frame<Bytes>>), DecodeError>;

/// Why a decode leg produced no first token.
enum DecodeError {
    Attempt(AttemptError),
    /// Its first body frame was an error event (a failed KV load).
    ErrorEvent,
}

/// The decode pod's response with `usage.prompt_tokens_details.cached_tokens` set to what the
/// prefill pod reported (once `cached` holds it; a body relayed before then is left as is):
/// vLLM's decode pod counts the transferred prompt as cached, but what the client is owed is
/// how much of its prompt a cache really served (llm-d's sidecar rewrites it the same way). The
/// length may change, so `content-length` goes.
fn with_cached_tokens(resp: Response, cached: Arc<OnceLock<u32>>) -> Response {
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(
        parts,
        axum::body::Body::new(CachedRewrite {
            inner: body,
            value: cached,
            held: Vec::new(),
        }),
    )
}

/// Rewrites the number after every `"cached_tokens":` in a body relayed frame by frame. Only
/// a tail that may be an unfinished key or number is held back until the next frame, so a
/// stream is not buffered.
struct CachedRewrite {
    inner: axum::body::Body,
    value: Arc<OnceLock<u32>>,
    held: Vec<u8>,
}

const CACHED_KEY: &[u8] = b"\"cached_tokens\":";

/// Most bytes held back for a key and its number: the key, some spaces and a 10-digit count
/// fit many times over; a decode pod sending an endless run of digits or spaces after the key
/// must not make the relay buffer it all (and copy it again with every frame).
const MAX_HELD_BYTES: usize = 256;

impl CachedRewrite {
    /// Rewrites `buf` and splits off what must wait for more bytes (unless `last`).
    fn rewrite(&self, buf: &[u8], last: bool) -> (Vec<u8>, Vec<u8>) {
        let Some(value) = self.value.get() else {
            return (buf.to_vec(), Vec::new());
        };
        let value = value.to_string();
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while let Some(at) = find(&buf[i..], CACHED_KEY).map(|k| k + i) {
            let mut j = at + CACHED_KEY.len();
            while j < buf.len() && buf[j] == b' ' {
                j += 1;
            }
            let digits = buf[j..].iter().take_while(|b| b.is_ascii_digit()).count();
            if j + digits == buf.len() && !last && buf.len() - at <= MAX_HELD_BYTES {
                // The number may go on in the next frame. (Past the bound it is no count a
                // server writes, and is relayed rather than held, whatever follows.)
                out.extend_from_slice(&buf[i..at]);
                return (out, buf[at..].to_vec());
            }
            out.extend_from_slice(&buf[i..j]);
            if digits > 0 {
                out.extend_from_slice(value.as_bytes());
            }
            i = j + digits;
        }
        // A partial key at the very end waits for the next frame.
        let keep = if last {
            0
        } else {
            (1..CACHED_KEY.len())
                .rev()
                .find(|&n| buf.len() - i >= n && buf.ends_with(&CACHED_KEY[..n]))
                .unwrap_or(0)
        };
        out.extend_from_slice(&buf[i..buf.len() - keep]);
        (out, buf[buf.len() - keep..].to_vec())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl hyper::body::Body for CachedRewrite {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        loop {
            let this = &mut *self;
            match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let mut buf = std::mem::take(&mut this.held);
                        buf.extend_from_slice(&data);
                        let (out, held) = this.rewrite(&buf, false);
                        this.held = held;
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(hyper::body::Frame::data(out.into()))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(None) if !this.held.is_empty() => {
                    let buf = std::mem::take(&mut this.held);
                    let (out, _) = this.rewrite(&buf, true);
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(out.into()))));
                }
                other => return other,
            }
        }
    }
}

/// Whether a first body frame reports a failure instead of a token: an SSE error event
/// (`data: {"error": …}`) or a choice finished with `error`, or a JSON body of either.
fn is_error_frame(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let payloads: Vec<&str> = if text.trim_start().starts_with("data:") {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .collect()
    } else {
        vec![text.trim()]
    };
    payloads.iter().any(|p| {
        serde_json::from_str::<Value>(p).is_ok_and(|v| {
            v.get("error").is_some_and(|e| !e.is_null())
                || v["choices"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["finish_reason"] == "error"))
        })
    })
}

/// What one try of the split plan came to.
enum Leg {
    /// The decode leg's answer, and when the handoff to it began.
    /// With the prefill pod's cached prompt tokens, when known (vllm-nixl), for the client's
    /// usage.
    Decode((DecodeResult, Instant, Arc<OnceLock<u32>>)),
    /// The prefill could not be done (cause): serve whole.
    Whole(&'static str),
    /// The prefill leg of a pair sent at once failed (cause): a new pair may be tried.
    RetryPrefill(&'static str),
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

/// The client's parsed body with `edit` applied to its top-level object, serialised.
fn rewrite(body: &Value, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Option<Bytes> {
    let mut v = body.clone();
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
    o.insert("max_tokens".into(), json!(1));
    if o.contains_key("max_completion_tokens") {
        o.insert("max_completion_tokens".into(), json!(1));
    }
    if o.contains_key("n") {
        o.insert("n".into(), json!(1));
    }
    // A minimum above one token is refused (400) with `max_tokens: 1`; echoed prompts and
    // logprobs would make the answer as large as the prompt for nothing (vLLM's own proxy drops
    // the minimums for the prefill leg too).
    for k in [
        "stream_options",
        "min_tokens",
        "min_completion_tokens",
        "echo",
        "logprobs",
        "top_logprobs",
        "prompt_logprobs",
    ] {
        o.remove(k);
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
        let (cause, kind) =
            match prefill_attempt(app, api, headers, body.clone(), booking, true).await {
                Attempt::Done(p) => return p,
                Attempt::Failed(cause, kind, b) => {
                    booking = *b;
                    (cause, kind)
                }
            };
        if attempt < app.max_attempts && booking.retry(cause, kind) {
            app.metrics.pd.count_prefill_retry(cause);
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
    match prefill_attempt(app, api, headers, body, booking, false).await {
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
    expect_params: bool,
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
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            // Not the pod's fault: it answered, at length.
            booking.set_status(status.as_u16());
            booking.release();
            return Attempt::Done(Prefilled::Ready(Err("prefill_answer_too_large")));
        }
        Err(_) => return Attempt::Failed("connect", FailureKind::Connect, Box::new(booking)),
    };
    let mut meter = ResponseMeter::new(false, api == ApiKind::Chat);
    meter.on_chunk(&bytes, Instant::now());
    let answer = serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null);
    let params = answer
        .get("kv_transfer_params")
        .filter(|p| p.is_object())
        .cloned();
    booking.set_status(status.as_u16());
    let measured = meter.finish();
    booking.finish(&measured);
    let cached = measured.usage.cached_tokens;
    let params = match params {
        Some(p) => Ok((p, cached)),
        // SGLang's prefill pod pushes the KV itself: its answer carries nothing to forward.
        None if !expect_params => Ok((Value::Null, cached)),
        // NixlConnector hands KV over only from a request cut at its length limit: a first
        // token that ends the generation (EOS, a stop string) leaves nothing to transfer.
        None if answer["choices"][0]["finish_reason"] == "stop" => Err("prefill_stopped"),
        None => {
            tracing::warn!(prefill = %address, "the prefill pod answered without kv_transfer_params; is it started with a KV connector (--kv-transfer-config)?");
            Err("no_transfer_params")
        }
    };
    Attempt::Done(Prefilled::Ready(params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_leg_asks_for_one_token_and_nothing_it_cannot_give() {
        let body = br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true},
            "max_tokens":64,"max_completion_tokens":64,"min_tokens":16,"min_completion_tokens":8,
            "n":1,"logprobs":true,"top_logprobs":3,"echo":true,"prompt_logprobs":2,"temperature":0.5}"#;
        let body: Value = serde_json::from_slice(body).unwrap();
        let out: Value = serde_json::from_slice(&rewrite(&body, prefill_fields).unwrap()).unwrap();
        assert_eq!(out["max_tokens"], 1);
        assert_eq!(out["max_completion_tokens"], 1);
        assert_eq!(out["n"], 1);
        assert_eq!(out["stream"], false);
        assert_eq!(out["temperature"], 0.5);
        assert_eq!(out["kv_transfer_params"]["do_remote_decode"], true);
        for gone in [
            "stream_options",
            "min_tokens",
            "min_completion_tokens",
            "logprobs",
            "top_logprobs",
            "echo",
            "prompt_logprobs",
        ] {
            assert!(out.get(gone).is_none(), "{gone} kept: {out}");
        }
    }

    #[test]
    fn cached_tokens_are_rewritten_whatever_the_frame_boundaries() {
        let body = br#"data: {"choices":[],"usage":{"prompt_tokens":900,"prompt_tokens_details":{"cached_tokens":899}}}

data: [DONE]

"#;
        let want = String::from_utf8_lossy(body).replace("899", "32");
        let r = CachedRewrite {
            inner: axum::body::Body::empty(),
            value: Arc::new(OnceLock::from(32)),
            held: Vec::new(),
        };
        for cut in 0..body.len() {
            let (mut out, held) = r.rewrite(&body[..cut], false);
            let mut rest = held;
            rest.extend_from_slice(&body[cut..]);
            let (tail, _) = r.rewrite(&rest, true);
            out.extend_from_slice(&tail);
            assert_eq!(String::from_utf8_lossy(&out), want, "cut at {cut}");
        }
        // A key followed by an endless run of spaces: held only up to the bound, then relayed.
        let mut endless = CACHED_KEY.to_vec();
        endless.extend_from_slice(&[b' '; 64]);
        let (out, held) = r.rewrite(&endless, false);
        assert_eq!((out.len(), held.len()), (0, endless.len()));
        endless.extend_from_slice(&[b' '; MAX_HELD_BYTES]);
        let (out, held) = r.rewrite(&endless, false);
        assert_eq!((out.len(), held.len()), (endless.len(), 0));
        // No usage details: nothing to rewrite.
        let (out, held) = r.rewrite(br#"{"prompt_tokens_details":null}"#, false);
        assert_eq!(
            (out.as_slice(), held.len()),
            (&br#"{"prompt_tokens_details":null}"#[..], 0)
        );
    }

    fn json(body: &[u8]) -> Value {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn several_completions_or_prompts_are_not_split() {
        assert!(splittable(&json(br#"{"model":"m","messages":[]}"#)));
        assert!(splittable(&json(br#"{"model":"m","prompt":"x","n":1}"#)));
        assert!(splittable(&json(br#"{"model":"m","prompt":[1,2,3]}"#)));
        assert!(!splittable(&json(br#"{"model":"m","messages":[],"n":2}"#)));
        assert!(!splittable(&json(
            br#"{"model":"m","prompt":"x","best_of":3}"#
        )));
        assert!(!splittable(&json(br#"{"model":"m","prompt":["a","b"]}"#)));
        assert!(!splittable(&json(br#"{"model":"m","prompt":[[1,2],[3]]}"#)));
    }

    #[test]
    fn an_error_event_or_an_error_finish_is_recognised_in_a_first_frame() {
        assert!(is_error_frame(
            b"data: {\"error\":{\"message\":\"KV load failed\",\"code\":500}}\n\n"
        ));
        assert!(is_error_frame(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"error\"}]}\n\n"
        ));
        assert!(is_error_frame(br#"{"error":{"message":"x"}}"#));
        assert!(!is_error_frame(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\n"
        ));
        assert!(!is_error_frame(
            br#"{"choices":[{"message":{"content":"ok"}}],"error":null}"#
        ));
    }
}
