//! Every engine's Prometheus text adapter, and engine detection, on a body an engine controls.
//! Any input must give a sample or a typed error, never a panic.
#![no_main]

use kvgate_core::endpoint::EngineKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    for kind in [
        EngineKind::Vllm,
        EngineKind::Sglang,
        EngineKind::TrtLlm,
        EngineKind::LlamaCpp,
    ] {
        if let Ok(sample) = kvgate_signals::parse_metrics(kind, body) {
            if let Some(u) = sample.kv_usage {
                assert!((0.0..=1.0).contains(&u), "kv usage {u} out of range");
            }
        }
    }
    let detected = kvgate_signals::detect_engine(body);
    if let Ok((kind, _)) = kvgate_signals::parse_metrics_detected(body) {
        assert_eq!(Some(kind), detected);
    }
});
