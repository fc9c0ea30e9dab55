//! Discovery: what a vLLM-compatible endpoint can tell about itself before any routing.
//!
//! Membership gives the router addresses; the facts that make routing precise (which model and
//! adapters a pod serves, its block size so request prompts can be hashed into the same blocks
//! the engine caches, its KV capacity for the cliff penalty) are best read from the engine itself
//! instead of being copied into configuration, where they drift. `/v1/models` lists the base
//! model and (in vLLM) loaded LoRA adapters as entries with a `parent`; `/metrics` carries the
//! cache configuration and the LoRA state as info gauges.

use std::sync::Arc;
use std::time::Duration;

use kvgate_core::endpoint::EngineKind;
use serde::Deserialize;

use crate::clock::MonotonicClock;
use crate::metrics::detect_engine;
use crate::metrics::{MetricsError, parse_vllm_info};
use crate::scrape::{ScrapeError, engine_client, fetch};

/// Budget for each discovery request. Discovery runs when an endpoint joins, off the request
/// path, so it can afford to wait longer than a scrape for an engine that is still warming up.
pub const DISCOVER_TIMEOUT_MS: u64 = 5_000;

/// Facts learned from one endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointFacts {
    /// Base models served (`/v1/models` entries without a parent).
    pub models: Vec<String>,
    /// Longest context accepted, if reported.
    pub max_model_len: Option<u32>,
    /// Tokens per KV block.
    pub block_size: Option<u32>,
    /// KV capacity in blocks (summed over DP ranks).
    pub num_gpu_blocks: Option<u64>,
    /// LoRA adapters known to be servable: loaded ones from `/v1/models` plus those seen running
    /// or waiting in the newest `lora_requests_info` series. Sorted, without duplicates.
    pub lora_adapters: Vec<String>,
    /// Maximum adapters loaded at once.
    pub max_lora: Option<u32>,
    /// The engine serving the endpoint, detected from its `/metrics` families; `None` when
    /// it exposes none of a known engine.
    pub engine: Option<EngineKind>,
}

/// Why discovery failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoverError {
    /// A request failed (timeout, transport, status, size).
    #[error("{path}: {source}")]
    Fetch {
        /// Which path was being fetched.
        path: &'static str,
        /// What went wrong.
        #[source]
        source: ScrapeError,
    },
    /// `/v1/models` was not the expected JSON.
    #[error("/v1/models is not an OpenAI model list: {source}")]
    ModelsJson {
        /// The JSON error.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// `/metrics` could not be parsed.
    #[error("/metrics: {0}")]
    Metrics(#[from] MetricsError),
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    max_model_len: Option<u32>,
}

/// Reads `/v1/models` and `/metrics` from `base_url` (e.g. `http://10.0.0.7:8000`).
pub async fn discover(base_url: &str) -> Result<EndpointFacts, DiscoverError> {
    let client = engine_client().map_err(|e| DiscoverError::Fetch {
        path: "client",
        source: ScrapeError::Transport {
            source: Arc::new(e),
        },
    })?;
    let base = base_url.trim_end_matches('/');
    let models_body = get(&client, &format!("{base}/v1/models"), "/v1/models").await?;
    let metrics_body = get(&client, &format!("{base}/metrics"), "/metrics").await?;
    facts_from(&models_body, &metrics_body)
}

async fn get(
    client: &reqwest::Client,
    url: &str,
    path: &'static str,
) -> Result<Vec<u8>, DiscoverError> {
    let clock = MonotonicClock::new();
    let fetched = tokio::time::timeout(
        Duration::from_millis(DISCOVER_TIMEOUT_MS),
        fetch(client, url, &clock),
    )
    .await
    .map_err(|_| ScrapeError::Timeout {
        timeout_ms: DISCOVER_TIMEOUT_MS,
    })
    .and_then(|r| r);
    fetched
        .map(|(_, body)| body)
        .map_err(|source| DiscoverError::Fetch { path, source })
}

/// The pure part of discovery: both bodies in, facts out.
fn facts_from(models_body: &[u8], metrics_body: &[u8]) -> Result<EndpointFacts, DiscoverError> {
    let list: ModelList =
        serde_json::from_slice(models_body).map_err(|e| DiscoverError::ModelsJson {
            source: Arc::new(e),
        })?;
    let text = std::str::from_utf8(metrics_body).map_err(|_| DiscoverError::Fetch {
        path: "/metrics",
        source: ScrapeError::NotUtf8,
    })?;
    let info = parse_vllm_info(text)?;
    let mut facts = EndpointFacts {
        block_size: info.block_size,
        num_gpu_blocks: info.num_gpu_blocks,
        max_lora: info.max_lora,
        engine: detect_engine(text),
        ..EndpointFacts::default()
    };
    for entry in list.data {
        match entry.parent {
            Some(parent) if parent != entry.id => facts.lora_adapters.push(entry.id),
            _ => {
                facts.max_model_len = facts.max_model_len.max(entry.max_model_len);
                facts.models.push(entry.id);
            }
        }
    }
    facts.lora_adapters.extend(
        info.running_lora_adapters
            .into_iter()
            .chain(info.waiting_lora_adapters),
    );
    facts.lora_adapters.sort();
    facts.lora_adapters.dedup();
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODELS: &str = r#"{"object":"list","data":[
        {"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model","created":1,"owned_by":"vllm","root":"meta-llama/Llama-3.1-8B-Instruct","parent":null,"max_model_len":8192},
        {"id":"sql-lora","object":"model","created":1,"owned_by":"vllm","root":"/adapters/sql","parent":"meta-llama/Llama-3.1-8B-Instruct","max_model_len":null}]}"#;

    const METRICS: &str = "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
# TYPE vllm:cache_config_info gauge\n\
vllm:cache_config_info{block_size=\"16\",engine=\"0\",num_gpu_blocks=\"29205\"} 1.0\n\
# HELP vllm:lora_requests_info Running stats on lora requests.\n\
# TYPE vllm:lora_requests_info gauge\n\
vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 1.7e9\n\
vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"chat-lora\",waiting_lora_adapters=\"sql-lora\"} 1.8e9\n";

    #[test]
    fn base_models_and_adapters_are_told_apart() {
        let facts = facts_from(MODELS.as_bytes(), METRICS.as_bytes()).unwrap();
        assert_eq!(facts.models, vec!["meta-llama/Llama-3.1-8B-Instruct"]);
        assert_eq!(facts.max_model_len, Some(8192));
        assert_eq!(facts.block_size, Some(16));
        assert_eq!(facts.num_gpu_blocks, Some(29205));
        assert_eq!(facts.lora_adapters, vec!["chat-lora", "sql-lora"]);
        assert_eq!(facts.max_lora, Some(4));
        assert_eq!(facts.engine, Some(EngineKind::Vllm));
    }

    #[test]
    fn discovery_needs_no_load_gauges() {
        // An engine that has not run a step yet exports only its info gauges.
        let metrics = "vllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"None\"} 1.0\n";
        let facts = facts_from(MODELS.as_bytes(), metrics.as_bytes()).unwrap();
        assert_eq!(facts.block_size, Some(32));
        assert_eq!(facts.num_gpu_blocks, None);
    }

    #[test]
    fn html_model_list_is_a_typed_error() {
        let err = facts_from(b"<html>502 Bad Gateway</html>", METRICS.as_bytes()).unwrap_err();
        assert!(matches!(err, DiscoverError::ModelsJson { .. }));
    }
}
