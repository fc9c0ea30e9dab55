//! Capturing live traffic as a Mooncake-format trace (`--capture-trace`), so that
//! `kvgate bench --trace FILE` replays an operator's own workload through every policy.
//!
//! Each finished request becomes one line `{timestamp, input_length, output_length, hash_ids}`:
//! arrival in ms from the first captured request, the prompt tokens the engine reported (the
//! router's count when it did not), the tokens it generated, and one id per 512-token block of
//! the prompt.
//!
//! Why it is built this way:
//! - **Prefix structure without content.** A block's id is the router's own chained key at that
//!   block's end ([`kvgate_core::keys`], a hash over every token before it), replaced by a small
//!   integer in order of first appearance within the file. Two requests get the same leading ids
//!   exactly when they share those leading blocks, and the file holds no hash of content that
//!   a guess could be checked against: only the sharing structure survives. The partial last
//!   block gets an id of its own, as in Mooncake's traces.
//! - **Arrival order, written at the end.** Output length is known only when a request ends,
//!   but the trace format wants non-decreasing timestamps. Requests register their arrival when
//!   booked; the writer holds finished ones back until no earlier arrival is still in flight.
//!   The record is queued before its arrival is unregistered, so the writer never passes a
//!   record it has not yet received.
//! - **Bounded memory.** The key → id map is capped at [`MAX_CAPTURE_BLOCKS`]; past it, new
//!   blocks get fresh ids that are not remembered (their sharing is lost, not the requests),
//!   and a warning says so once.

use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::RuntimeError;
// The writer re-checks every `WRITER_POLL_MS` which held-back records can be written when
// nothing arrives (a request that ended without a record, e.g. a failure, releases the ones
// behind it).
use crate::decision_log::{RecordSender, RotatingFile, WRITER_POLL_MS, warn_write_error};
use crate::metrics::DataPlaneMetrics;

/// Tokens per `hash_id` block in Mooncake traces (what `kvgate bench --trace` reads).
pub const TRACE_BLOCK_TOKENS: u32 = 512;

/// Distinct 512-token blocks remembered per capture: 2^22 entries are ~100 MiB of map, i.e. two
/// billion distinct prompt tokens of shared-prefix structure, far more than a capture session
/// that someone replays in a simulator.
pub const MAX_CAPTURE_BLOCKS: usize = 1 << 22;

/// A request's place in arrival order: µs since the capture started, then a tie-breaker.
pub(crate) type Slot = (u64, u64);

/// What a finished request contributes to the trace.
#[derive(Debug)]
pub(crate) struct CaptureRecord {
    pub(crate) slot: Slot,
    pub(crate) input_length: u32,
    pub(crate) output_length: u32,
    /// The router's chain of prompt block keys, `block_size` tokens each.
    pub(crate) block_size: u32,
    pub(crate) keys: Vec<u64>,
}

impl PartialEq for CaptureRecord {
    fn eq(&self, o: &Self) -> bool {
        self.slot == o.slot
    }
}
impl Eq for CaptureRecord {}
impl PartialOrd for CaptureRecord {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for CaptureRecord {
    /// Reversed, so a `BinaryHeap` yields the earliest arrival first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.slot.cmp(&self.slot)
    }
}

/// One line of a Mooncake trace.
#[derive(Debug, Serialize)]
struct TraceLine {
    timestamp: u64,
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

/// Turns records into trace lines: ids for block keys, timestamps from the first record.
#[derive(Debug, Default)]
pub(crate) struct TraceEncoder {
    ids: HashMap<u64, u64>,
    next_id: u64,
    first_us: Option<u64>,
    last_ms: u64,
    warned_full: bool,
}

impl TraceEncoder {
    fn fresh(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    fn line(&mut self, r: &CaptureRecord) -> TraceLine {
        let input_length = r.input_length.max(1);
        let n = input_length.div_ceil(TRACE_BLOCK_TOKENS) as usize;
        let mut hash_ids = Vec::with_capacity(n);
        for i in 0..n {
            // The router's key whose block ends where this 512-token block ends (the chain
            // makes it stand for every token before it too).
            let end_tokens = (i as u64 + 1) * u64::from(TRACE_BLOCK_TOKENS);
            let key = (r.block_size > 0)
                .then(|| (end_tokens / u64::from(r.block_size)).checked_sub(1))
                .flatten()
                .and_then(|k| r.keys.get(k as usize));
            let id = match key {
                Some(k) => match self.ids.get(k) {
                    Some(id) => *id,
                    None if self.ids.len() < MAX_CAPTURE_BLOCKS => {
                        let id = self.fresh();
                        self.ids.insert(*k, id);
                        id
                    }
                    None => {
                        if !std::mem::replace(&mut self.warned_full, true) {
                            tracing::warn!(
                                blocks = MAX_CAPTURE_BLOCKS,
                                "captured trace: block map full; new prefixes are no longer shared in the trace"
                            );
                        }
                        self.fresh()
                    }
                },
                None => self.fresh(),
            };
            hash_ids.push(id);
        }
        let first = *self.first_us.get_or_insert(r.slot.0);
        let timestamp = (r.slot.0.saturating_sub(first) / 1000).max(self.last_ms);
        self.last_ms = timestamp;
        TraceLine {
            timestamp,
            input_length,
            output_length: r.output_length.max(1),
            hash_ids,
        }
    }
}

/// Most finished records held back behind an older request still in flight (each holds its
/// prompt's key chain: 8 bytes per 16 tokens, so at most ~64 MiB for 32k-token prompts).
const MAX_HELD_RECORDS: usize = 4_096;

/// A captured trace is rotated (`FILE.1` newest … `FILE.5` oldest) when the next line would
/// take it past this many bytes: a line is ~0.1-0.5 KB (a 32k-token prompt's 64 hash ids), so
/// a file holds millions of requests, and the capture can never fill a disk (it grew without
/// bound). Concatenated oldest first, the files are one trace (timestamps run on).
pub const CAPTURE_MAX_BYTES: u64 = 1 << 30;

/// Rotated capture files kept besides the live one: at most 6 GiB on disk.
pub const CAPTURE_FILES: u32 = 5;

/// The capture of one data plane (see the module docs).
pub(crate) struct TraceCapture {
    epoch: Instant,
    next: AtomicU64,
    open: Arc<Mutex<BTreeSet<Slot>>>,
    sender: RecordSender<CaptureRecord>,
}

impl TraceCapture {
    /// Opens `path` (appending) and starts its writer.
    pub(crate) fn start(path: &Path, metrics: Arc<DataPlaneMetrics>) -> Result<Self, RuntimeError> {
        let mut file = RotatingFile::open(
            path,
            Some(CAPTURE_MAX_BYTES),
            CAPTURE_FILES,
            "logs.capture_trace",
        )?;
        tracing::info!(path = %path.display(), "capturing traffic as a Mooncake trace");
        let open: Arc<Mutex<BTreeSet<Slot>>> = Arc::default();
        let watermark = open.clone();
        let sender = RecordSender::spawn("capture_trace", metrics, move |rx, closing| {
            let mut enc = TraceEncoder::default();
            let mut held: BinaryHeap<CaptureRecord> = BinaryHeap::new();
            let mut last_err = 0;
            let mut warned_over = false;
            loop {
                let gone = match rx.recv_timeout(Duration::from_millis(WRITER_POLL_MS)) {
                    Ok(r) => {
                        held.push(r);
                        false
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
                };
                // Closing at exit: whatever is held goes out now, in order.
                let gone = gone || closing.load(std::sync::atomic::Ordering::Acquire);
                // Read the oldest arrival still in flight first, then take what is queued:
                // every record of a request no longer in flight is queued by now.
                let oldest = watermark
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .first()
                    .copied();
                held.extend(rx.try_iter());
                let mut wrote = false;
                while let Some(r) = held.peek() {
                    // Records wait for older requests still in flight (arrival order), but not
                    // without bound: one stalled stream must not hold every later record in
                    // memory. Past the bound the oldest go out anyway; the encoder keeps the
                    // timestamps non-decreasing, so the trace stays valid.
                    let over = held.len() > MAX_HELD_RECORDS;
                    if !gone && !over && oldest.is_some_and(|o| r.slot > o) {
                        break;
                    }
                    if over && !warned_over {
                        warned_over = true;
                        tracing::warn!(
                            held = held.len(),
                            "capture: a request in flight for long holds back {MAX_HELD_RECORDS} \
                             later records; writing them ahead of it (its line will be late)"
                        );
                    }
                    let Some(r) = held.pop() else { break };
                    let line = serde_json::to_vec(&enc.line(&r)).unwrap_or_default();
                    if let Err(e) = file.write_line(&line) {
                        warn_write_error("capture_trace", &mut last_err, &e);
                    }
                    wrote = true;
                }
                if wrote && let Err(e) = file.flush() {
                    warn_write_error("capture_trace", &mut last_err, &e);
                }
                if gone {
                    return;
                }
            }
        })?;
        Ok(Self {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            open,
            sender,
        })
    }

    /// Writes what the writer holds and stops it (see [`RecordSender::close`]).
    pub(crate) fn close_writer(&self, deadline: std::time::Instant) -> bool {
        self.sender.close(deadline)
    }

    /// Registers a request that arrived at `started`.
    pub(crate) fn open(&self, started: Instant) -> Slot {
        let slot = (
            started.saturating_duration_since(self.epoch).as_micros() as u64,
            self.next.fetch_add(1, Ordering::Relaxed),
        );
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot);
        slot
    }

    /// Ends a request: queues its record (only finished requests have one), then unregisters it.
    pub(crate) fn close(&self, slot: Slot, record: Option<CaptureRecord>) {
        if let Some(r) = record {
            self.sender.send(r);
        }
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_us: u64, input: u32, keys: Vec<u64>) -> CaptureRecord {
        CaptureRecord {
            slot: (at_us, 0),
            input_length: input,
            output_length: 7,
            block_size: 128,
            keys,
        }
    }

    #[test]
    fn shared_prefixes_share_ids_and_the_partial_block_is_its_own() {
        let mut enc = TraceEncoder::default();
        // 128-token router blocks: keys 3 and 7 end the first two 512-token blocks.
        let a: Vec<u64> = (100..110).collect();
        let mut b = a.clone();
        b[7] = 999; // same first 512 tokens, different second block
        let la = enc.line(&rec(5_000, 1200, a.clone()));
        let lb = enc.line(&rec(9_000, 1100, b));
        let la2 = enc.line(&rec(12_500, 1024, a));
        assert_eq!(la.hash_ids, [0, 1, 2]);
        assert_eq!(lb.hash_ids, [0, 3, 4], "shares the first block only");
        assert_eq!(la2.hash_ids, [0, 1], "a repeat shares both full blocks");
        assert_eq!((la.timestamp, lb.timestamp, la2.timestamp), (0, 4, 7));
        assert_eq!(la.output_length, 7);
    }

    /// Review finding: records waited behind the oldest request still in flight without bound,
    /// so one stalled stream held every later record in memory. Past [`MAX_HELD_RECORDS`] they
    /// are written anyway.
    #[test]
    fn a_request_in_flight_for_long_does_not_hold_every_later_record() {
        let dir = std::env::temp_dir().join(format!("kvgate-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.jsonl");
        let _ = std::fs::remove_file(&path);
        let cap = TraceCapture::start(&path, Arc::new(DataPlaneMetrics::new())).unwrap();
        let _stalled = cap.open(Instant::now());
        let extra = 200;
        for batch in 0..(MAX_HELD_RECORDS + extra).div_ceil(1000) {
            for i in 0..1000 {
                let slot = cap.open(Instant::now());
                let n = batch * 1000 + i;
                if n >= MAX_HELD_RECORDS + extra {
                    cap.close(slot, None);
                    continue;
                }
                let r = CaptureRecord {
                    slot,
                    input_length: 600,
                    output_length: 3,
                    block_size: 16,
                    keys: vec![n as u64; 40],
                };
                cap.close(slot, Some(r));
            }
            // Let the writer drain its queue (bounded too: a full queue drops records).
            std::thread::sleep(Duration::from_millis(3 * WRITER_POLL_MS));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let lines = loop {
            let n = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count();
            if n >= extra || std::time::Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(WRITER_POLL_MS));
        };
        assert!(
            lines >= extra,
            "only {lines} lines written while one request stayed open"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
