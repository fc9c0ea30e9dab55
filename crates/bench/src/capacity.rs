//! Capacity at SLO: per policy, the highest arrival rate at which the fleet still meets a
//! service-level objective — the figure fleets are sized by.
//!
//! The rate is a speed-up of a trace's arrival times, or the arrival rate of a synthetic
//! workload; the caller supplies the workload for a rate. The search is a bracket then a
//! bisection, in log space (capacities differ by factors, not by constants):
//! 1. probe the start rate; while it meets the SLO double it, while it misses halve it (at most
//!    [`CapacityOptions::max_bracket_steps`] times), which brackets the boundary;
//! 2. bisect the bracket at its geometric mean until `hi / lo ≤ 1 + tolerance` or
//!    [`CapacityOptions::max_bisections`] probes; the capacity is the highest rate that met.
//!
//! Every probe is one deterministic discrete-event run, so a seed gives the same capacity bit
//! for bit. Meeting the SLO is not guaranteed to be monotone in the rate (a policy can get
//! lucky at one rate); the search reports the boundary it found and every probe it made, so a
//! non-monotone curve is visible in the JSON and the chart.
//!
//! The SLO ([`CapacitySlo`]): TTFT p90 ≤ `ttft_p90_ms`, TPOT p99 ≤ `tpot_p99_ms`, and goodput —
//! requests served ÷ requests any engine of the fleet could serve — ≥ `min_goodput`. Requests
//! that no engine can serve (longer than `max_model_len`) are rejected, counted and left out
//! of the denominator: no routing could have served them at any rate.

use serde::Serialize;

use crate::BenchError;
use crate::ceiling::WorkCeiling;
use crate::des::{Arm, DesConfig, PolicyRun, run_arm};
use crate::report::{Goodput, Herding, PdCurve, PdFigures, PdPoint, PolicyReport, RateCurve, Slo};
use crate::stats::Summary;
use crate::workload::Workload;

/// What "meets the SLO" means for a capacity search.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CapacitySlo {
    /// Bound on the 90th percentile of time to first token, ms. 2,000: interactive chat.
    pub ttft_p90_ms: f64,
    /// Bound on the 99th percentile of time per output token, ms. 100: 10 tokens/s, reading
    /// speed.
    pub tpot_p99_ms: f64,
    /// Least fraction of servable requests that must be served. 0.99.
    pub min_goodput: f64,
}

impl Default for CapacitySlo {
    fn default() -> Self {
        Self {
            ttft_p90_ms: 2_000.0,
            tpot_p99_ms: 100.0,
            min_goodput: 0.99,
        }
    }
}

/// Search settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CapacityOptions {
    /// First rate probed.
    pub start_rate: f64,
    /// Doublings or halvings allowed while bracketing. 8: a factor of 256 either way.
    pub max_bracket_steps: u32,
    /// Bisection probes after bracketing. 6: the bracket shrinks from 2× to ≈ 1.011×.
    pub max_bisections: u32,
    /// Stop when `hi / lo ≤ 1 + tolerance`. 0.02: finer than run-to-run differences matter.
    pub tolerance: f64,
}

impl Default for CapacityOptions {
    fn default() -> Self {
        Self {
            start_rate: 1.0,
            max_bracket_steps: 8,
            max_bisections: 6,
            tolerance: 0.02,
        }
    }
}

/// One probe of the search.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Probe {
    /// Rate probed (speed-up or requests/s of the generator).
    pub rate: f64,
    /// Requests per second actually offered (requests ÷ arrival span).
    pub offered_rps: f64,
    /// TTFT p90, ms.
    pub ttft_p90_ms: f64,
    /// TPOT p99, ms.
    pub tpot_p99_ms: f64,
    /// Served ÷ servable requests.
    pub goodput: f64,
    /// Whether the SLO was met.
    pub meets: bool,
    /// Fraction of requests split, on a prefill/decode fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_fraction: Option<f64>,
    /// p99 over requests of the longest gap between two output tokens, ms, on a prefill/decode
    /// comparison (the stall an aggregated prefill causes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_p99_ms: Option<f64>,
}

/// One policy's capacity.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PolicyCapacity {
    /// Policy name.
    pub policy: String,
    /// Highest trace speed-up meeting the SLO (`None` for synthetic workloads, or if none did).
    pub capacity_speedup: Option<f64>,
    /// Highest synthetic-generator rate meeting the SLO (`None` for traces).
    pub capacity_rate: Option<f64>,
    /// Requests per second offered at capacity (0 if no rate met the SLO).
    pub capacity_rps: f64,
    /// TTFT at capacity, ms.
    pub ttft_ms: Summary,
    /// TPOT at capacity, ms.
    pub tpot_ms: Summary,
    /// Each request's longest gap between two output tokens at capacity, ms.
    pub max_itl_ms: Summary,
    /// Goodput (report definition: both per-request SLOs met) at capacity.
    pub goodput: Goodput,
    /// Prefix-cache hit ratio at capacity.
    pub hit_ratio: f64,
    /// Herding at capacity.
    pub herding: Herding,
    /// Requests rejected at capacity (router or invalid).
    pub rejected: usize,
    /// Of those, invalid for every engine (longer than `max_model_len`).
    pub invalid: usize,
    /// TTFT prediction error after warm-up at capacity (see [`crate::report::ttft_mape`]);
    /// `None` for policies that do not predict or if no rate met the SLO.
    pub ttft_mape: Option<f64>,
    /// The least TTFT prediction error any router could have had at capacity (see
    /// [`crate::report::ttft_mape_floor`]).
    pub ttft_mape_floor: Option<f64>,
    /// Every probe, in the order made.
    pub probes: Vec<Probe>,
    /// Prefill/decode figures at capacity, on a prefill/decode fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pd: Option<PdFigures>,
}

/// The whole capacity comparison.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CapacityReport {
    /// Workload description (at the start rate).
    pub workload: String,
    /// `speedup` (trace) or `rate` (synthetic).
    pub rate_kind: String,
    /// Endpoints.
    pub engines: usize,
    /// Router replicas.
    pub router_replicas: usize,
    /// Signal settings of the fleet.
    pub signals: Signals,
    /// The SLO searched for.
    pub slo: CapacitySlo,
    /// Search settings.
    pub options: Option<CapacityOptions>,
    /// One entry per policy, in the order given.
    pub policies: Vec<PolicyCapacity>,
    /// The most any router could sustain on this workload and fleet
    /// ([`crate::ceiling`]); `None` on a prefill/decode fleet, or when not computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<WorkCeiling>,
}

/// Signal settings of a run, for the record.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Signals {
    /// Metrics sampling interval range, ms.
    pub scrape_interval_ms: [u64; 2],
    /// Metrics delay range, ms.
    pub metrics_delay_ms: [u64; 2],
    /// KV-event delay range, ms.
    pub kv_event_delay_ms: [u64; 2],
    /// How requests are spread over replicas.
    pub replica_spread: crate::des::ReplicaSpread,
}

impl Signals {
    /// The signal settings of `cfg`.
    pub fn of(cfg: &DesConfig) -> Self {
        Self {
            scrape_interval_ms: [
                cfg.scrape_interval_ms,
                cfg.scrape_interval_max_ms.max(cfg.scrape_interval_ms),
            ],
            metrics_delay_ms: [
                cfg.metrics_delay_ms,
                cfg.metrics_delay_max_ms.max(cfg.metrics_delay_ms),
            ],
            kv_event_delay_ms: [
                cfg.kv_event_delay_ms,
                cfg.kv_event_delay_max_ms.max(cfg.kv_event_delay_ms),
            ],
            replica_spread: cfg.replica_spread,
        }
    }
}

/// Requests per second offered by `w` (requests ÷ arrival span).
pub fn offered_rps(w: &Workload) -> f64 {
    let span_s = arrival_span_us(w) as f64 / 1e6;
    if span_s > 0.0 {
        w.requests.len() as f64 / span_s
    } else {
        0.0
    }
}

/// From the first arrival of `w` to its last, µs.
pub fn arrival_span_us(w: &Workload) -> u64 {
    let first = w.requests.first().map_or(0, |r| r.arrival_us);
    let last = w.requests.last().map_or(0, |r| r.arrival_us);
    last.saturating_sub(first)
}

/// Served ÷ servable requests of a run.
pub fn served_fraction(run: &PolicyRun) -> f64 {
    let servable = run.requests.iter().filter(|r| !r.invalid).count();
    let served = run.requests.iter().filter(|r| r.finish_us > 0).count();
    if servable == 0 {
        1.0
    } else {
        served as f64 / servable as f64
    }
}

/// Rows that are kvgate's own, left out of "the best baseline".
const KVGATE_ROWS: [&str; 3] = ["kvgate", "oracle", "pd-cost"];

/// Everything a search needs besides the policy and the workload generator.
#[derive(Clone, Copy, Debug)]
pub struct CapacitySearch<'a> {
    /// Fleet and signals.
    pub cfg: &'a DesConfig,
    /// The SLO searched for.
    pub slo: CapacitySlo,
    /// The per-request SLO the reports' goodput uses.
    pub report_slo: Slo,
    /// Search settings.
    pub opts: CapacityOptions,
    /// Whether rates are trace speed-ups (else generator rates).
    pub is_trace: bool,
}

struct Outcome {
    probe: Probe,
    report: PolicyReport,
}

fn probe(
    arm: Arm,
    rate: f64,
    make: &(dyn Fn(f64) -> Workload + Sync),
    search: &CapacitySearch<'_>,
) -> Result<Outcome, BenchError> {
    let slo = search.slo;
    let w = make(rate);
    if w.requests.is_empty() {
        return Err(BenchError::EmptyWorkload);
    }
    let run = run_arm(&w, arm, search.cfg, None)?;
    let report = PolicyReport::from_run(&run, search.report_slo);
    let goodput = served_fraction(&run);
    let meets = report.ttft_ms.p90 <= slo.ttft_p90_ms
        && report.tpot_ms.p99 <= slo.tpot_p99_ms
        && goodput >= slo.min_goodput;
    Ok(Outcome {
        probe: Probe {
            rate,
            offered_rps: offered_rps(&w),
            ttft_p90_ms: report.ttft_ms.p90,
            tpot_p99_ms: report.tpot_ms.p99,
            goodput,
            meets,
            split_fraction: report.pd.as_ref().map(|f| f.split_fraction),
            stall_p99_ms: matches!(arm, Arm::Aggregated | Arm::Pd(_))
                .then_some(report.max_itl_ms.p99),
        },
        report,
    })
}

/// Finds one policy's (or P/D arm's) capacity (see module docs).
pub fn find_capacity(
    arm: impl Into<Arm>,
    make: &(dyn Fn(f64) -> Workload + Sync),
    search: &CapacitySearch<'_>,
) -> Result<PolicyCapacity, BenchError> {
    let arm = arm.into();
    let opts = search.opts;
    if !(opts.start_rate.is_finite() && opts.start_rate > 0.0) {
        return Err(BenchError::InvalidArgument(
            "capacity start rate must be positive",
        ));
    }
    let mut probes = Vec::new();
    let mut best: Option<Outcome> = None;
    let mut run = |rate: f64, probes: &mut Vec<Probe>| -> Result<bool, BenchError> {
        let o = probe(arm, rate, make, search)?;
        probes.push(o.probe);
        let meets = o.probe.meets;
        if meets && best.as_ref().is_none_or(|b| b.probe.rate < rate) {
            best = Some(o);
        }
        Ok(meets)
    };
    let mut rate = opts.start_rate;
    let first = run(rate, &mut probes)?;
    let (mut lo, mut hi) = (None, None);
    if first {
        lo = Some(rate);
    } else {
        hi = Some(rate);
    }
    for _ in 0..opts.max_bracket_steps {
        if lo.is_some() && hi.is_some() {
            break;
        }
        rate = if first { rate * 2.0 } else { rate / 2.0 };
        if run(rate, &mut probes)? {
            lo = Some(rate);
        } else {
            hi = Some(rate);
        }
    }
    if let (Some(mut l), Some(mut h)) = (lo, hi) {
        for _ in 0..opts.max_bisections {
            if h / l <= 1.0 + opts.tolerance {
                break;
            }
            let mid = (l * h).sqrt();
            if run(mid, &mut probes)? {
                l = mid;
            } else {
                h = mid;
            }
        }
    }
    let mut out = PolicyCapacity {
        policy: arm.name(),
        probes,
        ..Default::default()
    };
    if let Some(b) = best {
        if search.is_trace {
            out.capacity_speedup = Some(b.probe.rate);
        } else {
            out.capacity_rate = Some(b.probe.rate);
        }
        out.capacity_rps = b.probe.offered_rps;
        out.ttft_ms = b.report.ttft_ms;
        out.tpot_ms = b.report.tpot_ms;
        out.max_itl_ms = b.report.max_itl_ms;
        out.goodput = b.report.goodput;
        out.hit_ratio = b.report.hit_ratio;
        out.herding = b.report.herding;
        out.rejected = b.report.rejected;
        out.invalid = b.report.invalid;
        out.ttft_mape = b.report.ttft_mape;
        out.ttft_mape_floor = b.report.ttft_mape_floor;
        out.pd = b.report.pd;
    }
    Ok(out)
}

/// Finds every arm's capacity, arms in parallel over the machine's cores (each search is
/// sequential and deterministic, so the result does not depend on the thread count).
pub fn compare_capacity(
    arms: &[Arm],
    make: &(dyn Fn(f64) -> Workload + Sync),
    search: &CapacitySearch<'_>,
    on_done: &(dyn Fn(&PolicyCapacity) + Sync),
) -> Result<Vec<PolicyCapacity>, BenchError> {
    crate::par_map(arms, |&arm| {
        let r = find_capacity(arm, make, search);
        if let Ok(c) = &r {
            on_done(c);
        }
        r
    })
    .into_iter()
    .collect()
}

impl CapacityReport {
    /// The TTFT-p90-against-rate curves of every policy's probes.
    pub fn curves(&self) -> Vec<RateCurve> {
        self.policies
            .iter()
            .map(|p| RateCurve {
                policy: p.policy.clone(),
                points: p.probes.iter().map(|q| (q.rate, q.ttft_p90_ms)).collect(),
            })
            .collect()
    }

    /// Each arm's probes as P/D chart curves (TTFT p90, TPOT p99 and split fraction per rate).
    pub fn pd_curves(&self) -> Vec<PdCurve> {
        self.policies
            .iter()
            .map(|p| PdCurve {
                policy: p.policy.clone(),
                points: p
                    .probes
                    .iter()
                    .map(|q| PdPoint {
                        rate: q.rate,
                        ttft_p90_ms: q.ttft_p90_ms,
                        tpot_p99_ms: q.tpot_p99_ms,
                        stall_p99_ms: q.stall_p99_ms.unwrap_or(0.0),
                        split_fraction: q.split_fraction.unwrap_or(0.0),
                    })
                    .collect(),
            })
            .collect()
    }

    /// A plain-text table, one row per policy, with each capacity relative to the best
    /// baseline's (every policy but kvgate, kvgate's P/D decider and the oracle).
    pub fn table(&self) -> String {
        let baseline_best = self
            .policies
            .iter()
            .filter(|p| !KVGATE_ROWS.contains(&p.policy.as_str()))
            .map(|p| p.capacity_rps)
            .fold(0.0f64, f64::max);
        let mut s = format!(
            "capacity at SLO: {} ({} endpoints, {} router replica{}; scrape every {}-{} ms, metrics {}-{} ms late, KV events {}-{} ms late)\n",
            self.workload,
            self.engines,
            self.router_replicas,
            if self.router_replicas == 1 { "" } else { "s" },
            self.signals.scrape_interval_ms[0],
            self.signals.scrape_interval_ms[1],
            self.signals.metrics_delay_ms[0],
            self.signals.metrics_delay_ms[1],
            self.signals.kv_event_delay_ms[0],
            self.signals.kv_event_delay_ms[1],
        );
        s.push_str(&format!(
            "SLO: TTFT p90 <= {} ms, TPOT p99 <= {} ms, served >= {:.1}%\n",
            self.slo.ttft_p90_ms,
            self.slo.tpot_p99_ms,
            self.slo.min_goodput * 100.0
        ));
        s.push_str(&format!(
            "{:<20} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>6} {:>11} {:>6} {:>7} {:>6}\n",
            "policy",
            self.rate_kind,
            "req/s",
            "vs best",
            "ttft p90",
            "tpot p99",
            "hit",
            "probes",
            "herd (osc)",
            "rej",
            "mape",
            "floor"
        ));
        for p in &self.policies {
            let rate = p.capacity_speedup.or(p.capacity_rate);
            let rel = if baseline_best > 0.0 {
                format!("{:.2}x", p.capacity_rps / baseline_best)
            } else {
                "-".to_string()
            };
            s.push_str(&format!(
                "{:<20} {:>9} {:>9.2} {:>8} {:>9.1} {:>9.2} {:>8.3} {:>6} {:>5.2} ({:.2}) {:>6} {:>7} {:>6}\n",
                p.policy,
                rate.map_or("none".to_string(), |r| format!("{r:.3}")),
                p.capacity_rps,
                rel,
                p.ttft_ms.p90,
                p.tpot_ms.p99,
                p.hit_ratio,
                p.probes.len(),
                p.herding.mean_max_over_mean_waiting,
                p.herding.oscillation,
                p.rejected,
                crate::report::mape_cell(p.ttft_mape),
                crate::report::mape_cell(p.ttft_mape_floor)
            ));
        }
        if self.policies.iter().any(|p| p.pd.is_some()) {
            s.push_str(&format!(
                "{:<20} {:>5} {:>7} {:>8} {:>9} {:>8} {:>8}\n",
                "P/D at capacity", "P:D", "split", "xfer ms", "prefill %", "tpot p50", "stall99"
            ));
            for p in &self.policies {
                let (pd, split, xfer, share) = match &p.pd {
                    Some(f) => (
                        format!("{}:{}", f.prefill_engines, f.decode_engines),
                        format!("{:.1}%", f.split_fraction * 100.0),
                        format!("{:.2}", f.transfer_ms.mean),
                        format!("{:.1}%", f.prefill_pod_share * 100.0),
                    ),
                    // A P/D arm with no figures met the SLO at no rate.
                    None if p.policy.starts_with("pd-") => {
                        ("-".into(), "-".into(), "-".into(), "-".into())
                    }
                    None => (
                        format!("0:{}", self.engines),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                    ),
                };
                s.push_str(&format!(
                    "{:<20} {:>5} {:>7} {:>8} {:>9} {:>8.2} {:>8.1}\n",
                    p.policy, pd, split, xfer, share, p.tpot_ms.p50, p.max_itl_ms.p99
                ));
            }
        }
        if let Some(c) = &self.ceiling {
            let share = |rps: f64| {
                c.share(rps)
                    .map_or("-".to_string(), |f| format!("{:.0}%", f * 100.0))
            };
            let kvgate = self
                .policies
                .iter()
                .find(|p| p.policy == kvgate_core::Policy::Kvgate.as_str())
                .map(|p| format!(", kvgate {}", share(p.capacity_rps)))
                .unwrap_or_default();
            s.push_str(&format!(
                "work ceiling: {:.2} req/s ({} {:.3}): the fleet busy all the time with every prefix cached where needed (hit {:.3}), work split perfectly and every step full ({:.0}% of it prefill); best baseline at {}{}\n",
                c.rps,
                self.rate_kind,
                c.rate,
                c.ideal_hit_ratio,
                c.prefill_share * 100.0,
                share(baseline_best),
                kvgate,
            ));
        }
        s.push_str("vs best: capacity (req/s) relative to the best baseline (every policy but kvgate, pd-cost and oracle); mape: TTFT prediction error at capacity after warm-up; floor: the least any router could have (it cannot see where in its engine's step a request arrives)\n");
        s
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &std::path::Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self).expect("report serialises");
        std::fs::write(path, text).map_err(|source| BenchError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}
