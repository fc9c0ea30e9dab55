//! The routing brain: turns timestamped observations of a fleet of model servers into routing
//! decisions.
//!
//! Pure, synchronous and deterministic: no I/O, no async runtime, no wall clock (every call takes
//! `now_us` from its caller) and no hidden randomness (callers pass a seeded RNG). That is what
//! lets the HTTP gateway, the Envoy endpoint picker and the discrete-event benchmark run the very
//! same policy code. Wire formats never reach this crate: adapters in `kvgate-signals` and the
//! data planes translate them into the types of [`observe`] and [`endpoint`].
#![deny(missing_docs)]

pub mod endpoint;
pub mod observe;
