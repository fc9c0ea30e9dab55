//! Fault injection: the ways a real model-server pod misbehaves, so routers can be tested
//! against them.
//!
//! Semantics (all times are wall-clock, not scaled by `time_scale`: faults model the pod, not
//! the engine):
//! - `error_rate` / `error_status`: each inference request independently gets `error_status`
//!   (500 or 429) with an OpenAI-shaped error body, before any byte of a normal response.
//! - `added_latency_ms`: every inference response waits this long before its first byte (the
//!   request is admitted to the engine only after the wait).
//! - `crash_after_requests = N`: the engine admits N inference requests; when request N+1
//!   arrives the engine dies like a crashed pod: its HTTP listener, every open connection (so
//!   in-flight streams are cut mid-stream), its engine and its ZMQ sockets are dropped.
//! - `crash_at_s = T`: the same crash, T seconds after start.
//! - `metrics_unavailable`: `/metrics` answers 500; `metrics_delay_ms` delays `/metrics`.
//! - `kv_drop_rate`: each KV-event batch is independently not published; its sequence number
//!   is still consumed, so subscribers see a gap. The batch stays in the replay buffer, so a
//!   subscriber that notices the gap can recover it by replay, as from a real dropped frame.
//! - `slow_start_s`: for this long after start `/health` and every API route answer 503
//!   (`/metrics` keeps answering, so a scraper can watch the start).
//! - `transfer_failure_rate`: each KV transfer a prefill engine serves (a NIXL read or an
//!   SGLang bootstrap room) independently fails after its transfer time, as a broken link
//!   would; the prefill engine keeps the blocks until its hold times out (no completion
//!   notification came), and the decode engine applies its `kv_load_failure_policy`. Transfers
//!   also fail, without any draw, when the prefill engine is gone (crashed: the side channel
//!   refuses or cuts the connection) or its blocks were already released or timed out.
//!
//! A prefill-role engine is an engine like any other to the request faults: `error_rate`,
//! `added_latency_ms` and the crashes apply to its prefill requests, and a crash also takes
//! its side channel down, so every transfer from it fails. A decode engine's crash cuts its
//! streams like any crash.
//!
//! Every draw is a pure function of (fault seed, engine index, request or batch number), so a
//! run is reproducible given the seed and the order requests arrive in.

use serde::Deserialize;

/// Faults one engine injects; the default injects none.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Fraction of inference requests answered with `error_status`, in `[0, 1]`.
    pub error_rate: f64,
    /// Status of injected errors: 500 or 429.
    pub error_status: u16,
    /// Delay before the first byte of every inference response, in milliseconds.
    pub added_latency_ms: u64,
    /// Crash when request number N+1 arrives.
    pub crash_after_requests: Option<u64>,
    /// Crash this many seconds after start.
    pub crash_at_s: Option<f64>,
    /// `/metrics` answers 500.
    pub metrics_unavailable: bool,
    /// Delay before `/metrics` answers, in milliseconds.
    pub metrics_delay_ms: u64,
    /// Fraction of KV-event batches not published, in `[0, 1]`.
    pub kv_drop_rate: f64,
    /// Seconds after start during which the engine answers 503.
    pub slow_start_s: f64,
    /// Fraction of KV transfers served by this engine that fail, in `[0, 1]`.
    pub transfer_failure_rate: f64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 500,
            added_latency_ms: 0,
            crash_after_requests: None,
            crash_at_s: None,
            metrics_unavailable: false,
            metrics_delay_ms: 0,
            kv_drop_rate: 0.0,
            slow_start_s: 0.0,
            transfer_failure_rate: 0.0,
        }
    }
}

impl FaultConfig {
    /// Checks ranges; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !unit(self.error_rate) {
            return Err(format!("error_rate {} is not in [0, 1]", self.error_rate));
        }
        if !unit(self.transfer_failure_rate) {
            return Err(format!(
                "transfer_failure_rate {} is not in [0, 1]",
                self.transfer_failure_rate
            ));
        }
        if !unit(self.kv_drop_rate) {
            return Err(format!(
                "kv_drop_rate {} is not in [0, 1]",
                self.kv_drop_rate
            ));
        }
        if !matches!(self.error_status, 429 | 500) {
            return Err(format!(
                "error_status {} is not 429 or 500",
                self.error_status
            ));
        }
        if let Some(t) = self.crash_at_s
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(format!("crash_at_s {t} is not a non-negative number"));
        }
        if !(self.slow_start_s.is_finite() && self.slow_start_s >= 0.0) {
            return Err(format!(
                "slow_start_s {} is not a non-negative number",
                self.slow_start_s
            ));
        }
        Ok(())
    }
}

/// What a draw is for; keeps the error and KV-drop streams independent.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DrawKind {
    Error = 1,
    KvDrop = 2,
    Transfer = 3,
}

/// A uniform number in `[0, 1)` determined by its inputs alone (splitmix64 over the mixed key).
pub(crate) fn uniform(seed: u64, engine: usize, kind: DrawKind, n: u64) -> f64 {
    let mut x = seed
        ^ (engine as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (kind as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ n.wrapping_mul(0x1656_67b1_9e37_79f9);
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_roughly_uniform() {
        let a: Vec<f64> = (0..1000)
            .map(|n| uniform(7, 3, DrawKind::Error, n))
            .collect();
        let b: Vec<f64> = (0..1000)
            .map(|n| uniform(7, 3, DrawKind::Error, n))
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (0.0..1.0).contains(v)));
        let below = a.iter().filter(|&&v| v < 0.25).count();
        assert!((180..320).contains(&below), "{below} of 1000 below 0.25");
        let other = uniform(7, 3, DrawKind::KvDrop, 0);
        assert_ne!(other, a[0]);
    }

    #[test]
    fn bad_ranges_are_rejected() {
        let bad = FaultConfig {
            error_status: 503,
            ..FaultConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = FaultConfig {
            error_rate: 1.5,
            ..FaultConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(FaultConfig::default().validate().is_ok());
    }
}
