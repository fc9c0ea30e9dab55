//! The OpenAI request parser of both data planes on a body a client controls, for every API.
//! Any input must parse or give an `ApiError` (a 4xx), never a panic.
#![no_main]

use kvgate_runtime::openai::{ApiKind, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for api in [
        ApiKind::Chat,
        ApiKind::Completions,
        ApiKind::Embeddings,
        ApiKind::Responses,
    ] {
        if let Err(e) = parse_request(api, data) {
            let _ = e.body();
        }
    }
});
