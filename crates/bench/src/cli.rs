//! `kvgate bench` and `kvgate demo`: flags, workload selection, running and reporting.

use std::io::BufReader;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvgate_core::{PdDecider, Policy, Role};
use kvgate_engine::EngineConfig;

use crate::BenchError;
use crate::capacity::{
    CapacityOptions, CapacityReport, CapacitySearch, CapacitySlo, Signals, compare_capacity,
};
use crate::des::{Arm, DesConfig, PolicyRun, ReplicaSpread, pd_tuning_for, run_arm};
use crate::report::{
    PdCurve, PdPoint, PolicyReport, RateCurve, Report, Slo, write_charts, write_pd_chart,
    write_rate_chart,
};
use crate::trace::parse_trace;
use crate::truth::{HardwareTruth, Priors};
use crate::workload::{
    MultiTurnConfig, ReplayOptions, SharedPrefixConfig, Workload, from_trace, merge, multi_turn,
    shared_prefix,
};

/// GPU preset of the simulated fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Gpu {
    /// Llama-3.1-8B on H100 (DESIGN.md coefficients).
    H100,
    /// Llama-3.1-8B on A100-80GB.
    A100,
    /// Half H100, half A100: a heterogeneous fleet.
    Mixed,
}

/// Built-in synthetic workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Synthetic {
    /// inference-perf's shared-prefix workload.
    SharedPrefix,
    /// Multi-turn chat sessions.
    MultiTurn,
    /// Both at once: half the rate shared-prefix questions, half multi-turn chat turns.
    Mix,
    /// Long unshared prompts (8,000 tokens) with long answers (400 tokens) for 60 s: every
    /// prefill is long and every engine decodes many sequences, where an aggregated prefill
    /// stalls the most decodes (prefill/decode disaggregation's case).
    LongPrompt,
    /// Short questions (100 tokens) after 16 shared 1,000-token system prompts, 300-token
    /// answers, for 60 s: little to prefill and most of it cached (where disaggregation has
    /// little to win).
    ShortCached,
}

/// How requests are spread over router replicas (a Kubernetes Service).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Spread {
    /// Round-robin over replicas.
    RoundRobin,
    /// Uniformly random replica.
    Random,
}

/// Flags shared by `bench` and `demo`.
#[derive(Args, Clone, Debug)]
pub struct FleetArgs {
    /// Simulated engines.
    #[arg(long, default_value_t = 8)]
    pub engines: usize,
    /// GPU preset of the engines.
    #[arg(long, value_enum, default_value_t = Gpu::H100)]
    pub gpu: Gpu,
    /// Override KV capacity per engine, in blocks of 16 tokens.
    #[arg(long)]
    pub num_gpu_blocks: Option<usize>,
    /// What the engines really are against what the routers are told: `declared` (as
    /// `--gpu` says, exact priors), `a100-as-h100`, `cpu-like` (prefill 7.5× dearer relative to
    /// the step base) or `three-speeds` (0.6×, 1×, 1.8× an H100 in rotation), all declared H100.
    /// Other than `declared`, the truth sets the engines' speed and `--gpu` must stay `h100`.
    #[arg(long, value_enum, default_value_t = HardwareTruth::Declared)]
    pub hardware_truth: HardwareTruth,
    /// Priors the routers get: `declared` (what the truth declares) or `truth` (each engine's
    /// true coefficients registered as its hardware class: correct priors).
    #[arg(long, value_enum, default_value_t = Priors::Declared)]
    pub priors: Priors,
    /// Turn off the online learning of each endpoint's step-time coefficients in every router
    /// (the declared prior and one speed factor, kvgate before it learnt).
    #[arg(long)]
    pub static_priors: bool,
    /// Metrics sampling interval, ms.
    #[arg(long, default_value_t = 100)]
    pub scrape_interval_ms: u64,
    /// Delay before a metrics sample reaches the router, ms.
    #[arg(long, default_value_t = 20)]
    pub metrics_delay_ms: u64,
    /// Delay before KV events reach the router, ms.
    #[arg(long, default_value_t = 10)]
    pub kv_event_delay_ms: u64,
    /// Upper end of the scrape intervals over router replicas, ms (default: no spread).
    #[arg(long)]
    pub scrape_interval_max_ms: Option<u64>,
    /// Upper end of the metrics delays over router replicas, ms (default: no spread).
    #[arg(long)]
    pub metrics_delay_max_ms: Option<u64>,
    /// Upper end of the KV-event delays over router replicas, ms (default: no spread).
    #[arg(long)]
    pub kv_event_delay_max_ms: Option<u64>,
    /// Independent router replicas, each with its own bookings, scrape phase and delays.
    #[arg(long, default_value_t = 1)]
    pub router_replicas: usize,
    /// How requests are spread over router replicas.
    #[arg(long, value_enum, default_value_t = Spread::RoundRobin)]
    pub replica_spread: Spread,
    /// Seed for the router and the synthetic workloads.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Goodput SLO on time to first token, ms.
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_ms: f64,
    /// Goodput SLO on time per output token, ms.
    #[arg(long, default_value_t = 100.0)]
    pub slo_tpot_ms: f64,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `kvgate bench`: compare policies on one workload.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Mooncake-format trace (JSONL with timestamp, input_length, output_length, hash_ids).
    #[arg(long, conflicts_with = "workload")]
    pub trace: Option<PathBuf>,
    /// A built-in synthetic workload instead of a trace.
    #[arg(long, value_enum)]
    pub workload: Option<Synthetic>,
    /// Comma-separated policies, or `all` for every one. Checked before anything runs; an
    /// unknown name is refused with the list of known ones.
    #[arg(long, default_value = "all")]
    pub policies: String,
    /// Replay only the first K requests.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Replay only the first T seconds of the trace.
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// Divide trace inter-arrival times by X (raises the load).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Spread each trace arrival over the MS milliseconds after its timestamp (trace time,
    /// before `--speedup`; uniform, seeded by `--seed`). For traces with bucketed timestamps:
    /// the Mooncake conversation trace stamps ~10 requests at each 3-second mark, which
    /// replayed as written reach the router at one instant (`--spread-arrivals-ms 3000`).
    #[arg(long, default_value_t = 0.0, value_name = "MS")]
    pub spread_arrivals_ms: f64,
    /// Arrival rate for synthetic workloads, requests (or sessions) per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Rate sweep for synthetic workloads: run the whole comparison once per rate
    /// (comma-separated, e.g. `10,20,40`). The JSON then holds `{"sweep": [{"rate", "report"}]}`
    /// and charts go to one subdirectory per rate.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["trace", "live"])]
    pub rates: Vec<f64>,
    /// Live mode: send the workload over HTTP to this OpenAI-compatible base URL instead of
    /// simulating (e.g. `http://127.0.0.1:8080` for `kvgate serve`).
    #[arg(long)]
    pub live: Option<String>,
    /// Model name sent in live mode [default: the first model the target's `/v1/models`
    /// lists].
    #[arg(long)]
    pub model: Option<String>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write charts (SVG and PNG) into this directory.
    #[arg(long)]
    pub charts: Option<PathBuf>,
    /// Write one JSON line per request and policy here: arrival, measured and predicted TTFT,
    /// prompt and cached tokens, engine, router replica (for looking into a prediction error
    /// or a tail request by request).
    #[arg(long)]
    pub requests_out: Option<PathBuf>,
    /// Capacity at SLO: per policy, bisect the arrival rate (trace speed-up from `--speedup`,
    /// or synthetic rate from `--rate`) for the highest one meeting the SLO.
    #[arg(long, conflicts_with_all = ["live", "rates"])]
    pub capacity: bool,
    /// Capacity SLO: bound on TTFT p90, ms.
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_p90_ms: f64,
    /// Capacity SLO: bound on TPOT p99, ms.
    #[arg(long, default_value_t = 100.0)]
    pub slo_tpot_p99_ms: f64,
    /// Capacity SLO: least fraction of servable requests served.
    #[arg(long, default_value_t = 0.99)]
    pub slo_goodput: f64,
    /// Capacity search: bisection probes after bracketing.
    #[arg(long, default_value_t = 6)]
    pub capacity_bisections: u32,
    /// Prefill/decode comparison on a fleet of P prefill and D decode pods (`P:D`, e.g. `2:6`;
    /// replaces `--engines`): the same P+D engines all aggregated (`aggregated`, routed by
    /// kvgate) against the P/D fleet under each of `--pd-deciders` (`pd-<decider>`), on the
    /// same work. `--policies` is not used.
    #[arg(long, value_name = "P:D", conflicts_with_all = ["prefill_engines", "decode_engines", "live"])]
    pub pd_fleet: Option<String>,
    /// Prefill pods of a P/D comparison (with `--decode-engines`; same as `--pd-fleet P:D`).
    #[arg(long, requires = "decode_engines", conflicts_with = "live")]
    pub prefill_engines: Option<usize>,
    /// Decode pods of a P/D comparison (with `--prefill-engines`).
    #[arg(long, requires = "prefill_engines")]
    pub decode_engines: Option<usize>,
    /// Deciders a P/D comparison runs, comma-separated, or `all`: `aggregated` (never split),
    /// `always`, `threshold` (llm-d: split above `--pd-threshold-tokens` uncached tokens),
    /// `cost` (kvgate).
    #[arg(long, default_value = "all")]
    pub pd_deciders: String,
    /// llm-d's threshold: split when more prompt tokens than this are uncached on the decode pod.
    #[arg(long, default_value_t = 10)]
    pub pd_threshold_tokens: u32,
    /// KV transfer link bandwidth between prefill and decode pods, GB/s (engines and routers
    /// alike) [default: the engine model's, 50 GB/s].
    #[arg(long)]
    pub transfer_bandwidth_gbps: Option<f64>,
    /// Fixed cost of one KV transfer, µs [default: the engine model's, 200 µs].
    #[arg(long)]
    pub transfer_latency_us: Option<u64>,
    /// Fleet and signal settings.
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// `kvgate demo`: a one-minute comparison on a built-in workload.
#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Where to write the report and charts.
    #[arg(long, default_value = "kvgate-report")]
    pub out: PathBuf,
    /// Fleet and signal settings.
    #[command(flatten)]
    pub fleet: FleetArgs,
}

fn des_config(f: &FleetArgs) -> Result<DesConfig, BenchError> {
    if f.engines == 0 {
        return Err(BenchError::NoEngines);
    }
    let mut engines = Vec::with_capacity(f.engines);
    for i in 0..f.engines {
        let mut e = match (f.gpu, i % 2) {
            (Gpu::H100, _) | (Gpu::Mixed, 0) => EngineConfig::h100(),
            _ => EngineConfig::a100(),
        };
        if let Some(b) = f.num_gpu_blocks {
            e.num_gpu_blocks = b;
        }
        engines.push(e);
    }
    if f.hardware_truth != HardwareTruth::Declared && f.gpu != Gpu::H100 {
        return Err(BenchError::InvalidArgument(
            "--hardware-truth other than declared sets the engines' speed; leave --gpu at h100",
        ));
    }
    let mut cfg = DesConfig::homogeneous(f.engines, EngineConfig::h100());
    cfg.engines = engines;
    crate::truth::apply(&mut cfg, f.hardware_truth, f.priors);
    cfg.static_priors = f.static_priors;
    cfg.scrape_interval_ms = f.scrape_interval_ms;
    cfg.metrics_delay_ms = f.metrics_delay_ms;
    cfg.kv_event_delay_ms = f.kv_event_delay_ms;
    cfg.scrape_interval_max_ms = f.scrape_interval_max_ms.unwrap_or(f.scrape_interval_ms);
    cfg.metrics_delay_max_ms = f.metrics_delay_max_ms.unwrap_or(f.metrics_delay_ms);
    cfg.kv_event_delay_max_ms = f.kv_event_delay_max_ms.unwrap_or(f.kv_event_delay_ms);
    if cfg.scrape_interval_max_ms < cfg.scrape_interval_ms
        || cfg.metrics_delay_max_ms < cfg.metrics_delay_ms
        || cfg.kv_event_delay_max_ms < cfg.kv_event_delay_ms
    {
        return Err(BenchError::InvalidArgument(
            "a --*-max-ms value is below its minimum",
        ));
    }
    if f.router_replicas == 0 {
        return Err(BenchError::InvalidArgument(
            "--router-replicas must be at least 1",
        ));
    }
    cfg.router_replicas = f.router_replicas;
    cfg.replica_spread = match f.replica_spread {
        Spread::RoundRobin => ReplicaSpread::RoundRobin,
        Spread::Random => ReplicaSpread::Random,
    };
    cfg.seed = f.seed;
    Ok(cfg)
}

/// Parses `--policies`: `all`, or names of [`Policy`]. An unknown name is an error, so a typo
/// fails before the first policy runs rather than after it.
pub fn parse_policies(s: &str) -> Result<Vec<Policy>, BenchError> {
    if s.trim() == "all" {
        return Ok(Policy::ALL.to_vec());
    }
    let policies = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse().map_err(|source| BenchError::Policy {
                policy: p.to_string(),
                source,
            })
        })
        .collect::<Result<Vec<Policy>, _>>()?;
    if policies.is_empty() {
        return Err(BenchError::InvalidArgument("--policies names no policy"));
    }
    Ok(policies)
}

/// Fails now if `path` cannot be written, so a bad `--json` path costs nothing rather than the
/// whole run. A file this check creates is removed again; the report is written at the end.
fn check_writable(path: &std::path::Path) -> Result<(), BenchError> {
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|source| BenchError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Runs every policy on `workload` and builds the report; runs are returned for charts, in
/// the order of `policies`. Policies run in parallel, one per core (each run is deterministic
/// and independent, so the report is the same however many run at once), each with its own
/// progress bar.
pub fn compare(
    workload: &Workload,
    policies: &[Policy],
    cfg: &DesConfig,
    slo: Slo,
    quiet: bool,
) -> Result<(Report, Vec<PolicyRun>), BenchError> {
    let arms: Vec<Arm> = policies.iter().map(|&p| Arm::Policy(p)).collect();
    compare_arms(workload, &arms, cfg, slo, quiet)
}

/// [`compare`] over arms: policies, or the P/D comparison's aggregated baseline and deciders.
pub fn compare_arms(
    workload: &Workload,
    arms: &[Arm],
    cfg: &DesConfig,
    slo: Slo,
    quiet: bool,
) -> Result<(Report, Vec<PolicyRun>), BenchError> {
    if workload.requests.is_empty() {
        return Err(BenchError::EmptyWorkload);
    }
    let total = workload.requests.len() as u64;
    let bars = MultiProgress::new();
    if quiet {
        bars.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style =
        ProgressStyle::with_template("{prefix:>20} [{bar:40}] {pos}/{len} requests {elapsed}")
            .expect("valid template")
            .progress_chars("=> ");
    let runs = crate::par_map(arms, |&arm| {
        let bar = bars.add(ProgressBar::new(total));
        bar.set_style(style.clone());
        bar.set_prefix(arm.name());
        let started = Instant::now();
        let run = run_arm(workload, arm, cfg, Some(&|n| bar.set_position(n)));
        bar.finish_and_clear();
        bars.remove(&bar);
        if !quiet && run.is_ok() {
            let _ = bars.println(format!(
                "{:>20} done in {:.1} s",
                arm.name(),
                started.elapsed().as_secs_f64()
            ));
        }
        run
    })
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let report = Report {
        workload: workload.name.clone(),
        requests: workload.requests.len(),
        engines: cfg.engines.len(),
        router_replicas: cfg.router_replicas,
        slo,
        policies: runs
            .iter()
            .map(|r| PolicyReport::from_run(r, slo))
            .collect(),
    };
    Ok((report, runs))
}

fn slo(f: &FleetArgs) -> Slo {
    Slo {
        ttft_ms: f.slo_ttft_ms,
        tpot_ms: f.slo_tpot_ms,
    }
}

/// How `args` replays a trace (at `--speedup`).
fn replay_options(args: &BenchArgs) -> ReplayOptions {
    ReplayOptions {
        speedup: args.speedup,
        limit: args.limit,
        max_seconds: args.max_seconds,
        spread_ms: args.spread_arrivals_ms,
        spread_seed: args.fleet.seed,
    }
}

/// `kvgate bench`.
pub fn bench(args: &BenchArgs) -> Result<Report, BenchError> {
    if !(args.speedup.is_finite() && args.speedup > 0.0) {
        return Err(BenchError::InvalidArgument("--speedup must be positive"));
    }
    if !(args.rate.is_finite() && args.rate > 0.0) {
        return Err(BenchError::InvalidArgument("--rate must be positive"));
    }
    if !(args.spread_arrivals_ms.is_finite() && args.spread_arrivals_ms >= 0.0) {
        return Err(BenchError::InvalidArgument(
            "--spread-arrivals-ms must be zero or positive",
        ));
    }
    // Everything that can be checked before the run is checked here, so a typo never costs a
    // run: the policy names (unused in live mode, where the gateway's policy routes) and the
    // JSON path.
    let arms = bench_arms(args)?;
    for path in [&args.json, &args.requests_out].into_iter().flatten() {
        check_writable(path)?;
    }
    let opts = replay_options(args);
    if !args.rates.is_empty() {
        return sweep(args);
    }
    if args.capacity {
        capacity(args, &arms)?;
        return Ok(Report::default());
    }
    let mut workload = match &args.trace {
        Some(path) => {
            let file = std::fs::File::open(path).map_err(|source| BenchError::Open {
                path: path.clone(),
                source,
            })?;
            let records = parse_trace(BufReader::new(file))?;
            from_trace(&path.display().to_string(), &records, opts)
        }
        None => synthetic(args.workload, args.rate, args.fleet.seed),
    };
    if args.trace.is_none()
        && let Some(n) = args.limit
    {
        workload.requests.truncate(n);
    }
    let (report, runs) = if let Some(url) = &args.live {
        live(&workload, url, args.model.as_deref(), slo(&args.fleet))?
    } else {
        let cfg = bench_config(args)?;
        compare_arms(&workload, &arms, &cfg, slo(&args.fleet), args.fleet.quiet)?
    };
    println!("{}", report.table());
    if is_pd(args) {
        println!("{}", report.pd_table());
        if let Some(dir) = &args.charts {
            let x = if args.trace.is_some() {
                args.speedup
            } else {
                args.rate
            };
            let files = write_pd_chart(
                dir,
                &pd_curves(&[(x, &report)]),
                slo(&args.fleet),
                rate_label(args.trace.is_some()),
            )?;
            println!("chart: {}", files[0].display());
        }
    }
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("JSON report: {}", path.display());
    }
    if let Some(path) = &args.requests_out {
        write_requests(path, &runs)?;
        println!("requests: {}", path.display());
    }
    if let Some(dir) = &args.charts {
        let files = write_charts(dir, &runs)?;
        println!(
            "charts: {}",
            files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(report)
}

/// One request of one policy's run, as `--requests-out` writes it.
#[derive(serde::Serialize)]
struct RequestLine<'a> {
    policy: &'a str,
    arrival_ms: f64,
    /// `None`: no first token (rejected or invalid).
    ttft_ms: Option<f64>,
    /// `None`: the policy does not predict.
    predicted_ttft_ms: Option<f64>,
    /// Why the router chose the engine (`None`: not routed).
    reason: Option<&'static str>,
    prompt_tokens: u32,
    /// Prompt tokens the router's index matched on the engine (`None`: not routed).
    matched_tokens: Option<u32>,
    cached_tokens: u32,
    output_tokens: u32,
    /// Mean time per output token after the first (`None`: not finished, or one token).
    tpot_ms: Option<f64>,
    /// The longest wait between two of its output tokens (`None` as for `tpot_ms`).
    max_itl_ms: Option<f64>,
    /// `None`: rejected.
    engine: Option<u32>,
    replica: u32,
    rejected: bool,
    invalid: bool,
}

/// Writes every run's requests to `path`, one JSON line each, policy by policy in arrival
/// order.
fn write_requests(path: &std::path::Path, runs: &[PolicyRun]) -> Result<(), BenchError> {
    use std::io::Write;
    let write_err = |source| BenchError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(write_err)?);
    for run in runs {
        let mut requests: Vec<_> = run.requests.iter().collect();
        requests.sort_by_key(|r| r.arrival_us);
        for r in requests {
            // Finished with more than one token: a TPOT and gaps between tokens exist.
            let decoded = r.finish_us > 0 && r.output_tokens > 1;
            let line = RequestLine {
                policy: &run.policy,
                arrival_ms: r.arrival_us as f64 / 1e3,
                ttft_ms: (r.first_token_us > 0)
                    .then(|| r.first_token_us.saturating_sub(r.arrival_us) as f64 / 1e3),
                predicted_ttft_ms: r.predicted_ttft_us.map(|p| p as f64 / 1e3),
                reason: r.reason.map(|r| r.as_str()),
                prompt_tokens: r.prompt_tokens,
                matched_tokens: r.matched_tokens,
                cached_tokens: r.cached_tokens,
                output_tokens: r.output_tokens,
                tpot_ms: decoded.then(|| {
                    r.finish_us.saturating_sub(r.first_token_us) as f64
                        / 1e3
                        / f64::from(r.output_tokens - 1)
                }),
                max_itl_ms: decoded.then(|| r.max_itl_us as f64 / 1e3),
                engine: (r.engine != u32::MAX).then_some(r.engine),
                replica: r.replica,
                rejected: r.rejected,
                invalid: r.invalid,
            };
            serde_json::to_writer(&mut out, &line)
                .map_err(|e| write_err(std::io::Error::other(e)))?;
            out.write_all(b"\n").map_err(write_err)?;
        }
    }
    out.flush().map_err(write_err)
}

/// The built-in synthetic workload `kind` (shared-prefix when `None`) at `rate`.
pub fn synthetic(kind: Option<Synthetic>, rate: f64, seed: u64) -> Workload {
    match kind {
        Some(Synthetic::Mix) => {
            // A fixed span of arrivals whose request count grows with the rate, so a capacity
            // search measures sustained load: a fixed request count compressed in time would
            // end as a burst the fleet drains after arrivals stop.
            const SPAN_S: f64 = 120.0;
            let turns = 5u32;
            let groups = 32u32;
            let half = rate / 2.0;
            let per_group = ((half * SPAN_S) / f64::from(groups)).ceil().max(1.0) as u32;
            let sessions = ((half * SPAN_S) / f64::from(turns)).ceil().max(1.0) as u32;
            let sp = shared_prefix(
                SharedPrefixConfig {
                    num_groups: groups,
                    num_prompts_per_group: per_group,
                    system_prompt_len: 4000,
                    question_len: 200,
                    output_len: 200,
                    rate_per_s: half,
                },
                seed,
            );
            let mt = multi_turn(
                MultiTurnConfig {
                    sessions,
                    turns,
                    system_prompt_len: 2000,
                    user_len: 300,
                    output_len: 200,
                    session_rate_per_s: half / f64::from(turns),
                    think_time_s: 5.0,
                },
                seed.wrapping_add(1),
            );
            merge(
                &format!(
                    "mix: {rate} req/s for ~{SPAN_S} s, half shared-prefix (32 4k-token system prompts, 200-token questions), half five-turn chats (2k system, 300-token turns, 5 s think time)"
                ),
                vec![sp, mt],
            )
        }
        Some(Synthetic::LongPrompt) => {
            const SPAN_S: f64 = 60.0;
            let n = (rate * SPAN_S).ceil().max(1.0) as u32;
            let mut w = shared_prefix(
                SharedPrefixConfig {
                    num_groups: n,
                    num_prompts_per_group: 1,
                    system_prompt_len: 7_000,
                    question_len: 1_000,
                    output_len: 400,
                    rate_per_s: rate,
                },
                seed,
            );
            w.name = format!(
                "long-prompt: {rate} req/s for ~{SPAN_S} s, unshared 8,000-token prompts, 400-token answers"
            );
            w
        }
        Some(Synthetic::ShortCached) => {
            const SPAN_S: f64 = 60.0;
            let groups = 16u32;
            let per_group = ((rate * SPAN_S) / f64::from(groups)).ceil().max(1.0) as u32;
            let mut w = shared_prefix(
                SharedPrefixConfig {
                    num_groups: groups,
                    num_prompts_per_group: per_group,
                    system_prompt_len: 1_000,
                    question_len: 100,
                    output_len: 300,
                    rate_per_s: rate,
                },
                seed,
            );
            w.name = format!(
                "short-cached: {rate} req/s for ~{SPAN_S} s, 16 shared 1,000-token system prompts, 100-token questions, 300-token answers"
            );
            w
        }
        Some(Synthetic::MultiTurn) => multi_turn(
            MultiTurnConfig {
                sessions: 200,
                turns: 5,
                system_prompt_len: 2000,
                user_len: 200,
                output_len: 200,
                session_rate_per_s: rate,
                think_time_s: 5.0,
            },
            seed,
        ),
        _ => shared_prefix(
            SharedPrefixConfig {
                num_groups: 32,
                num_prompts_per_group: 64,
                system_prompt_len: 4000,
                question_len: 200,
                output_len: 200,
                rate_per_s: rate,
            },
            seed,
        ),
    }
}

/// One point of a rate sweep.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SweepPoint {
    /// Arrival rate of this point.
    pub rate: f64,
    /// The comparison at that rate.
    pub report: Report,
}

fn sweep(args: &BenchArgs) -> Result<Report, BenchError> {
    if args.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(BenchError::InvalidArgument("--rates must all be positive"));
    }
    let cfg = bench_config(args)?;
    let arms = bench_arms(args)?;
    if let Some(path) = &args.json {
        check_writable(path)?;
    }
    let mut points: Vec<SweepPoint> = Vec::with_capacity(args.rates.len());
    for &rate in &args.rates {
        let mut workload = synthetic(args.workload, rate, args.fleet.seed);
        if let Some(n) = args.limit {
            workload.requests.truncate(n);
        }
        let (report, runs) =
            compare_arms(&workload, &arms, &cfg, slo(&args.fleet), args.fleet.quiet)?;
        println!("rate {rate}/s\n{}", report.table());
        if is_pd(args) {
            println!("{}", report.pd_table());
        }
        if let Some(dir) = &args.charts {
            write_charts(&dir.join(format!("rate-{rate}")), &runs)?;
        }
        points.push(SweepPoint { rate, report });
    }
    if let Some(dir) = &args.charts {
        let mut curves: Vec<RateCurve> = Vec::new();
        for point in &points {
            for p in &point.report.policies {
                match curves.iter_mut().find(|c| c.policy == p.policy) {
                    Some(c) => c.points.push((point.rate, p.ttft_ms.p90)),
                    None => curves.push(RateCurve {
                        policy: p.policy.clone(),
                        points: vec![(point.rate, p.ttft_ms.p90)],
                    }),
                }
            }
        }
        let files = write_rate_chart(
            dir,
            &curves,
            args.slo_ttft_p90_ms,
            "arrival rate (requests or sessions per second)",
        )?;
        println!("chart: {}", files[0].display());
        if is_pd(args) {
            let at: Vec<(f64, &Report)> = points.iter().map(|p| (p.rate, &p.report)).collect();
            let files = write_pd_chart(dir, &pd_curves(&at), slo(&args.fleet), rate_label(false))?;
            println!("chart: {}", files[0].display());
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({ "sweep": points }))
            .expect("sweep serialises");
        std::fs::write(path, text).map_err(|source| BenchError::Write {
            path: path.clone(),
            source,
        })?;
        println!("JSON report: {}", path.display());
    }
    Ok(points.pop().map(|p| p.report).unwrap_or_default())
}

fn capacity(args: &BenchArgs, arms: &[Arm]) -> Result<(), BenchError> {
    if !(args.slo_goodput.is_finite() && (0.0..=1.0).contains(&args.slo_goodput)) {
        return Err(BenchError::InvalidArgument(
            "--slo-goodput must be within 0..=1",
        ));
    }
    if !(args.slo_ttft_p90_ms > 0.0 && args.slo_tpot_p99_ms > 0.0) {
        return Err(BenchError::InvalidArgument("SLO bounds must be positive"));
    }
    let cfg = bench_config(args)?;
    let records = match &args.trace {
        Some(path) => {
            let file = std::fs::File::open(path).map_err(|source| BenchError::Open {
                path: path.clone(),
                source,
            })?;
            Some(parse_trace(BufReader::new(file))?)
        }
        None => None,
    };
    let name = args
        .trace
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let (kind, seed, replay) = (args.workload, args.fleet.seed, replay_options(args));
    let make = |rate: f64| -> Workload {
        match &records {
            Some(recs) => from_trace(
                &name,
                recs,
                ReplayOptions {
                    speedup: rate,
                    ..replay
                },
            ),
            None => {
                let mut w = synthetic(kind, rate, seed);
                if let Some(n) = replay.limit {
                    w.requests.truncate(n);
                }
                w
            }
        }
    };
    let is_trace = records.is_some();
    let start_rate = if is_trace { args.speedup } else { args.rate };
    let search = CapacitySearch {
        cfg: &cfg,
        slo: CapacitySlo {
            ttft_p90_ms: args.slo_ttft_p90_ms,
            tpot_p99_ms: args.slo_tpot_p99_ms,
            min_goodput: args.slo_goodput,
        },
        report_slo: slo(&args.fleet),
        opts: CapacityOptions {
            start_rate,
            max_bisections: args.capacity_bisections,
            ..CapacityOptions::default()
        },
        is_trace,
    };
    let quiet = args.fleet.quiet;
    let started = Instant::now();
    let found = compare_capacity(arms, &make, &search, &|c| {
        if !quiet {
            eprintln!(
                "{:>20} capacity {:.2} req/s after {} probes ({:.0} s)",
                c.policy,
                c.capacity_rps,
                c.probes.len(),
                started.elapsed().as_secs_f64()
            );
        }
    })?;
    let report = CapacityReport {
        workload: make(start_rate).name,
        rate_kind: if is_trace { "speedup" } else { "rate" }.to_string(),
        engines: cfg.engines.len(),
        router_replicas: cfg.router_replicas,
        signals: Signals::of(&cfg),
        slo: search.slo,
        options: Some(search.opts),
        policies: found,
        ceiling: (!is_pd(args))
            .then(|| crate::ceiling::work_ceiling(&cfg.engines, &make, start_rate))
            .flatten(),
    };
    println!("{}", report.table());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("JSON report: {}", path.display());
    }
    if let Some(dir) = &args.charts {
        let label = if is_trace {
            "trace speed-up (x real time)"
        } else {
            "arrival rate (generator requests/s)"
        };
        let files = write_rate_chart(dir, &report.curves(), args.slo_ttft_p90_ms, label)?;
        println!("chart: {}", files[0].display());
        if is_pd(args) {
            let slo = Slo {
                ttft_ms: args.slo_ttft_p90_ms,
                tpot_ms: args.slo_tpot_p99_ms,
            };
            let files = write_pd_chart(dir, &report.pd_curves(), slo, label)?;
            println!("chart: {}", files[0].display());
        }
    }
    Ok(())
}

/// Whether the command is a P/D comparison.
fn is_pd(args: &BenchArgs) -> bool {
    args.pd_fleet.is_some() || args.prefill_engines.is_some()
}

fn rate_label(is_trace: bool) -> &'static str {
    if is_trace {
        "trace speed-up (x real time)"
    } else {
        "arrival rate (generator requests/s)"
    }
}

/// Parses `--pd-fleet`'s `P:D`.
pub fn parse_pd_fleet(s: &str) -> Result<(usize, usize), BenchError> {
    let bad = BenchError::InvalidArgument("--pd-fleet takes P:D, e.g. 2:6");
    let (p, d) = s.split_once(':').ok_or(bad)?;
    let p: usize = p
        .trim()
        .parse()
        .map_err(|_| BenchError::InvalidArgument("--pd-fleet takes P:D, e.g. 2:6"))?;
    let d: usize = d
        .trim()
        .parse()
        .map_err(|_| BenchError::InvalidArgument("--pd-fleet takes P:D, e.g. 2:6"))?;
    Ok((p, d))
}

/// Parses `--pd-deciders`: `all`, or decider names. An unknown name is an error.
pub fn parse_pd_deciders(s: &str) -> Result<Vec<PdDecider>, BenchError> {
    if s.trim() == "all" {
        return Ok(Arm::PD_DECIDERS.to_vec());
    }
    let deciders = s
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            Arm::PD_DECIDERS
                .into_iter()
                .find(|k| k.as_str() == d)
                .ok_or(BenchError::InvalidArgument(
                    "--pd-deciders takes all, or some of aggregated,always,threshold,cost",
                ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if deciders.is_empty() {
        return Err(BenchError::InvalidArgument(
            "--pd-deciders names no decider",
        ));
    }
    Ok(deciders)
}

/// The P/D fleet's prefill and decode pod counts, if the command is a P/D comparison.
fn pd_counts(args: &BenchArgs) -> Result<Option<(usize, usize)>, BenchError> {
    let counts = match (&args.pd_fleet, args.prefill_engines, args.decode_engines) {
        (Some(s), _, _) => parse_pd_fleet(s)?,
        (None, Some(p), Some(d)) => (p, d),
        _ => return Ok(None),
    };
    if counts.0 == 0 || counts.1 == 0 {
        return Err(BenchError::InvalidArgument(
            "a P/D fleet needs at least one prefill and one decode pod",
        ));
    }
    Ok(Some(counts))
}

/// What `bench` runs: `--policies`, or in a P/D comparison the aggregated baseline and then
/// each of `--pd-deciders`.
fn bench_arms(args: &BenchArgs) -> Result<Vec<Arm>, BenchError> {
    if is_pd(args) {
        let mut arms = vec![Arm::Aggregated];
        arms.extend(
            parse_pd_deciders(&args.pd_deciders)?
                .into_iter()
                .map(Arm::Pd),
        );
        return Ok(arms);
    }
    Ok(parse_policies(&args.policies)?
        .into_iter()
        .map(Arm::Policy)
        .collect())
}

/// The fleet of `bench`: the fleet flags' config, and in a P/D comparison `P + D` engines with their
/// roles (prefill pods first), the link on every engine and the routers' transfer model set
/// from the same flags.
pub fn bench_config(args: &BenchArgs) -> Result<DesConfig, BenchError> {
    let Some((p, d)) = pd_counts(args)? else {
        return des_config(&args.fleet);
    };
    let mut fleet = args.fleet.clone();
    fleet.engines = p + d;
    let mut cfg = des_config(&fleet)?;
    if let Some(gbps) = args.transfer_bandwidth_gbps {
        if !(gbps.is_finite() && gbps > 0.0) {
            return Err(BenchError::InvalidArgument(
                "--transfer-bandwidth-gbps must be positive",
            ));
        }
        for e in &mut cfg.engines {
            e.kv_transfer.link_bandwidth_bytes_per_s = gbps * 1e9;
        }
    }
    if let Some(us) = args.transfer_latency_us {
        for e in &mut cfg.engines {
            e.kv_transfer.link_latency_us = us;
        }
    }
    cfg.pd = pd_tuning_for(&cfg.engines[0]);
    cfg.pd.threshold_tokens = args.pd_threshold_tokens;
    cfg.roles = (0..p + d)
        .map(|i| if i < p { Role::Prefill } else { Role::Decode })
        .collect();
    Ok(cfg)
}

/// P/D chart curves from reports at rates: TTFT p90, TPOT p99 and split fraction per arm.
pub fn pd_curves(at: &[(f64, &Report)]) -> Vec<PdCurve> {
    let mut curves: Vec<PdCurve> = Vec::new();
    for &(rate, report) in at {
        for p in &report.policies {
            let point = PdPoint {
                rate,
                ttft_p90_ms: p.ttft_ms.p90,
                tpot_p99_ms: p.tpot_ms.p99,
                stall_p99_ms: p.max_itl_ms.p99,
                split_fraction: p.pd.as_ref().map_or(0.0, |f| f.split_fraction),
            };
            match curves.iter_mut().find(|c| c.policy == p.policy) {
                Some(c) => c.points.push(point),
                None => curves.push(PdCurve {
                    policy: p.policy.clone(),
                    points: vec![point],
                }),
            }
        }
    }
    curves
}

fn live(
    workload: &Workload,
    url: &str,
    model: Option<&str>,
    slo: Slo,
) -> Result<(Report, Vec<PolicyRun>), BenchError> {
    if workload.requests.is_empty() {
        return Err(BenchError::EmptyWorkload);
    }
    let rt = tokio::runtime::Runtime::new().map_err(|source| BenchError::Write {
        path: PathBuf::from("<tokio runtime>"),
        source,
    })?;
    let model = match model {
        Some(m) => m.to_string(),
        None => {
            let m = rt
                .block_on(crate::live::served_model(url))
                .map_err(|reason| BenchError::NoModel {
                    url: url.to_string(),
                    reason,
                })?;
            eprintln!(
                "live: sending model {m} (the first {url}/v1/models lists; --model to choose)"
            );
            m
        }
    };
    let cfg = crate::live::LiveConfig {
        base_url: url.to_string(),
        model,
        timeout: std::time::Duration::from_secs(600),
        label: format!("live {url}"),
    };
    let live = rt.block_on(crate::live::run_live(workload, &cfg));
    for e in live.errors.iter().take(5) {
        eprintln!("live request failed: {e}");
    }
    // A run in which nothing succeeded measured nothing (a wrong --model, a gateway that is
    // down): that is a failure of the command, not a report of zeros.
    if live.run.requests.iter().all(|r| r.rejected) {
        return Err(BenchError::AllFailed {
            requests: live.run.requests.len(),
            first_error: live.errors.first().cloned().unwrap_or_default(),
        });
    }
    let mut row = PolicyReport::from_run(&live.run, slo);
    let itl_ms: Vec<f64> = live.itl_us.iter().map(|&u| u as f64 / 1000.0).collect();
    row.tpot_ms = crate::stats::Summary::of(&itl_ms);
    let report = Report {
        workload: workload.name.clone(),
        requests: workload.requests.len(),
        engines: 0,
        router_replicas: 1,
        slo,
        policies: vec![row],
    };
    Ok((report, vec![live.run]))
}

/// The demo's built-in workload: RAG-style shared system prompts mixed with multi-turn chats,
/// at a load where routing decides the tail.
pub fn demo_workload(seed: u64) -> Workload {
    let sp = shared_prefix(
        SharedPrefixConfig {
            num_groups: 64,
            num_prompts_per_group: 30,
            system_prompt_len: 8000,
            question_len: 400,
            output_len: 200,
            rate_per_s: 40.0,
        },
        seed,
    );
    let mt = multi_turn(
        MultiTurnConfig {
            sessions: 200,
            turns: 5,
            system_prompt_len: 2000,
            user_len: 500,
            output_len: 250,
            session_rate_per_s: 4.0,
            think_time_s: 6.0,
        },
        seed.wrapping_add(1),
    );
    merge(
        "demo: 64 shared 8k-token system prompts x 30 questions at 40 req/s, plus 200 five-turn chats",
        vec![sp, mt],
    )
}

/// Policies the demo compares: kvgate and the anchors as they ship in 2026, plus round-robin as
/// the floor.
pub const DEMO_POLICIES: [Policy; 8] = [
    Policy::Kvgate,
    Policy::LlmD,
    Policy::SglangCacheAware,
    Policy::GieDefault,
    Policy::Dynamo,
    Policy::DynamoSoftmax,
    Policy::SmgLeastLoad,
    Policy::RoundRobin,
];

/// The demo's scenario, the conditions under which what only kvgate does should matter:
/// several router replicas on stale signals (4 replicas, metrics every 50-100 ms arriving 20-60
/// ms late, KV events 10-50 ms late), hot shared prefixes, a KV cache small enough to reach its
/// cliff (8,000 blocks of 16 tokens per engine) and a heterogeneous fleet (H100 and A100
/// alternating). Flags the user set away from their defaults win.
pub fn demo_config(f: &FleetArgs) -> Result<DesConfig, BenchError> {
    let mut f = f.clone();
    if f.gpu == Gpu::H100 && f.hardware_truth == HardwareTruth::Declared {
        f.gpu = Gpu::Mixed;
    }
    if f.num_gpu_blocks.is_none() {
        f.num_gpu_blocks = Some(8_000);
    }
    if f.router_replicas == 1 {
        f.router_replicas = 4;
    }
    if f.scrape_interval_ms == 100 && f.scrape_interval_max_ms.is_none() {
        f.scrape_interval_ms = 50;
        f.scrape_interval_max_ms = Some(100);
    }
    if f.metrics_delay_ms == 20 && f.metrics_delay_max_ms.is_none() {
        f.metrics_delay_max_ms = Some(60);
    }
    if f.kv_event_delay_ms == 10 && f.kv_event_delay_max_ms.is_none() {
        f.kv_event_delay_max_ms = Some(50);
    }
    des_config(&f)
}

/// `workload` with every arrival time divided by `speedup`.
pub fn scale_arrivals(workload: &Workload, speedup: f64) -> Workload {
    let mut w = workload.clone();
    for r in &mut w.requests {
        r.arrival_us = (r.arrival_us as f64 / speedup).round() as u64;
    }
    w
}

/// The demo's closing sentence: who sustains how much more traffic at the SLO, and why; and,
/// with the work ceiling ([`crate::ceiling`]), how much of what the fleet could serve kvgate
/// reaches.
pub fn demo_conclusion(
    found: &[crate::capacity::PolicyCapacity],
    ceiling: Option<&crate::ceiling::WorkCeiling>,
) -> String {
    let mut s = demo_comparison(found);
    if let Some(c) = ceiling
        && let Some(k) = found.iter().find(|p| p.policy == Policy::Kvgate.as_str())
        && let Some(share) = c.share(k.capacity_rps)
    {
        s.push_str(&format!(
            " With every prefix cached wherever needed and the work split perfectly, the engines could compute {:.1} req/s (KV memory aside); kvgate reaches {:.0}% of it.",
            c.rps,
            share * 100.0
        ));
    }
    s
}

/// Who sustains how much more traffic at the SLO, and why.
fn demo_comparison(found: &[crate::capacity::PolicyCapacity]) -> String {
    let Some(k) = found.iter().find(|p| p.policy == Policy::Kvgate.as_str()) else {
        return "kvgate was not run.".to_string();
    };
    let best = found
        .iter()
        .filter(|p| p.policy != Policy::Kvgate.as_str())
        .max_by(|a, b| a.capacity_rps.total_cmp(&b.capacity_rps));
    let Some(b) = best else {
        return format!(
            "kvgate sustains {:.1} req/s at the SLO; no baseline was run.",
            k.capacity_rps
        );
    };
    if b.capacity_rps <= 0.0 && k.capacity_rps <= 0.0 {
        return "No policy met the SLO at any rate tried.".to_string();
    }
    let ratio = if b.capacity_rps > 0.0 {
        k.capacity_rps / b.capacity_rps
    } else {
        f64::INFINITY
    };
    let why = format!(
        "prefix-cache hit ratio kvgate {:.2} vs {} {:.2}, queue herding (max/mean waiting) kvgate {:.2} vs {} {:.2}",
        k.hit_ratio,
        b.policy,
        b.hit_ratio,
        k.herding.mean_max_over_mean_waiting,
        b.policy,
        b.herding.mean_max_over_mean_waiting
    );
    if ratio >= 1.0 {
        format!(
            "At the SLO kvgate sustains {:.1} req/s, {:.2}x the best baseline ({} at {:.1} req/s): {why}.",
            k.capacity_rps, ratio, b.policy, b.capacity_rps
        )
    } else {
        format!(
            "At the SLO {} sustains {:.1} req/s, more than kvgate's {:.1} req/s ({:.2}x): {why}.",
            b.policy, b.capacity_rps, k.capacity_rps, ratio
        )
    }
}

/// `kvgate demo`: the scenario of [`demo_config`] at the workload's own rate (table and
/// charts), then each policy's capacity at the SLO, and one sentence saying what it means.
pub fn demo(args: &DemoArgs) -> Result<Report, BenchError> {
    let workload = demo_workload(args.fleet.seed);
    let cfg = demo_config(&args.fleet)?;
    let policies = DEMO_POLICIES;
    let truth = args.fleet.hardware_truth;
    let gpus = (0..cfg.engines.len())
        .map(|i| match truth.engine(i) {
            Some((_, class)) => class,
            None if cfg.engines[i].step == kvgate_engine::StepModel::A100_LLAMA31_8B => {
                "A100".to_string()
            }
            None => "H100".to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let gpus = if truth == HardwareTruth::Declared {
        gpus
    } else {
        format!(
            "{gpus}; routers told {}{}",
            match args.fleet.priors {
                Priors::Declared => "h100",
                Priors::Truth => "the truth",
            },
            if args.fleet.static_priors {
                ", not learning"
            } else {
                ""
            }
        )
    };
    let signals = Signals::of(&cfg);
    println!(
        "kvgate demo: {} simulated Llama-3.1-8B engines ({gpus}), {} KV blocks of {} tokens each, \
         {} router replicas; metrics every {}-{} ms arriving {}-{} ms late, KV events {}-{} ms late\n\
         workload: {} ({} requests)\n",
        cfg.engines.len(),
        cfg.engines[0].num_gpu_blocks,
        cfg.engines[0].block_size,
        cfg.router_replicas,
        signals.scrape_interval_ms[0],
        signals.scrape_interval_ms[1],
        signals.metrics_delay_ms[0],
        signals.metrics_delay_ms[1],
        signals.kv_event_delay_ms[0],
        signals.kv_event_delay_ms[1],
        workload.name,
        workload.requests.len(),
    );
    let (report, runs) = compare(
        &workload,
        &policies,
        &cfg,
        slo(&args.fleet),
        args.fleet.quiet,
    )?;
    println!("{}", report.table());
    std::fs::create_dir_all(&args.out).map_err(|source| BenchError::Write {
        path: args.out.clone(),
        source,
    })?;
    let files = write_charts(&args.out, &runs)?;

    let search = CapacitySearch {
        cfg: &cfg,
        slo: CapacitySlo {
            ttft_p90_ms: args.fleet.slo_ttft_ms,
            tpot_p99_ms: args.fleet.slo_tpot_ms,
            ..CapacitySlo::default()
        },
        report_slo: slo(&args.fleet),
        opts: CapacityOptions {
            start_rate: 1.0,
            max_bisections: 3,
            tolerance: 0.05,
            ..CapacityOptions::default()
        },
        is_trace: true,
    };
    let make = |speedup: f64| scale_arrivals(&workload, speedup);
    let arms: Vec<Arm> = policies.iter().map(|&p| Arm::Policy(p)).collect();
    let found = compare_capacity(&arms, &make, &search, &|_| {})?;
    let capacity = CapacityReport {
        workload: workload.name.clone(),
        rate_kind: "speedup".to_string(),
        engines: cfg.engines.len(),
        router_replicas: cfg.router_replicas,
        signals,
        slo: search.slo,
        options: Some(search.opts),
        policies: found,
        ceiling: crate::ceiling::work_ceiling(&cfg.engines, &make, 1.0),
    };
    println!("{}", capacity.table());
    let rate_files = write_rate_chart(
        &args.out,
        &capacity.curves(),
        search.slo.ttft_p90_ms,
        "load (x the demo workload's arrival rate)",
    )?;
    let conclusion = demo_conclusion(&capacity.policies, capacity.ceiling.as_ref());
    let json = args.out.join("report.json");
    let fleet = serde_json::json!({
        "engines": cfg.engines.len(),
        "gpus": gpus,
        "model": "Llama-3.1-8B",
        "num_gpu_blocks": cfg.engines[0].num_gpu_blocks,
        "block_size": cfg.engines[0].block_size,
        "router_replicas": cfg.router_replicas,
        "signals": capacity.signals,
    });
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "fleet": fleet,
        "workload": workload.name,
        "report": report,
        "capacity": capacity,
        "conclusion": conclusion,
    }))
    .expect("demo report serialises");
    std::fs::write(&json, text).map_err(|source| BenchError::Write {
        path: json.clone(),
        source,
    })?;
    println!("report: {}", json.display());
    for f in files.iter().chain(&rate_files) {
        println!("chart:  {}", f.display());
    }
    println!("\n{conclusion}");
    Ok(report)
}
