//! `kvgate epp --decision-log/--capture-trace/--access-log` (issue 14.1, 14.2): a request the
//! picker routes and sees answered leaves one route receipt, naming the endpoint it put in
//! `x-gateway-destination-endpoint`, the status and usage of the response, and one trace line.

#[path = "common/messages.rs"]
mod messages;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use kvgate_epp::extproc::{Picker, PickerSettings, Step, StreamState};
use kvgate_epp::metrics::EppMetrics;
use kvgate_runtime::config::{DataPlaneConfig, RoutingFlags};
use kvgate_runtime::control::Control;
use kvgate_runtime::decision_log::Recorder;
use messages::{body, chat_body, headers, resp_body, resp_headers, set_headers};
use serde_json::Value;
use tokio::time::Instant;

const EP: [&str; 2] = ["127.0.0.1:9", "127.0.0.1:10"];

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

fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} has {} lines",
            path.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn a_picked_and_answered_request_leaves_a_receipt_and_a_trace_line() {
    let dir = std::env::temp_dir().join(format!("kvgate-epp-records-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let flags = RoutingFlags {
        endpoints: EP.iter().map(|s| s.to_string()).collect(),
        models: vec!["m".into()],
        policy: Some("round-robin".into()),
        decision_log: Some(dir.join("decisions.jsonl")),
        capture_trace: Some(dir.join("trace.jsonl")),
        ..RoutingFlags::default()
    };
    let cfg = DataPlaneConfig::load(None, &flags.overrides()).unwrap();
    let metrics = Arc::new(EppMetrics::new());
    let control = Control::start(&cfg, metrics.gateway.clone()).unwrap();
    control.set_endpoints(&cfg.endpoints);
    let recorder = Recorder::start(&cfg.logs, "round-robin", &metrics.gateway).unwrap();
    assert!(recorder.is_some());
    let picker = Picker::new(
        control.clone(),
        metrics.clone(),
        PickerSettings {
            max_body_bytes: cfg.limits.max_body_bytes,
            fallbacks: 0,
        },
    )
    .with_recorder(recorder);

    let mut s = picker.stream();
    let t0 = Instant::now();
    let req_headers = headers(
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("content-type", "application/json"),
            ("x-request-id", "epp-1"),
        ],
        false,
    );
    assert!(handle(&mut s, req_headers, t0).responses.is_empty());
    let step = handle(&mut s, body(&chat_body("hello"), true), t0);
    let Some(Resp::RequestHeaders(h)) = &step.responses[0].response else {
        panic!("expected the request-headers answer");
    };
    let dest = set_headers(h.response.as_ref().unwrap())["x-gateway-destination-endpoint"].clone();
    handle(&mut s, resp_headers(200, "text/event-stream", false), t0);
    let last = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\ndata: [DONE]\n\n";
    handle(&mut s, resp_body(last, true), t0);

    let receipts = wait_lines(&dir.join("decisions.jsonl"), 1);
    assert_eq!(receipts.len(), 1);
    let r = &receipts[0];
    assert_eq!(r["request_id"], "epp-1");
    assert_eq!(r["chosen"], dest.as_str());
    assert_eq!(r["reason"], "round_robin");
    assert_eq!(r["candidates"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["outcome"]["result"], "ok");
    assert_eq!(r["outcome"]["status"], 200);
    assert_eq!(r["outcome"]["output_tokens"], 3);
    assert_eq!(r["outcome"]["engine_prompt_tokens"], 9);
    assert_eq!(r["outcome"]["cached_tokens"], 4);
    let trace = wait_lines(&dir.join("trace.jsonl"), 1);
    assert_eq!(
        trace[0],
        serde_json::json!({"timestamp": 0, "input_length": 9, "output_length": 3, "hash_ids": [0]})
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
