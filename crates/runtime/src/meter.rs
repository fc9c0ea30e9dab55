//! Measuring a response as it streams back: time to first token, time per output token and
//! `usage`, for both data planes (the HTTP relay of `kvgate-gateway` and the Envoy endpoint
//! picker), so a request calibrates the core the same way whichever of them carried it.
//!
//! The meter sees only body bytes and the instants they arrived at, never a socket or a protobuf:
//! each data plane feeds it what its wire delivers (hyper frames, ext_proc body chunks) and
//! reports the result to the core and the metrics itself.
//!
//! TTFT runs from the moment the data plane had the request head to the first non-empty body
//! chunk of an SSE response (vLLM sends the first chunk when the first token exists). TPOT is
//! `(last chunk − first chunk) / (completion tokens − 1)`, with completion tokens from the final
//! usage chunk when present, else the number of SSE `data:` events carrying tokens. Only the last
//! [`STREAM_TAIL_BYTES`] of a stream (or a non-streaming body up to [`USAGE_WINDOW_BYTES`]) is
//! kept to read `usage` at the end.

use tokio::time::Instant;

use kvgate_core::request::Outcome;

use crate::metrics::{DataPlaneMetrics, EndpointLabels};
use crate::openai::{Usage, usage_of};

/// Bytes of a response kept to read `usage` from at the end: the tail of a stream (the usage
/// chunk is the last event before `[DONE]`, a few hundred bytes) or a whole non-streaming body
/// (a long completion is tens of KiB). Larger non-streaming bodies simply report no usage.
pub const USAGE_WINDOW_BYTES: usize = 256 * 1024;

/// Tail of a stream kept for the usage chunk: comfortably more than one usage chunk plus
/// `[DONE]` (a few hundred bytes), small enough that copying it per chunk costs nothing.
pub const STREAM_TAIL_BYTES: usize = 4 * 1024;

/// What a finished response tells the core and the metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Outcome for `on_finish`.
    pub outcome: Outcome,
    /// Mean time per output token, seconds, when measurable.
    pub tpot_seconds: Option<f64>,
    /// Usage as reported by the engine.
    pub usage: Usage,
}

impl Measured {
    /// Records TPOT and the prompt cache hit rate of this response in the shared metrics (TTFT
    /// is recorded when the first token arrives, not here).
    pub fn observe(&self, metrics: &DataPlaneMetrics, endpoint: &EndpointLabels) {
        if let Some(t) = self.tpot_seconds {
            metrics.tpot_seconds.get_or_create(endpoint).observe(t);
        }
        if let (Some(p), Some(c)) = (self.usage.prompt_tokens, self.usage.cached_tokens) {
            metrics.observe_usage(p, c);
        }
    }
}

/// Per-response measurement state.
#[derive(Debug)]
pub struct ResponseMeter {
    sse: bool,
    chat: bool,
    sequences: u32,
    /// A Responses API stream (see [`Self::responses`]).
    responses: bool,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    events: u32,
    window: Vec<u8>,
    window_overflow: bool,
    at_line_start: bool,
}

/// Whether a Responses stream chunk holds an event other than the two vLLM sends before any
/// token (`response.created`, `response.in_progress`), named by its `event:` line.
fn carries_output_event(data: &[u8]) -> bool {
    const EVENT: &[u8] = b"event:";
    let mut from = 0;
    let mut saw_event = false;
    while let Some(at) = data[from..]
        .windows(EVENT.len())
        .position(|w| w == EVENT)
        .map(|i| from + i + EVENT.len())
    {
        saw_event = true;
        let end = find_byte(&data[at..], b'\n').map_or(data.len(), |n| at + n);
        let name = data[at..end].trim_ascii();
        if name != b"response.created" && name != b"response.in_progress" {
            return true;
        }
        from = end;
    }
    // A server that names no events: any data is taken as output.
    !saw_event
}

/// Offset of the first `byte` in `hay`. The relay scans every streamed frame for line ends, so
/// this goes through the standard library's word-at-a-time `memchr`, which it exposes only
/// through `BufRead` on a byte slice: a byte-at-a-time loop was most of the gateway's own CPU
/// per relayed frame.
pub fn find_byte(hay: &[u8], byte: u8) -> Option<usize> {
    use std::io::BufRead;
    let mut rest = hay;
    // Reading a slice never fails; the count includes the delimiter when there is one.
    let read = rest.skip_until(byte).unwrap_or(0);
    (read > 0 && hay[read - 1] == byte).then(|| read - 1)
}

/// SSE `data:` events starting in `data`, given whether `data` begins at a line start.
fn count_events(data: &[u8], at_line_start: &mut bool) -> u32 {
    let Some(&last) = data.last() else {
        return 0;
    };
    let mut n = u32::from(*at_line_start && data.starts_with(b"data:"));
    let mut from = 0;
    while let Some(nl) = find_byte(&data[from..], b'\n') {
        from += nl + 1;
        n += u32::from(data[from..].starts_with(b"data:"));
    }
    *at_line_start = last == b'\n';
    n
}

impl ResponseMeter {
    /// A meter for a response whose body is SSE (`sse`) to a chat request (`chat`: the role
    /// chunk carries no token).
    pub fn new(sse: bool, chat: bool) -> Self {
        Self {
            sse,
            chat,
            sequences: 1,
            responses: false,
            first_at: None,
            last_at: None,
            events: 0,
            window: Vec::new(),
            window_overflow: false,
            at_line_start: true,
        }
    }

    /// The response generates `sequences` sequences side by side (`n`, a batch of prompts):
    /// usage and the stream's events count the tokens of all of them, while each token's
    /// time is that of one sequence, so TPOT divides by the tokens per sequence.
    #[must_use]
    pub fn with_sequences(mut self, sequences: u32) -> Self {
        self.sequences = sequences.max(1);
        self
    }

    /// A Responses API stream (`responses`): vLLM sends `response.created` and
    /// `response.in_progress` as soon as the request is accepted, before any token, so the
    /// first token is the first other event; and its usage comes nested in the final
    /// `response.completed` event (the whole response, often longer than the tail kept).
    #[must_use]
    pub fn responses(mut self, responses: bool) -> Self {
        self.responses = responses;
        self
    }

    /// Accounts one body chunk received at `now`; returns true when it is the first token of a
    /// stream (the caller reports TTFT then).
    pub fn on_chunk(&mut self, data: &[u8], now: Instant) -> bool {
        let first = self.first_at.is_none()
            && !data.is_empty()
            && (!self.responses || !self.sse || carries_output_event(data));
        if first {
            self.first_at = Some(now);
        }
        if self.sse {
            self.last_at = Some(now);
            self.events += count_events(data, &mut self.at_line_start);
            self.window.extend_from_slice(data);
            if self.window.len() > STREAM_TAIL_BYTES * 2 {
                let cut = self.window.len() - STREAM_TAIL_BYTES;
                self.window.drain(..cut);
            }
        } else if !self.window_overflow {
            if self.window.len() + data.len() > USAGE_WINDOW_BYTES {
                self.window_overflow = true;
                self.window = Vec::new();
            } else {
                self.window.extend_from_slice(data);
            }
        }
        first && self.sse
    }

    fn stream_usage(&self) -> Option<Usage> {
        let text = &self.window;
        // Walk events from the end; the usage chunk is the last JSON event with a `usage` object.
        let mut end = text.len();
        while end > 0 {
            let start = text[..end]
                .windows(6)
                .rposition(|w| w == b"data: " || w == b"\ndata:")
                .unwrap_or(0);
            let event = &text[start..end];
            if let Some(json_at) = event.iter().position(|&b| b == b'{') {
                let json = &event[json_at..];
                let json_end = json
                    .iter()
                    .rposition(|&b| b == b'}')
                    .map_or(json.len(), |e| e + 1);
                if let Some(u) = usage_of(&json[..json_end]) {
                    return Some(u);
                }
            }
            if start == 0 {
                break;
            }
            end = start;
        }
        None
    }

    /// The measurement of the finished response.
    pub fn finish(&self) -> Measured {
        let usage = if self.sse {
            self.stream_usage().or_else(|| {
                self.responses
                    .then(|| crate::openai::usage_in_tail(&self.window))
                    .flatten()
            })
        } else if self.window_overflow {
            None
        } else {
            usage_of(&self.window)
        }
        .unwrap_or_default();
        // Events that carry no generated token: `[DONE]`, the chat role chunk (one per
        // choice), the usage chunk.
        let overhead = 1
            + u32::from(self.chat).saturating_mul(self.sequences)
            + u32::from(usage.completion_tokens.is_some());
        let output_tokens = usage
            .completion_tokens
            .unwrap_or_else(|| self.events.saturating_sub(overhead));
        let per_sequence = output_tokens.div_ceil(self.sequences);
        let per = match (self.sse, self.first_at, self.last_at) {
            (true, Some(first), Some(last)) if per_sequence > 1 => {
                Some(last.duration_since(first) / (per_sequence - 1))
            }
            _ => None,
        };
        Measured {
            outcome: Outcome {
                output_tokens,
                prompt_tokens: usage.prompt_tokens,
                cached_tokens: usage.cached_tokens,
                tpot_us: per.map(|p| u64::try_from(p.as_micros()).unwrap_or(u64::MAX)),
            },
            tpot_seconds: per.map(|p| p.as_secs_f64()),
            usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn events_are_counted_as_a_byte_by_byte_scan_counts_them_at_every_split() {
        fn reference(data: &[u8], at_line_start: &mut bool) -> u32 {
            let mut n = 0;
            for (i, &b) in data.iter().enumerate() {
                if *at_line_start && data[i..].starts_with(b"data:") {
                    n += 1;
                }
                *at_line_start = b == b'\n';
            }
            n
        }
        let stream: &[u8] = b"data: {\"a\":1}\n\ndata:{}\r\n\r\n: comment\ndata: x\ndata: y\n\n\n\ndata: [DONE]\n\n";
        for split in 0..=stream.len() {
            for start in [true, false] {
                let (mut a, mut b) = (start, start);
                let got =
                    count_events(&stream[..split], &mut a) + count_events(&stream[split..], &mut a);
                let want =
                    reference(&stream[..split], &mut b) + reference(&stream[split..], &mut b);
                assert_eq!((got, a), (want, b), "split at {split}, start {start}");
            }
        }
        assert_eq!(find_byte(b"", b'\n'), None);
        assert_eq!(find_byte(b"ab", b'\n'), None);
        assert_eq!(find_byte(b"a\nb\n", b'\n'), Some(1));
        assert_eq!(find_byte(b"ab\n", b'\n'), Some(2));
    }

    #[test]
    fn stream_with_usage_chunk_split_across_chunks() {
        let mut m = ResponseMeter::new(true, true);
        let t = Instant::now();
        assert!(m.on_chunk(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\nda",
            t
        ));
        assert!(!m.on_chunk(
            b"ta: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            t
        ));
        m.on_chunk(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
            t,
        );
        m.on_chunk(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n",
            t + Duration::from_millis(10),
        );
        let r = m.finish();
        assert_eq!(r.outcome.output_tokens, 2);
        assert_eq!(r.outcome.cached_tokens, Some(8));
        assert_eq!(r.outcome.tpot_us, Some(10_000));
    }

    /// `n: 2`: two choices of three tokens each stream side by side over 20 ms; usage counts
    /// six tokens, and a token took 10 ms (not 4 ms, as six tokens in a row would).
    #[test]
    fn side_by_side_sequences_are_timed_per_sequence() {
        let mut m = ResponseMeter::new(true, true).with_sequences(2);
        let t = Instant::now();
        for (k, at) in [0u64, 0, 10, 10, 20, 20].into_iter().enumerate() {
            let event = format!(
                "data: {{\"choices\":[{{\"index\":{},\"delta\":{{\"content\":\"x\"}}}}]}}\n\n",
                k % 2
            );
            m.on_chunk(event.as_bytes(), t + Duration::from_millis(at));
        }
        m.on_chunk(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":6}}\n\ndata: [DONE]\n\n",
            t + Duration::from_millis(20),
        );
        let r = m.finish();
        assert_eq!(r.outcome.output_tokens, 6);
        assert_eq!(r.outcome.tpot_us, Some(10_000));
    }

    /// A Responses stream: the two events sent on acceptance are not the first token, and
    /// the usage nested in `response.completed` (cut off at its start in the tail) is read.
    #[test]
    fn responses_streams_start_at_their_first_output_event() {
        let mut m = ResponseMeter::new(true, false).responses(true);
        let t = Instant::now();
        let accepted = b"event: response.created\ndata: {\"type\":\"response.created\"}\n\nevent: response.in_progress\ndata: {\"type\":\"response.in_progress\"}\n\n";
        assert!(!m.on_chunk(accepted, t));
        let delta = |k: u64| {
            format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"t{k}\"}}\n\n"
            )
        };
        assert!(m.on_chunk(delta(0).as_bytes(), t + Duration::from_millis(300)));
        assert!(!m.on_chunk(delta(1).as_bytes(), t + Duration::from_millis(310)));
        let long_output = "x".repeat(3 * STREAM_TAIL_BYTES);
        let completed = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"text\":\"{long_output}\"}}],\"usage\":{{\"input_tokens\":40,\"input_tokens_details\":{{\"cached_tokens\":32}},\"output_tokens\":3}},\"user\":null}}}}\n\n"
        );
        m.on_chunk(completed.as_bytes(), t + Duration::from_millis(320));
        let r = m.finish();
        assert_eq!(
            (
                r.outcome.prompt_tokens,
                r.outcome.cached_tokens,
                r.outcome.output_tokens
            ),
            (Some(40), Some(32), 3)
        );
        assert_eq!(r.outcome.tpot_us, Some(10_000));
    }

    #[test]
    fn stream_without_usage_counts_events() {
        let mut m = ResponseMeter::new(true, false);
        let t = Instant::now();
        m.on_chunk(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", t);
        m.on_chunk(
            b"data: {\"choices\":[{\"text\":\"b\"}]}\n\ndata: {\"choices\":[{\"text\":\"c\"}]}\n\n",
            t,
        );
        m.on_chunk(b"data: [DONE]\n\n", t);
        assert_eq!(m.finish().outcome.output_tokens, 3);
    }

    #[test]
    fn events_are_counted_at_line_starts() {
        assert_eq!(count_events(b"data: {}\n\ndata: [DONE]\n\n", &mut true), 2);
        assert_eq!(count_events(b"x data: y\n", &mut true), 0);
        // A chunk that starts mid-line: its `data:` is not an event start.
        assert_eq!(count_events(b"data: y\n", &mut false), 0);
    }

    #[test]
    fn non_streaming_body_reads_usage() {
        let mut m = ResponseMeter::new(false, true);
        assert!(!m.on_chunk(
            br#"{"choices":[],"usage":{"prompt_tokens":3,"#,
            Instant::now()
        ));
        m.on_chunk(br#""completion_tokens":4}}"#, Instant::now());
        let r = m.finish();
        assert_eq!(r.outcome.output_tokens, 4);
        assert_eq!(r.outcome.tpot_us, None);
    }
}
