//! Typed errors of the routing core: configuration problems ([`CoreError`]) and per-request
//! routing failures ([`RouteError`]). The data planes map them to HTTP statuses or ext_proc
//! immediate responses; this crate never does.

use crate::endpoint::EndpointId;

/// Configuration and membership errors.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// No endpoint with this id (never added, or removed and released).
    #[error("unknown endpoint {id:?}")]
    UnknownEndpoint {
        /// The id asked for.
        id: EndpointId,
    },
    /// `RouterConfig::for_policy` got a name it does not know.
    #[error("unknown policy `{name}` (known: {known})")]
    UnknownPolicy {
        /// The name asked for.
        name: String,
        /// Comma-separated list of known names.
        known: String,
    },
    /// A plugin `type` in a config file that this router does not implement.
    #[error("unknown plugin type `{plugin_type}`; known types: {known}")]
    UnknownPluginType {
        /// The `type` as written.
        plugin_type: String,
        /// Every type this router implements, comma-separated.
        known: String,
    },
    /// A profile refers to a plugin name that no `plugins` entry defines.
    #[error("profile `{profile}` refers to undefined plugin `{plugin_ref}`")]
    UnknownPluginRef {
        /// Profile name.
        profile: String,
        /// The `pluginRef` as written.
        plugin_ref: String,
    },
    /// A plugin's `parameters` could not be read.
    #[error("plugin `{plugin}`: bad parameters: {source}")]
    PluginParameters {
        /// Plugin name (or type).
        plugin: String,
        /// What the YAML decoder said.
        #[source]
        source: serde_norway::Error,
    },
    /// A profile has no picker, or more than one.
    #[error("profile `{profile}` must have exactly one picker, has {count}")]
    PickerCount {
        /// Profile name.
        profile: String,
        /// Number of pickers found.
        count: usize,
    },
    /// A config defines no scheduling profile.
    #[error("config defines no scheduling profile")]
    NoProfile,
    /// A numeric setting is out of its valid range.
    #[error("setting `{field}` = {value} is out of range ({expected})")]
    OutOfRange {
        /// Setting name.
        field: &'static str,
        /// The value given.
        value: f64,
        /// The valid range, in words.
        expected: &'static str,
    },
    /// The YAML document could not be parsed.
    #[error("config is not valid YAML for kvgate or EndpointPickerConfig")]
    Yaml {
        /// What the YAML decoder said.
        #[source]
        source: serde_norway::Error,
    },
}

/// Why a request could not be routed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// No endpoint (in any state) serves this model.
    #[error("no endpoint serves model `{model}`")]
    UnknownModel {
        /// Requested model.
        model: String,
    },
    /// The model is known but no endpoint is eligible (role, adapter, subset, all gone).
    #[error("no eligible endpoint for model `{model}`")]
    NoEndpoints {
        /// Requested model.
        model: String,
    },
    /// A sheddable request (priority < 0) met a saturated pool.
    #[error("request shed: pool saturated and priority {priority} is sheddable")]
    Shed {
        /// The request's priority.
        priority: i32,
    },
    /// The oracle policy was asked to pick without an [`crate::OracleView`].
    #[error("the oracle policy needs an OracleView (simulation only)")]
    NoOracle,
    /// A scorer returned NaN or an infinity; the host refuses to rank with it.
    #[error("scorer `{scorer}` returned a non-finite score for endpoint {endpoint:?}")]
    NonFiniteScore {
        /// Scorer name.
        scorer: String,
        /// Endpoint it scored.
        endpoint: EndpointId,
    },
    /// A picker returned an index outside the candidate list.
    #[error("picker `{picker}` returned candidate {index} of {len}")]
    BadPick {
        /// Picker name.
        picker: String,
        /// Index returned.
        index: usize,
        /// Number of candidates.
        len: usize,
    },
}

impl RouteError {
    /// Whether the caller may retry the same request later with a fair chance of success.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Shed { .. } | Self::NoEndpoints { .. })
    }
}
