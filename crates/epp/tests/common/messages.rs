//! ext_proc messages as Envoy sends them, and readers for the picker's answers; shared by the
//! socket-level tests (`extproc.rs`) and the message-level ones (`messages.rs`).
// Each test binary that includes this module uses only some of its helpers.
#![allow(dead_code)]

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HttpBody, HttpHeaders, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;

pub fn headers(pairs: &[(&str, &str)], eos: bool) -> Req {
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

pub fn chat_headers() -> Req {
    headers(
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-type", "application/json"),
        ],
        false,
    )
}

pub fn body(b: &[u8], eos: bool) -> Req {
    Req::RequestBody(HttpBody {
        body: b.to_vec(),
        end_of_stream: eos,
        ..HttpBody::default()
    })
}

pub fn resp_body(b: &[u8], eos: bool) -> Req {
    Req::ResponseBody(HttpBody {
        body: b.to_vec(),
        end_of_stream: eos,
        ..HttpBody::default()
    })
}

pub fn chat_body(content: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 4,
    }))
    .unwrap()
}

pub fn set_headers(c: &CommonResponse) -> HashMap<String, String> {
    c.header_mutation
        .as_ref()
        .map(|m| {
            m.set_headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| {
                    (
                        h.key.clone(),
                        String::from_utf8_lossy(&h.raw_value).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn destination_metadata(r: &ProcessingResponse) -> Option<String> {
    let lb = r
        .dynamic_metadata
        .as_ref()?
        .fields
        .get("envoy.lb")?
        .kind
        .as_ref()?;
    let Kind::StructValue(s) = lb else {
        return None;
    };
    match s
        .fields
        .get("x-gateway-destination-endpoint")?
        .kind
        .as_ref()?
    {
        Kind::StringValue(v) => Some(v.clone()),
        _ => None,
    }
}

pub fn immediate(r: Resp) -> (u16, serde_json::Value, HashMap<String, String>) {
    let Resp::ImmediateResponse(ir) = r else {
        panic!("expected an immediate response, got {r:?}");
    };
    let status = u16::try_from(ir.status.expect("status").code).unwrap();
    let hdrs = set_headers(&CommonResponse {
        header_mutation: ir.headers,
        ..CommonResponse::default()
    });
    (
        status,
        serde_json::from_slice(&ir.body).expect("JSON body"),
        hdrs,
    )
}

/// Response headers as Envoy forwards them from the engine.
pub fn resp_headers(status: u16, content_type: &str, eos: bool) -> Req {
    Req::ResponseHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: [
                (":status", status.to_string()),
                ("content-type", content_type.to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_owned(),
                raw_value: v.into_bytes(),
                ..HeaderValue::default()
            })
            .collect(),
        }),
        end_of_stream: eos,
        ..HttpHeaders::default()
    })
}
