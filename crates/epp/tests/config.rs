//! Configuration: the `kvgate serve` YAML (with endpoint hot reload) and a bare
//! `EndpointPickerConfig` file both work; contradictory flags and bad files are typed errors.

use std::path::PathBuf;
use std::time::Duration;

use kvgate_testkit::eventually_sync;

use kvgate_epp::{Epp, EppArgs, EppError};
use kvgate_runtime::config::PolicyChoice;

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvgate-epp-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn args(config: Option<PathBuf>) -> EppArgs {
    EppArgs {
        config,
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        ..EppArgs::default()
    }
}

const GIE_CONFIG: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"#;

#[tokio::test]
async fn bare_endpoint_picker_config_is_the_policy() {
    let path = temp_file("gie.yaml", GIE_CONFIG);
    let mut a = args(Some(path));
    a.routing.endpoints = vec!["127.0.0.1:9".into()];
    a.routing.models = vec!["m".into()];
    let cfg = a.load_config().unwrap();
    assert!(matches!(&cfg.policy, PolicyChoice::Yaml(t) if t.contains("EndpointPickerConfig")));
    assert_eq!(cfg.endpoints[0].address, "127.0.0.1:9");
    let epp = Epp::start(&a).await.expect("starts with a GIE config");
    assert_eq!(epp.control.ready_endpoints(), 1);

    let bad = temp_file(
        "bad-gie.yaml",
        &GIE_CONFIG.replace("queue-scorer\n-", "no-such-scorer\n-"),
    );
    let err = Epp::start(&args(Some(bad))).await.unwrap_err();
    assert!(matches!(err, EppError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn serve_config_endpoints_are_reloaded() {
    let path = temp_file(
        "serve.yaml",
        "endpoints:\n  - url: http://127.0.0.1:9\n    models: [m]\nport: 1234\n",
    );
    let epp = Epp::start(&args(Some(path.clone()))).await.unwrap();
    assert_eq!(epp.control.endpoint_addresses(), vec!["127.0.0.1:9"]);
    // Rewrite with a different endpoint; make sure the modification time moves.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(
        &path,
        "endpoints:\n  - url: http://127.0.0.1:10\n    models: [m]\n",
    )
    .unwrap();
    eventually_sync("config reload applied", Duration::from_secs(10), || {
        epp.control.endpoint_addresses() == vec!["127.0.0.1:10"]
    })
    .await;
}

#[tokio::test]
async fn static_endpoints_and_a_pool_are_exclusive_and_bad_files_are_errors() {
    let mut a = args(None);
    a.routing.endpoints = vec!["127.0.0.1:9".into()];
    a.pool_name = Some("p".into());
    assert!(matches!(
        Epp::start(&a).await.unwrap_err(),
        EppError::Flags(_)
    ));
    let bad = temp_file("bad.yaml", "endpoints: [{url: 'https://x:1'}]\n");
    assert!(matches!(
        Epp::start(&args(Some(bad))).await.unwrap_err(),
        EppError::Config(_)
    ));
    let missing = std::env::temp_dir().join("kvgate-epp-no-such-config.yaml");
    assert!(matches!(
        Epp::start(&args(Some(missing))).await.unwrap_err(),
        EppError::Config(_)
    ));
}

/// A pod replay port with no way to receive the pods' events is refused at start-up (it was
/// silently unused).
#[tokio::test]
async fn a_pod_replay_port_without_events_is_refused() {
    let args = EppArgs {
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        pool_name: Some("pool".into()),
        pod_kv_replay_port: Some(5558),
        ..EppArgs::default()
    };
    match Epp::start(&args).await {
        Err(EppError::Flags(why)) => assert!(why.contains("--pod-kv-replay-port"), "{why}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("started with a replay port and no KV events"),
    }
}
