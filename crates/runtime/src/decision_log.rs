//! Per-request records written when a booking ends: route receipts (`--decision-log`), the
//! captured trace ([`crate::capture`], `--capture-trace`) and the access log (`--access-log`).
//!
//! Why it is built this way:
//! - **Written where the outcome is known.** A [`crate::booking::Booking`] is the one place that
//!   learns a request's decision, its moves and how it ended, for both data planes; it hands a
//!   [`Recording`] its facts once, when it ends (finished, failed or dropped).
//! - **Never on the request path.** Records go through a bounded channel to a writer thread that
//!   owns the file; serialising and writing happen there. When the writer falls behind, a
//!   record is dropped and counted (`kvgate_gateway_request_records_dropped_total{log}`), with
//!   a rate-limited warning, instead of making a request wait for a disk.
//! - **No prompt text.** A receipt carries lengths, block counts and the router's view of each
//!   candidate, never content; the policy's explanation comes from the core
//!   ([`kvgate_core::CandidateReport`]), asked for only when a decision log is on.
//! - **Bounded on disk.** The decision log rotates at a size bound (`FILE.1` … `FILE.N`) and
//!   says so in the log each time the bound trips.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{SystemTime, UNIX_EPOCH};

use kvgate_core::request::{CandidateReport, Decision, RoutingRequest};
use serde::Serialize;
use tokio::time::Instant;

use crate::RuntimeError;
use crate::capture::{CaptureRecord, TraceCapture};
use crate::config::RequestLogConfig;
use crate::control::Control;
use crate::meter::Measured;
use crate::metrics::{DataPlaneMetrics, RecordLabels};

/// Records a writer may have queued before new ones are dropped. 4,096 receipts are a few MiB
/// and several seconds of a busy gateway's traffic: enough to ride out a slow disk flush, small
/// enough that a stuck disk costs bounded memory.
pub const RECORD_CHANNEL_CAPACITY: usize = 4_096;

/// At most one "records dropped" warning per this many ms per log, so a stuck disk does not
/// flood the log it may share.
pub const DROP_WARN_INTERVAL_MS: u64 = 10_000;

/// Target of the access log lines.
pub const ACCESS_LOG_TARGET: &str = "kvgate::access";

/// The sending side of one record file: a bounded channel to its writer thread.
pub(crate) struct RecordSender<T> {
    tx: SyncSender<T>,
    log: &'static str,
    metrics: Arc<DataPlaneMetrics>,
    last_warn_ms: AtomicU64,
    /// Set by [`RecordSender::close`]: the writer writes what it has and ends.
    closing: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How often a writer waiting for records looks at its closing flag.
pub(crate) const WRITER_POLL_MS: u64 = 200;

impl<T: Send + 'static> RecordSender<T> {
    /// Starts the writer thread `name` running `write` over the records sent; it ends when the
    /// sender is dropped, or writes what it has and ends once the flag it is given is set
    /// ([`RecordSender::close`]).
    pub(crate) fn spawn(
        log: &'static str,
        metrics: Arc<DataPlaneMetrics>,
        write: impl FnOnce(Receiver<T>, Arc<AtomicBool>) + Send + 'static,
    ) -> Result<Self, RuntimeError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(RECORD_CHANNEL_CAPACITY);
        let closing = Arc::new(AtomicBool::new(false));
        let flag = closing.clone();
        let writer = std::thread::Builder::new()
            .name(format!("kvgate-{log}"))
            .spawn(move || write(rx, flag))
            .map_err(|e| RuntimeError::InvalidConfig {
                field: log,
                reason: format!("cannot start its writer thread: {e}"),
            })?;
        metrics
            .records_dropped
            .get_or_create(&RecordLabels { log })
            .get();
        Ok(Self {
            tx,
            log,
            metrics,
            last_warn_ms: AtomicU64::new(0),
            closing,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Tells the writer to write what it holds and end, and waits for it until `deadline`
    /// (blocking: call it off the async threads). Returns whether it ended in time.
    pub(crate) fn close(&self, deadline: std::time::Instant) -> bool {
        self.closing.store(true, Ordering::Release);
        let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return true;
        };
        while !writer.is_finished() {
            if std::time::Instant::now() >= deadline {
                tracing::warn!(log = self.log, "records still unwritten at exit");
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = writer.join();
        true
    }

    /// Queues `record` without waiting; a full queue drops it (counted, warned rate-limited).
    pub(crate) fn send(&self, record: T) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let dropped = self
                    .metrics
                    .records_dropped
                    .get_or_create(&RecordLabels { log: self.log })
                    .inc()
                    + 1;
                let now = unix_ms(SystemTime::now());
                let last = self.last_warn_ms.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= DROP_WARN_INTERVAL_MS
                    && self
                        .last_warn_ms
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        log = self.log,
                        dropped_total = dropped,
                        "request records dropped: the writer is behind (slow disk?); requests are unaffected"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A line-oriented file rotated at a size bound: `path` is live, `path.1` the newest rotated
/// file, `path.{keep}` the oldest kept.
pub(crate) struct RotatingFile {
    path: PathBuf,
    max_bytes: Option<u64>,
    keep: u32,
    out: BufWriter<File>,
    size: u64,
}

impl RotatingFile {
    /// Opens (appending to) `path`; `max_bytes: None` never rotates.
    pub(crate) fn open(
        path: &Path,
        max_bytes: Option<u64>,
        keep: u32,
        field: &'static str,
    ) -> Result<Self, RuntimeError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| RuntimeError::InvalidConfig {
                field,
                reason: format!("cannot open {}: {e}", path.display()),
            })?;
        let size = file.metadata().map_or(0, |m| m.len());
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            keep,
            out: BufWriter::new(file),
            size,
        })
    }

    fn rotated(&self, i: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        for i in (1..self.keep).rev() {
            let from = self.rotated(i);
            if from.exists() {
                std::fs::rename(&from, self.rotated(i + 1))?;
            }
        }
        if self.keep > 0 {
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.out = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }

    /// Appends one line (`line` without its newline), rotating first if it would pass the bound.
    pub(crate) fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if let Some(max) = self.max_bytes
            && self.size > 0
            && self.size + len > max
        {
            self.rotate()?;
            tracing::info!(
                path = %self.path.display(),
                max_bytes = max,
                kept_files = self.keep,
                "decision log reached its size bound; rotated"
            );
        }
        self.out.write_all(line)?;
        self.out.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    /// Flushes buffered lines to the file.
    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Logs a write error at most once per [`DROP_WARN_INTERVAL_MS`].
pub(crate) fn warn_write_error(log: &str, last_ms: &mut u64, e: &std::io::Error) {
    let now = unix_ms(SystemTime::now());
    if now.saturating_sub(*last_ms) >= DROP_WARN_INTERVAL_MS {
        *last_ms = now;
        tracing::warn!(log, error = %e, "cannot write request records");
    }
}

/// One candidate in a receipt.
#[derive(Debug, Serialize)]
struct CandidateLine {
    endpoint: Option<String>,
    matched_blocks: u32,
    /// `precise` (KV events) or `approximate` (the router's own bookings).
    source: &'static str,
    waiting: u32,
    running: u32,
    queued_prefill_tokens: u64,
    kv_usage: f64,
    metrics_age_ms: Option<f64>,
    kv_event_age_ms: Option<f64>,
    predicted_ttft_ms: f64,
    cost_ms: f64,
    /// The policy's score; absent when a filter dropped the candidate.
    score: Option<f64>,
}

/// How a request ended, in a receipt.
#[derive(Debug, Serialize)]
struct OutcomeLine {
    /// `ok`, a failure kind (`connect`, `status_5xx`, …) or `cancelled`.
    result: &'static str,
    status: Option<u16>,
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    output_tokens: Option<u32>,
    engine_prompt_tokens: Option<u32>,
    cached_tokens: Option<u32>,
    duration_ms: f64,
}

/// One route receipt (a line of the decision log).
#[derive(Debug, Serialize)]
struct DecisionRecord {
    /// Arrival, Unix ms.
    ts_ms: u64,
    request_id: Option<String>,
    model: String,
    lora: Option<String>,
    prompt_tokens: u32,
    /// Tokens per prefix block; `precise_keys`: the blocks are over the engines' token ids.
    block_size: u32,
    precise_keys: bool,
    policy: String,
    candidates: Vec<CandidateLine>,
    chosen: Option<String>,
    reason: &'static str,
    matched_blocks: u32,
    predicted_ttft_ms: Option<f64>,
    /// Every endpoint the request was booked on, first the chosen one.
    attempts: Vec<String>,
    outcome: OutcomeLine,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A duration in ms at µs resolution (no float noise in the receipt).
fn ms_of(d: std::time::Duration) -> f64 {
    ms(d.as_micros() as u64)
}

/// What the data plane knows of a request beyond its routing request, for the access log and
/// receipts.
#[derive(Clone, Debug, Default)]
pub struct RequestInfo {
    /// HTTP method (`POST`).
    pub method: String,
    /// Request path (`/v1/chat/completions`).
    pub path: String,
    /// The client's or proxy's `x-request-id`, if any.
    pub request_id: Option<String>,
}

/// How a booking ended.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ending<'a> {
    /// The response ended normally.
    Finished(&'a Measured),
    /// The last attempt failed (`label` as in `upstream_errors{kind}`).
    Failed(&'static str),
    /// Dropped without an ending: the client went away.
    Cancelled,
}

/// The per-request record files of one data plane (see the module docs).
pub struct Recorder {
    decisions: Option<RecordSender<DecisionRecord>>,
    capture: Option<TraceCapture>,
    access_log: bool,
    policy: Arc<str>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("decisions", &self.decisions.is_some())
            .field("capture", &self.capture.is_some())
            .field("access_log", &self.access_log)
            .finish()
    }
}

impl Recorder {
    /// Whether the access log is on.
    pub fn access_log(&self) -> bool {
        self.access_log
    }

    /// Opens the configured record files and starts their writers; `None` when every record is
    /// off. `policy` names the routing policy in receipts (fixed for the process).
    pub fn start(
        cfg: &RequestLogConfig,
        policy: &str,
        metrics: &Arc<DataPlaneMetrics>,
    ) -> Result<Option<Arc<Self>>, RuntimeError> {
        if cfg.decision_log.is_none() && cfg.capture_trace.is_none() && !cfg.access_log {
            return Ok(None);
        }
        let decisions = match &cfg.decision_log {
            None => None,
            Some(path) => {
                let mut file = RotatingFile::open(
                    path,
                    Some(cfg.decision_log_max_bytes),
                    cfg.decision_log_files,
                    "logs.decision_log",
                )?;
                tracing::info!(path = %path.display(), max_bytes = cfg.decision_log_max_bytes, files = cfg.decision_log_files, "writing a route receipt per request");
                Some(RecordSender::spawn(
                    "decision_log",
                    metrics.clone(),
                    move |rx: Receiver<DecisionRecord>, closing: Arc<AtomicBool>| {
                        let mut last_err = 0;
                        loop {
                            let poll = std::time::Duration::from_millis(WRITER_POLL_MS);
                            let first = match rx.recv_timeout(poll) {
                                Ok(r) => Some(r),
                                Err(RecvTimeoutError::Timeout) => None,
                                Err(RecvTimeoutError::Disconnected) => return,
                            };
                            let closed = closing.load(Ordering::Acquire);
                            let mut wrote = false;
                            for r in first.into_iter().chain(rx.try_iter()) {
                                let line = serde_json::to_vec(&r).unwrap_or_default();
                                if let Err(e) = file.write_line(&line) {
                                    warn_write_error("decision_log", &mut last_err, &e);
                                }
                                wrote = true;
                            }
                            if wrote && let Err(e) = file.flush() {
                                warn_write_error("decision_log", &mut last_err, &e);
                            }
                            if closed {
                                return;
                            }
                        }
                    },
                )?)
            }
        };
        let capture = match &cfg.capture_trace {
            None => None,
            Some(path) => Some(TraceCapture::start(path, metrics.clone())?),
        };
        Ok(Some(Arc::new(Self {
            decisions,
            capture,
            access_log: cfg.access_log,
            policy: Arc::from(policy),
        })))
    }

    /// Writes every record still queued or held and stops the writers (at shutdown, after the
    /// drain: requests still in flight then are not recorded). Waits up to `within`.
    pub async fn close(self: &Arc<Self>, within: std::time::Duration) {
        let this = Arc::clone(self);
        let deadline = std::time::Instant::now() + within;
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(d) = &this.decisions {
                d.close(deadline);
            }
            if let Some(c) = &this.capture {
                c.close_writer(deadline);
            }
        })
        .await;
    }

    /// Prepares a routing request before the pick: receipts need the pick explained.
    pub fn prepare(&self, req: &mut RoutingRequest) {
        req.explain |= self.decisions.is_some();
    }

    /// Starts recording a request that arrived at `started` (when the data plane had it).
    pub(crate) fn open(self: &Arc<Self>, info: RequestInfo, started: Instant) -> Recording {
        let arrival = SystemTime::now()
            .checked_sub(started.elapsed())
            .unwrap_or_else(SystemTime::now);
        Recording {
            recorder: self.clone(),
            info,
            arrival_unix_ms: unix_ms(arrival),
            capture_slot: self.capture.as_ref().map(|c| c.open(started)),
            first_token_at: None,
            status: None,
            attempts: Vec::new(),
        }
    }
}

/// One request being recorded; held by its booking until it ends.
#[derive(Debug)]
pub(crate) struct Recording {
    recorder: Arc<Recorder>,
    info: RequestInfo,
    arrival_unix_ms: u64,
    capture_slot: Option<crate::capture::Slot>,
    /// When the first token arrived.
    pub(crate) first_token_at: Option<Instant>,
    /// The HTTP status the engine answered with, when the data plane saw it.
    pub(crate) status: Option<u16>,
    /// Every endpoint the request was booked on, the chosen one first.
    pub(crate) attempts: Vec<Arc<str>>,
}

/// What a booking knows when it ends.
pub(crate) struct Ended<'a> {
    pub(crate) control: &'a Control,
    pub(crate) req: &'a mut RoutingRequest,
    pub(crate) decision: &'a Decision,
    pub(crate) started: Instant,
    pub(crate) ending: Ending<'a>,
}

impl Recording {
    /// Writes the request's records: called once, when its booking ends.
    pub(crate) fn end(self, e: Ended<'_>) {
        let rec = &self.recorder;
        let now = Instant::now();
        let duration_ms = ms_of(now.duration_since(e.started));
        let ttft_ms = self
            .first_token_at
            .map(|t| ms_of(t.duration_since(e.started)));
        let (result, measured) = match e.ending {
            Ending::Finished(m) => ("ok", Some(m)),
            Ending::Failed(label) => (label, None),
            Ending::Cancelled => ("cancelled", None),
        };
        let outcome = measured.map(|m| m.outcome);
        let served_by = self.attempts.last().cloned();
        if rec.access_log {
            tracing::info!(
                target: ACCESS_LOG_TARGET,
                method = %self.info.method,
                path = %self.info.path,
                status = self.status,
                result,
                routed = true,
                model = %e.req.model,
                endpoint = served_by.as_deref().unwrap_or(""),
                attempts = self.attempts.len(),
                duration_ms,
                ttft_ms,
                prompt_tokens = e.req.prompt_tokens,
                output_tokens = outcome.map(|o| o.output_tokens),
                request_id = self.info.request_id.as_deref(),
                "request"
            );
        }
        if let Some(capture) = &rec.capture
            && let Some(slot) = self.capture_slot
        {
            let record = outcome.map(|o| CaptureRecord {
                slot,
                input_length: o.prompt_tokens.unwrap_or(e.req.prompt_tokens),
                output_length: o.output_tokens,
                block_size: e.req.keys.block_size,
                keys: std::mem::take(&mut e.req.keys.keys),
            });
            capture.close(slot, record);
        }
        if let Some(decisions) = &rec.decisions {
            let d = e.decision;
            let candidates = d
                .candidates
                .iter()
                .map(|c: &CandidateReport| CandidateLine {
                    endpoint: e.control.address_of(c.endpoint).map(|a| a.to_string()),
                    matched_blocks: c.matched_blocks,
                    source: c.index_mode.as_str(),
                    waiting: c.waiting,
                    running: c.running,
                    queued_prefill_tokens: c.queued_prefill_tokens,
                    kv_usage: c.kv_usage,
                    metrics_age_ms: c.sample_age_us.map(ms),
                    kv_event_age_ms: c.kv_event_age_us.map(ms),
                    predicted_ttft_ms: ms(c.predicted_ttft_us),
                    cost_ms: (c.cost_us.round()) / 1000.0,
                    score: c.score,
                })
                .collect();
            decisions.send(DecisionRecord {
                ts_ms: self.arrival_unix_ms,
                request_id: self.info.request_id.clone(),
                model: e.req.model.clone(),
                lora: e.req.lora.clone(),
                prompt_tokens: e.req.prompt_tokens,
                block_size: e.req.keys.block_size,
                precise_keys: e.req.keys.precise,
                policy: rec.policy.to_string(),
                candidates,
                chosen: self.attempts.first().map(|a| a.to_string()),
                reason: d.reason.as_str(),
                matched_blocks: d.matched_blocks,
                predicted_ttft_ms: d.predicted_ttft_us.map(ms),
                attempts: self.attempts.iter().map(|a| a.to_string()).collect(),
                outcome: OutcomeLine {
                    result,
                    status: self.status,
                    ttft_ms,
                    tpot_ms: outcome.and_then(|o| o.tpot_us).map(ms),
                    output_tokens: outcome.map(|o| o.output_tokens),
                    engine_prompt_tokens: outcome.and_then(|o| o.prompt_tokens),
                    cached_tokens: outcome.and_then(|o| o.cached_tokens),
                    duration_ms,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvgate-dl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("decisions.jsonl")
    }

    #[test]
    fn a_rotating_file_keeps_n_files_under_its_bound() {
        let path = temp("rotate");
        let mut f = RotatingFile::open(&path, Some(100), 2, "t").unwrap();
        let line = [b'x'; 39]; // 40 bytes with the newline: two fit under 100
        for _ in 0..9 {
            f.write_line(&line).unwrap();
        }
        f.flush().unwrap();
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
        assert_eq!(len(&path), Some(40), "the 9th line opened a fresh file");
        assert_eq!(len(&f.rotated(1)), Some(80));
        assert_eq!(len(&f.rotated(2)), Some(80));
        assert_eq!(len(&f.rotated(3)), None, "only two rotated files are kept");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_full_writer_drops_and_counts_instead_of_blocking() {
        let metrics = Arc::new(DataPlaneMetrics::new());
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let sender = RecordSender::spawn(
            "decision_log",
            metrics.clone(),
            move |rx: Receiver<u32>, _| {
                // A writer stuck on its disk until the test lets it go.
                let _ = hold_rx.recv();
                drop(rx);
            },
        )
        .unwrap();
        let extra = 25;
        for i in 0..(RECORD_CHANNEL_CAPACITY + extra) as u32 {
            sender.send(i);
        }
        let dropped = metrics
            .records_dropped
            .get_or_create(&RecordLabels {
                log: "decision_log",
            })
            .get();
        assert_eq!(dropped, extra as u64);
        assert!(
            metrics
                .encode()
                .contains("kvgate_gateway_request_records_dropped_total{log=\"decision_log\"} 25")
        );
        hold_tx.send(()).unwrap();
    }
}
