//! The ext_proc state machine driven by a real tonic client over a socket, message by message as
//! Envoy sends them in FULL_DUPLEX_STREAMED mode (no Envoy needed).

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse, body_mutation,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
#[path = "common/messages.rs"]
mod messages;

use kvgate_epp::extproc::BODY_CHUNK_BYTES;
use kvgate_epp::{Epp, EppArgs};
use kvgate_runtime::config::RoutingFlags;
use kvgate_testkit::{eventually, eventually_sync};
use messages::{
    body, chat_body, chat_headers, destination_metadata, headers, immediate, resp_body, set_headers,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const EP: [&str; 3] = ["127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:11"];

async fn epp(endpoints: &[&str], tweak: impl FnOnce(&mut EppArgs)) -> Epp {
    let mut args = EppArgs {
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        routing: RoutingFlags {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            models: vec!["m".into(), "m2".into()],
            ..RoutingFlags::default()
        },
        ..EppArgs::default()
    };
    tweak(&mut args);
    Epp::start(&args).await.expect("picker starts")
}

struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: Streaming<ProcessingResponse>,
}

impl Stream {
    async fn open(epp: &Epp) -> Self {
        let mut client = ExternalProcessorClient::connect(format!("http://{}", epp.grpc_addr))
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(64);
        let rx = client
            .process(ReceiverStream::new(rx))
            .await
            .expect("process")
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, r: Req, md: Option<Metadata>) {
        self.tx
            .send(ProcessingRequest {
                request: Some(r),
                metadata_context: md,
                ..ProcessingRequest::default()
            })
            .await
            .expect("send");
    }

    async fn recv(&mut self) -> Resp {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("an answer within 5 s")
            .expect("stream ok")
            .expect("a message")
            .response
            .expect("a response")
    }

    async fn recv_full(&mut self) -> ProcessingResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("an answer within 5 s")
            .expect("stream ok")
            .expect("a message")
    }
}

/// Opens a stream and sends a chat request whose model is rewritten to `m2` by `header`.
async fn rewritten_chat(epp: &Epp, header: &str) -> Stream {
    let s = Stream::open(epp).await;
    s.send(
        headers(&[(":path", "/v1/chat/completions"), (header, "m2")], false),
        None,
    )
    .await;
    s.send(body(&chat_body("hi"), true), None).await;
    s
}

/// The upstream's response headers: `:status 200`.
fn status_200() -> Req {
    Req::ResponseHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![HeaderValue {
                key: ":status".into(),
                raw_value: b"200".to_vec(),
                ..HeaderValue::default()
            }],
        }),
        ..HttpHeaders::default()
    })
}

/// Sends the upstream's `200` response headers and reads their answer.
async fn respond_200(s: &mut Stream) {
    s.send(status_200(), None).await;
    s.recv().await;
}

/// Sends one chunk of the upstream's response body; returns what the client gets for it.
async fn relay_response_chunk(s: &mut Stream, part: &[u8], eos: bool) -> Vec<u8> {
    s.send(resp_body(part, eos), None).await;
    let Resp::ResponseBody(b) = s.recv().await else {
        panic!("expected a response body answer")
    };
    let Some(body_mutation::Mutation::StreamedResponse(sr)) = b
        .response
        .and_then(|c| c.body_mutation)
        .and_then(|m| m.mutation)
    else {
        panic!("expected a streamed body")
    };
    sr.body
}

/// Reads the routing answer: the destination header value and the re-sent body chunks.
async fn routed(s: &mut Stream) -> (String, Vec<Vec<u8>>, bool) {
    let first = s.recv_full().await;
    let dest_md = destination_metadata(&first);
    let Some(Resp::RequestHeaders(h)) = first.response else {
        panic!(
            "expected a request-headers answer, got {:?}",
            first.response
        );
    };
    let common = h.response.expect("common response");
    assert!(common.clear_route_cache, "route cache must be cleared");
    let hdrs = set_headers(&common);
    let dest = hdrs["x-gateway-destination-endpoint"].clone();
    assert_eq!(
        dest_md.as_deref(),
        Some(dest.as_str()),
        "header and metadata agree"
    );
    let mut chunks = Vec::new();
    loop {
        let Resp::RequestBody(b) = s.recv().await else {
            panic!("expected request body chunks");
        };
        let Some(body_mutation::Mutation::StreamedResponse(sr)) = b
            .response
            .and_then(|c| c.body_mutation)
            .and_then(|m| m.mutation)
        else {
            panic!("expected a streamed body mutation");
        };
        chunks.push(sr.body);
        if sr.end_of_stream {
            let total: usize = chunks.iter().map(Vec::len).sum();
            assert_eq!(hdrs["content-length"], total.to_string());
            return (dest, chunks, true);
        }
    }
}

#[tokio::test]
async fn chat_request_is_routed_with_header_metadata_and_body_then_measured() {
    let epp = epp(&EP[..2], |_| {}).await;
    let mut s = Stream::open(&epp).await;
    let b = chat_body("hello there");
    s.send(chat_headers(), None).await;
    let (a, rest) = b.split_at(10);
    s.send(body(a, false), None).await;
    s.send(body(rest, true), None).await;
    let (dest, chunks, _) = routed(&mut s).await;
    assert!(EP[..2].contains(&dest.as_str()), "{dest}");
    assert_eq!(chunks.concat(), b);

    // Response phase: headers, then streamed SSE chunks echoed back unchanged.
    s.send(
        Req::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    HeaderValue {
                        key: ":status".into(),
                        raw_value: b"200".to_vec(),
                        ..HeaderValue::default()
                    },
                    HeaderValue {
                        key: "content-type".into(),
                        raw_value: b"text/event-stream".to_vec(),
                        ..HeaderValue::default()
                    },
                ],
            }),
            ..HttpHeaders::default()
        }),
        None,
    )
    .await;
    assert!(matches!(s.recv().await, Resp::ResponseHeaders(_)));
    let events: [&[u8]; 3] = [
        b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\ndata: [DONE]\n\n",
    ];
    for (i, e) in events.iter().enumerate() {
        let last = i == events.len() - 1;
        s.send(resp_body(e, last), None).await;
        let Resp::ResponseBody(b) = s.recv().await else {
            panic!("expected a response body answer");
        };
        let Some(body_mutation::Mutation::StreamedResponse(sr)) = b
            .response
            .and_then(|c| c.body_mutation)
            .and_then(|m| m.mutation)
        else {
            panic!("expected a streamed body mutation");
        };
        assert_eq!(&sr.body[..], *e);
        assert_eq!(sr.end_of_stream, last);
    }
    let text = epp.metrics.encode();
    let ttft = format!("kvgate_gateway_ttft_seconds_count{{endpoint=\"{dest}\"}} 1");
    assert!(text.contains(&ttft), "{ttft} missing from\n{text}");
    assert!(
        text.contains("kvgate_gateway_prompt_tokens_total 9"),
        "{text}"
    );
}

#[tokio::test]
async fn large_body_is_re_chunked_at_most_62000_bytes() {
    let epp = epp(&EP[..2], |_| {}).await;
    let mut s = Stream::open(&epp).await;
    let prompt = "lorem ipsum dolor sit amet ".repeat(220_000 / 27);
    let b = chat_body(&prompt);
    assert!(b.len() > 200_000);
    s.send(chat_headers(), None).await;
    // Envoy forwards what it has: uneven chunks.
    let mut rest = &b[..];
    while !rest.is_empty() {
        let n = rest.len().min(16_384 + 7);
        let (c, r) = rest.split_at(n);
        s.send(body(c, r.is_empty()), None).await;
        rest = r;
    }
    let (_, chunks, _) = routed(&mut s).await;
    assert!(chunks.iter().all(|c| c.len() <= BODY_CHUNK_BYTES));
    assert_eq!(chunks.len(), b.len().div_ceil(BODY_CHUNK_BYTES));
    assert_eq!(chunks.concat(), b);
}

#[tokio::test]
async fn no_ready_endpoint_is_an_immediate_503() {
    let epp = epp(&[], |_| {}).await;
    let mut s = Stream::open(&epp).await;
    s.send(chat_headers(), None).await;
    s.send(body(&chat_body("hi"), true), None).await;
    let (status, body, hdrs) = immediate(s.recv().await);
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], 503);
    assert_eq!(hdrs["content-type"], "application/json");
    // The stream is closed after an immediate response.
    assert!(s.rx.message().await.unwrap().is_none());
}

#[tokio::test]
async fn malformed_json_is_an_immediate_400_in_openai_shape() {
    let epp = epp(&EP[..1], |_| {}).await;
    for (path, bad, param) in [
        (
            "/v1/chat/completions",
            &b"{\"model\": \"m\", \"messages\": ["[..],
            None,
        ),
        (
            "/v1/chat/completions",
            &b"{\"messages\": []}"[..],
            Some("model"),
        ),
        (
            "/v1/completions",
            &b"{\"model\": \"m\"}"[..],
            Some("prompt"),
        ),
    ] {
        let mut s = Stream::open(&epp).await;
        s.send(headers(&[(":path", path)], false), None).await;
        s.send(body(bad, true), None).await;
        let (status, err, _) = immediate(s.recv().await);
        assert_eq!(status, 400);
        assert_eq!(err["error"]["type"], "BadRequestError");
        assert_eq!(err["error"]["code"], 400);
        assert_eq!(err["error"]["param"].as_str(), param);
        assert!(err["error"]["message"].as_str().is_some());
    }
}

#[tokio::test]
async fn oversized_body_is_an_immediate_413() {
    let epp = epp(&EP[..1], |a| a.routing.max_body_bytes = Some(1_000)).await;
    let mut s = Stream::open(&epp).await;
    s.send(chat_headers(), None).await;
    s.send(body(&[b' '; 800], false), None).await;
    s.send(body(&[b' '; 800], true), None).await;
    assert_eq!(immediate(s.recv().await).0, 413);
}

#[tokio::test]
async fn sheddable_request_on_a_saturated_pool_is_an_immediate_429() {
    let epp = epp(&EP[..1], |_| {}).await;
    // Book requests that never get an answer until the endpoint counts as saturated.
    let mut open = Vec::new();
    let mut shed = None;
    for _ in 0..32 {
        let mut s = Stream::open(&epp).await;
        s.send(
            headers(
                &[
                    (":path", "/v1/chat/completions"),
                    ("x-gateway-inference-objective", "-1"),
                ],
                false,
            ),
            None,
        )
        .await;
        s.send(body(&chat_body("same old prompt"), true), None)
            .await;
        let first = s.recv().await;
        if let Resp::ImmediateResponse(_) = first {
            shed = Some(immediate(first));
            break;
        }
        open.push(s);
    }
    let (status, err, headers) = shed.expect("a sheddable request is shed once the pool saturates");
    assert_eq!(status, 429);
    assert_eq!(err["error"]["type"], "RateLimitError");
    assert_eq!(
        headers.get("retry-after").map(String::as_str),
        Some("1"),
        "{headers:?}"
    );
    // Priority 0 is never shed.
    let mut s = Stream::open(&epp).await;
    s.send(chat_headers(), None).await;
    s.send(body(&chat_body("important"), true), None).await;
    assert!(matches!(s.recv().await, Resp::RequestHeaders(_)));
}

fn subset_md(v: Kind) -> Metadata {
    let mut inner = Struct::default();
    inner.fields.insert(
        "x-gateway-destination-endpoint-subset".into(),
        Value { kind: Some(v) },
    );
    Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_string(), inner)].into(),
        ..Metadata::default()
    }
}

#[tokio::test]
async fn subset_hint_restricts_the_pick() {
    let epp = epp(&EP, |_| {}).await;
    for i in 0..12 {
        let mut s = Stream::open(&epp).await;
        let md = if i % 2 == 0 {
            subset_md(Kind::StringValue(format!("{}, 10.9.9.9:1", EP[2])))
        } else {
            subset_md(Kind::ListValue(ListValue {
                values: vec![Value {
                    kind: Some(Kind::StringValue(EP[1].into())),
                }],
            }))
        };
        s.send(chat_headers(), Some(md)).await;
        s.send(body(&chat_body(&format!("prompt {i}")), true), None)
            .await;
        let (dest, _, _) = routed(&mut s).await;
        assert_eq!(dest, if i % 2 == 0 { EP[2] } else { EP[1] });
    }
    // A hint naming no pool endpoint leaves nothing to pick.
    let mut s = Stream::open(&epp).await;
    s.send(
        chat_headers(),
        Some(subset_md(Kind::StringValue("10.9.9.9:1".into()))),
    )
    .await;
    s.send(body(&chat_body("x"), true), None).await;
    assert_eq!(immediate(s.recv().await).0, 503);
}

#[tokio::test]
async fn model_rewrite_changes_the_body_and_is_undone_in_the_response() {
    let epp = epp(&EP[..1], |_| {}).await;
    let mut s = rewritten_chat(&epp, "x-gateway-model-name-rewrite").await;
    let (_, chunks, _) = routed(&mut s).await;
    let sent: serde_json::Value = serde_json::from_slice(&chunks.concat()).unwrap();
    assert_eq!(sent["model"], "m2");
    respond_200(&mut s).await;
    let got = relay_response_chunk(&mut s, br#"{"model":"m2","choices":[]}"#, true).await;
    assert_eq!(&got[..], br#"{"model":"m","choices":[]}"#);
}

#[tokio::test]
async fn fallbacks_follow_the_primary_when_asked_for() {
    let epp = epp(&EP, |a| a.fallbacks = 2).await;
    let mut s = Stream::open(&epp).await;
    s.send(chat_headers(), None).await;
    s.send(body(&chat_body("hi"), true), None).await;
    let (dest, _, _) = routed(&mut s).await;
    let parts: Vec<&str> = dest.split(',').collect();
    assert_eq!(parts.len(), 3, "{dest}");
    let mut sorted = parts.clone();
    sorted.sort();
    let mut all = EP.to_vec();
    all.sort();
    assert_eq!(sorted, all);
}

#[tokio::test]
async fn bodyless_request_is_routed_at_headers_and_trailers_end_a_body() {
    let epp = epp(&EP[..2], |_| {}).await;
    let mut s = Stream::open(&epp).await;
    s.send(
        headers(&[(":method", "GET"), (":path", "/v1/models")], true),
        None,
    )
    .await;
    let Resp::RequestHeaders(h) = s.recv().await else {
        panic!()
    };
    let dest = set_headers(&h.response.unwrap())["x-gateway-destination-endpoint"].clone();
    assert!(EP[..2].contains(&dest.as_str()));

    // Trailers end the body: the body is re-sent without end_of_stream, then the trailers answer.
    let mut s = Stream::open(&epp).await;
    s.send(chat_headers(), None).await;
    s.send(body(&chat_body("t"), false), None).await;
    s.send(Req::RequestTrailers(HttpTrailers::default()), None)
        .await;
    let Resp::RequestHeaders(_) = s.recv().await else {
        panic!()
    };
    let Resp::RequestBody(b) = s.recv().await else {
        panic!()
    };
    let Some(body_mutation::Mutation::StreamedResponse(sr)) = b
        .response
        .and_then(|c| c.body_mutation)
        .and_then(|m| m.mutation)
    else {
        panic!()
    };
    assert!(!sr.end_of_stream);
    assert!(matches!(s.recv().await, Resp::RequestTrailers(_)));
}

#[tokio::test]
async fn messages_out_of_order_end_the_stream_with_an_error() {
    let epp = epp(&EP[..1], |_| {}).await;
    let mut s = Stream::open(&epp).await;
    s.send(body(b"{}", true), None).await;
    let err = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .unwrap()
        .expect_err("protocol violation");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn health_reports_serving_for_static_endpoints() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let epp = epp(&EP[..1], |_| {}).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", epp.health_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let c = HealthClient::new(channel);
    for service in [
        "",
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "liveness",
    ] {
        // SERVING is set by a start-up task: poll briefly.
        eventually(
            &format!("{service} SERVING"),
            Duration::from_secs(5),
            || {
                let mut c = c.clone();
                async move {
                    let r = c
                        .check(HealthCheckRequest {
                            service: service.into(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    r.status == 1
                }
            },
        )
        .await;
    }
    let m = reqwest::get(format!("http://{}/metrics", epp.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("kvgate_epp_streams_total"));
    assert!(m.trim_end().ends_with("# EOF"));
    assert_eq!(m.matches("# EOF").count(), 1);
}

#[tokio::test]
async fn served_endpoint_metadata_moves_the_booking_to_the_fallback() {
    let epp = epp(&EP, |a| a.fallbacks = 2).await;
    let mut s = Stream::open(&epp).await;
    s.send(chat_headers(), None).await;
    s.send(body(&chat_body("hi"), true), None).await;
    let (dest, _, _) = routed(&mut s).await;
    let parts: Vec<String> = dest.split(',').map(str::to_owned).collect();
    let in_flight = |addr: &str| {
        epp.control.refresh_gauges();
        let line = format!("kvgate_gateway_in_flight{{endpoint=\"{addr}\"}} ");
        epp.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
            .unwrap_or_default()
    };
    assert_eq!(in_flight(&parts[0]), "1");
    // Envoy reports (as the protocol's served metadata) that the first fallback served.
    let mut lb = Struct::default();
    lb.fields.insert(
        "x-gateway-destination-endpoint-served".into(),
        Value {
            kind: Some(Kind::StringValue(parts[1].clone())),
        },
    );
    let md = Metadata {
        filter_metadata: [("envoy.lb".to_string(), lb)].into(),
        ..Metadata::default()
    };
    s.send(status_200(), Some(md)).await;
    assert!(matches!(s.recv().await, Resp::ResponseHeaders(_)));
    assert_eq!(in_flight(&parts[0]), "0");
    assert_eq!(in_flight(&parts[1]), "1");
    s.send(resp_body(br#"{"choices":[]}"#, true), None).await;
    assert!(matches!(s.recv().await, Resp::ResponseBody(_)));
    drop(s);
    // The stream ended normally: nothing stays booked.
    eventually_sync("booking released", Duration::from_secs(5), || {
        in_flight(&parts[1]) == "0"
    })
    .await;
}

#[tokio::test]
async fn a_stream_closed_mid_request_releases_its_booking() {
    let epp = epp(&EP[..1], |_| {}).await;
    let mut s = Stream::open(&epp).await;
    s.send(chat_headers(), None).await;
    s.send(body(&chat_body("bye"), true), None).await;
    let (dest, _, _) = routed(&mut s).await;
    let gauge = |name: &str| {
        epp.control.refresh_gauges();
        epp.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    let in_flight = format!("kvgate_gateway_in_flight{{endpoint=\"{dest}\"}}");
    assert_eq!(gauge(&in_flight), "1");
    // Envoy goes away (client disconnected before the response).
    drop(s);
    eventually_sync("booking released", Duration::from_secs(5), || {
        gauge(&in_flight) == "0"
    })
    .await;
    assert_eq!(gauge("kvgate_gateway_client_cancellations_total"), "1");
}

/// The request-headers answer's header mutation: what is set and what is removed.
async fn routing_headers(
    s: &mut Stream,
) -> (std::collections::HashMap<String, String>, Vec<String>) {
    let Resp::RequestHeaders(h) = s.recv().await else {
        panic!("expected a request-headers answer");
    };
    let common = h.response.expect("common response");
    let removed = common
        .header_mutation
        .as_ref()
        .map(|m| m.remove_headers.clone())
        .unwrap_or_default();
    (set_headers(&common), removed)
}

#[tokio::test]
async fn a_disaggregated_pool_routes_to_the_decode_pod_and_names_the_prefill_pod() {
    use kvgate_core::PdDecider;
    for (decider, split) in [(PdDecider::Always, true), (PdDecider::Aggregated, false)] {
        let epp = epp(&[], |a| {
            a.routing.prefill = vec![EP[0].into()];
            a.routing.decode = vec![EP[1].into()];
            a.routing.pd_decider = Some(decider);
        })
        .await;
        let mut s = Stream::open(&epp).await;
        s.send(chat_headers(), None).await;
        s.send(body(&chat_body("a prompt for two pods"), true), None)
            .await;
        let (set, removed) = routing_headers(&mut s).await;
        assert_eq!(set["x-gateway-destination-endpoint"], EP[1], "{decider:?}");
        if split {
            assert_eq!(
                set.get("x-prefiller-host-port").map(String::as_str),
                Some(EP[0])
            );
        } else {
            assert!(!set.contains_key("x-prefiller-host-port"), "{set:?}");
            assert!(
                removed.iter().any(|h| h == "x-prefiller-host-port"),
                "a client-sent prefiller header must not reach the sidecar: {removed:?}"
            );
        }
        // The prefill leg the sidecar runs is released by itself (no response has come): the
        // prefill pod carries no phantom queue.
        let control = epp.control.clone();
        eventually("only the decode leg booked", Duration::from_secs(5), || {
            let c = control.clone();
            async move { c.in_flight() == 1 }
        })
        .await;
        let text = epp.metrics.encode();
        let (phase, reason) = if split {
            ("disaggregated", "always_split")
        } else {
            ("aggregated", "never_split")
        };
        let line =
            format!("kvgate_gateway_pd_decisions_total{{phase=\"{phase}\",reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }
}

/// An engine's `/tokenize` for `--tokenizer engine`: answers three tokens and records the
/// model each request named.
async fn tokenize_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    let app = axum::Router::new().route(
        "/tokenize",
        axum::routing::post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                seen.lock()
                    .unwrap()
                    .push(v["model"].as_str().unwrap_or("").to_string());
                axum::Json(serde_json::json!({"tokens": [1, 2, 3], "count": 3}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, asked)
}

/// `--tokenizer engine` with trailers after the body: routing waits for the engine's tokens,
/// and the routed answer still ends with the trailers' answer (Envoy waits for it; it was
/// dropped, and the request hung until Envoy's timeout).
#[tokio::test]
async fn trailers_are_answered_when_routing_waits_for_engine_tokens() {
    let (engine, asked) = tokenize_server().await;
    let epp = epp(&[engine.as_str()], |a| {
        a.routing.tokenizer = Some(kvgate_runtime::tokenize::ENGINE_MODE.into());
    })
    .await;
    let mut s = Stream::open(&epp).await;
    s.send(chat_headers(), None).await;
    s.send(body(&chat_body("t"), false), None).await;
    s.send(Req::RequestTrailers(HttpTrailers::default()), None)
        .await;
    let Resp::RequestHeaders(_) = s.recv().await else {
        panic!("expected the routing answer")
    };
    let Resp::RequestBody(_) = s.recv().await else {
        panic!("expected the body")
    };
    assert!(matches!(s.recv().await, Resp::RequestTrailers(_)));
    assert_eq!(*asked.lock().unwrap(), ["m"]);
}

/// `--tokenizer engine` with `x-gateway-model-name-rewrite`: the engine is asked for the
/// tokens under the model it serves (the rewrite's target), not the client's alias.
#[tokio::test]
async fn engine_tokens_are_asked_for_under_the_rewritten_model() {
    let (engine, asked) = tokenize_server().await;
    let epp = epp(&[engine.as_str()], |a| {
        a.routing.tokenizer = Some(kvgate_runtime::tokenize::ENGINE_MODE.into());
        a.routing.models = vec!["m2".into()];
    })
    .await;
    let mut s = rewritten_chat(&epp, "x-gateway-model-name-rewrite").await;
    let (dest, chunks, _) = routed(&mut s).await;
    assert_eq!(dest, engine);
    let sent: serde_json::Value = serde_json::from_slice(&chunks.concat()).unwrap();
    assert_eq!(sent["model"], "m2");
    assert_eq!(*asked.lock().unwrap(), ["m2"]);
}

/// The response's `"model":"m2"` cut between two chunks (Envoy cuts bodies anywhere) is still
/// rewritten back to the client's name: the chunk's end that may start it is held until the
/// next chunk.
#[tokio::test]
async fn model_rewrite_back_survives_a_chunk_boundary() {
    let epp = epp(&EP[..1], |_| {}).await;
    let mut s = rewritten_chat(&epp, "x-gateway-model-name-rewrite").await;
    routed(&mut s).await;
    respond_200(&mut s).await;
    let mut client_saw = Vec::new();
    for (part, eos) in [
        (&br#"{"id":"x","mod"#[..], false),
        (br#"el":"m2","choices":[]}"#, true),
    ] {
        client_saw.extend(relay_response_chunk(&mut s, part, eos).await);
    }
    assert_eq!(
        String::from_utf8(client_saw).unwrap(),
        r#"{"id":"x","model":"m","choices":[]}"#
    );
}

/// llm-d's spelling of the rewrite header (`x-llm-d-model-name-rewrite`) rewrites as well.
#[tokio::test]
async fn the_llm_d_rewrite_header_is_read_too() {
    let epp = epp(&EP[..1], |_| {}).await;
    let mut s = rewritten_chat(&epp, "x-llm-d-model-name-rewrite").await;
    let (_, chunks, _) = routed(&mut s).await;
    let sent: serde_json::Value = serde_json::from_slice(&chunks.concat()).unwrap();
    assert_eq!(sent["model"], "m2");
}
