//! What the gateway stamps on every request and response, whatever answered it (an engine, a
//! handler, a routing refusal, the listener's own 400): `x-request-id` and, on 429,
//! `Retry-After`.
//!
//! - **`x-request-id`.** A client's id is kept (when it is a valid header value of at most
//!   [`MAX_REQUEST_ID_BYTES`]), otherwise one is generated (a random UUID v4). The id is put on
//!   the request before it is handled, so engines receive it (the proxy forwards
//!   `x-request-id`; vLLM uses it as its request id and echoes it), and it is set on the
//!   response, replacing whatever an engine answered, so a client always gets back the id its
//!   request went by.
//! - **`Retry-After` on 429.** An engine's `Retry-After` is relayed as it is; a 429 without
//!   one (kvgate's own load shedding, or an engine that sent none) gets
//!   [`SHED_RETRY_AFTER_S`], so clients that honour it (the OpenAI and Anthropic SDKs do) back
//!   off instead of retrying at once into the same overload.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

/// The request id header (vLLM's, Envoy's, and the OpenAI SDKs').
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id kept; a longer one is replaced. vLLM puts the id in its logs and
/// in every response chunk's `id`, so an unbounded one would be copied into each of them.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// `Retry-After` (seconds) on a 429 that carries none (shared with `kvgate epp`).
pub use kvgate_runtime::openai::SHED_RETRY_AFTER_S;

/// Makes sure `headers` carry a usable request id, and returns it.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID_HEADER)
        && !v.is_empty()
        && v.len() <= MAX_REQUEST_ID_BYTES
        && v.to_str().is_ok()
        && headers.get_all(&REQUEST_ID_HEADER).iter().count() == 1
    {
        return v.clone();
    }
    let id = HeaderValue::from_str(&new_request_id()).unwrap_or(HeaderValue::from_static("-"));
    headers.insert(REQUEST_ID_HEADER, id.clone());
    id
}

/// Stamps a response: the request's id, and `Retry-After` on a 429 that has none.
pub fn stamp_response(status: StatusCode, headers: &mut HeaderMap, request_id: HeaderValue) {
    headers.insert(REQUEST_ID_HEADER, request_id);
    if status == StatusCode::TOO_MANY_REQUESTS && !headers.contains_key(header::RETRY_AFTER) {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(SHED_RETRY_AFTER_S));
    }
}

/// A random UUID v4 (122 random bits from the process's randomly keyed hasher over a counter,
/// so ids never repeat within a process and differ between processes).
fn new_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(std::collections::hash_map::RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let word = |salt: u64| {
        let mut h = keys.build_hasher();
        h.write_u64(n);
        h.write_u64(salt);
        h.finish()
    };
    let (hi, lo) = (word(0), word(1));
    let hi = (hi & !0xF000) | 0x4000; // version 4
    let lo = (lo & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
    uuid_text(hi, lo)
}

/// `hi` and `lo` as a UUID's text, `{:08x}-{:04x}-{:04x}-{:04x}-{:012x}` of its five groups,
/// written digit by digit: `format!` was most of the cost of an id, made for every request.
fn uuid_text(hi: u64, lo: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (word, group) in [
        (hi >> 32, 8),
        ((hi >> 16) & 0xFFFF, 4),
        (hi & 0xFFFF, 4),
        (lo >> 48, 4),
        (lo & 0xFFFF_FFFF_FFFF, 12),
    ] {
        if !s.is_empty() {
            s.push('-');
        }
        for shift in (0..group).rev() {
            s.push(char::from(HEX[((word >> (shift * 4)) & 0xF) as usize]));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_id_is_kept_and_a_missing_or_bad_one_replaced() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-1"));
        assert_eq!(ensure_request_id(&mut h), "abc-1");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(h.get(REQUEST_ID_HEADER), Some(&id));
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4", "{s}");
        let mut long = HeaderMap::new();
        long.insert(
            REQUEST_ID_HEADER,
            HeaderValue::from_str(&"x".repeat(MAX_REQUEST_ID_BYTES + 1)).unwrap(),
        );
        assert_ne!(ensure_request_id(&mut long).len(), MAX_REQUEST_ID_BYTES + 1);
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn uuid_text_is_what_format_writes() {
        for (hi, lo) in [
            (0, 0),
            (u64::MAX, u64::MAX),
            (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
            (0x4000, 1 << 63),
        ] {
            let want = format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                hi >> 32,
                (hi >> 16) & 0xFFFF,
                hi & 0xFFFF,
                lo >> 48,
                lo & 0xFFFF_FFFF_FFFF
            );
            assert_eq!(uuid_text(hi, lo), want);
        }
    }

    #[test]
    fn retry_after_is_added_to_429_only_when_missing() {
        let id = HeaderValue::from_static("r");
        let mut h = HeaderMap::new();
        stamp_response(StatusCode::TOO_MANY_REQUESTS, &mut h, id.clone());
        assert_eq!(h[header::RETRY_AFTER], "1");
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        stamp_response(StatusCode::TOO_MANY_REQUESTS, &mut h, id.clone());
        assert_eq!(h[header::RETRY_AFTER], "7");
        let mut h = HeaderMap::new();
        stamp_response(StatusCode::OK, &mut h, id);
        assert!(!h.contains_key(header::RETRY_AFTER));
        assert_eq!(h[REQUEST_ID_HEADER], "r");
    }
}
