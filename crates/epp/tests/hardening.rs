//! Defects of the ext_proc service found by hostile and broken peers (issue 10), each pinned by
//! a test named after it: message by message on the state machine where the protocol logic
//! lives, and over a real gRPC socket where the stream driver does.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
use kvgate_epp::extproc::{DEFAULT_RESPONSE_TIMEOUT_MS, Picker, PickerSettings};
use kvgate_epp::metrics::EppMetrics;
use kvgate_epp::{Epp, EppArgs};
use kvgate_runtime::config::{DataPlaneConfig, RoutingFlags};
use kvgate_runtime::control::Control;
use tokio::time::Instant;

const EP: [&str; 2] = ["127.0.0.1:9", "127.0.0.1:10"];

fn picker() -> (Picker, Arc<Control>) {
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
        metrics,
        PickerSettings {
            max_body_bytes: cfg.limits.max_body_bytes,
            fallbacks: 0,
        },
    );
    (picker, control)
}

fn msg(r: Req) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(r),
        ..ProcessingRequest::default()
    }
}

fn headers(pairs: &[(&str, &str)], eos: bool) -> Req {
    Req::RequestHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.as_bytes().to_vec(),
                    ..HeaderValue::default()
                })
                .collect(),
        }),
        end_of_stream: eos,
        ..HttpHeaders::default()
    })
}

fn chat_headers(eos: bool) -> Req {
    headers(
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-type", "application/json"),
        ],
        eos,
    )
}

fn chat_body() -> Req {
    Req::RequestBody(HttpBody {
        body: br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
        end_of_stream: true,
        ..HttpBody::default()
    })
}

#[tokio::test]
async fn empty_body_post_through_the_epp_went_to_an_engine() {
    let (picker, control) = picker();
    let mut s = picker.stream();
    let step = s.handle(msg(chat_headers(true)), Instant::now()).unwrap();
    assert!(step.close, "answered at once");
    let Some(Resp::ImmediateResponse(r)) = step.responses[0].response.clone() else {
        panic!("an immediate response, not a route: {:?}", step.responses)
    };
    assert_eq!(r.status.unwrap().code, 400);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], 400, "{v}");
    assert_eq!(control.with_router(|r| r.in_flight()), 0);

    // A body-less request to a path that is no inference API is still routed as before.
    let mut s = picker.stream();
    let step = s
        .handle(
            msg(headers(
                &[(":method", "GET"), (":path", "/v1/models")],
                true,
            )),
            Instant::now(),
        )
        .unwrap();
    assert!(!step.close);
    assert!(matches!(
        step.responses[0].response,
        Some(Resp::RequestHeaders(_))
    ));
}

#[tokio::test]
async fn paths_were_matched_by_suffix_in_the_epp() {
    let (picker, control) = picker();
    let mut s = picker.stream();
    let prefixed = headers(
        &[(":method", "POST"), (":path", "/x/v1/chat/completions")],
        false,
    );
    s.handle(msg(prefixed), Instant::now()).unwrap();
    let step = s.handle(msg(chat_body()), Instant::now()).unwrap();
    assert!(matches!(
        step.responses[0].response,
        Some(Resp::RequestHeaders(_))
    ));
    assert_eq!(
        control.with_router(|r| r.in_flight()),
        0,
        "not parsed and booked as a chat request"
    );
}

#[tokio::test(start_paused = true)]
async fn epp_bookings_waited_forever_for_the_response_phase() {
    let (picker, control) = picker();
    let mut s = picker.stream();
    let t0 = Instant::now();
    s.handle(msg(chat_headers(false)), t0).unwrap();
    s.handle(msg(chat_body()), t0).unwrap();
    assert_eq!(
        control.with_router(|r| r.in_flight()),
        1,
        "routed and booked"
    );
    let deadline = s
        .response_deadline()
        .expect("waiting for the response phase");
    assert_eq!(
        deadline.duration_since(t0),
        Duration::from_millis(DEFAULT_RESPONSE_TIMEOUT_MS)
    );
    s.response_overdue();
    assert_eq!(
        control.with_router(|r| r.in_flight()),
        0,
        "the booking is released"
    );
    assert_eq!(s.response_deadline(), None);
}

/// A gRPC codec that sends raw bytes and ignores what comes back: lets a test send a message
/// that is not a valid `ProcessingRequest`.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, Self::Error> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[tokio::test]
async fn ext_proc_decode_errors_ended_the_stream_with_grpc_status_0() {
    let epp = Epp::start(&EppArgs {
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        routing: RoutingFlags {
            endpoints: vec![EP[0].into()],
            models: vec!["m".into()],
            ..RoutingFlags::default()
        },
        ..EppArgs::default()
    })
    .await
    .expect("picker starts");
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", epp.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // Field 2 (request_headers, a message) sent as a varint: not a ProcessingRequest.
    let bogus = Bytes::from_static(&[0x10, 0x01]);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
    );
    let outcome = async {
        let mut inbound = grpc
            .streaming(
                tonic::Request::new(futures::stream::iter([bogus])),
                path,
                RawCodec,
            )
            .await?
            .into_inner();
        while inbound.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    };
    let status = tokio::time::timeout(Duration::from_secs(5), outcome)
        .await
        .expect("the stream ends")
        .expect_err("a decode error is not a clean end (grpc-status 0)");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
}

#[tokio::test]
async fn epp_drain_turns_health_not_serving_first_and_keeps_accepting() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let epp = Epp::start(&EppArgs {
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        routing: RoutingFlags {
            endpoints: vec![EP[0].into()],
            models: vec!["m".into()],
            shutdown_accept_grace_ms: Some(2_000),
            drain_timeout_ms: Some(2_000),
            ..RoutingFlags::default()
        },
        ..EppArgs::default()
    })
    .await
    .expect("picker starts");
    let (grpc_addr, control) = (epp.grpc_addr, epp.control.clone());
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", epp.health_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |mut h: HealthClient<tonic::transport::Channel>| async move {
        h.check(HealthCheckRequest {
            service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while status(health.clone()).await != 1 {
        assert!(std::time::Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = tokio::spawn(epp.drain("SIGTERM"));
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while status(health.clone()).await != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "not NOT_SERVING at once"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(control.is_shutting_down());
    // The ext_proc port still accepts during the grace period.
    tokio::net::TcpStream::connect(grpc_addr)
        .await
        .expect("still accepting during the grace period");
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("drained within grace + drain timeout")
        .unwrap();
    let _ = health
        .check(HealthCheckRequest::default())
        .await
        .expect_err("the health listener is closed after the drain");
}
