//! The `envoy.service.ext_proc.v3.ExternalProcessor` service: one state machine per ext_proc
//! stream (one stream per HTTP request), speaking the Gateway API Inference Extension
//! endpoint-picker protocol.
//!
//! **Per-stream state machine.** Envoy (request/response header mode `SEND`, body mode
//! `FULL_DUPLEX_STREAMED`, trailers `SEND`) sends, in order: request headers, request body chunks,
//! optional request trailers, then response headers, response body chunks, optional response
//! trailers. [`StreamState`] walks `Headers → Body → Routed → Responding → Done`:
//! - *Request headers* are recorded (`:path`, `x-request-id`, `x-gateway-inference-objective`,
//!   `x-gateway-model-name-rewrite`, `x-session-id`, and the subset hint from the filter metadata
//!   `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`, a comma-separated string or
//!   a list). Nothing is answered yet: in full-duplex mode the headers answer must carry the routing
//!   decision, which needs the body. A request without a body (`end_of_stream` on the headers,
//!   e.g. `GET /v1/models`) is sent to a ready endpoint at once, round-robin.
//! - *Body chunks* are buffered until `end_of_stream` (or until request trailers arrive, which also
//!   end the body). Then the body is parsed as the OpenAI API named by the `:path` suffix, the model
//!   is rewritten if asked, the core picks and books, and the picker answers, in this order: the
//!   request-headers response (header mutation `x-gateway-destination-endpoint`, `content-length`
//!   of the body it re-sends, `clear_route_cache: true`, and the same endpoint value in dynamic
//!   metadata `envoy.lb`), then the body as streamed body mutations of at most
//!   [`BODY_CHUNK_BYTES`] each (the last one carries `end_of_stream` unless trailers follow), then a
//!   trailers response if trailers came. Paths that are not an inference API are routed like
//!   body-less requests and their body re-sent untouched.
//! - *Response headers* give the status and the endpoint that actually served (dynamic metadata
//!   `envoy.lb` / `x-gateway-destination-endpoint-served`, else the response header of that name;
//!   if it is one of the fallbacks, the booking moves there). A 5xx or 429 ends the booking as a
//!   failure the core penalises, as the HTTP gateway does.
//! - *Response body chunks* are measured ([`kvgate_runtime::meter`]: TTFT, TPOT, usage) and echoed back
//!   unchanged (model name rewritten back to the client's name when a rewrite was applied); the
//!   end of the body (or response trailers) finishes the booking with the measured outcome.
//! - If Envoy closes the stream early (client gone, upstream reset), dropping the state releases
//!   the booking as cancelled, which carries no penalty. The booking is the runtime's
//!   [`Booking`], the one `kvgate serve` uses, so both record decisions, TTFT, TPOT and failures
//!   alike.
//!
//! **Buffering limits.** The request body is held in memory until the decision, then once more
//! as the outgoing chunks (so at most about twice its size per stream); it is capped at `limits.max_body_bytes` of the config (32 MiB by default, shared with
//! `kvgate serve`), beyond which the client gets an immediate 413. Response bodies are never
//! buffered: each chunk is answered as it arrives, only a 4 KiB tail is kept for `usage` (a
//! non-streaming body is copied up to 256 KiB for the same reason).
//!
//! **Malformed input.** A body that is not valid JSON for the API, lacks `model` or the prompt
//! field, or mistypes them gets an immediate 400 in the OpenAI error shape
//! (`{"error": {"message", "type", "param", "code"}}`, `content-type: application/json`), exactly
//! what `kvgate serve` answers; so does an inference path whose request has no body at all
//! (headers with `end_of_stream`), which is never sent to an engine. Paths are matched
//! exactly (`/x/v1/chat/completions` is not the chat API). A message that cannot be decoded
//! ends the stream with `INVALID_ARGUMENT` and a WARN. An unknown model is 404; no ready endpoint (none configured or
//! discovered, none left in the subset hint) is 503; a sheddable request (objective priority < 0)
//! meeting a saturated pool is 429. Messages out of protocol order (a body before headers, a
//! second set of request headers) end the stream with a gRPC `FAILED_PRECONDITION`, which Envoy
//! turns into a 500 unless its filter fails open.
//!
//! **Bounded bookings.** A routed request's booking waits for the response headers at most
//! [`Picker::with_response_timeout_ms`]; then it is released (no penalty, WARN logged) so
//! streams that never continue cannot hold bookings forever. The bound runs on tokio's clock.
//!
//! **Fallbacks.** The core ranks fallbacks after the primary. The protocol allows writing them
//! after it (`ip:port,ip:port`), but Envoy's `ORIGINAL_DST` cluster, which the reference
//! deployment uses, only parses a single address and answers 503 to a list; so the picker writes
//! the primary alone unless `--fallbacks N` asks for up to N more (for proxies whose load balancer
//! understands lists, such as Envoy's `override_host` policy).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::time::Instant;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody,
    HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse, body_mutation,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use futures::Stream;
use kvgate_core::request::FailureKind;
use kvgate_runtime::booking::{Booking, status_failure};
use kvgate_runtime::config::{LLMD_OBJECTIVE_HEADER, OBJECTIVE_HEADER, SESSION_HEADER};
use kvgate_runtime::decision_log::Recorder;
use kvgate_runtime::meter::ResponseMeter;
use kvgate_runtime::metrics::RequestLabels;
use kvgate_runtime::openai::{ApiError, ApiKind, ParsedRequest, parse_request};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::{EppMetrics, StatusLabels};
use kvgate_runtime::control::Control;

/// Largest body chunk sent back to Envoy, bytes: the reference picker's limit, kept below
/// Envoy's 64 KiB default per-stream buffer so one mutation never exceeds it.
pub const BODY_CHUNK_BYTES: usize = 62_000;

/// Responses queued per stream before the stream task waits for Envoy to read: a routed request
/// answers with one headers message plus one per 62 KB body chunk, so 32 covers ~2 MB bodies
/// without a wait while bounding memory per stream.
const RESPONSE_CHANNEL_CAPACITY: usize = 32;

/// Header (and `envoy.lb` metadata key) carrying the chosen endpoint(s).
pub const DESTINATION_ENDPOINT: &str = "x-gateway-destination-endpoint";
/// Dynamic-metadata namespace of the destination.
pub const DESTINATION_NAMESPACE: &str = "envoy.lb";
/// Filter-metadata namespace of the subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key of the subset hint.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Key (metadata) and header naming the endpoint that served the request.
pub const SERVED_ENDPOINT: &str = "x-gateway-destination-endpoint-served";
/// Header asking the picker to send the request under another model name.
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";

/// llm-d's twin of [`MODEL_REWRITE_HEADER`] (both spellings are accepted).
pub const LLMD_MODEL_REWRITE_HEADER: &str = "x-llm-d-model-name-rewrite";
/// The prefill pod of a disaggregated request, `host:port`, for the sidecar on the decode pod
/// (llm-d's P/D protocol).
pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";

/// How long a booking waits for the response phase by default, ms (see
/// [`Picker::with_response_timeout_ms`]). A non-streaming request's response headers come
/// only when the engine has generated the whole answer, so this must exceed the longest
/// legitimate generation (minutes); ten minutes does, and still frees a leaked booking.
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 600_000;

/// Settings of the ext_proc service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PickerSettings {
    /// Largest request body buffered, bytes (larger → immediate 413).
    pub max_body_bytes: usize,
    /// Fallback endpoints written after the primary (0 = primary only; see the module docs).
    pub fallbacks: usize,
}

struct Shared {
    control: Arc<Control>,
    metrics: Arc<EppMetrics>,
    settings: PickerSettings,
    /// How long a routed request's booking waits for the response headers, ms. A stream that
    /// sends a body and then never continues (a proxy that lost the request, or a peer holding
    /// bookings on purpose) would otherwise count against its endpoint forever, and enough of
    /// them make the pool look saturated (sheddable traffic then gets 429). When it trips the
    /// booking is released without a penalty (nobody knows whose fault it is) and a WARN is
    /// logged; the stream itself goes on, so a response that does come is still relayed.
    response_timeout_ms: u64,
    round_robin: AtomicUsize,
    /// Per-request records (decision log, captured trace, access log), when any is on.
    recorder: Option<Arc<Recorder>>,
}

/// The ext_proc service (cheap to clone; all state is shared).
#[derive(Clone)]
pub struct Picker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Picker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Picker")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl Picker {
    /// A picker routing with `control`.
    pub fn new(control: Arc<Control>, metrics: Arc<EppMetrics>, settings: PickerSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                control,
                metrics,
                settings,
                response_timeout_ms: DEFAULT_RESPONSE_TIMEOUT_MS,
                round_robin: AtomicUsize::new(0),
                recorder: None,
            }),
        }
    }

    /// The same picker writing per-request records with `recorder`.
    pub fn with_recorder(self, recorder: Option<Arc<Recorder>>) -> Self {
        let shared = Arc::new(Shared {
            control: self.shared.control.clone(),
            metrics: self.shared.metrics.clone(),
            settings: self.shared.settings,
            response_timeout_ms: self.shared.response_timeout_ms,
            round_robin: AtomicUsize::new(0),
            recorder,
        });
        Self { shared }
    }

    /// The same picker with bookings waiting at most `ms` for the response phase (default
    /// [`DEFAULT_RESPONSE_TIMEOUT_MS`]; see the module docs).
    pub fn with_response_timeout_ms(self, ms: u64) -> Self {
        let shared = Arc::new(Shared {
            control: self.shared.control.clone(),
            metrics: self.shared.metrics.clone(),
            settings: self.shared.settings,
            response_timeout_ms: ms,
            round_robin: AtomicUsize::new(0),
            recorder: self.shared.recorder.clone(),
        });
        Self { shared }
    }

    /// A fresh per-stream state machine (what [`ExternalProcessor::process`] runs per stream).
    pub fn stream(&self) -> StreamState {
        StreamState::new(self.shared.clone())
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream =
        Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send + 'static>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(RESPONSE_CHANNEL_CAPACITY);
        let mut state = self.stream();
        self.shared.metrics.streams.inc();
        tokio::spawn(async move {
            loop {
                let next = inbound.message();
                let received = match state.response_deadline() {
                    Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                        Ok(r) => r,
                        Err(_) => {
                            state.response_overdue();
                            continue;
                        }
                    },
                    None => next.await,
                };
                let msg = match received {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) if is_decode_error(&status) => {
                        // Not a proxy going away: bytes that are no ext_proc message. Say so
                        // with an error status (Envoy logs it) rather than a clean end.
                        tracing::warn!(%status, "ext_proc message cannot be decoded; ending the stream");
                        let _ = tx
                            .send(Err(Status::invalid_argument(format!(
                                "cannot decode the ext_proc message: {}",
                                status.message()
                            ))))
                            .await;
                        break;
                    }
                    Err(status) => {
                        tracing::debug!(%status, "ext_proc stream ended by the proxy");
                        break;
                    }
                };
                match state.handle(msg, Instant::now()) {
                    Ok(mut step) => {
                        // Engine-side tokenization happens here, off the state machine, which
                        // stays synchronous (and testable message by message).
                        while let Some(parsed) = step.tokenize.take() {
                            let control = state.shared.control.clone();
                            let tokens = control.engine_tokens(&parsed).await;
                            step = state.resume_with_tokens(tokens);
                        }
                        for r in step.responses {
                            if tx.send(Ok(r)).await.is_err() {
                                return;
                            }
                        }
                        if step.close {
                            return;
                        }
                    }
                    Err(status) => {
                        tracing::warn!(%status, "ext_proc protocol violation");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Whether an inbound stream error is a message that could not be decoded (tonic reports
/// those as `INTERNAL`, with the decoder's message), as opposed to the peer resetting or
/// closing the stream.
fn is_decode_error(status: &Status) -> bool {
    // A transport failure (Envoy resetting the stream when its HTTP request ends, a dropped
    // connection) also arrives as `Internal`, but carries the h2/hyper error as its source; a
    // message that does not decode has none. Only the latter is the peer's fault.
    matches!(
        status.code(),
        tonic::Code::Internal | tonic::Code::InvalidArgument | tonic::Code::DataLoss
    ) && std::error::Error::source(status).is_none()
        && !status.message().starts_with("h2 protocol error")
}

/// What the stream answers to one message.
#[derive(Debug, Default)]
pub struct Step {
    /// Messages to send to Envoy, in order.
    pub responses: Vec<ProcessingResponse>,
    /// The exchange is over (an immediate response was sent): close the stream.
    pub close: bool,
    /// With `--tokenizer engine`: the request is waiting for its prompt's tokens; the driver
    /// asks an engine ([`Control::engine_tokens`]) and hands them to
    /// [`StreamState::resume_with_tokens`], which routes.
    pub tokenize: Option<ParsedRequest>,
}

/// The answer to the request's trailers (passed on unchanged).
fn trailers_response() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Resp::RequestTrailers(TrailersResponse::default())),
        ..ProcessingResponse::default()
    }
}

impl Step {
    fn none() -> Self {
        Self::default()
    }

    fn one(r: ProcessingResponse) -> Self {
        Self {
            responses: vec![r],
            ..Self::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Headers,
    Body,
    Routed,
    Responding,
    Done,
}

/// What the request headers said.
#[derive(Debug, Default)]
struct RequestInfo {
    method: String,
    path: String,
    request_id: Option<String>,
    objective: Option<String>,
    session: Option<String>,
    model_rewrite: Option<String>,
    /// `Some` when the proxy sent a subset hint (even an empty one: then nothing may be picked).
    subset: Option<Vec<String>>,
}

/// The state of one ext_proc stream (see the module docs).
pub struct StreamState {
    shared: Arc<Shared>,
    phase: Phase,
    full_duplex: bool,
    t0: Instant,
    info: RequestInfo,
    api: Option<ApiKind>,
    /// Sequences the request generates side by side (`n`, a batch of prompts; see
    /// [`kvgate_runtime::meter::ResponseMeter::with_sequences`]).
    sequences: u32,
    body: Vec<u8>,
    booking: Option<Booking>,
    /// The prefill leg of a disaggregated request, run by the decode pod's sidecar (the picker
    /// never sees the prefill pod's answer): released, with nothing learnt and no fault found,
    /// when the decode pod's response starts or at twice its predicted TTFT, whichever comes
    /// first; a non-streaming response starts only when the whole generation is done, and the
    /// prefill pod would carry a phantom queue until then.
    prefill_leg: Option<PrefillLeg>,
    /// `(client's model, model sent upstream)` when the model was rewritten.
    rewrite: Option<(String, String)>,
    /// The end of the last response chunk that may begin a `"model":"…"` to rewrite back,
    /// held until the next chunk shows whether it does (Envoy cuts the body anywhere).
    rewrite_held: Vec<u8>,
    meter: Option<ResponseMeter>,
    status: u16,
    /// Engine-side tokenization: `Some` once the tokens were asked for (`Some(None)`: no engine
    /// answered), and the end-of-stream flag of the body that is waiting.
    engine_tokens: Option<Option<Vec<u32>>>,
    waiting_eos: bool,
    /// The request's trailers arrived while its tokens were asked for: their answer follows
    /// the routed body once [`Self::resume_with_tokens`] routes.
    waiting_trailers: bool,
    /// When the request was routed (its booking starts waiting for the response phase).
    routed_at: Option<Instant>,
}

impl std::fmt::Debug for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamState")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

fn header_value(h: &HeaderValue) -> String {
    if h.raw_value.is_empty() {
        h.value.clone()
    } else {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    }
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..HeaderValue::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// Addresses from a subset-hint value: a comma-separated string or a list of such strings.
fn subset_addresses(v: &Value, out: &mut Vec<String>) {
    match &v.kind {
        Some(Kind::StringValue(s)) => out.extend(
            s.split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned),
        ),
        Some(Kind::ListValue(l)) => {
            for item in &l.values {
                subset_addresses(item, out);
            }
        }
        _ => {}
    }
}

fn subset_hint(md: Option<&Metadata>) -> Option<Vec<String>> {
    let v = md?
        .filter_metadata
        .get(SUBSET_NAMESPACE)?
        .fields
        .get(SUBSET_KEY)?;
    let mut out = Vec::new();
    subset_addresses(v, &mut out);
    Some(out)
}

fn lb_metadata_string(md: Option<&Metadata>, key: &str) -> Option<String> {
    match &md?
        .filter_metadata
        .get(DESTINATION_NAMESPACE)?
        .fields
        .get(key)?
        .kind
    {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

/// Chunks `body` into streamed body mutations; the last carries `end_of_stream` when `eos`.
fn body_chunks(body: &[u8], eos: bool, request: bool) -> Vec<ProcessingResponse> {
    let wrap = |chunk: &[u8], end: bool| {
        let common = CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body: chunk.to_vec(),
                        end_of_stream: end,
                        ..StreamedBodyResponse::default()
                    },
                )),
            }),
            ..CommonResponse::default()
        };
        let br = BodyResponse {
            response: Some(common),
        };
        ProcessingResponse {
            response: Some(if request {
                Resp::RequestBody(br)
            } else {
                Resp::ResponseBody(br)
            }),
            ..ProcessingResponse::default()
        }
    };
    if body.is_empty() {
        return vec![wrap(body, eos)];
    }
    let n = body.len().div_ceil(BODY_CHUNK_BYTES);
    body.chunks(BODY_CHUNK_BYTES)
        .enumerate()
        .map(|(i, c)| wrap(c, eos && i + 1 == n))
        .collect()
}

/// Replaces the top-level `model` of a JSON body.
fn rewrite_model(body: &[u8], model: &str) -> Result<Vec<u8>, ApiError> {
    let mut v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            tonic::codegen::http::StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
        )
    })?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("model".into(), serde_json::Value::String(model.to_owned()));
    }
    serde_json::to_vec(&v).map_err(|e| {
        ApiError::new(
            tonic::codegen::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot re-encode the body: {e}"),
        )
    })
}

/// Replaces `"model":"from"` (with or without a space after the colon) by `to` in a response
/// chunk, so clients see the name they asked for.
fn rewrite_model_back(chunk: &[u8], from: &str, to: &str) -> Vec<u8> {
    let mut out = chunk.to_vec();
    for sep in [":", ": "] {
        let old = format!("\"model\"{sep}\"{from}\"");
        let new = format!("\"model\"{sep}\"{to}\"");
        out = replace_all(&out, old.as_bytes(), new.as_bytes());
    }
    out
}

/// Length of the longest end of `out` that is the start, not the whole, of a
/// `"model":"from"` (either spacing): those bytes may be completed by the next chunk.
fn model_prefix_at_end(out: &[u8], from: &str) -> usize {
    [":", ": "]
        .iter()
        .map(|sep| {
            let pattern = format!("\"model\"{sep}\"{from}\"");
            let p = pattern.as_bytes();
            (1..p.len().min(out.len() + 1))
                .rev()
                .find(|&n| out.ends_with(&p[..n]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

fn replace_all(hay: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    if old.is_empty() || hay.len() < old.len() {
        return hay.to_vec();
    }
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(old) {
            out.extend_from_slice(new);
            i += old.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// A prefill leg the picker books but cannot watch (see `StreamState::prefill_leg`): released
/// at the decode pod's response, at its deadline, or when the stream goes away.
struct PrefillLeg {
    slot: Arc<std::sync::Mutex<Option<Booking>>>,
    timer: tokio::task::AbortHandle,
}

impl PrefillLeg {
    /// Holds `leg` until released, or until twice its predicted TTFT (at least 100 ms, at most
    /// a minute) has passed.
    fn start(leg: Booking) -> Self {
        let deadline_us = leg
            .decision()
            .predicted_ttft_us
            .unwrap_or(1_000_000)
            .saturating_mul(2)
            .clamp(100_000, 60_000_000);
        let slot = Arc::new(std::sync::Mutex::new(Some(leg)));
        let held = slot.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_micros(deadline_us)).await;
            Self::take(&held);
        })
        .abort_handle();
        Self { slot, timer }
    }

    fn take(slot: &std::sync::Mutex<Option<Booking>>) {
        let leg = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(leg) = leg {
            leg.release();
        }
    }

    fn release(self) {
        drop(self);
    }
}

impl Drop for PrefillLeg {
    fn drop(&mut self) {
        self.timer.abort();
        Self::take(&self.slot);
    }
}

impl StreamState {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            phase: Phase::Headers,
            full_duplex: true,
            t0: Instant::now(),
            info: RequestInfo::default(),
            api: None,
            body: Vec::new(),
            booking: None,
            prefill_leg: None,
            rewrite: None,
            meter: None,
            status: 0,
            engine_tokens: None,
            waiting_eos: false,
            rewrite_held: Vec::new(),
            waiting_trailers: false,
            sequences: 1,
            routed_at: None,
        }
    }

    /// Until when the booking waits for the response headers: `Some` while the request is
    /// routed, booked and the response has not started (see
    /// [`Picker::with_response_timeout_ms`]).
    pub fn response_deadline(&self) -> Option<Instant> {
        if self.phase != Phase::Routed || self.booking.is_none() {
            return None;
        }
        let bound = std::time::Duration::from_millis(self.shared.response_timeout_ms);
        Some(self.routed_at? + bound)
    }

    /// The response did not start by [`StreamState::response_deadline`]: the booking is
    /// released without a penalty and the stream goes on (see
    /// [`Picker::with_response_timeout_ms`]).
    pub fn response_overdue(&mut self) {
        if let Some(p) = self.prefill_leg.take() {
            p.release();
        }
        if let Some(b) = self.booking.take() {
            tracing::warn!(
                endpoint = %b.address(),
                request_id = ?self.info.request_id,
                waited_ms = self.shared.response_timeout_ms,
                "no response phase within the bound; releasing the booking"
            );
            self.shared
                .metrics
                .gateway
                .upstream_errors
                .get_or_create(&kvgate_runtime::metrics::UpstreamErrorLabels {
                    endpoint: b.address().to_string(),
                    kind: "response_timeout",
                })
                .inc();
            drop(b);
        }
    }

    /// Continues a request that waited for its engine-side tokens (see [`Step::tokenize`]).
    pub fn resume_with_tokens(&mut self, tokens: Option<Vec<u32>>) -> Step {
        self.engine_tokens = Some(tokens);
        let mut step = self.route(self.waiting_eos);
        if std::mem::take(&mut self.waiting_trailers) && !step.close {
            step.responses.push(trailers_response());
        }
        step
    }

    fn api_label(&self) -> &'static str {
        self.api.map_or("other", ApiKind::label)
    }

    /// Advances the state machine by one message received at `now`.
    pub fn handle(&mut self, msg: ProcessingRequest, now: Instant) -> Result<Step, Status> {
        if let Some(pc) = &msg.protocol_config {
            self.full_duplex = pc.request_body_mode == BodySendMode::FullDuplexStreamed as i32;
        }
        match msg.request {
            Some(Req::RequestHeaders(h)) => {
                self.on_request_headers(h, msg.metadata_context.as_ref(), now)
            }
            Some(Req::RequestBody(b)) => self.on_request_body(b),
            Some(Req::RequestTrailers(_)) => self.on_request_trailers(),
            Some(Req::ResponseHeaders(h)) => {
                Ok(self.on_response_headers(h, msg.metadata_context.as_ref()))
            }
            Some(Req::ResponseBody(b)) => Ok(self.on_response_body(b, now)),
            Some(Req::ResponseTrailers(_)) => Ok(self.on_response_trailers()),
            None => Ok(Step::none()),
        }
    }

    fn out_of_order(&self, what: &str) -> Status {
        Status::failed_precondition(format!(
            "ext_proc message out of order: {what} in phase {:?}",
            self.phase
        ))
    }

    fn on_request_headers(
        &mut self,
        h: HttpHeaders,
        md: Option<&Metadata>,
        now: Instant,
    ) -> Result<Step, Status> {
        if self.phase != Phase::Headers {
            return Err(self.out_of_order("request headers"));
        }
        if !self.full_duplex {
            return Err(Status::failed_precondition(
                "kvgate epp needs request_body_mode FULL_DUPLEX_STREAMED (as the reference Envoy config sets)",
            ));
        }
        self.t0 = now;
        for hv in h.headers.iter().flat_map(|m| m.headers.iter()) {
            let key = hv.key.to_ascii_lowercase();
            let slot = match key.as_str() {
                ":path" => {
                    self.info.path = header_value(hv);
                    continue;
                }
                ":method" => {
                    self.info.method = header_value(hv);
                    continue;
                }
                "x-request-id" => &mut self.info.request_id,
                k if k == OBJECTIVE_HEADER || k == LLMD_OBJECTIVE_HEADER => {
                    &mut self.info.objective
                }
                k if k == SESSION_HEADER => &mut self.info.session,
                k if k == MODEL_REWRITE_HEADER || k == LLMD_MODEL_REWRITE_HEADER => {
                    &mut self.info.model_rewrite
                }
                _ => continue,
            };
            // Either spelling: the first one given wins.
            if slot.is_none() {
                *slot = Some(header_value(hv)).filter(|v| !v.trim().is_empty());
            }
        }
        self.info.subset = subset_hint(md);
        self.api = ApiKind::from_path(&self.info.path);
        if h.end_of_stream {
            // An inference API call without a body is invalid: answer it as `kvgate serve`
            // does (400), rather than sending it to an engine.
            if let Some(Err(e)) = self.api.map(|api| parse_request(api, b"")) {
                return Ok(self.immediate(&e));
            }
            return Ok(self.route_without_body(None, false));
        }
        self.phase = Phase::Body;
        Ok(Step::none())
    }

    fn on_request_body(&mut self, b: HttpBody) -> Result<Step, Status> {
        if self.phase != Phase::Body {
            return Err(self.out_of_order("request body"));
        }
        let limit = self.shared.settings.max_body_bytes;
        if self.body.len() + b.body.len() > limit {
            return Ok(self.immediate(&ApiError::new(
                tonic::codegen::http::StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {limit} bytes"),
            )));
        }
        self.body.extend_from_slice(&b.body);
        if b.end_of_stream {
            return Ok(self.route(true));
        }
        Ok(Step::none())
    }

    fn on_request_trailers(&mut self) -> Result<Step, Status> {
        let mut step = match self.phase {
            Phase::Body => self.route(false),
            Phase::Routed => Step::none(),
            _ => return Err(self.out_of_order("request trailers")),
        };
        if step.tokenize.is_some() {
            // Routing waits for an engine's tokens; the driver replaces this step with the
            // routed one, which must still end with the trailers' answer (Envoy waits for it).
            self.waiting_trailers = true;
        } else if !step.close {
            step.responses.push(trailers_response());
        }
        Ok(step)
    }

    /// An immediate response in the OpenAI error shape; ends the exchange.
    fn immediate(&mut self, e: &ApiError) -> Step {
        let status = e.status.as_u16();
        self.shared
            .metrics
            .immediate_responses
            .get_or_create(&StatusLabels { status })
            .inc();
        self.count(status);
        self.phase = Phase::Done;
        tracing::debug!(status, message = %e.message, request_id = ?self.info.request_id, "answering without routing");
        Step {
            responses: vec![ProcessingResponse {
                response: Some(Resp::ImmediateResponse(ImmediateResponse {
                    status: Some(HttpStatus {
                        code: i32::from(status),
                    }),
                    headers: Some(HeaderMutation {
                        set_headers: {
                            let mut h = vec![set_header("content-type", "application/json")];
                            if status == 429 {
                                // As `kvgate serve` does: clients that honour it back off.
                                h.push(set_header(
                                    "retry-after",
                                    &kvgate_runtime::openai::SHED_RETRY_AFTER_S.to_string(),
                                ));
                            }
                            h
                        },
                        ..HeaderMutation::default()
                    }),
                    body: e.body().to_string().into_bytes(),
                    details: format!("kvgate_epp_{status}"),
                    ..ImmediateResponse::default()
                })),
                ..ProcessingResponse::default()
            }],
            close: true,
            tokenize: None,
        }
    }

    fn count(&self, status: u16) {
        self.shared
            .metrics
            .gateway
            .requests
            .get_or_create(&RequestLabels {
                api: self.api_label(),
                status,
            })
            .inc();
    }

    /// The request-headers answer carrying `destination` (and the body's new length).
    fn headers_response(
        &self,
        destination: &str,
        prefiller: Option<&str>,
        body_len: Option<usize>,
    ) -> ProcessingResponse {
        let mut set = vec![set_header(DESTINATION_ENDPOINT, destination)];
        if let Some(p) = prefiller {
            set.push(set_header(PREFILLER_HEADER, p));
        }
        if let Some(len) = body_len {
            set.push(set_header("content-length", &len.to_string()));
        }
        let mut lb = Struct::default();
        lb.fields
            .insert(DESTINATION_ENDPOINT.to_owned(), string_value(destination));
        let mut md = Struct::default();
        md.fields.insert(
            DESTINATION_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(lb)),
            },
        );
        ProcessingResponse {
            response: Some(Resp::RequestHeaders(HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: set,
                        // The served endpoint is the proxy's to report, the prefill pod the
                        // picker's to name: drop client-sent copies.
                        remove_headers: if prefiller.is_some() {
                            vec![SERVED_ENDPOINT.to_owned()]
                        } else {
                            vec![SERVED_ENDPOINT.to_owned(), PREFILLER_HEADER.to_owned()]
                        },
                    }),
                    clear_route_cache: true,
                    ..CommonResponse::default()
                }),
            })),
            dynamic_metadata: Some(md),
            ..ProcessingResponse::default()
        }
    }

    /// Routes a request the core has no use for (no body, or not an inference API) to a ready
    /// endpoint, round-robin within the subset hint; `body` is re-sent as is.
    fn route_without_body(&mut self, body: Option<Vec<u8>>, eos: bool) -> Step {
        let mut addrs = self.shared.control.passthrough_addresses();
        if let Some(subset) = &self.info.subset {
            let named = self.shared.control.subset_addresses(subset);
            addrs.retain(|a| named.contains(a));
        }
        if addrs.is_empty() {
            return self.immediate(&ApiError::new(
                tonic::codegen::http::StatusCode::SERVICE_UNAVAILABLE,
                "no ready endpoint",
            ));
        }
        addrs.sort();
        let i = self.shared.round_robin.fetch_add(1, Ordering::Relaxed) % addrs.len();
        self.phase = Phase::Routed;
        let mut responses =
            vec![self.headers_response(&addrs[i], None, body.as_ref().map(Vec::len))];
        if let Some(b) = body {
            responses.extend(body_chunks(&b, eos, true));
        }
        Step {
            responses,
            ..Step::default()
        }
    }

    /// The body is complete: parse, pick, book, answer (see the module docs).
    fn route(&mut self, eos: bool) -> Step {
        let started = Instant::now();
        let mut body = std::mem::take(&mut self.body);
        let Some(api) = self.api else {
            return self.route_without_body(Some(body), eos);
        };
        let mut parsed = match parse_request(api, &body) {
            Ok(p) => p,
            Err(e) => return self.immediate(&e),
        };
        self.sequences = parsed.sequences;
        if self.engine_tokens.is_none() && self.shared.control.tokenizes_remotely() {
            self.body = body;
            self.waiting_eos = eos;
            // The engines are asked under the model they serve: the rewrite's target when the
            // request names an alias (`x-gateway-model-name-rewrite`), which no engine lists.
            if let Some(to) = &self.info.model_rewrite {
                parsed.model.clone_from(to);
            }
            return Step {
                tokenize: Some(parsed),
                ..Step::none()
            };
        }
        let engine_tokens = self.engine_tokens.take().flatten();
        if let Some(to) = self.info.model_rewrite.clone()
            && to != parsed.model
        {
            body = match rewrite_model(&body, &to) {
                Ok(b) => b,
                Err(e) => return self.immediate(&e),
            };
            self.rewrite = Some((std::mem::replace(&mut parsed.model, to.clone()), to));
        }
        let control = self.shared.control.clone();
        let mut rr = match control.routing_request(
            &parsed,
            engine_tokens,
            self.info.objective.as_deref(),
            self.info.session.as_deref(),
        ) {
            Ok(rr) => rr,
            Err(e) => return self.immediate(&e),
        };
        if let Some(subset) = &self.info.subset {
            let named = control.subset_addresses(subset);
            rr.subset = Some(control.endpoint_ids(named.iter().map(String::as_str)));
        }
        if let Some(r) = &self.shared.recorder {
            r.prepare(&mut rr);
        }
        // A pool with prefill pods plans each generation request with the prefill/decode
        // decider: the decode pod is the destination, the prefill pod (when split) is named
        // in `x-prefiller-host-port` for the decode pod's sidecar (llm-d's protocol).
        let disaggregated =
            matches!(api, ApiKind::Chat | ApiKind::Completions) && control.disaggregated();
        let (mut booking, prefill_leg) = if disaggregated {
            match control.pick_pd(rr, self.t0) {
                Ok(pd) => {
                    let phase = if pd.prefill.is_some() {
                        "disaggregated"
                    } else {
                        "aggregated"
                    };
                    self.shared
                        .control
                        .metrics
                        .pd
                        .count_decision(phase, pd.reason.as_str());
                    (pd.decode, pd.prefill)
                }
                Err(e) => return self.immediate(&ApiError::from(&e)),
            }
        } else {
            match control.pick(rr, self.t0) {
                Ok(b) => (b, None),
                Err(e) => return self.immediate(&ApiError::from(&e)),
            }
        };
        let prefiller = prefill_leg.as_ref().map(|p| p.address().to_string());
        if let Some(r) = &self.shared.recorder {
            let info = kvgate_runtime::decision_log::RequestInfo {
                method: self.info.method.clone(),
                path: self.info.path.clone(),
                request_id: self.info.request_id.clone(),
            };
            booking.record_to(r, info);
        }
        let mut destination = booking.address().to_string();
        for &id in booking
            .decision()
            .fallbacks
            .iter()
            .take(self.shared.settings.fallbacks)
        {
            if let Some(a) = control.address_of(id) {
                destination.push(',');
                destination.push_str(&a);
            }
        }
        tracing::debug!(request_id = ?self.info.request_id, endpoint = %destination, reason = booking.decision().reason.as_str(), "routed");
        self.booking = Some(booking);
        self.prefill_leg = prefill_leg.map(PrefillLeg::start);
        self.phase = Phase::Routed;
        self.routed_at = Some(Instant::now());
        let mut responses =
            vec![self.headers_response(&destination, prefiller.as_deref(), Some(body.len()))];
        responses.extend(body_chunks(&body, eos, true));
        self.shared
            .metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        Step {
            responses,
            ..Step::default()
        }
    }

    fn on_response_headers(&mut self, h: HttpHeaders, md: Option<&Metadata>) -> Step {
        let mut status = 0u16;
        let mut sse = false;
        let mut served = lb_metadata_string(md, SERVED_ENDPOINT);
        for hv in h.headers.iter().flat_map(|m| m.headers.iter()) {
            match hv.key.to_ascii_lowercase().as_str() {
                ":status" => status = header_value(hv).trim().parse().unwrap_or(0),
                "content-type" => sse = header_value(hv).starts_with("text/event-stream"),
                SERVED_ENDPOINT if served.is_none() => served = Some(header_value(hv)),
                _ => {}
            }
        }
        self.status = status;
        self.count(status);
        self.phase = Phase::Responding;
        // The decode pod answers only once its sidecar's prefill is done.
        if let Some(p) = self.prefill_leg.take() {
            p.release();
        }
        if let Some(b) = &mut self.booking {
            b.set_status(status);
        }
        if let Some(b) = &mut self.booking
            && let Some(served) = served.as_deref().map(str::trim)
            && served != &**b.address()
            && let Some(&id) = b
                .decision()
                .fallbacks
                .iter()
                .find(|&&id| self.shared.control.address_of(id).as_deref() == Some(served))
        {
            // The proxy gave up on the primary before the response: a connect failure.
            b.move_to(id, "connect", FailureKind::Connect);
        }
        match status_failure(status) {
            Some((label, kind)) => {
                if let Some(b) = self.booking.take() {
                    b.fail(label, kind);
                }
            }
            None if self.booking.is_some() => {
                self.meter = Some(
                    ResponseMeter::new(sse, self.api == Some(ApiKind::Chat))
                        .with_sequences(self.sequences)
                        .responses(self.api == Some(ApiKind::Responses)),
                );
            }
            None => {}
        }
        let step = Step::one(ProcessingResponse {
            response: Some(Resp::ResponseHeaders(HeadersResponse::default())),
            ..ProcessingResponse::default()
        });
        if h.end_of_stream {
            self.finish();
        }
        step
    }

    fn on_response_body(&mut self, b: HttpBody, now: Instant) -> Step {
        if let Some(m) = &mut self.meter
            && m.on_chunk(&b.body, now)
            && let Some(booking) = &mut self.booking
        {
            booking.first_token(now);
        }
        let body = match &self.rewrite {
            Some((client, upstream)) => {
                let mut data = std::mem::take(&mut self.rewrite_held);
                data.extend_from_slice(&b.body);
                let mut out = rewrite_model_back(&data, upstream, client);
                if !b.end_of_stream {
                    let keep = model_prefix_at_end(&out, upstream);
                    self.rewrite_held = out.split_off(out.len() - keep);
                }
                out
            }
            None => b.body,
        };
        if b.end_of_stream {
            self.finish();
        }
        Step {
            responses: body_chunks(&body, b.end_of_stream, false),
            ..Step::default()
        }
    }

    fn on_response_trailers(&mut self) -> Step {
        self.finish();
        // Trailers end the body: what was held for the model rewrite goes out before their
        // answer (as the request's body does before the request trailers' answer).
        let held = std::mem::take(&mut self.rewrite_held);
        let mut responses = if held.is_empty() {
            Vec::new()
        } else {
            body_chunks(&held, false, false)
        };
        responses.push(ProcessingResponse {
            response: Some(Resp::ResponseTrailers(TrailersResponse::default())),
            ..ProcessingResponse::default()
        });
        Step {
            responses,
            ..Step::default()
        }
    }

    /// The response is complete: report the outcome to the core and the metrics.
    fn finish(&mut self) {
        self.phase = Phase::Done;
        if let (Some(meter), Some(b)) = (self.meter.take(), self.booking.take()) {
            b.finish(&meter.finish());
        }
    }
}
