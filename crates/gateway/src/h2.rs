//! HTTP/2 over cleartext (h2c) on the API port, both ways a client can start it (RFC 9113 §3.3
//! prior knowledge, RFC 7540 §3.2 `Upgrade: h2c`), beside HTTP/1.1.
//!
//! Prior knowledge is hyper-util's: its `auto` connection builder reads the first bytes and
//! serves the connection as HTTP/2 when they are the connection preface. The upgrade is ours,
//! because hyper does not implement it (its HTTP/2 server cannot start with stream 1 already
//! open, which the upgrade requires: the request that carried `Upgrade: h2c` is answered on
//! stream 1 of the new connection). So the gateway:
//!
//! 1. recognises an HTTP/1.1 request with `Upgrade: h2c`, exactly one `HTTP2-Settings`, and
//!    `Connection: Upgrade, HTTP2-Settings`, and reads its whole body (the client sends nothing
//!    else until it has the 101);
//! 2. answers `101 Switching Protocols` and takes the connection from hyper's HTTP/1.1 server;
//! 3. starts hyper's HTTP/2 server on it, and after the client's connection preface and first
//!    SETTINGS frame puts in front of the client's next bytes a HEADERS frame (and DATA frames)
//!    that carry the upgraded request as stream 1 — headers as HPACK literals that leave the
//!    dynamic table untouched, so the client's own header compression stays in step. The
//!    answer goes out on stream 1 as the RFC asks, and the client's next streams (3, 5, …)
//!    follow on the same connection.
//!
//! The request is served over HTTP/1.1 instead (the upgrade ignored, which RFC 9110 §7.8
//! allows) when its body is larger than [`MAX_UPGRADE_BODY_BYTES`] (HTTP/2's initial flow
//! control window, the most a server may receive before its own settings are acknowledged) or
//! its headers do not fit one frame, and when its `HTTP2-Settings` (base64url SETTINGS payload,
//! RFC 7540 §3.2.1) is malformed or restricts the server below HTTP/2's defaults (a header
//! table under 4,096 bytes, an initial window under 65,535): hyper only learns the client's
//! settings from its preface, so it could otherwise send stream 1's answer beyond what the
//! client allowed. Settings at or above the defaults change nothing the server must respect
//! before the preface arrives. RFC 9113 deprecates the upgrade; it is here for clients that
//! still start h2c that way (`curl --http2` on `http://`).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use kvgate_runtime::config::Limits;
use kvgate_runtime::openai::ApiError;

/// The HTTP/2 connection preface a client sends first.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest request body that is upgraded: 65,535 bytes is HTTP/2's default initial window, the
/// data a server accepts on a stream before its SETTINGS are acknowledged.
pub const MAX_UPGRADE_BODY_BYTES: usize = 65_535;

/// HTTP/2's default (and minimum) `SETTINGS_MAX_FRAME_SIZE`.
const MAX_FRAME_BYTES: usize = 16_384;

const FRAME_HEADER_BYTES: usize = 9;
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

/// Request headers that are HTTP/1.1 connection matters, not carried into HTTP/2 (RFC 9113
/// §8.2.2), plus `host` (becomes `:authority`) and `content-length` (recomputed).
const NOT_CARRIED: [&str; 9] = [
    "connection",
    "upgrade",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "host",
    "content-length",
];

/// The comma-separated tokens of every `name` header, lower-cased.
fn tokens<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = String> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
}

/// Whether `req` asks to upgrade its connection to h2c as RFC 7540 §3.2 requires it to.
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    req.version() == hyper::Version::HTTP_11
        && tokens(h, "upgrade").any(|t| t == "h2c")
        && h.get_all("http2-settings").iter().count() == 1
        && tokens(h, "connection").any(|t| t == "upgrade")
        && tokens(h, "connection").any(|t| t == "http2-settings")
        && h.get("http2-settings")
            .is_some_and(|v| settings_allow_upgrade(v.as_bytes()))
}

/// Whether an `HTTP2-Settings` value is a well-formed SETTINGS payload that does not restrict
/// the server below HTTP/2's defaults (see the module docs).
fn settings_allow_upgrade(value: &[u8]) -> bool {
    use base64::Engine;
    let trimmed: Vec<u8> = value.iter().copied().take_while(|b| *b != b'=').collect();
    let Ok(payload) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed) else {
        return false;
    };
    if payload.len() % 6 != 0 {
        return false;
    }
    payload.chunks_exact(6).all(|s| {
        let id = u16::from_be_bytes([s[0], s[1]]);
        let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
        match id {
            SETTINGS_HEADER_TABLE_SIZE => v >= 4_096,
            SETTINGS_INITIAL_WINDOW_SIZE => (65_535..=0x7fff_ffff).contains(&v),
            SETTINGS_MAX_FRAME_SIZE => (16_384..=16_777_215).contains(&v),
            SETTINGS_ENABLE_PUSH => v <= 1,
            _ => true,
        }
    })
}

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// A switch to HTTP/2 that the connection carries out once the 101 is written.
pub struct PendingUpgrade {
    /// Resolves to the connection once hyper has written the 101.
    pub on_upgrade: hyper::upgrade::OnUpgrade,
    /// The upgraded request as HTTP/2 frames on stream 1.
    pub stream_one: Bytes,
}

/// What to do with a request that asked for the upgrade.
pub enum Upgrade {
    /// Switch: answer with the 101, then serve the connection as HTTP/2.
    Switch(PendingUpgrade, Response<Body>),
    /// Serve the request over HTTP/1.1 (body read already, put back).
    Http1(Request<Body>),
    /// The body could not be read (too large, too slow, broken).
    Refused(Response<Body>),
}

/// Reads the body of an upgrade request and decides (see the module docs).
pub async fn accept(mut req: Request<Incoming>, limits: &Limits) -> Upgrade {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let read = Limited::new(body, limits.max_body_bytes).collect();
    let body = match tokio::time::timeout(Duration::from_millis(limits.body_read_timeout_ms), read)
        .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Upgrade::Refused(
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body exceeds the limit of {} bytes",
                        limits.max_body_bytes
                    ),
                )
                .into_response(),
            );
        }
        Ok(Err(e)) => {
            return Upgrade::Refused(
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read request body: {e}"),
                )
                .into_response(),
            );
        }
        Err(_) => {
            return Upgrade::Refused(
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "request body not received within {} ms",
                        limits.body_read_timeout_ms
                    ),
                )
                .into_response(),
            );
        }
    };
    let stream_one = (body.len() <= MAX_UPGRADE_BODY_BYTES)
        .then(|| stream_one(&parts, &body))
        .flatten();
    match stream_one {
        Some(stream_one) => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("h2c"));
            Upgrade::Switch(
                PendingUpgrade {
                    on_upgrade,
                    stream_one,
                },
                resp,
            )
        }
        None => {
            let mut parts = parts;
            for name in ["upgrade", "http2-settings"] {
                parts.headers.remove(name);
            }
            Upgrade::Http1(Request::from_parts(parts, Body::from(body)))
        }
    }
}

/// HPACK integer with an `prefix_bits`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, value: usize, prefix_bits: u32, flags: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut v = value - max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// "Literal header field without indexing — new name" (RFC 7541 §6.2.2), no Huffman: the
/// decoder's dynamic table is left as it was.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, name.len(), 7, 0);
    out.extend_from_slice(name);
    hpack_int(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7FFF_FFFF).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The request as HTTP/2 frames on stream 1; `None` if its headers do not fit one frame.
fn stream_one(parts: &axum::http::request::Parts, body: &[u8]) -> Option<Bytes> {
    let mut block = Vec::new();
    hpack_literal(&mut block, b":method", parts.method.as_str().as_bytes());
    hpack_literal(&mut block, b":scheme", b"http");
    let authority = parts
        .headers
        .get(header::HOST)
        .map(HeaderValue::as_bytes)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()))?;
    hpack_literal(&mut block, b":authority", authority);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    hpack_literal(&mut block, b":path", path.as_bytes());
    for (name, value) in &parts.headers {
        if !NOT_CARRIED.contains(&name.as_str()) {
            hpack_literal(&mut block, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if !body.is_empty() {
        hpack_literal(
            &mut block,
            b"content-length",
            body.len().to_string().as_bytes(),
        );
    }
    if block.len() > MAX_FRAME_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(block.len() + body.len() + 4 * FRAME_HEADER_BYTES);
    let end = if body.is_empty() { FLAG_END_STREAM } else { 0 };
    frame(&mut out, FRAME_HEADERS, FLAG_END_HEADERS | end, 1, &block);
    let chunks = body.chunks(MAX_FRAME_BYTES);
    let n = chunks.len();
    for (i, chunk) in chunks.enumerate() {
        let flags = if i + 1 == n { FLAG_END_STREAM } else { 0 };
        frame(&mut out, FRAME_DATA, flags, 1, chunk);
    }
    Some(Bytes::from(out))
}

enum InjectState {
    /// Reading the client's preface and first frame.
    Preface { seen: Vec<u8>, stream_one: Bytes },
    /// Handing out buffered bytes (the preface, stream 1, what followed).
    Replay(Bytes),
    /// Passing reads through.
    Through,
}

/// The upgraded connection, with stream 1 put in after the client's preface and first frame
/// (see the module docs). Writes pass through untouched.
pub struct Injected<T> {
    inner: T,
    state: InjectState,
    /// Called once the preface has been read (or given up on): the connection's head clock,
    /// which bounds how long a client may take to send it, stops there.
    on_preface: Option<Box<dyn FnOnce() + Send>>,
}

impl<T> Injected<T> {
    /// Wraps `inner`, to show `stream_one` to the reader after the client's first frame;
    /// `on_preface` runs when the client's preface and first frame are in (or are not a
    /// preface at all).
    pub fn new(inner: T, stream_one: Bytes, on_preface: Box<dyn FnOnce() + Send>) -> Self {
        Self {
            inner,
            state: InjectState::Preface {
                seen: Vec::with_capacity(PREFACE.len() + 64),
                stream_one,
            },
            on_preface: Some(on_preface),
        }
    }
}

/// What the bytes read so far after a 101 are.
#[derive(Debug, PartialEq, Eq)]
enum PrefaceRead {
    /// Too few to tell.
    More,
    /// Not the preface and a SETTINGS frame of at most [`MAX_FRAME_BYTES`]: handed to hyper as
    /// they are (it answers with a connection error), without waiting for a length a client
    /// made up.
    Raw,
    /// The preface and its SETTINGS frame end here: stream 1 goes in after them.
    At(usize),
}

fn preface_len(seen: &[u8]) -> PrefaceRead {
    let n = seen.len().min(PREFACE.len());
    if seen[..n] != PREFACE[..n] {
        return PrefaceRead::Raw;
    }
    let head = PREFACE.len() + FRAME_HEADER_BYTES;
    if seen.len() < head {
        return PrefaceRead::More;
    }
    let len = u32::from_be_bytes([0, seen[24], seen[25], seen[26]]) as usize;
    if seen[27] != FRAME_SETTINGS || len > MAX_FRAME_BYTES {
        return PrefaceRead::Raw;
    }
    if seen.len() < head + len {
        return PrefaceRead::More;
    }
    PrefaceRead::At(head + len)
}

impl<T: AsyncRead + Unpin> AsyncRead for Injected<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                InjectState::Through => return Pin::new(&mut this.inner).poll_read(cx, out),
                InjectState::Replay(bytes) => {
                    if bytes.is_empty() {
                        this.state = InjectState::Through;
                        continue;
                    }
                    let n = bytes.len().min(out.remaining());
                    out.put_slice(&bytes[..n]);
                    bytes.advance(n);
                    return Poll::Ready(Ok(()));
                }
                InjectState::Preface { seen, stream_one } => {
                    let read = preface_len(seen);
                    if read != PrefaceRead::More {
                        let mut all = Vec::with_capacity(seen.len() + stream_one.len());
                        match read {
                            PrefaceRead::At(need) => {
                                all.extend_from_slice(&seen[..need]);
                                all.extend_from_slice(stream_one);
                                all.extend_from_slice(&seen[need..]);
                            }
                            // A client that does not open with the preface and SETTINGS gets
                            // no stream 1: hyper answers its bytes with a connection error.
                            _ => all.extend_from_slice(seen),
                        }
                        this.state = InjectState::Replay(Bytes::from(all));
                        if let Some(f) = this.on_preface.take() {
                            f();
                        }
                        continue;
                    }
                    let mut tmp = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut tmp);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        this.state = InjectState::Replay(Bytes::from(std::mem::take(seen)));
                        continue;
                    }
                    seen.extend_from_slice(rb.filled());
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Injected<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn http2_settings_that_restrict_the_server_keep_the_request_on_http1() {
        use base64::Engine;
        let enc = |settings: &[(u16, u32)]| {
            let mut p = Vec::new();
            for (id, v) in settings {
                p.extend_from_slice(&id.to_be_bytes());
                p.extend_from_slice(&v.to_be_bytes());
            }
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(p)
        };
        // What curl sends: max concurrent streams 100, initial window 1 GiB - 1.
        assert!(settings_allow_upgrade(b"AAMAAABkAAQAAP__"));
        assert!(settings_allow_upgrade(b""), "no settings: the defaults");
        assert!(settings_allow_upgrade(
            enc(&[(0x4, 65_535), (0x1, 8_192)]).as_bytes()
        ));
        assert!(
            !settings_allow_upgrade(enc(&[(0x4, 1_024)]).as_bytes()),
            "small window"
        );
        assert!(
            !settings_allow_upgrade(enc(&[(0x1, 0)]).as_bytes()),
            "no header table"
        );
        assert!(!settings_allow_upgrade(b"not base64!"), "malformed");
        assert!(!settings_allow_upgrade(b"AAMAAA"), "not whole settings");
    }

    #[test]
    fn preface_reads_wait_for_the_frame_and_refuse_made_up_lengths() {
        let mut p = PREFACE.to_vec();
        assert_eq!(preface_len(&p[..10]), PrefaceRead::More);
        assert_eq!(preface_len(b"GET / HTTP"), PrefaceRead::Raw);
        p.extend_from_slice(&[0, 0, 6, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
        assert_eq!(preface_len(&p), PrefaceRead::More);
        p.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        assert_eq!(preface_len(&p), PrefaceRead::At(p.len()));
        // A 16 MiB "SETTINGS" frame is not waited for (it was buffered whole before).
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
        assert_eq!(preface_len(&huge), PrefaceRead::Raw);
        let mut data = PREFACE.to_vec();
        data.extend_from_slice(&[0, 0, 1, 0x0, 0, 0, 0, 0, 1]);
        assert_eq!(preface_len(&data), PrefaceRead::Raw);
    }

    use super::*;

    #[test]
    fn hpack_integers_follow_rfc7541_examples() {
        // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix.
        let mut v = Vec::new();
        hpack_int(&mut v, 10, 5, 0);
        assert_eq!(v, [10]);
        let mut v = Vec::new();
        hpack_int(&mut v, 1337, 5, 0);
        assert_eq!(v, [31, 154, 10]);
    }

    #[test]
    fn upgrade_needs_all_three_headers() {
        let req = |upgrade: &str, conn: &str, settings: bool| {
            let mut b = Request::builder()
                .header("upgrade", upgrade)
                .header("connection", conn);
            if settings {
                b = b.header("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA");
            }
            b.body(()).unwrap()
        };
        assert!(wants_upgrade(&req("h2c", "Upgrade, HTTP2-Settings", true)));
        assert!(!wants_upgrade(&req(
            "h2c",
            "Upgrade, HTTP2-Settings",
            false
        )));
        assert!(!wants_upgrade(&req("h2c", "Upgrade", true)));
        assert!(!wants_upgrade(&req(
            "websocket",
            "Upgrade, HTTP2-Settings",
            true
        )));
    }

    #[test]
    fn stream_one_splits_the_body_into_frames_and_ends_the_stream() {
        let (parts, ()) = Request::post("/v1/chat/completions")
            .header("host", "kvgate:8080")
            .header("upgrade", "h2c")
            .body(())
            .unwrap()
            .into_parts();
        let body = vec![b'x'; MAX_FRAME_BYTES + 10];
        let frames = stream_one(&parts, &body).unwrap();
        let len = |at: usize| u32::from_be_bytes([0, frames[at], frames[at + 1], frames[at + 2]]);
        let headers = len(0) as usize;
        assert_eq!((frames[3], frames[4]), (FRAME_HEADERS, FLAG_END_HEADERS));
        assert!(!frames[9..9 + headers].windows(7).any(|w| w == b"upgrade"));
        let d1 = 9 + headers;
        assert_eq!(len(d1) as usize, MAX_FRAME_BYTES);
        assert_eq!(frames[d1 + 4], 0);
        let d2 = d1 + 9 + MAX_FRAME_BYTES;
        assert_eq!((len(d2), frames[d2 + 4]), (10, FLAG_END_STREAM));
        assert_eq!(frames.len(), d2 + 9 + 10);
    }
}
