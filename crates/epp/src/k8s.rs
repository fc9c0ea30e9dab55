//! Kubernetes discovery: watch one `InferencePool` and the pods its selector matches, and keep
//! the router's endpoint set equal to the ready pods × the pool's target ports.
//!
//! **Semantics.** A pod is an endpoint (one per `targetPorts` entry, address `podIP:port`) while
//! it has a pod IP, its `Ready` condition is `True` and it is not terminating (no
//! `deletionTimestamp`). Everything else is left out of the wanted set, which
//! [`Control::set_endpoints`] turns into: new pods join (and start their metrics scraper, KV-event
//! subscriber when `--pod-kv-events-port` is given, and model discovery), pods that leave the set
//! drain (they get new requests only if nothing else can serve; in-flight ones finish) and are
//! removed once their last in-flight request ends. A pool that is deleted empties the set. A pool
//! whose selector or ports change restarts the pod watch.
//!
//! **Watching.** Both watches use `kube::runtime::watcher` (list, then watch from the list's
//! resource version, relisting after errors with kube's default backoff), so the picker follows
//! the API server without polling. A relist (`Init` … `InitDone`) replaces the pod set as a whole,
//! so pods deleted while the watch was down do not linger. The picker reports SERVING on its
//! health port only after the first complete pod list, as the reference picker waits for its
//! datastore to sync.
//!
//! Both `inference.networking.k8s.io/v1` (`selector.matchLabels`, `targetPorts[].number`) and the
//! older `inference.networking.x-k8s.io/v1alpha2` shape (`selector` as a flat label map,
//! `targetPortNumber`) are read.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config};
use kvgate_core::Role;
use kvgate_runtime::config::{EndpointConfig, UpstreamProtocol};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use kvgate_runtime::control::Control;

/// API group of the v1 `InferencePool` (the reference picker's `--pool-group` default).
pub const DEFAULT_POOL_GROUP: &str = "inference.networking.k8s.io";

/// The pre-v1 API group, served at version `v1alpha2`.
pub const ALPHA_POOL_GROUP: &str = "inference.networking.x-k8s.io";

/// Why Kubernetes discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// Neither in-cluster config nor a kubeconfig was found.
    #[error("no Kubernetes configuration found")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("kubernetes client")]
    Client(#[source] kube::Error),
}

/// Which pool to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRef {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (pods are watched there too).
    pub namespace: String,
    /// API group.
    pub group: String,
}

/// What every discovered pod endpoint is configured with besides its address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodEndpointTemplate {
    /// Models the pods serve (empty: learned from each pod's `/v1/models`).
    pub models: Vec<String>,
    /// Port of each pod's KV-event publisher, if subscribed.
    pub kv_events_port: Option<u16>,
    /// Port of each pod's KV-event replay socket.
    pub kv_replay_port: Option<u16>,
}

/// The parts of an `InferencePool` spec discovery uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolSpec {
    /// Pod label selector (`matchLabels`).
    pub selector: BTreeMap<String, String>,
    /// Model server ports on each pod.
    pub target_ports: Vec<u16>,
    /// `appProtocol` (v1): `kubernetes.io/h2c` marks HTTP/2 model servers. The picker never
    /// carries request bodies (Envoy does, and reads the protocol from the same pool), so it
    /// only records it on each endpoint's config.
    pub protocol: UpstreamProtocol,
}

impl PoolSpec {
    /// Reads the spec of a v1 or v1alpha2 `InferencePool` object; `None` if it has no usable
    /// selector or port.
    pub fn from_object(obj: &DynamicObject) -> Option<Self> {
        let spec = obj.data.get("spec")?;
        let sel = spec.get("selector")?;
        let labels = sel.get("matchLabels").unwrap_or(sel);
        let selector: BTreeMap<String, String> = labels
            .as_object()?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect();
        let port = |v: &Value| v.as_u64().and_then(|p| u16::try_from(p).ok());
        let mut target_ports: Vec<u16> = match spec.get("targetPorts") {
            Some(Value::Array(ps)) => ps
                .iter()
                .filter_map(|p| p.get("number").and_then(port))
                .collect(),
            _ => spec
                .get("targetPortNumber")
                .and_then(port)
                .into_iter()
                .collect(),
        };
        target_ports.dedup();
        let protocol = match spec.get("appProtocol").and_then(Value::as_str) {
            Some(UpstreamProtocol::K8S_H2C) => UpstreamProtocol::H2c,
            _ => UpstreamProtocol::Http1,
        };
        (!target_ports.is_empty() && !selector.is_empty()).then_some(Self {
            selector,
            target_ports,
            protocol,
        })
    }

    fn label_selector(&self) -> String {
        self.selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A pod as discovery sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// `status.podIP`.
    pub ip: Option<String>,
    /// `Ready` condition is `True`.
    pub ready: bool,
    /// Has a `deletionTimestamp`.
    pub terminating: bool,
    /// Its role in a disaggregated pool, from llm-d's `llm-d.ai/role` label: `prefill`, or
    /// decode for `decode`, `both` and no label (llm-d's prefill and decode filters).
    pub role: Role,
}

/// The pod label llm-d marks prefill and decode pods with.
pub const ROLE_LABEL: &str = "llm-d.ai/role";

impl PodView {
    /// Reads a pod.
    pub fn of(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        Self {
            ip: status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty()),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            // llm-d's filters: only `prefill` pods prefill; `decode`, `both` and unlabelled pods
            // decode (and serve whole requests), so a decode pod is never named as a prefiller.
            role: match pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ROLE_LABEL))
                .map(String::as_str)
            {
                Some("prefill") => Role::Prefill,
                _ => Role::Decode,
            },
        }
    }

    /// Whether it may get new requests.
    pub fn serving(&self) -> bool {
        self.ready && !self.terminating && self.ip.is_some()
    }
}

/// The endpoint set wanted for `pods` under `spec`.
pub fn wanted_endpoints(
    spec: &PoolSpec,
    pods: &BTreeMap<String, PodView>,
    template: &PodEndpointTemplate,
) -> Vec<EndpointConfig> {
    let mut out = Vec::new();
    for pod in pods.values().filter(|p| p.serving()) {
        let Some(ip) = &pod.ip else { continue };
        // IPv6 pod IPs need brackets in host:port.
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.clone()
        };
        for port in &spec.target_ports {
            out.push(EndpointConfig {
                address: format!("{host}:{port}"),
                kv_events: template.kv_events_port.map(|p| format!("tcp://{host}:{p}")),
                // With --kv-events-listen the pods' events arrive on the picker's socket, and
                // their replay sockets still serve gaps (checked at start-up: a replay port
                // needs one of the two).
                kv_replay: template.kv_replay_port.map(|p| format!("tcp://{host}:{p}")),
                models: template.models.clone(),
                lora_adapters: Vec::new(),
                role: pod.role,
                engine: Default::default(),
                hardware_class: String::new(),
                relative_cost: 1.0,
                protocol: spec.protocol,
                // The sidecar on the decode pod runs the transfer; the picker only names pods.
                pd_protocol: Default::default(),
                bootstrap_port: None,
            });
        }
    }
    out
}

/// A Kubernetes client from `kubeconfig`, else in-cluster config, else `$KUBECONFIG` /
/// `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, DiscoveryError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(DiscoveryError::Kubeconfig)?;
            Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(DiscoveryError::Kubeconfig)?
        }
        None => Config::infer().await.map_err(DiscoveryError::Infer)?,
    };
    Client::try_from(config).map_err(DiscoveryError::Client)
}

fn pool_resource(group: &str) -> ApiResource {
    let version = if group == ALPHA_POOL_GROUP {
        "v1alpha2"
    } else {
        "v1"
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, "InferencePool"),
        "inferencepools",
    )
}

type PodEvents = Pin<Box<dyn Stream<Item = Result<Event<Pod>, watcher::Error>> + Send>>;

fn pod_watch(client: &Client, namespace: &str, spec: &PoolSpec) -> PodEvents {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let cfg = watcher::Config::default().labels(&spec.label_selector());
    Box::pin(watcher::watcher(pods, cfg).default_backoff())
}

async fn next_pod_event(s: &mut Option<PodEvents>) -> Option<Result<Event<Pod>, watcher::Error>> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

struct State {
    spec: Option<PoolSpec>,
    pods: BTreeMap<String, PodView>,
    relist: Option<BTreeMap<String, PodView>>,
    synced: bool,
}

/// Watches `pool` and its pods until `stop`, applying the endpoint set to `control`; sets
/// `synced` once the first complete pod list (or the pool's absence) is known.
pub async fn run_discovery(
    client: Client,
    pool: PoolRef,
    template: PodEndpointTemplate,
    control: Arc<Control>,
    synced: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let pools: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &pool.namespace, &pool_resource(&pool.group));
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", pool.name));
    let mut pool_events = Box::pin(watcher::watcher(pools, cfg).default_backoff());
    let mut pod_events: Option<PodEvents> = None;
    let mut st = State {
        spec: None,
        pods: BTreeMap::new(),
        relist: None,
        synced: false,
    };
    let apply = |st: &State| {
        let wanted = st
            .spec
            .as_ref()
            .map(|s| wanted_endpoints(s, &st.pods, &template))
            .unwrap_or_default();
        tracing::debug!(endpoints = wanted.len(), "applying discovered endpoints");
        control.set_endpoints(&wanted);
        if st.synced {
            synced.send_replace(true);
        }
    };
    // Whether the pool's current (re)list showed it: a list without it (a relist after the
    // watch was down, when its Delete was never seen) means it is gone.
    let mut listed = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            ev = pool_events.next() => {
                let Some(ev) = ev else { return };
                let obj = match ev {
                    Ok(Event::InitApply(o)) => {
                        listed = true;
                        Some(o)
                    }
                    Ok(Event::Apply(o)) => Some(o),
                    Ok(Event::Delete(_)) => None,
                    Ok(Event::Init) => {
                        listed = false;
                        continue;
                    }
                    Ok(Event::InitDone) if !listed && st.spec.is_some() => {
                        tracing::warn!(pool = %pool.name, namespace = %pool.namespace, "InferencePool no longer listed (deleted while the watch was down)");
                        None
                    }
                    Ok(Event::InitDone) => {
                        if st.spec.is_none() {
                            tracing::warn!(pool = %pool.name, namespace = %pool.namespace, "InferencePool not found; no endpoints until it exists");
                            st.synced = true;
                            apply(&st);
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "InferencePool watch failed; retrying");
                        continue;
                    }
                };
                let spec = obj.as_ref().and_then(|o| {
                    let s = PoolSpec::from_object(o);
                    if s.is_none() {
                        tracing::warn!(pool = %pool.name, "InferencePool has no usable selector or targetPorts");
                    }
                    s
                });
                if spec != st.spec {
                    tracing::info!(pool = %pool.name, spec = ?spec, "InferencePool changed; watching its pods");
                    pod_events = spec.as_ref().map(|s| pod_watch(&client, &pool.namespace, s));
                    st.spec = spec;
                    // Keep the known pods until the new watch's first list replaces them: a port
                    // change must not drain pods that still match.
                    if st.spec.is_none() {
                        st.pods.clear();
                    }
                    st.relist = None;
                    // Without a spec there is nothing to wait for; with one, the pod list decides.
                    st.synced = st.synced || st.spec.is_none();
                    apply(&st);
                }
            }
            ev = next_pod_event(&mut pod_events) => {
                let Some(ev) = ev else {
                    pod_events = None;
                    continue;
                };
                match ev {
                    Ok(Event::Init) => {
                        st.relist = Some(BTreeMap::new());
                        continue;
                    }
                    Ok(Event::InitApply(p)) => {
                        let name = p.metadata.name.clone().unwrap_or_default();
                        st.relist.get_or_insert_with(BTreeMap::new).insert(name, PodView::of(&p));
                        continue;
                    }
                    Ok(Event::InitDone) => {
                        st.pods = st.relist.take().unwrap_or_default();
                        st.synced = true;
                    }
                    Ok(Event::Apply(p)) => {
                        let name = p.metadata.name.clone().unwrap_or_default();
                        st.pods.insert(name, PodView::of(&p));
                    }
                    Ok(Event::Delete(p)) => {
                        st.pods.remove(&p.metadata.name.clone().unwrap_or_default());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pod watch failed; retrying");
                        continue;
                    }
                }
                apply(&st);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(spec: serde_json::Value) -> DynamicObject {
        let mut o = DynamicObject::new("p", &pool_resource(DEFAULT_POOL_GROUP));
        o.data = serde_json::json!({ "spec": spec });
        o
    }

    #[test]
    fn v1_and_alpha_specs_parse() {
        let v1 = PoolSpec::from_object(&pool(serde_json::json!({
            "selector": {"matchLabels": {"app": "vllm"}},
            "targetPorts": [{"number": 8000}, {"number": 8001}],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}
        })))
        .unwrap();
        assert_eq!(v1.target_ports, vec![8000, 8001]);
        assert_eq!(v1.label_selector(), "app=vllm");
        assert_eq!(v1.protocol, UpstreamProtocol::Http1);
        let h2c = PoolSpec::from_object(&pool(serde_json::json!({
            "selector": {"matchLabels": {"app": "vllm"}},
            "targetPorts": [{"number": 8000}],
            "appProtocol": "kubernetes.io/h2c"
        })))
        .unwrap();
        assert_eq!(h2c.protocol, UpstreamProtocol::H2c);
        let pods = [(
            "p".to_owned(),
            PodView {
                ip: Some("10.0.0.1".into()),
                ready: true,
                terminating: false,
                role: Role::Both,
            },
        )]
        .into();
        let eps = wanted_endpoints(&h2c, &pods, &PodEndpointTemplate::default());
        assert_eq!(eps[0].protocol, UpstreamProtocol::H2c);
        let alpha = PoolSpec::from_object(&pool(serde_json::json!({
            "selector": {"app": "vllm", "tier": "a"},
            "targetPortNumber": 8000
        })))
        .unwrap();
        assert_eq!(alpha.target_ports, vec![8000]);
        assert_eq!(alpha.label_selector(), "app=vllm,tier=a");
        assert!(PoolSpec::from_object(&pool(serde_json::json!({"selector": {}}))).is_none());
    }

    #[test]
    fn only_ready_non_terminating_pods_with_ips_are_wanted() {
        let spec = PoolSpec {
            selector: [("app".into(), "vllm".into())].into(),
            target_ports: vec![8000],
            protocol: UpstreamProtocol::Http1,
        };
        let view = |ip: Option<&str>, ready, terminating| PodView {
            ip: ip.map(str::to_owned),
            ready,
            terminating,
            role: Role::Both,
        };
        let pods: BTreeMap<String, PodView> = [
            ("a".into(), view(Some("10.0.0.1"), true, false)),
            ("b".into(), view(Some("10.0.0.2"), false, false)),
            ("c".into(), view(Some("10.0.0.3"), true, true)),
            ("d".into(), view(None, true, false)),
            ("e".into(), view(Some("fd00::5"), true, false)),
        ]
        .into();
        let t = PodEndpointTemplate {
            kv_events_port: Some(5557),
            ..PodEndpointTemplate::default()
        };
        let w = wanted_endpoints(&spec, &pods, &t);
        let addrs: Vec<&str> = w.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, vec!["10.0.0.1:8000", "[fd00::5]:8000"]);
        assert_eq!(w[0].kv_events.as_deref(), Some("tcp://10.0.0.1:5557"));
        assert_eq!(w[0].kv_replay, None);
    }
}
