//! The ext_proc state machine driven message by message, without sockets: each test hands a
//! [`StreamState`] the `ProcessingRequest`s Envoy would send and checks the
//! `ProcessingResponse`s it answers, plus what the request left in the router and the metrics.
//! Time is tokio's paused clock, so measured times are exact.

#[path = "common/messages.rs"]
mod messages;

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingResponse, body_mutation};
use kvgate_epp::extproc::{Picker, PickerSettings, Step, StreamState};
use kvgate_epp::metrics::EppMetrics;
use kvgate_runtime::config::{DataPlaneConfig, RoutingFlags};
use kvgate_runtime::control::Control;
use messages::{body, chat_body, chat_headers, immediate, resp_body, resp_headers, set_headers};
use tokio::time::Instant;

const EP: [&str; 2] = ["127.0.0.1:9", "127.0.0.1:10"];

struct Harness {
    picker: Picker,
    control: Arc<Control>,
    metrics: Arc<EppMetrics>,
}

impl Harness {
    /// A picker over `EP` (configured with model `m`, so ready without discovery).
    fn new() -> Self {
        let flags = RoutingFlags {
            endpoints: EP.iter().map(|s| s.to_string()).collect(),
            models: vec!["m".into()],
            policy: Some("round-robin".into()),
            ..RoutingFlags::default()
        };
        let cfg = DataPlaneConfig::load(None, &flags.overrides()).unwrap();
        let metrics = Arc::new(EppMetrics::new());
        let control = Control::start(&cfg, metrics.gateway.clone()).unwrap();
        control.set_endpoints(&cfg.endpoints);
        let picker = Picker::new(
            control.clone(),
            metrics.clone(),
            PickerSettings {
                max_body_bytes: cfg.limits.max_body_bytes,
                fallbacks: 0,
            },
        );
        Self {
            picker,
            control,
            metrics,
        }
    }

    fn in_flight(&self) -> usize {
        self.control.with_router(|r| r.in_flight())
    }

    fn metric(&self, prefix: &str) -> f64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn handle(s: &mut StreamState, r: Req, now: Instant) -> Step {
    s.handle(
        ProcessingRequest {
            request: Some(r),
            ..ProcessingRequest::default()
        },
        now,
    )
    .expect("a message in protocol order")
}

fn kinds(step: &Step) -> Vec<&'static str> {
    step.responses
        .iter()
        .map(|r| match r.response.as_ref() {
            Some(Resp::RequestHeaders(_)) => "request_headers",
            Some(Resp::RequestBody(_)) => "request_body",
            Some(Resp::RequestTrailers(_)) => "request_trailers",
            Some(Resp::ResponseHeaders(_)) => "response_headers",
            Some(Resp::ResponseBody(_)) => "response_body",
            Some(Resp::ResponseTrailers(_)) => "response_trailers",
            Some(Resp::ImmediateResponse(_)) => "immediate",
            Some(Resp::StreamedImmediateResponse(_)) => "streamed_immediate",
            None => "none",
        })
        .collect()
}

fn destination(r: &ProcessingResponse) -> (String, String) {
    let Some(Resp::RequestHeaders(h)) = &r.response else {
        panic!("expected the request-headers answer, got {r:?}");
    };
    let common = h.response.as_ref().expect("common response");
    assert!(common.clear_route_cache);
    let set = set_headers(common);
    (
        set["x-gateway-destination-endpoint"].clone(),
        set["content-length"].clone(),
    )
}

fn streamed_body(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    let (Some(Resp::RequestBody(b)) | Some(Resp::ResponseBody(b))) = &r.response else {
        panic!("expected a body answer, got {r:?}");
    };
    let Some(body_mutation::Mutation::StreamedResponse(sr)) = b
        .response
        .as_ref()
        .and_then(|c| c.body_mutation.as_ref())
        .and_then(|m| m.mutation.as_ref())
    else {
        panic!("expected a streamed body mutation");
    };
    (sr.body.clone(), sr.end_of_stream)
}

/// Sends the request phase of a chat request; returns the chosen endpoint.
fn route_chat(s: &mut StreamState, now: Instant) -> String {
    let step = handle(s, chat_headers(), now);
    assert!(
        step.responses.is_empty() && !step.close,
        "headers wait for the body"
    );
    let b = chat_body("hello there");
    let step = handle(s, body(&b, true), now);
    assert_eq!(kinds(&step), ["request_headers", "request_body"]);
    let (dest, len) = destination(&step.responses[0]);
    assert_eq!(len, b.len().to_string());
    assert_eq!(streamed_body(&step.responses[1]), (b, true));
    dest
}

#[tokio::test(start_paused = true)]
async fn a_chat_stream_is_routed_relayed_and_measured_message_by_message() {
    let h = Harness::new();
    let mut s = h.picker.stream();
    let t0 = Instant::now();
    let dest = route_chat(&mut s, t0);
    assert!(EP.contains(&dest.as_str()), "{dest}");
    assert_eq!(h.in_flight(), 1);

    let step = handle(&mut s, resp_headers(200, "text/event-stream", false), t0);
    assert_eq!(kinds(&step), ["response_headers"]);
    let first = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n";
    let step = handle(
        &mut s,
        resp_body(first, false),
        t0 + Duration::from_millis(250),
    );
    assert_eq!(streamed_body(&step.responses[0]), (first.to_vec(), false));
    let last = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\ndata: [DONE]\n\n";
    let step = handle(
        &mut s,
        resp_body(last, true),
        t0 + Duration::from_millis(290),
    );
    assert_eq!(streamed_body(&step.responses[0]), (last.to_vec(), true));

    // The booking ended with the response: once, measured from the request headers.
    assert_eq!(h.in_flight(), 0);
    let ttft = format!("kvgate_gateway_ttft_seconds_sum{{endpoint=\"{dest}\"}}");
    assert_eq!(h.metric(&ttft), 0.25);
    assert_eq!(h.metric("kvgate_gateway_ttft_seconds_count"), 1.0);
    let decided = format!("kvgate_gateway_decisions_total{{endpoint=\"{dest}\",reason=");
    assert_eq!(h.metric(&decided), 1.0);
    assert_eq!(h.metric("kvgate_gateway_prompt_tokens_total"), 9.0);
    assert_eq!(h.metric("kvgate_gateway_cached_prompt_tokens_total"), 4.0);
    assert_eq!(h.metric("kvgate_gateway_tpot_seconds_count"), 1.0);
    assert_eq!(h.metric("kvgate_gateway_client_cancellations_total"), 0.0);
    drop(s);
    assert_eq!(h.metric("kvgate_gateway_client_cancellations_total"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn messages_out_of_order_are_a_failed_precondition() {
    let h = Harness::new();
    let now = Instant::now();
    let mut s = h.picker.stream();
    let err = s
        .handle(
            ProcessingRequest {
                request: Some(body(b"{}", true)),
                ..ProcessingRequest::default()
            },
            now,
        )
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let mut s = h.picker.stream();
    handle(&mut s, chat_headers(), now);
    let err = s
        .handle(
            ProcessingRequest {
                request: Some(chat_headers()),
                ..ProcessingRequest::default()
            },
            now,
        )
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(h.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn bad_bodies_and_unknown_models_are_immediate_openai_errors() {
    let h = Harness::new();
    let now = Instant::now();
    let answer = |b: &[u8]| {
        let mut s = h.picker.stream();
        handle(&mut s, chat_headers(), now);
        let step = handle(&mut s, body(b, true), now);
        assert!(step.close, "an immediate response ends the exchange");
        assert_eq!(kinds(&step), ["immediate"]);
        immediate(step.responses[0].response.clone().unwrap())
    };
    let (status, v, headers) = answer(b"{not json");
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], 400);
    assert_eq!(headers["content-type"], "application/json");
    let (status, v, _) = answer(br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(h.in_flight(), 0);
    assert_eq!(
        h.metric("kvgate_epp_immediate_responses_total{status=\"400\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn an_engine_error_fails_the_booking_and_a_dropped_stream_cancels_it() {
    let h = Harness::new();
    let now = Instant::now();
    let mut s = h.picker.stream();
    let dest = route_chat(&mut s, now);
    let step = handle(&mut s, resp_headers(503, "application/json", false), now);
    assert_eq!(kinds(&step), ["response_headers"]);
    assert_eq!(h.in_flight(), 0, "a 5xx ends the booking at once");
    let failed =
        format!("kvgate_gateway_upstream_errors_total{{endpoint=\"{dest}\",kind=\"status_5xx\"}}");
    assert_eq!(h.metric(&failed), 1.0);
    // The error body is relayed; nothing more is reported for the request.
    handle(&mut s, resp_body(br#"{"error":{}}"#, true), now);
    drop(s);
    assert_eq!(h.metric("kvgate_gateway_client_cancellations_total"), 0.0);

    // Envoy closes a stream before the response: dropping its state cancels the booking.
    let mut s = h.picker.stream();
    route_chat(&mut s, now);
    assert_eq!(h.in_flight(), 1);
    drop(s);
    assert_eq!(h.in_flight(), 0);
    assert_eq!(h.metric("kvgate_gateway_client_cancellations_total"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn an_anthropic_messages_stream_is_routed_and_measured_like_chat() {
    let h = Harness::new();
    let mut s = h.picker.stream();
    let t0 = Instant::now();
    let step = handle(
        &mut s,
        messages::headers(
            &[
                (":method", "POST"),
                (":path", "/v1/messages"),
                ("content-type", "application/json"),
            ],
            false,
        ),
        t0,
    );
    assert!(step.responses.is_empty());
    let b = serde_json::to_vec(&serde_json::json!({
        "model": "m", "max_tokens": 4, "stream": true,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
    }))
    .unwrap();
    let step = handle(&mut s, body(&b, true), t0);
    assert_eq!(kinds(&step), ["request_headers", "request_body"]);
    let (dest, _) = destination(&step.responses[0]);
    assert!(EP.contains(&dest.as_str()), "{dest}");
    handle(&mut s, resp_headers(200, "text/event-stream", false), t0);
    let first = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":0}}}\n\n";
    handle(
        &mut s,
        resp_body(first, false),
        t0 + Duration::from_millis(120),
    );
    let last = b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":5,\"output_tokens\":3,\"cache_read_input_tokens\":4}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    handle(
        &mut s,
        resp_body(last, true),
        t0 + Duration::from_millis(180),
    );
    assert_eq!(h.in_flight(), 0);
    assert_eq!(h.metric("kvgate_gateway_ttft_seconds_sum"), 0.12);
    assert_eq!(h.metric("kvgate_gateway_prompt_tokens_total"), 9.0);
    assert_eq!(h.metric("kvgate_gateway_cached_prompt_tokens_total"), 4.0);
    assert_eq!(
        h.metric("kvgate_gateway_requests_total{api=\"messages\""),
        1.0
    );
}
