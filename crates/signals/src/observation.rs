//! What the I/O loops send to the router: one channel of [`Observation`]s per router, so data
//! planes only apply what arrives and never talk to engines themselves.

use kvgate_core::observe::{KvEventBatch, MetricsSample};

use crate::scrape::ScrapeError;

/// The endpoint an observation is about: its `host:port` address, as in
/// `EndpointSpec::address`. The data plane maps it to its `EndpointId`; keeping the address
/// here means the adapters need no access to the router's id table.
pub type EndpointKey = String;

/// One thing learned about one endpoint, stamped with the shared [`crate::Clock`].
#[derive(Debug, Clone)]
pub enum Observation {
    /// A metrics scrape succeeded.
    Metrics {
        /// Which endpoint.
        endpoint: EndpointKey,
        /// When the response arrived (see [`crate::scrape`] for why this instant).
        taken_at_us: u64,
        /// The normalised sample.
        sample: MetricsSample,
        /// Size of the page it was read from, bytes.
        body_bytes: usize,
    },
    /// A metrics scrape failed; the previous sample keeps ageing.
    ScrapeFailed {
        /// Which endpoint.
        endpoint: EndpointKey,
        /// When the failure was detected.
        at_us: u64,
        /// Why.
        error: ScrapeError,
    },
    /// A batch of KV events, delivered in sequence order (replayed ones included).
    KvBatch {
        /// Which endpoint.
        endpoint: EndpointKey,
        /// When the batch was received (for replayed batches, when the replay delivered it).
        received_at_us: u64,
        /// The decoded batch.
        batch: KvEventBatch,
    },
    /// Batches `expected..got` are lost for good: the router's precise view of this endpoint
    /// has holes and should fall back to approximate tracking.
    KvGap {
        /// Which endpoint.
        endpoint: EndpointKey,
        /// First lost sequence number.
        expected: u64,
        /// First sequence number received after the loss.
        got: u64,
    },
    /// A gap was filled by replay: every batch up to the current one has been delivered.
    KvResynced {
        /// Which endpoint.
        endpoint: EndpointKey,
    },
    /// The connection to the publisher dropped (the socket reconnects by itself): events
    /// published meanwhile are missed, so the router stops trusting its precise view of this
    /// endpoint until a batch arrives again.
    KvDisconnected {
        /// Which endpoint.
        endpoint: EndpointKey,
        /// When the drop was noticed.
        at_us: u64,
    },
    /// A new KV-event subscriber for the endpoint starts (its first message, before any batch
    /// of its source): what an earlier source taught is void from here, whatever of it was
    /// still queued before this (see `Router::kv_publisher_restarted`).
    KvSubscribed {
        /// Which endpoint.
        endpoint: EndpointKey,
    },
    /// The publisher restarted, so the engine's cache is empty: forget every block it held.
    KvPublisherRestarted {
        /// Which endpoint.
        endpoint: EndpointKey,
        /// When the restart was detected.
        at_us: u64,
    },
}

impl Observation {
    /// The endpoint the observation is about.
    pub fn endpoint(&self) -> &str {
        match self {
            Self::Metrics { endpoint, .. }
            | Self::ScrapeFailed { endpoint, .. }
            | Self::KvBatch { endpoint, .. }
            | Self::KvGap { endpoint, .. }
            | Self::KvResynced { endpoint }
            | Self::KvSubscribed { endpoint }
            | Self::KvDisconnected { endpoint, .. }
            | Self::KvPublisherRestarted { endpoint, .. } => endpoint,
        }
    }
}
