//! Live mode: an HTTP load generator for any OpenAI-compatible URL (kvgate serve, another router,
//! a real engine, `kvgate sim`), measuring TTFT and inter-token latency from the SSE stream itself.
//!
//! Open loop: each request is sent at its workload arrival time whether or not earlier ones have
//! finished, as real users do; a closed loop would hide queueing. TTFT is the time from sending
//! the request to the first chunk carrying generated text; every later text chunk gives an
//! inter-token gap. `usage` from the final chunk (`stream_options.include_usage`) supplies the
//! prompt, cached and completion token counts. The SSE framing is parsed by hand (a dozen lines:
//! split on blank lines, take `data:` fields) rather than with an extra crate, because the
//! generator must see each event the moment its bytes arrive to time it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::des::{PolicyRun, RequestRecord};
use crate::workload::Workload;

/// Where and how to send the workload.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    /// `model` field of every request.
    pub model: String,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Label for the report row.
    pub label: String,
}

/// A failed live request (counted, not fatal to the run).
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Transport failure.
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// Non-2xx answer.
    #[error("server answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Body (truncated).
        body: String,
    },
    /// The stream ended without `[DONE]`.
    #[error("stream ended early")]
    Truncated,
}

/// Results of a live run: per-request records plus every inter-token gap seen.
#[derive(Clone, Debug, Default)]
pub struct LiveRun {
    /// Records in the same shape as discrete-event runs (times relative to the run start).
    pub run: PolicyRun,
    /// All inter-token gaps, µs.
    pub itl_us: Vec<u64>,
    /// Requests that failed, with their errors.
    pub errors: Vec<String>,
}

/// Incremental SSE parser: feed bytes, get complete `data:` payloads.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Appends `bytes` and returns the data payloads of every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = find_event_end(&self.buf) {
            let (event, sep) = end;
            let text = String::from_utf8_lossy(&self.buf[..event]).into_owned();
            self.buf.drain(..event + sep);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

struct Measured {
    first_token: Option<Instant>,
    finish: Instant,
    gaps_us: Vec<u64>,
    prompt_tokens: u32,
    cached_tokens: u32,
    output_tokens: u32,
}

async fn one(
    client: &reqwest::Client,
    cfg: &LiveConfig,
    prompt: String,
    max_tokens: u32,
) -> Result<Measured, LiveError> {
    let body = json!({
        "model": cfg.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let resp = client
        .post(format!(
            "{}/v1/completions",
            cfg.base_url.trim_end_matches('/')
        ))
        .timeout(cfg.timeout)
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(LiveError::Status {
            status: status.as_u16(),
            body: text.chars().take(300).collect(),
        });
    }
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::default();
    let mut m = Measured {
        first_token: None,
        finish: Instant::now(),
        gaps_us: Vec::new(),
        prompt_tokens: 0,
        cached_tokens: 0,
        output_tokens: 0,
    };
    let mut last: Option<Instant> = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let now = Instant::now();
        for data in parser.push(&chunk) {
            if data.trim() == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            let has_text = v["choices"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["text"].as_str().is_some_and(|t| !t.is_empty())
                        || c["delta"]["content"]
                            .as_str()
                            .is_some_and(|t| !t.is_empty())
                })
            });
            if has_text {
                if m.first_token.is_none() {
                    m.first_token = Some(now);
                } else if let Some(prev) = last {
                    m.gaps_us.push(now.duration_since(prev).as_micros() as u64);
                }
                last = Some(now);
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                m.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as u32;
                m.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as u32;
                m.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as u32;
            }
        }
        m.finish = now;
    }
    if !done {
        return Err(LiveError::Truncated);
    }
    Ok(m)
}

/// The HTTP client of live mode. It never follows a redirect (the target may be an engine,
/// and an engine's redirect is not a place to send prompts) and ignores proxy variables, so
/// what is measured is the target itself.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("reqwest client builds")
}

/// The first model `base_url`'s `/v1/models` lists (what live mode sends when no model is
/// given), or why there is none.
pub async fn served_model(base_url: &str) -> Result<String, String> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let resp = client()
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("it answered {status}"));
    }
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    v["data"]
        .as_array()
        .and_then(|models| models.iter().find_map(|m| m["id"].as_str()))
        .map(str::to_owned)
        .ok_or_else(|| "its list is empty".to_string())
}

/// Sends `workload` to `cfg.base_url` by its arrival times and measures every stream.
pub async fn run_live(workload: &Workload, cfg: &LiveConfig) -> LiveRun {
    let client = client();
    let start = Instant::now();
    let tasks: Vec<_> = workload
        .requests
        .iter()
        .map(|r| {
            let client = client.clone();
            let cfg = cfg.clone();
            let prompt = r.text();
            let (arrival_us, max_tokens) = (r.arrival_us, r.output_tokens);
            tokio::spawn(async move {
                tokio::time::sleep_until((start + Duration::from_micros(arrival_us)).into()).await;
                let sent = Instant::now();
                let res = one(&client, &cfg, prompt, max_tokens).await;
                (sent, res)
            })
        })
        .collect();
    let mut out = LiveRun::default();
    out.run.policy = cfg.label.clone();
    let rel = |t: Instant| t.duration_since(start).as_micros() as u64;
    for (i, t) in tasks.into_iter().enumerate() {
        let mut rec = RequestRecord {
            arrival_us: workload.requests[i].arrival_us,
            prompt_tokens: workload.requests[i].prompt_tokens(),
            engine: u32::MAX,
            ..Default::default()
        };
        match t.await {
            Ok((sent, Ok(m))) => {
                // Measure from the actual send time so scheduler lag is not billed to the server.
                rec.arrival_us = rel(sent);
                rec.first_token_us = m.first_token.map_or(rel(m.finish), rel);
                rec.finish_us = rel(m.finish).max(rec.first_token_us);
                rec.cached_tokens = m.cached_tokens;
                rec.output_tokens = m.output_tokens;
                if m.prompt_tokens > 0 {
                    rec.prompt_tokens = m.prompt_tokens;
                }
                out.run.makespan_us = out.run.makespan_us.max(rec.finish_us);
                rec.max_itl_us = m.gaps_us.iter().copied().max().unwrap_or(0);
                out.itl_us.extend(m.gaps_us);
            }
            Ok((_, Err(e))) => {
                rec.rejected = true;
                out.errors.push(e.to_string());
            }
            Err(e) => {
                rec.rejected = true;
                out.errors.push(format!("task failed: {e}"));
            }
        }
        out.run.requests.push(rec);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_and_joined_events() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\":").is_empty());
        assert_eq!(p.push(b"1}\n\ndata: [DONE]\n\n"), ["{\"a\":1}", "[DONE]"]);
        assert_eq!(p.push(b": comment\n\ndata:x\r\n\r\n"), ["x"]);
    }
}
