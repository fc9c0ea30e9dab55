//! Shared test harnesses.

pub mod envoy;
