//! The ext_proc message handler of `kvgate epp` on messages Envoy (or anything that reaches the
//! gRPC port) sends: each input is a sequence of length-prefixed protobuf `ProcessingRequest`s
//! (2-byte big-endian length, then the message), decoded with prost as tonic decodes them and
//! fed in order to one stream's state machine (`Picker::stream().handle`), the socket-free
//! entry point the gRPC service runs per stream. Undecodable messages are skipped, as tonic
//! would end the stream on them. Any input must give responses or a gRPC status, never a panic.
//!
//! The picker routes over one configured endpoint that nothing serves (no engine is needed:
//! the handler's parsing, booking and immediate-response paths are what is exercised; the
//! runtime is never driven, so no scrape or connection happens).
#![no_main]

use std::sync::{Arc, OnceLock};
use tokio::time::Instant;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use kvgate_epp::extproc::{Picker, PickerSettings};
use kvgate_epp::metrics::EppMetrics;
use kvgate_runtime::config::DataPlaneConfig;
use kvgate_runtime::control::Control;
use kvgate_runtime::metrics::DataPlaneMetrics;
use libfuzzer_sys::fuzz_target;
use prost::Message;

struct Target {
    _rt: tokio::runtime::Runtime,
    picker: Picker,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let picker = {
            let _entered = rt.enter();
            let cfg = DataPlaneConfig::from_yaml(
                "endpoints:\n  - url: http://127.0.0.1:9\n    models: [m]\n",
            )
            .expect("fuzz config");
            let control = Control::start(&cfg, Arc::new(DataPlaneMetrics::new())).expect("control");
            control.set_endpoints(&cfg.endpoints);
            Picker::new(
                control,
                Arc::new(EppMetrics::new()),
                PickerSettings {
                    max_body_bytes: 1 << 20,
                    fallbacks: 1,
                },
            )
        };
        Target { _rt: rt, picker }
    })
}

fuzz_target!(|data: &[u8]| {
    let t = target();
    let mut stream = t.picker.stream();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (msg, tail) = rest[2..].split_at(len);
        rest = tail;
        let Ok(req) = ProcessingRequest::decode(msg) else {
            continue;
        };
        match stream.handle(req, Instant::now()) {
            Ok(step) if step.close => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
});
