//! A `kvgate serve` in front of a simulated fleet, as the process-level tests start it: the
//! endpoint configs of a fleet's engines, the base config, and a gateway that has discovered
//! its endpoints. Shared by `serve.rs`, `replicas.rs` and `pd.rs`.
// Each test binary that includes this module uses only some of its helpers.
#![allow(dead_code)]

use std::time::Duration;

use kvgate_gateway::Gateway;
use kvgate_runtime::config::{DataPlaneConfig, EndpointConfig, Overrides};
use kvgate_sim::Fleet;
use kvgate_testkit::eventually;

/// The endpoint at `address` as a config file would give it (defaults for everything else).
pub fn endpoint(address: String) -> EndpointConfig {
    let mut cfg =
        DataPlaneConfig::from_yaml(&format!("endpoints: [{{url: 'http://{address}'}}]")).unwrap();
    cfg.endpoints.remove(0)
}

/// Every engine of `f`, subscribed to its KV events (and replay) when `kv_events`.
pub fn endpoints_of(f: &Fleet, kv_events: bool) -> Vec<EndpointConfig> {
    f.engines
        .iter()
        .map(|e| {
            let mut ep = endpoint(e.http_addr.to_string());
            if kv_events {
                ep.kv_events = Some(e.kv_pub_endpoint.clone());
                ep.kv_replay = Some(e.kv_replay_endpoint.clone());
            }
            ep
        })
        .collect()
}

/// Loopback, ephemeral ports, a 50 ms scrape.
pub fn base_config(endpoints: Vec<EndpointConfig>) -> DataPlaneConfig {
    DataPlaneConfig {
        host: "127.0.0.1".into(),
        port: 0,
        admin_port: 0,
        endpoints,
        scrape_interval_ms: 50,
        ..DataPlaneConfig::default()
    }
}

/// Starts a gateway on `cfg` and waits until `want` endpoints are ready.
pub async fn start_gateway(cfg: DataPlaneConfig, want: usize) -> Gateway {
    let gw = Gateway::start(cfg, Overrides::default())
        .await
        .expect("gateway starts");
    let control = gw.control.clone();
    eventually("endpoints discovered", Duration::from_secs(10), || {
        let c = control.clone();
        async move { c.ready_endpoints() >= want }
    })
    .await;
    gw
}
