//! The routing brain: turns timestamped observations of a fleet of model servers into routing
//! decisions.
//!
//! Pure, synchronous and deterministic: no I/O, no async runtime, no wall clock (every call takes
//! `now_us` from its caller) and no hidden randomness (callers pass a seeded RNG). That is what
//! lets the HTTP gateway, the Envoy endpoint picker and the discrete-event benchmark run the very
//! same policy code. Wire formats never reach this crate: adapters in `kvgate-signals` and the
//! data planes translate them into the types of [`observe`] and [`endpoint`].
//!
//! Map of the crate, each module documenting its design decisions:
//! * [`router`]: the [`Router`] object and the host rules every policy shares (eligibility,
//!   last resorts, shedding, address-ordered candidates, booking).
//! * [`keys`]: the router's own block keys (a chain over token ids), so nothing depends on an
//!   engine's hash seed or algorithm; [`engine_keys`] learns each engine hash → key alias from
//!   `BlockStored`.
//! * [`kv_seq`]: the one sequence rule of a KV-event stream (first batch, gaps, replays,
//!   restarts), shared by the router and the KV-event subscriber.
//! * [`index`]: the prefix index (precise from KV events, approximate from decisions; layout,
//!   eviction, trust).
//! * [`contract`]: the self-check of the precise index against the engines' reported cached
//!   tokens.
//! * [`estimate`]: dead-reckoned load per endpoint and its reconciliation with scraped samples;
//!   online calibration.
//! * [`cost`]: the kvgate TTFT model and the KV cliff.
//! * [`learn`]: each endpoint's step-time coefficients, fitted online from its first tokens.
//! * [`policies`]: filter/scorer/picker roles, the [`Policy`] names, and one module per policy
//!   (kvgate's anti-herding softmax picker, and each baseline with the source it follows).
//! * [`config`]: presets, tuning constants (each default explained) and YAML formats.
#![deny(missing_docs)]

pub mod config;
pub mod contract;
pub mod cost;
pub mod endpoint;
pub mod engine_keys;
pub mod error;
pub mod estimate;
pub mod index;
pub mod keys;
pub mod kv_seq;
pub mod learn;
pub mod observe;
pub mod pd;
pub mod policies;
pub mod request;
pub mod router;
pub mod testing;

/// The former name of [`policies`], kept for existing imports.
pub use policies as plugins;

pub use config::{FilterKind, PickerKind, ProfileConfig, RouterConfig, ScorerKind, Tuning};
pub use contract::ContractChange;
pub use endpoint::{EndpointId, EndpointSpec, EndpointState, EngineKind, Role, Tier};
pub use error::{CoreError, RouteError};
pub use estimate::LoadEstimate;
pub use keys::KeyScope;
pub use observe::{BlockExtra, KvEvent, KvEventBatch, MetricsSample};
pub use pd::{PdDecider, PdDecision, PdReason, PdTuning};
pub use policies::Policy;
pub use request::{
    BookingPlan, CandidateReport, Decision, DecisionReason, FailureKind, OracleView, Outcome,
    Phase, PromptKeys, RoutingRequest, TrueLoad,
};
pub use router::{
    ApproximateReason, EndpointView, FinishReport, IndexMode, Price, Router, SeqCheck,
};
