//! Reports: per-policy figures as a table, as JSON, and as charts (SVG and PNG).
//!
//! Definitions (all from the requests' own timestamps):
//! - TTFT = first token − arrival; TPOT = (finish − first token) / (output tokens − 1), for
//!   requests with at least two output tokens; end-to-end = finish − arrival.
//! - Output tokens/s = all generated tokens ÷ (last finish − first arrival).
//! - Goodput = requests meeting both SLOs (TTFT ≤ `slo_ttft_ms`, TPOT ≤ `slo_tpot_ms`) per second
//!   of the same span, and as a fraction of all requests (rejections count as misses).
//! - Hit ratio = cached prompt tokens ÷ prompt tokens (what `usage.prompt_tokens_details.cached_tokens`
//!   reports).
//! - Load balance = max ÷ mean over endpoints of uncached prompt tokens prefilled.
//! - Herding = the mean over time of max ÷ mean waiting requests across endpoints (sampled
//!   true queues; instants with no waiting request anywhere are skipped: nothing to herd), and
//!   its oscillation, the standard deviation of that ratio over time. 1.0 is an even spread; a
//!   fleet of N whose whole queue sits on one endpoint scores N. Several routers acting on the
//!   same stale view pile onto whichever endpoint last looked idle, then all leave it: the
//!   ratio is high and swings.
//! - TTFT MAPE = mean over requests of |predicted − measured| ÷ measured TTFT, where the
//!   prediction is the deciding router's at booking (`Decision::predicted_ttft_us`: kvgate's
//!   cost model and the oracle; policies that do not predict have none). The first
//!   [`MAPE_WARMUP_FRACTION`] of the requests by arrival are the warm-up, while each endpoint's
//!   step model is still being learnt, and are left out; `prediction_error.svg` draws the whole
//!   learning curve, the MAPE per window of arrival time.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::BenchError;
use crate::des::PolicyRun;
use crate::stats::{Summary, percentile};

/// Fraction of a run's requests, the earliest by arrival, that are warm-up for
/// [`ttft_mape`]. 10%: on a fleet of 8 that is ~12 first tokens per endpoint per 1,000 requests,
/// enough for the online fit to have set each endpoint's scale and most of its shape
/// (`kvgate_core::learn`), while 90% of the run is still judged.
pub const MAPE_WARMUP_FRACTION: f64 = 0.1;

/// TTFT prediction error after warm-up: mean |predicted − measured| ÷ measured over the
/// requests that have both, leaving out the first [`MAPE_WARMUP_FRACTION`] of all requests by
/// arrival. `None` if no request after warm-up has a prediction.
pub fn ttft_mape(run: &PolicyRun) -> Option<f64> {
    mean(after_warmup(run).into_iter().filter_map(relative_error))
}

/// The run's requests by arrival, less the first [`MAPE_WARMUP_FRACTION`] of them.
fn after_warmup(run: &PolicyRun) -> Vec<&crate::des::RequestRecord> {
    let mut by_arrival: Vec<&crate::des::RequestRecord> = run.requests.iter().collect();
    by_arrival.sort_by_key(|r| r.arrival_us);
    let warmup = (by_arrival.len() as f64 * MAPE_WARMUP_FRACTION).floor() as usize;
    by_arrival.split_off(warmup)
}

/// The lowest TTFT prediction error any router could have had on this run, over the requests
/// [`ttft_mape`] counts: that of a predictor that knows everything about each request except
/// where in its engine's step cycle it arrived ([`RequestRecord::arrival_phase_us`]), which
/// engines do not publish. `None` where [`ttft_mape`] is.
///
/// A request arriving while a step of length `S` is in flight waits `U·S` for it to end, `U`
/// uniform on [0, 1) (arrivals are independent of the engine's steps), then `K` more (its
/// queue and its own steps, here taken as known, including work that arrives after it and
/// shares its steps, which no router knows either). The prediction with the least expected
/// relative error of `T = K + U·S` is the median of T weighted by `1/T`, which is
/// `√(K·(K + S))`; the floor is its error on the measured TTFTs. On the `mix` workload it is
/// 12-15% (most TTFTs there are one or two steps long): a prediction goal below it cannot be
/// met by any router.
pub fn ttft_mape_floor(run: &PolicyRun) -> Option<f64> {
    mean(after_warmup(run).into_iter().filter_map(|r| {
        relative_error(r)?;
        let measured = measured_ttft_us(r)?;
        let (wait, step) = r.arrival_phase_us?;
        let known = (measured - wait as f64).max(0.0);
        let best = (known * (known + step as f64)).sqrt();
        Some((best - measured).abs() / measured)
    }))
}

/// Measured TTFT of a request that got its first token, µs.
fn measured_ttft_us(r: &crate::des::RequestRecord) -> Option<f64> {
    let measured = r.first_token_us.checked_sub(r.arrival_us)? as f64;
    (r.first_token_us > 0 && measured > 0.0).then_some(measured)
}

/// |predicted − measured| ÷ measured TTFT of one request, if it has both.
fn relative_error(r: &crate::des::RequestRecord) -> Option<f64> {
    let predicted = r.predicted_ttft_us? as f64;
    let measured = measured_ttft_us(r)?;
    Some((predicted - measured).abs() / measured)
}

/// Mean of `errors`; `None` if there are none.
fn mean(errors: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = errors.fold((0.0, 0usize), |(s, n), e| (s + e, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Service-level objective used for goodput.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Slo {
    /// Time to first token bound, ms.
    pub ttft_ms: f64,
    /// Time per output token bound, ms.
    pub tpot_ms: f64,
}

impl Default for Slo {
    /// 2 s TTFT and 100 ms TPOT: interactive chat targets that leave room for long prompts.
    fn default() -> Self {
        Self {
            ttft_ms: 2_000.0,
            tpot_ms: 100.0,
        }
    }
}

/// Goodput figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Goodput {
    /// Requests meeting the SLO per second.
    pub requests_per_s: f64,
    /// Fraction of all requests meeting the SLO.
    pub fraction: f64,
}

/// Load-balance figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoadBalance {
    /// max ÷ mean of uncached prompt tokens per endpoint (1.0 = perfectly even).
    pub max_over_mean_prefill_tokens: f64,
    /// Uncached prompt tokens per endpoint.
    pub prefill_tokens_per_endpoint: Vec<u64>,
    /// Requests per endpoint.
    pub requests_per_endpoint: Vec<u64>,
}

/// How unevenly the waiting queues sat over time (see module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Herding {
    /// Mean over time of max ÷ mean waiting requests across endpoints.
    pub mean_max_over_mean_waiting: f64,
    /// Standard deviation over time of that ratio.
    pub oscillation: f64,
    /// Mean over time of the longest waiting queue.
    pub mean_max_waiting: f64,
    /// Instants counted (with at least one waiting request).
    pub samples: usize,
}

impl Herding {
    /// Herding figures of a run's queue samples.
    pub fn of(samples: &[crate::des::QueueSample]) -> Self {
        let ratios: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|s| {
                let total: u32 = s.waiting.iter().sum();
                let max = s.waiting.iter().copied().max().unwrap_or(0);
                (total > 0).then(|| {
                    let mean = f64::from(total) / s.waiting.len() as f64;
                    (f64::from(max) / mean, f64::from(max))
                })
            })
            .collect();
        if ratios.is_empty() {
            return Self::default();
        }
        let k = ratios.len() as f64;
        let mean = ratios.iter().map(|r| r.0).sum::<f64>() / k;
        let var = ratios.iter().map(|r| (r.0 - mean).powi(2)).sum::<f64>() / k;
        Self {
            mean_max_over_mean_waiting: mean,
            oscillation: var.sqrt(),
            mean_max_waiting: ratios.iter().map(|r| r.1).sum::<f64>() / k,
            samples: ratios.len(),
        }
    }
}

/// One policy's row of the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PolicyReport {
    /// Policy name.
    pub policy: String,
    /// Requests completed.
    pub completed: usize,
    /// Requests rejected: by the router (shed, no endpoint), by the engine as invalid (longer
    /// than `max_model_len`: vLLM's 400), or failed in live mode.
    pub rejected: usize,
    /// Time to first token, ms.
    pub ttft_ms: Summary,
    /// Time per output token, ms.
    pub tpot_ms: Summary,
    /// Each request's longest gap between two output tokens, ms (requests with at least two
    /// output tokens): the stalls the mean TPOT dilutes.
    pub max_itl_ms: Summary,
    /// End-to-end latency, ms.
    pub e2e_ms: Summary,
    /// Generated tokens per second over the run.
    pub output_tokens_per_s: f64,
    /// Goodput under the report's SLO.
    pub goodput: Goodput,
    /// Cached prompt tokens ÷ prompt tokens.
    pub hit_ratio: f64,
    /// Engine preemptions.
    pub preemptions: u64,
    /// Spread of work across endpoints.
    pub load_balance: LoadBalance,
    /// Unevenness of the waiting queues over time.
    pub herding: Herding,
    /// Requests no engine of the fleet could serve (longer than `max_model_len`), included in
    /// `rejected`.
    pub invalid: usize,
    /// TTFT prediction error after warm-up ([`ttft_mape`]), a fraction; `None` (JSON `null`)
    /// for policies that do not predict.
    pub ttft_mape: Option<f64>,
    /// The least TTFT prediction error any router could have had over the same requests
    /// ([`ttft_mape_floor`]); `None` where `ttft_mape` is.
    pub ttft_mape_floor: Option<f64>,
    /// For policies that predict: the step-time coefficients each endpoint was priced with at
    /// the end of the run (router replica 0), to hold against the engines' true ones.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub step_models: Vec<crate::des::StepFit>,
    /// Prefill/decode figures, for runs on a fleet with prefill or decode pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pd: Option<PdFigures>,
}

/// What a prefill/decode fleet did with the requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PdFigures {
    /// Prefill pods in the fleet.
    pub prefill_engines: usize,
    /// Decode pods in the fleet.
    pub decode_engines: usize,
    /// Split requests ÷ completed requests.
    pub split_fraction: f64,
    /// KV transfers completed (one per split request).
    pub transfers: usize,
    /// Transfer time, from the decode engine allocating the blocks to the KV arriving, ms.
    pub transfer_ms: Summary,
    /// Mean prompt tokens moved per transfer.
    pub transfer_tokens_mean: f64,
    /// Uncached prompt tokens prefilled on prefill pods ÷ on every pod: the share of the
    /// fleet's prefill work the prefill pods did.
    pub prefill_pod_share: f64,
}

impl PdFigures {
    /// The P/D figures of `run`; `None` if every engine served both phases.
    pub fn of(run: &PolicyRun) -> Option<Self> {
        use kvgate_core::Role;
        if run.roles.iter().all(|r| *r == Role::Both) {
            return None;
        }
        let done: Vec<_> = run.requests.iter().filter(|r| r.finish_us > 0).collect();
        let split: Vec<_> = done.iter().filter(|r| r.split).collect();
        let transfer_ms: Vec<f64> = split
            .iter()
            .map(|r| r.transfer_us as f64 / 1000.0)
            .collect();
        let on = |role: Role| {
            run.roles
                .iter()
                .zip(&run.prefill_tokens_per_engine)
                .filter(|(r, _)| **r == role)
                .map(|(_, &t)| t)
                .sum::<u64>()
        };
        let all: u64 = run.prefill_tokens_per_engine.iter().sum();
        Some(Self {
            prefill_engines: run.roles.iter().filter(|r| **r == Role::Prefill).count(),
            decode_engines: run.roles.iter().filter(|r| **r == Role::Decode).count(),
            split_fraction: split.len() as f64 / done.len().max(1) as f64,
            transfers: split.len(),
            transfer_ms: Summary::of(&transfer_ms),
            transfer_tokens_mean: split
                .iter()
                .map(|r| f64::from(r.transfer_tokens))
                .sum::<f64>()
                / split.len().max(1) as f64,
            prefill_pod_share: if all > 0 {
                on(Role::Prefill) as f64 / all as f64
            } else {
                0.0
            },
        })
    }
}

/// The whole comparison.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// Workload description.
    pub workload: String,
    /// Requests in the workload.
    pub requests: usize,
    /// Endpoints in the fleet.
    pub engines: usize,
    /// Router replicas that decided (1 unless `--router-replicas`).
    pub router_replicas: usize,
    /// SLO used for goodput.
    pub slo: Slo,
    /// One entry per policy, in the order run.
    pub policies: Vec<PolicyReport>,
}

impl PolicyReport {
    /// Computes the figures of one run.
    pub fn from_run(run: &PolicyRun, slo: Slo) -> Self {
        let mape = ttft_mape(run);
        let done: Vec<_> = run.requests.iter().filter(|r| r.finish_us > 0).collect();
        let ms = |us: u64| us as f64 / 1000.0;
        let ttft: Vec<f64> = done
            .iter()
            .map(|r| ms(r.first_token_us - r.arrival_us))
            .collect();
        let tpot_of = |r: &crate::des::RequestRecord| {
            (r.output_tokens > 1)
                .then(|| ms(r.finish_us - r.first_token_us) / f64::from(r.output_tokens - 1))
        };
        let tpot: Vec<f64> = done.iter().filter_map(|r| tpot_of(r)).collect();
        let max_itl: Vec<f64> = done
            .iter()
            .filter(|r| r.output_tokens > 1)
            .map(|r| ms(r.max_itl_us))
            .collect();
        let e2e: Vec<f64> = done
            .iter()
            .map(|r| ms(r.finish_us - r.arrival_us))
            .collect();
        let start = run.requests.iter().map(|r| r.arrival_us).min().unwrap_or(0);
        let span_s = (run.makespan_us.saturating_sub(start)) as f64 / 1e6;
        let per_s = |x: f64| if span_s > 0.0 { x / span_s } else { 0.0 };
        let out_tokens: u64 = done.iter().map(|r| u64::from(r.output_tokens)).sum();
        let good = done
            .iter()
            .filter(|r| {
                ms(r.first_token_us - r.arrival_us) <= slo.ttft_ms
                    && tpot_of(r).is_none_or(|t| t <= slo.tpot_ms)
            })
            .count();
        let prompt: u64 = done.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let cached: u64 = done.iter().map(|r| u64::from(r.cached_tokens)).sum();
        let loads = &run.prefill_tokens_per_engine;
        let mean = loads.iter().sum::<u64>() as f64 / loads.len().max(1) as f64;
        let max = loads.iter().copied().max().unwrap_or(0) as f64;
        Self {
            policy: run.policy.clone(),
            completed: done.len(),
            rejected: run.requests.iter().filter(|r| r.rejected).count(),
            ttft_ms: Summary::of(&ttft),
            tpot_ms: Summary::of(&tpot),
            max_itl_ms: Summary::of(&max_itl),
            e2e_ms: Summary::of(&e2e),
            output_tokens_per_s: per_s(out_tokens as f64),
            goodput: Goodput {
                requests_per_s: per_s(good as f64),
                fraction: good as f64 / run.requests.len().max(1) as f64,
            },
            hit_ratio: if prompt > 0 {
                cached as f64 / prompt as f64
            } else {
                0.0
            },
            preemptions: run.preemptions,
            load_balance: LoadBalance {
                max_over_mean_prefill_tokens: if mean > 0.0 { max / mean } else { 0.0 },
                prefill_tokens_per_endpoint: loads.clone(),
                requests_per_endpoint: run.requests_per_engine.clone(),
            },
            herding: Herding::of(&run.queue_samples),
            invalid: run.requests.iter().filter(|r| r.invalid).count(),
            ttft_mape: mape,
            ttft_mape_floor: ttft_mape_floor(run),
            step_models: if mape.is_some() {
                run.step_models.clone()
            } else {
                Vec::new()
            },
            pd: PdFigures::of(run),
        }
    }
}

impl Report {
    /// A plain-text table, one row per policy.
    pub fn table(&self) -> String {
        let mut s = format!(
            "workload: {} ({} requests, {} endpoints, {} router replica{})\n",
            self.workload,
            self.requests,
            self.engines,
            self.router_replicas.max(1),
            if self.router_replicas > 1 { "s" } else { "" }
        );
        s.push_str(&format!(
            "{:<20} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7} {:>8} {:>7} {:>6} {:>5} {:>11} {:>7} {:>6}\n",
            "policy",
            "ttft mean",
            "ttft p50",
            "ttft p90",
            "ttft p99",
            "tpot p50",
            "tpot p99",
            "out tok/s",
            "goodput",
            "hit",
            "preempt",
            "imbal",
            "rej",
            "herd (osc)",
            "mape",
            "floor"
        ));
        s.push_str(&format!(
            "{:<20} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7} {:>8} {:>7} {:>6} {:>5} {:>11} {:>7} {:>6}\n",
            "", "ms", "ms", "ms", "ms", "ms", "ms", "", "(SLO)", "ratio", "", "max/µ", "", "max/µ wait", "ttft", "(any)"
        ));
        for p in &self.policies {
            s.push_str(&format!(
                "{:<20} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>9.0} {:>6.1}% {:>8.3} {:>7} {:>6.2} {:>5} {:>5.2} ({:.2}) {:>7} {:>6}\n",
                p.policy,
                p.ttft_ms.mean,
                p.ttft_ms.p50,
                p.ttft_ms.p90,
                p.ttft_ms.p99,
                p.tpot_ms.p50,
                p.tpot_ms.p99,
                p.output_tokens_per_s,
                p.goodput.fraction * 100.0,
                p.hit_ratio,
                p.preemptions,
                p.load_balance.max_over_mean_prefill_tokens,
                p.rejected,
                p.herding.mean_max_over_mean_waiting,
                p.herding.oscillation,
                mape_cell(p.ttft_mape),
                mape_cell(p.ttft_mape_floor)
            ));
        }
        s.push_str(&format!(
            "goodput SLO: TTFT <= {} ms and TPOT <= {} ms; mape: TTFT prediction error after the first {:.0}% of requests (- = policy does not predict); floor: the least any router could have (it cannot see where in its engine's step a request arrives)\n",
            self.slo.ttft_ms,
            self.slo.tpot_ms,
            MAPE_WARMUP_FRACTION * 100.0
        ));
        s
    }

    /// The prefill/decode comparison as a table: how each arm split the requests, what the
    /// transfers cost, and TTFT and TPOT at p50, p90 and p99 (TPOT is where aggregated prefills
    /// stall decodes).
    pub fn pd_table(&self) -> String {
        let mut s = format!(
            "{:<16} {:>5} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6}\n",
            "P/D",
            "P:D",
            "split",
            "xfers",
            "xfer ms",
            "xfer tok",
            "ttft p50",
            "ttft p90",
            "ttft p99",
            "tpot50",
            "tpot90",
            "tpot99",
            "stall99",
            "goodput",
            "hit"
        );
        for p in &self.policies {
            let (pd, split, xfers, xfer_ms, xfer_tok) = match &p.pd {
                Some(f) if f.transfers > 0 => (
                    format!("{}:{}", f.prefill_engines, f.decode_engines),
                    format!("{:.1}%", f.split_fraction * 100.0),
                    f.transfers.to_string(),
                    format!("{:.2}", f.transfer_ms.mean),
                    format!("{:.0}", f.transfer_tokens_mean),
                ),
                Some(f) => (
                    format!("{}:{}", f.prefill_engines, f.decode_engines),
                    "0.0%".into(),
                    "0".into(),
                    "-".into(),
                    "-".into(),
                ),
                None => (
                    format!("0:{}", self.engines),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
            };
            s.push_str(&format!(
                "{:<16} {:>5} {:>6} {:>6} {:>8} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>7.2} {:>7.2} {:>8.1} {:>6.1}% {:>6.3}\n",
                p.policy,
                pd,
                split,
                xfers,
                xfer_ms,
                xfer_tok,
                p.ttft_ms.p50,
                p.ttft_ms.p90,
                p.ttft_ms.p99,
                p.tpot_ms.p50,
                p.tpot_ms.p90,
                p.tpot_ms.p99,
                p.max_itl_ms.p99,
                p.goodput.fraction * 100.0,
                p.hit_ratio,
            ));
        }
        s.push_str("P:D: prefill:decode pods (0:N = all aggregated); split: requests prefilled on a prefill pod; xfer ms: mean KV transfer time; stall99: p99 over requests of the longest gap between two output tokens; times in ms\n");
        s
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self).expect("report serialises");
        std::fs::write(path, text).map_err(|source| BenchError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// A MAPE as a table cell: percent, or `-` when the policy does not predict.
pub fn mape_cell(mape: Option<f64>) -> String {
    mape.map_or("-".to_string(), |m| format!("{:.1}%", m * 100.0))
}

const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

fn chart_err(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Chart {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Draws the five charts (TTFT CDF, TTFT over time, per-endpoint load, queue herding over time,
/// TTFT prediction error over time) as SVG and PNG into `dir`, returning the files written.
pub fn write_charts(dir: &Path, runs: &[PolicyRun]) -> Result<Vec<PathBuf>, BenchError> {
    let mut written = Vec::new();
    for name in [
        "ttft_cdf",
        "ttft_over_time",
        "endpoint_load",
        "queue_herding",
        "prediction_error",
    ] {
        written.extend(write_svg_png(dir, name, (1000, 600), &Named(name, runs))?);
    }
    Ok(written)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// The legend box of every chart: series labels on a translucent white box at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A dashed black horizontal line at `y` across `x_range`: an SLO bound.
fn draw_level<'a, DB: DrawingBackend + 'a, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    x_range: &std::ops::Range<f64>,
    y: f64,
) -> DrawResult
where
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart.draw_series(DashedLineSeries::new(
        vec![(x_range.start, y), (x_range.end, y)],
        8,
        6,
        BLACK.stroke_width(2),
    ))?;
    Ok(())
}

/// A chart drawn on any plotters backend, so the SVG and the PNG come from one drawing.
trait Chart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> DrawResult
    where
        DB::ErrorType: 'static;
}

/// Writes `chart` as `{name}.svg` and `{name}.png`, `size` pixels, into `dir`.
fn write_svg_png(
    dir: &Path,
    name: &str,
    size: (u32, u32),
    chart: &impl Chart,
) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let svg = dir.join(format!("{name}.svg"));
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        chart.draw(&root).map_err(|e| chart_err(&svg, e))?;
        root.present().map_err(|e| chart_err(&svg, e))?;
    }
    let png = dir.join(format!("{name}.png"));
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        chart.draw(&root).map_err(|e| chart_err(&png, e))?;
        root.present().map_err(|e| chart_err(&png, e))?;
    }
    Ok(vec![svg, png])
}

/// One of [`write_charts`]'s charts, by name.
struct Named<'a>(&'a str, &'a [PolicyRun]);

impl Chart for Named<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, plotters::coord::Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        draw_named(self.0, root, self.1)
    }
}

fn draw_named<DB: DrawingBackend>(
    name: &str,
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[PolicyRun],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    match name {
        "ttft_cdf" => draw_cdf(root, runs),
        "ttft_over_time" => draw_over_time(root, runs),
        "queue_herding" => draw_herding(root, runs),
        "prediction_error" => draw_prediction_error(root, runs),
        _ => draw_load(root, runs),
    }
}

/// An axis label: one decimal below 10, none above (log axes span decades).
fn axis_number(v: &f64) -> String {
    if *v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// The values 1, 2, 5, 10, 20, 50, … (and below 1: 0.1, 0.2, 0.5) within `[lo, hi]`.
fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powi(lo.max(1e-3).log10().floor() as i32);
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

fn ttfts_ms(run: &PolicyRun) -> Vec<f64> {
    let mut v: Vec<f64> = run
        .requests
        .iter()
        .filter(|r| r.finish_us > 0)
        .map(|r| (r.first_token_us - r.arrival_us) as f64 / 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn draw_cdf<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[PolicyRun],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let all: Vec<Vec<f64>> = runs.iter().map(ttfts_ms).collect();
    // Clip the x axis at the largest p99.5 so one policy's extreme tail does not flatten the rest.
    let x_max = all
        .iter()
        .filter_map(|v| percentile(v, 99.5))
        .fold(1.0f64, f64::max);
    let x_min = all
        .iter()
        .filter_map(|v| v.first().copied())
        .fold(f64::INFINITY, f64::min)
        .clamp(0.1, x_max / 2.0);
    // Labelled ticks at 1-2-5 steps, so the region where policies differ (often tens of ms)
    // is read off the axis, not guessed: plotters' own log axis labels only whole decades.
    let mut chart = ChartBuilder::on(root)
        .caption("TTFT CDF per policy (log x)", ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(
            (x_min..x_max)
                .log_scale()
                .with_key_points(one_two_five(x_min, x_max)),
            0.0..1.0,
        )?;
    chart
        .configure_mesh()
        .x_desc("time to first token (ms, log scale)")
        .y_desc("fraction of requests with TTFT at most x")
        .x_label_formatter(&axis_number)
        .draw()?;
    for (i, (run, v)) in runs.iter().zip(&all).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let n = v.len().max(1) as f64;
        let step = (v.len() / 400).max(1);
        let pts: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .step_by(step)
            .map(|(k, &x)| (x.clamp(x_min, x_max), (k + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(run.policy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    Ok(())
}

fn draw_over_time<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[PolicyRun],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let end_s = runs
        .iter()
        .flat_map(|r| r.requests.iter().map(|q| q.arrival_us))
        .max()
        .unwrap_or(0) as f64
        / 1e6;
    let buckets = 60usize;
    let width = (end_s / buckets as f64).max(1e-3);
    let series: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|run| {
            let mut per: Vec<Vec<f64>> = vec![Vec::new(); buckets + 1];
            for r in run.requests.iter().filter(|r| r.finish_us > 0) {
                let b = ((r.arrival_us as f64 / 1e6) / width) as usize;
                per[b.min(buckets)].push((r.first_token_us - r.arrival_us) as f64 / 1000.0);
            }
            per.iter_mut()
                .enumerate()
                .filter(|(_, v)| !v.is_empty())
                .map(|(b, v)| {
                    v.sort_by(f64::total_cmp);
                    ((b as f64 + 0.5) * width, percentile(v, 90.0).unwrap_or(0.0))
                })
                .collect()
        })
        .collect();
    let y_max = series.iter().flatten().map(|p| p.1).fold(1.0f64, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(root)
        .caption("TTFT p90 over time (by arrival)", ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end_s.max(1e-3), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("arrival time (s)")
        .y_desc("TTFT p90 (ms)")
        .draw()?;
    for (i, (run, pts)) in runs.iter().zip(series).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(run.policy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

fn draw_load<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[PolicyRun],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let endpoints = runs
        .iter()
        .map(|r| r.prefill_tokens_per_engine.len())
        .max()
        .unwrap_or(0);
    let y_max = runs
        .iter()
        .flat_map(|r| r.prefill_tokens_per_engine.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64
        / 1e6
        * 1.1;
    let groups = runs.len().max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Uncached prompt tokens each endpoint prefilled (work placed on it), per policy",
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..endpoints as f64, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("endpoint index")
        .y_desc("uncached prompt tokens prefilled (millions)")
        .x_labels(endpoints.min(32))
        .x_label_formatter(&|x| format!("{}", x.floor() as usize))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let w = 0.8 / groups;
        chart
            .draw_series(
                run.prefill_tokens_per_engine
                    .iter()
                    .enumerate()
                    .map(|(e, &t)| {
                        let x0 = e as f64 + 0.1 + i as f64 * w;
                        Rectangle::new([(x0, 0.0), (x0 + w, t as f64 / 1e6)], color.filled())
                    }),
            )?
            .label(run.policy.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// Max ÷ mean waiting requests across endpoints, averaged per second, per policy.
fn herding_series(run: &PolicyRun) -> Vec<(f64, f64)> {
    let mut buckets: std::collections::BTreeMap<u64, (f64, u32)> = Default::default();
    for q in &run.queue_samples {
        let total: u32 = q.waiting.iter().sum();
        if total == 0 {
            continue;
        }
        let max = q.waiting.iter().copied().max().unwrap_or(0);
        let ratio = f64::from(max) * q.waiting.len() as f64 / f64::from(total);
        let b = buckets.entry(q.t_us / 1_000_000).or_default();
        b.0 += ratio;
        b.1 += 1;
    }
    buckets
        .into_iter()
        .map(|(s, (sum, k))| (s as f64 + 0.5, sum / f64::from(k)))
        .collect()
}

fn draw_herding<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[PolicyRun],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let series: Vec<Vec<(f64, f64)>> = runs.iter().map(herding_series).collect();
    let x_max = series.iter().flatten().map(|p| p.0).fold(1.0f64, f64::max);
    let engines = runs
        .iter()
        .filter_map(|r| r.queue_samples.first().map(|q| q.waiting.len()))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let replicas = runs.iter().map(|r| r.router_replicas).max().unwrap_or(1);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "Herding: longest waiting queue / mean waiting queue over time ({replicas} router replica{})",
                if replicas > 1 { "s" } else { "" }
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 1.0..engines.max(1.5))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("max / mean waiting requests (1 = even)")
        .draw()?;
    for (i, (run, pts)) in runs.iter().zip(series).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(run.policy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// Windows of arrival time the learning curve is cut into.
const ERROR_WINDOWS: usize = 40;

/// MAPE (percent) of the TTFT predictions per window of arrival time, the learning curve of one
/// run: (window middle in s, MAPE %) for every window with a prediction.
pub fn prediction_error_series(run: &PolicyRun) -> Vec<(f64, f64)> {
    let end_us = run.requests.iter().map(|r| r.arrival_us).max().unwrap_or(0);
    let width_us = (end_us / ERROR_WINDOWS as u64).max(1);
    let mut windows: Vec<Vec<&crate::des::RequestRecord>> = vec![Vec::new(); ERROR_WINDOWS + 1];
    for r in &run.requests {
        windows[((r.arrival_us / width_us) as usize).min(ERROR_WINDOWS)].push(r);
    }
    windows
        .iter()
        .enumerate()
        .filter_map(|(w, rs)| {
            mean(rs.iter().copied().filter_map(relative_error))
                .map(|e| ((w as f64 + 0.5) * width_us as f64 / 1e6, e * 100.0))
        })
        .collect()
}

fn draw_prediction_error<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[PolicyRun],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let series: Vec<(&PolicyRun, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| (r, prediction_error_series(r)))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    let end_s = runs
        .iter()
        .flat_map(|r| r.requests.iter().map(|q| q.arrival_us))
        .max()
        .unwrap_or(0) as f64
        / 1e6;
    let pts = series.iter().flat_map(|(_, s)| s.iter().map(|p| p.1));
    let y_max = pts.clone().fold(20.0f64, f64::max) * 1.3;
    let y_min = pts.fold(5.0f64, f64::min).max(0.1) * 0.8;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "TTFT prediction error over time: the learning curve (dashed: 10%)",
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end_s.max(1e-3), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("arrival time (s)")
        .y_desc("MAPE of predicted TTFT (%, log)")
        .y_labels(12)
        .y_label_formatter(&axis_number)
        .draw()?;
    for (i, (run, pts)) in series.into_iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart.draw_series(pts.iter().map(|&q| Circle::new(q, 3, color.filled())))?;
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(run.policy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart.draw_series(DashedLineSeries::new(
        vec![(0.0, 10.0), (end_s.max(1e-3), 10.0)],
        8,
        6,
        BLACK.stroke_width(2),
    ))?;
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// One policy's curve on the rate chart: (rate, TTFT p90 in ms) points.
#[derive(Clone, Debug, PartialEq)]
pub struct RateCurve {
    /// Policy name.
    pub policy: String,
    /// Points, any order (sorted when drawn).
    pub points: Vec<(f64, f64)>,
}

/// Draws TTFT p90 against arrival rate per policy with the SLO line, as SVG and PNG named
/// `ttft_p90_vs_rate` in `dir`; `rate_label` names the x axis.
pub fn write_rate_chart(
    dir: &Path,
    curves: &[RateCurve],
    slo_ttft_p90_ms: f64,
    rate_label: &str,
) -> Result<Vec<PathBuf>, BenchError> {
    struct Rate<'a>(&'a [RateCurve], f64, &'a str);
    impl Chart for Rate<'_> {
        fn draw<DB: DrawingBackend>(
            &self,
            root: &DrawingArea<DB, plotters::coord::Shift>,
        ) -> DrawResult
        where
            DB::ErrorType: 'static,
        {
            draw_rate(root, self.0, self.1, self.2)
        }
    }
    let chart = Rate(curves, slo_ttft_p90_ms, rate_label);
    write_svg_png(dir, "ttft_p90_vs_rate", (1000, 600), &chart)
}

fn draw_rate<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    curves: &[RateCurve],
    slo_ms: f64,
    rate_label: &str,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let pts = curves.iter().flat_map(|c| c.points.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::INFINITY, 0.0f64, slo_ms, slo_ms);
    for &(x, y) in pts {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y.max(1.0));
        y_max = y_max.max(y);
    }
    if !x_min.is_finite() {
        x_min = 0.0;
    }
    let x_pad = ((x_max - x_min) * 0.05).max(0.01);
    let x_range = (x_min - x_pad).max(0.0)..(x_max + x_pad);
    let mut chart = ChartBuilder::on(root)
        .caption(
            "TTFT p90 against arrival rate per policy (dashed: SLO)",
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.clone(), ((y_min * 0.8)..(y_max * 1.25)).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(rate_label)
        .y_desc("TTFT p90 (ms, log)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (i, c) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut p = c.points.clone();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        let p: Vec<(f64, f64)> = p.into_iter().map(|(x, y)| (x, y.max(1.0))).collect();
        chart.draw_series(p.iter().map(|&q| Circle::new(q, 3, color.filled())))?;
        chart
            .draw_series(LineSeries::new(p, color.stroke_width(2)))?
            .label(c.policy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    draw_level(&mut chart, &x_range, slo_ms)?;
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

/// One arm's curve on the P/D chart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PdCurve {
    /// Arm name (`aggregated`, `pd-cost`, ...).
    pub policy: String,
    /// Points, any order (sorted when drawn).
    pub points: Vec<PdPoint>,
}

/// One point of a [`PdCurve`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PdPoint {
    /// Arrival rate (or trace speed-up).
    pub rate: f64,
    /// TTFT p90, ms.
    pub ttft_p90_ms: f64,
    /// TPOT p99, ms.
    pub tpot_p99_ms: f64,
    /// p99 over requests of the longest gap between two output tokens, ms.
    pub stall_p99_ms: f64,
    /// Fraction of requests split.
    pub split_fraction: f64,
}

/// Draws the P/D comparison as SVG and PNG named `pd_vs_rate` in `dir`: TTFT p90, TPOT p99, the
/// longest inter-token gap (p99 over requests) and the split fraction against the rate, one line
/// per arm, the SLO bounds dashed. What disaggregation trades is visible at a glance: stalls and
/// TPOT fall when prefills leave the decode pods, TTFT rises when the prefill pool queues.
pub fn write_pd_chart(
    dir: &Path,
    curves: &[PdCurve],
    slo: Slo,
    rate_label: &str,
) -> Result<Vec<PathBuf>, BenchError> {
    struct Pd<'a>(&'a [PdCurve], Slo, &'a str);
    impl Chart for Pd<'_> {
        fn draw<DB: DrawingBackend>(
            &self,
            root: &DrawingArea<DB, plotters::coord::Shift>,
        ) -> DrawResult
        where
            DB::ErrorType: 'static,
        {
            draw_pd(root, self.0, self.1, self.2)
        }
    }
    write_svg_png(dir, "pd_vs_rate", (1400, 900), &Pd(curves, slo, rate_label))
}

type PdPick = fn(&PdPoint) -> f64;

/// One line per arm of `pick` against the rate, values below `floor` drawn at it.
fn pd_lines<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    curves: &[PdCurve],
    pick: PdPick,
    floor: f64,
) -> DrawResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: plotters::coord::CoordTranslate<From = (f64, f64)>,
{
    for (i, c) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut p: Vec<(f64, f64)> = c
            .points
            .iter()
            .map(|q| (q.rate, pick(q).max(floor)))
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart.draw_series(p.iter().map(|&q| Circle::new(q, 3, color.filled())))?;
        chart
            .draw_series(LineSeries::new(p, color.stroke_width(2)))?
            .label(c.policy.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    Ok(())
}

fn draw_pd<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    curves: &[PdCurve],
    slo: Slo,
    rate_label: &str,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let rates = curves.iter().flat_map(|c| c.points.iter().map(|p| p.rate));
    let x_min = rates.clone().fold(f64::INFINITY, f64::min);
    let x_max = rates.fold(0.0f64, f64::max);
    let x_min = if x_min.is_finite() { x_min } else { 0.0 };
    let x_pad = ((x_max - x_min) * 0.05).max(0.01);
    let x_range = (x_min - x_pad).max(0.0)..(x_max + x_pad);
    let metrics: [(&str, &str, PdPick, Option<f64>, bool); 4] = [
        (
            "TTFT p90 (dashed: SLO)",
            "TTFT p90 (ms, log)",
            |p| p.ttft_p90_ms,
            Some(slo.ttft_ms),
            true,
        ),
        (
            "TPOT p99 (dashed: SLO)",
            "TPOT p99 (ms, log)",
            |p| p.tpot_p99_ms,
            Some(slo.tpot_ms),
            true,
        ),
        (
            "Longest gap between two output tokens, p99 over requests",
            "stall p99 (ms, log)",
            |p| p.stall_p99_ms,
            None,
            true,
        ),
        (
            "Requests split (prefill pod + transfer)",
            "fraction split",
            |p| p.split_fraction,
            None,
            false,
        ),
    ];
    for (panel, (title, y_desc, pick, line, log)) in panels.iter().zip(metrics) {
        let ys = curves.iter().flat_map(|c| c.points.iter().map(pick));
        let mut y_lo = ys.clone().fold(f64::INFINITY, f64::min);
        let mut y_hi = ys.fold(0.0f64, f64::max);
        if let Some(l) = line {
            y_lo = y_lo.min(l);
            y_hi = y_hi.max(l);
        }
        if log {
            let y_lo = y_lo.clamp(0.01, f64::MAX) * 0.8;
            let y_hi = y_hi.max(y_lo * 2.0) * 1.25;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(x_range.clone(), (y_lo..y_hi).log_scale())?;
            chart
                .configure_mesh()
                .x_desc(rate_label)
                .y_desc(y_desc)
                .y_labels(10)
                .y_label_formatter(&axis_number)
                .draw()?;
            pd_lines(&mut chart, curves, pick, y_lo)?;
            if let Some(l) = line {
                draw_level(&mut chart, &x_range, l)?;
            }
            draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        } else {
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(x_range.clone(), 0.0..1.05)?;
            chart
                .configure_mesh()
                .x_desc(rate_label)
                .y_desc(y_desc)
                .draw()?;
            pd_lines(&mut chart, curves, pick, f64::MIN)?;
            draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor is the error of √(K·(K+S)) on each measured TTFT, `K` the TTFT less the wait
    /// for the step in flight and `S` that step; over the requests after warm-up that have a
    /// prediction and a phase.
    #[test]
    fn the_floor_predicts_the_geometric_mean_of_the_possible_ttfts() {
        let rec = |arrival_us, ttft_us, phase| crate::des::RequestRecord {
            arrival_us,
            first_token_us: arrival_us + ttft_us,
            predicted_ttft_us: Some(ttft_us),
            arrival_phase_us: phase,
            ..Default::default()
        };
        let mut requests = vec![rec(0, 1_000, Some((500, 600)))]; // warm-up: left out
        requests.extend((1..10).map(|i| rec(i * 10, 1_000, Some((0, 0)))));
        let mut run = PolicyRun {
            requests,
            ..Default::default()
        };
        // Arrived on idle engines: nothing unknown, no error.
        assert_eq!(ttft_mape_floor(&run), Some(0.0));
        // One waited 300 µs of a 400 µs step: K = 700, prediction √(700·1100).
        run.requests[5].arrival_phase_us = Some((300, 400));
        // No phase (no first token seen by the engine): not counted.
        run.requests[6].arrival_phase_us = None;
        let err = ((700.0f64 * 1100.0).sqrt() - 1000.0).abs() / 1000.0;
        let floor = ttft_mape_floor(&run).unwrap();
        assert!((floor - err / 8.0).abs() < 1e-12, "{floor}");
        // A policy that predicts nothing has no floor either.
        for r in &mut run.requests {
            r.predicted_ttft_us = None;
        }
        assert_eq!(ttft_mape_floor(&run), None);
    }

    /// The CDF's x ticks follow 1-2-5 steps inside the range, down to tenths: the tens of
    /// milliseconds where policies usually differ get labels.
    #[test]
    fn ticks_step_one_two_five_inside_the_range() {
        assert_eq!(
            one_two_five(12.0, 900.0),
            vec![20.0, 50.0, 100.0, 200.0, 500.0]
        );
        assert_eq!(one_two_five(0.1, 1.0), vec![0.1, 0.2, 0.5, 1.0]);
        assert!(one_two_five(3.0, 4.0).is_empty());
    }
}
