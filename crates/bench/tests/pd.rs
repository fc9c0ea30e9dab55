//! Prefill/decode disaggregation in the discrete-event runner: determinism, what the engines
//! compute on each side, how splits are counted, and the two scenarios the comparison exists for
//! (a saturated prefill pool, where kvgate's decider must beat llm-d's threshold; long prompts
//! over many running decodes, where disaggregation must beat the same GPUs aggregated).

use kvgate_bench::des::{Arm, DesConfig, PolicyRun, run_arm};
use kvgate_bench::report::{PdFigures, PolicyReport, Slo};
use kvgate_bench::workload::{SharedPrefixConfig, Workload, shared_prefix};
use kvgate_core::{PdDecider, Role};
use kvgate_engine::EngineConfig;

/// `p` prefill and `d` decode H100s (prefill pods first).
fn pd_fleet(p: usize, d: usize) -> DesConfig {
    let mut cfg = DesConfig::homogeneous(p + d, EngineConfig::h100());
    cfg.roles = (0..p + d)
        .map(|i| if i < p { Role::Prefill } else { Role::Decode })
        .collect();
    cfg.seed = 7;
    cfg
}

/// Unshared prompts of `prompt` tokens with `output`-token answers at `rate` req/s.
fn unshared(n: u32, prompt: u32, output: u32, rate: f64, seed: u64) -> Workload {
    shared_prefix(
        SharedPrefixConfig {
            num_groups: n,
            num_prompts_per_group: 1,
            system_prompt_len: prompt - 16,
            question_len: 16,
            output_len: output,
            rate_per_s: rate,
        },
        seed,
    )
}

fn run(w: &Workload, arm: Arm, cfg: &DesConfig) -> PolicyRun {
    run_arm(w, arm, cfg, None).expect("the run completes")
}

fn report(run: &PolicyRun) -> PolicyReport {
    PolicyReport::from_run(run, Slo::default())
}

#[test]
fn same_seed_same_run_for_every_decider() {
    let w = unshared(40, 1_200, 30, 30.0, 1);
    let cfg = pd_fleet(1, 2);
    for arm in [Arm::Aggregated]
        .into_iter()
        .chain(Arm::PD_DECIDERS.map(Arm::Pd))
    {
        let a = run(&w, arm, &cfg);
        assert_eq!(a, run(&w, arm, &cfg), "{} is not deterministic", arm.name());
        assert_eq!(
            serde_json::to_string(&report(&a)).unwrap(),
            serde_json::to_string(&report(&run(&w, arm, &cfg))).unwrap()
        );
    }
}

#[test]
fn decode_engines_compute_one_prompt_token_per_split_request() {
    let w = unshared(30, 2_000, 20, 20.0, 2);
    let cfg = pd_fleet(2, 2);
    let r = run(&w, Arm::Pd(PdDecider::Always), &cfg);
    assert!(r.requests.iter().all(|q| q.split && q.finish_us > 0));
    for (e, sources) in r.prompt_sources.iter().enumerate() {
        let decoded = r
            .requests
            .iter()
            .filter(|q| q.engine as usize == e)
            .collect::<Vec<_>>();
        let prefilled = r
            .requests
            .iter()
            .filter(|q| q.prefill_engine as usize == e)
            .collect::<Vec<_>>();
        match cfg.roles[e] {
            Role::Decode => {
                // The engine's own counters: the last prompt token of each request (to sample
                // the first output token), the rest loaded from the prefill pod.
                assert_eq!(sources.local_compute, decoded.len() as u64, "engine {e}");
                let loaded: u64 = decoded.iter().map(|q| u64::from(q.transfer_tokens)).sum();
                assert_eq!(sources.external_kv_transfer, loaded, "engine {e}");
                assert!(prefilled.is_empty());
            }
            _ => {
                assert!(decoded.is_empty(), "a prefill pod decoded");
                let prompts: u64 = prefilled.iter().map(|q| u64::from(q.prompt_tokens)).sum();
                assert_eq!(
                    sources.local_compute + sources.local_cache_hit,
                    prompts,
                    "engine {e}"
                );
                assert_eq!(sources.external_kv_transfer, 0);
            }
        }
    }
    // Unshared prompts: the decode pod holds none of it, so the whole prompt moves (the engine
    // loads it all, then recomputes the last token, as vLLM's NixlConnector does).
    for q in &r.requests {
        assert_eq!(q.transfer_tokens, q.prompt_tokens);
        assert!(q.transfer_us > 0);
        assert!(q.first_token_us > q.arrival_us);
    }
}

#[test]
fn splits_and_transfers_are_counted_per_decider() {
    let w = unshared(30, 1_500, 20, 20.0, 3);
    let cfg = pd_fleet(1, 3);
    let always = report(&run(&w, Arm::Pd(PdDecider::Always), &cfg));
    let f = always.pd.expect("a P/D fleet reports P/D figures");
    assert_eq!((f.prefill_engines, f.decode_engines), (1, 3));
    assert_eq!(f.split_fraction, 1.0);
    assert_eq!(f.transfers, w.requests.len());
    assert!(f.transfer_ms.mean > 0.0);
    assert!(f.prefill_pod_share > 0.99, "{}", f.prefill_pod_share);

    let never = run(&w, Arm::Pd(PdDecider::Aggregated), &cfg);
    let f = PdFigures::of(&never).unwrap();
    assert_eq!((f.split_fraction, f.transfers), (0.0, 0));
    assert_eq!(
        never.prefill_tokens_per_engine[0], 0,
        "the prefill pod idles"
    );
    assert_eq!(never.requests_per_engine[0], 0);

    // The baseline runs the same four engines aggregated: no P/D figures, nothing split.
    let agg = run(&w, Arm::Aggregated, &cfg);
    assert!(PdFigures::of(&agg).is_none());
    assert!(agg.requests.iter().all(|q| !q.split));
    assert!(agg.requests_per_engine.iter().all(|&n| n > 0));
}
