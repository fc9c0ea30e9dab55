//! The data-plane runtime: everything `kvgate serve` (HTTP) and `kvgate epp` (Envoy ext_proc)
//! share below their wire protocols, so the two carry one routing decision the same way.
//!
//! Why it is built this way:
//! - **Siblings over one runtime.** The gateway and the picker differ only in how a request
//!   reaches them and how the decision is carried out (proxying bytes vs. answering Envoy). Both
//!   depend on this crate and neither on the other, as linkerd's inbound and outbound proxies
//!   sit on `app-core`; a concern written here cannot drift between them.
//! - **One owner for live state.** [`control::Control`] owns the core router (behind one
//!   lock), endpoint membership and identity (address ↔ id), and the signal tasks that feed
//!   the router observations; data planes ask it rather than keep copies.
//! - **The data plane only does I/O.** Decisions, load estimates and the prefix index live in
//!   the pure `kvgate-core`; this crate turns requests into routing requests ([`openai`],
//!   [`tokenize`]), applies signal observations, measures responses ([`meter`]) to calibrate
//!   the core, and exports what happened ([`metrics`]). A pick returns one
//!   [`booking::Booking`] that both data planes drive the same way, so a request is reported to
//!   the core and counted in the metrics once, whichever wire carried it.
//! - **Typed config, bounded lifecycle.** [`config`] parses raw YAML and flags, then validates
//!   into a typed config; [`lifecycle`] owns a server's tasks, its bounded shutdown and config
//!   reload, so both data planes start, reload and end alike; every listener accepts through
//!   [`accept::Acceptor`], which backs off when descriptors run out.
#![deny(missing_docs)]

pub mod accept;
pub mod anthropic;
pub mod booking;
pub mod capture;
pub mod config;
pub mod control;
pub mod decision_log;
pub mod lifecycle;
pub mod meter;
pub mod metrics;
pub mod openai;
pub mod tokenize;

use std::path::PathBuf;

/// Why a data plane could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A configuration value is invalid.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid YAML for the data plane.
    #[error("cannot parse config file {path}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_norway::Error,
    },
    /// The router refused its configuration (unknown policy, bad plugin config).
    #[error("router configuration")]
    Router(#[source] kvgate_core::CoreError),
    /// The configured HuggingFace tokenizer could not be loaded.
    #[error("tokenizer")]
    Tokenizer(#[source] kvgate_tokens::TokenizerError),
    /// A listener could not be bound.
    #[error("cannot bind {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}
