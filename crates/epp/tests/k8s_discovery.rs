//! Kubernetes discovery against a fake API server: an axum server on 127.0.0.1 answering the
//! list and watch calls kube-rs makes for an `InferencePool` and its pods, reached through a
//! kubeconfig file, exactly as `kvgate epp --pool-name --pool-namespace --kubeconfig` would.
//!
//! Every address stays on 127.0.0.1: the "pod" has IP 127.0.0.1 and the pool's two target ports
//! are two `kvgate-sim` engines, so endpoints come and go with the pool and the pod.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use futures::StreamExt;
use kvgate_engine::EngineConfig;
use kvgate_epp::{Epp, EppArgs};
use kvgate_runtime::config::RoutingFlags;
use kvgate_sim::{FleetConfig, start_fleet};
use kvgate_testkit::eventually_sync;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

const NS: &str = "inference";
const MODEL: &str = kvgate_sim::config::DEFAULT_MODEL;

/// One resource collection of the fake API server: current objects, an event log (so a watch
/// from a list's resourceVersion misses nothing) and live subscribers.
struct Collection {
    kind: &'static str,
    api_version: &'static str,
    rv: u64,
    objects: BTreeMap<String, Value>,
    log: Vec<(u64, String)>,
    live: broadcast::Sender<(u64, String)>,
    queries: Vec<String>,
    /// Watches from a resourceVersion below this are answered 410 Gone (compacted history).
    expired_below: u64,
}

impl Collection {
    fn new(kind: &'static str, api_version: &'static str) -> Self {
        Self {
            kind,
            api_version,
            rv: 1,
            objects: BTreeMap::new(),
            log: Vec::new(),
            live: broadcast::channel(256).0,
            queries: Vec::new(),
            expired_below: 0,
        }
    }

    fn put(&mut self, mut obj: Value) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        obj["apiVersion"] = json!(self.api_version);
        obj["kind"] = json!(self.kind);
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        let kind = if self.objects.insert(name, obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.emit(kind, obj);
    }

    fn delete(&mut self, name: &str) {
        self.rv += 1;
        if let Some(mut obj) = self.objects.remove(name) {
            obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            self.emit("DELETED", obj);
        }
    }

    /// `name` is deleted while every watch is down: open watches end, the delete is never
    /// sent, and the history before it is compacted (a watcher resuming gets 410 Gone and
    /// must list again).
    fn vanish(&mut self, name: &str) {
        self.rv += 1;
        self.objects.remove(name);
        self.expired_below = self.rv;
        self.log.clear();
        self.live = broadcast::channel(256).0;
    }

    fn emit(&mut self, kind: &str, obj: Value) {
        let line = format!("{}\n", json!({"type": kind, "object": obj}));
        self.log.push((self.rv, line.clone()));
        let _ = self.live.send((self.rv, line));
    }
}

#[derive(Clone)]
struct Fake {
    pools: Arc<Mutex<Collection>>,
    pods: Arc<Mutex<Collection>>,
}

async fn serve(c: Arc<Mutex<Collection>>, q: BTreeMap<String, String>, raw: String) -> Response {
    let mut col = c.lock().unwrap();
    col.queries.push(raw);
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watch {
        let list = json!({
            "apiVersion": col.api_version,
            "kind": format!("{}List", col.kind),
            "metadata": {"resourceVersion": col.rv.to_string()},
            "items": col.objects.values().cloned().collect::<Vec<_>>(),
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(list.to_string()))
            .unwrap();
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if from < col.expired_below {
        let gone = json!({"type": "ERROR", "object": {
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410,
        }});
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(format!("{gone}\n")))
            .unwrap();
    }
    let backlog: Vec<String> = col
        .log
        .iter()
        .filter(|(rv, _)| *rv > from)
        .map(|(_, l)| l.clone())
        .collect();
    let last = col.rv;
    let live = tokio_stream::wrappers::BroadcastStream::new(col.live.subscribe()).filter_map(
        move |e| async move {
            match e {
                Ok((rv, line)) if rv > last => Some(line),
                _ => None,
            }
        },
    );
    drop(col);
    let stream = futures::stream::iter(backlog)
        .chain(live)
        .map(|l| Ok::<_, Infallible>(Bytes::from(l)));
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn start_fake() -> (Fake, SocketAddr) {
    use axum::routing::get;
    let fake = Fake {
        pools: Arc::new(Mutex::new(Collection::new(
            "InferencePool",
            "inference.networking.k8s.io/v1",
        ))),
        pods: Arc::new(Mutex::new(Collection::new("Pod", "v1"))),
    };
    let app = axum::Router::new()
        .route(
            "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools",
            get(
                |State(f): State<Fake>,
                 Query(q): Query<BTreeMap<String, String>>,
                 uri: axum::http::Uri| async move {
                    serve(f.pools, q, uri.query().unwrap_or_default().to_owned()).await
                },
            ),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods",
            get(
                |State(f): State<Fake>,
                 Query(q): Query<BTreeMap<String, String>>,
                 uri: axum::http::Uri| async move {
                    serve(f.pods, q, uri.query().unwrap_or_default().to_owned()).await
                },
            ),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, addr)
}

/// `kvgate epp` discovering the pool `sim-pool` through the fake API server at `api`, and the
/// temporary directory (named after `name`) holding its kubeconfig.
async fn pool_picker(api: SocketAddr, name: &str, routing: RoutingFlags) -> (Epp, PathBuf) {
    let dir = std::env::temp_dir().join(format!("kvgate-epp-k8s-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{api}'}}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u, namespace: {NS}}}\n\
             current-context: c\n"
        ),
    )
    .unwrap();
    let epp = Epp::start(&EppArgs {
        host: Some("127.0.0.1".into()),
        grpc_port: 0,
        grpc_health_port: 0,
        metrics_port: 0,
        pool_name: Some("sim-pool".into()),
        pool_namespace: Some(NS.into()),
        kubeconfig: Some(kubeconfig),
        routing,
        ..EppArgs::default()
    })
    .await
    .expect("picker starts");
    (epp, dir)
}

fn pool(ports: &[u16]) -> Value {
    json!({
        "metadata": {"name": "sim-pool", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "sim"}},
            "targetPorts": ports.iter().map(|p| json!({"number": p})).collect::<Vec<_>>(),
            "endpointPickerRef": {"name": "kvgate-epp", "port": {"number": 9002}},
        }
    })
}

fn pod(name: &str, ready: bool, terminating: bool) -> Value {
    let mut p = json!({
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "sim"}},
        "status": {
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        }
    });
    if terminating {
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    p
}

struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: tonic::Streaming<ProcessingResponse>,
}

impl Stream {
    async fn send(&self, r: Req) {
        self.tx
            .send(ProcessingRequest {
                request: Some(r),
                ..ProcessingRequest::default()
            })
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> Resp {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .response
            .unwrap()
    }
}

/// Sends one chat request through the picker; returns the stream (left open: the request is in
/// flight) and the chosen endpoint, or the immediate status.
async fn route(epp: &Epp, prompt: &str) -> (Stream, Result<String, u16>) {
    let mut client = ExternalProcessorClient::connect(format!("http://{}", epp.grpc_addr))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let rx = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut s = Stream { tx, rx };
    s.send(Req::RequestHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![HeaderValue {
                key: ":path".into(),
                raw_value: b"/v1/chat/completions".to_vec(),
                ..HeaderValue::default()
            }],
        }),
        ..HttpHeaders::default()
    }))
    .await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}]});
    s.send(Req::RequestBody(HttpBody {
        body: body.to_string().into_bytes(),
        end_of_stream: true,
        ..HttpBody::default()
    }))
    .await;
    let r = match s.recv().await {
        Resp::RequestHeaders(h) => {
            let m = h.response.unwrap().header_mutation.unwrap();
            let v = m
                .set_headers
                .iter()
                .filter_map(|o| o.header.as_ref())
                .find(|h| h.key == "x-gateway-destination-endpoint")
                .unwrap();
            Ok(String::from_utf8(v.raw_value.clone()).unwrap())
        }
        Resp::ImmediateResponse(i) => Err(u16::try_from(i.status.unwrap().code).unwrap()),
        other => panic!("unexpected {other:?}"),
    };
    (s, r)
}

/// Finishes an in-flight request (response headers and a final body chunk).
async fn finish(mut s: Stream) {
    s.send(Req::ResponseHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![HeaderValue {
                key: ":status".into(),
                raw_value: b"200".to_vec(),
                ..HeaderValue::default()
            }],
        }),
        ..HttpHeaders::default()
    }))
    .await;
    s.send(Req::ResponseBody(HttpBody {
        body: br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#.to_vec(),
        end_of_stream: true,
        ..HttpBody::default()
    }))
    .await;
    // Read up to the response-body answer, so the picker has accounted the end.
    loop {
        if let Resp::ResponseBody(_) = s.recv().await {
            return;
        }
    }
}

async fn health(epp: &Epp) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", epp.health_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_pods_join_drain_and_leave() {
    let mut cfg = FleetConfig::homogeneous(2, EngineConfig::h100());
    cfg.time_scale = 10.0;
    let fleet = start_fleet(cfg).await.unwrap();
    let ports: Vec<u16> = fleet.engines.iter().map(|e| e.http_addr.port()).collect();
    let addrs: Vec<String> = fleet
        .engines
        .iter()
        .map(|e| e.http_addr.to_string())
        .collect();

    let (fake, api) = start_fake().await;
    fake.pools.lock().unwrap().put(pool(&ports));
    fake.pods.lock().unwrap().put(pod("sim-0", true, false));
    // A pod that is not ready yet does not count (it shares the address, so it must not
    // resurrect the endpoint when sim-0 terminates either).
    fake.pods.lock().unwrap().put(pod("sim-1", false, false));

    let (epp, dir) = pool_picker(
        api,
        "join",
        RoutingFlags {
            scrape_interval_ms: Some(50),
            ..RoutingFlags::default()
        },
    )
    .await;

    // Ready pod × two target ports = two endpoints; health turns SERVING once synced.
    let control = epp.control.clone();
    eventually_sync("both endpoints discovered", Duration::from_secs(10), || {
        control.ready_endpoints() == 2
    })
    .await;
    // And both answering their scrapes: under CI load a first scrape can time out, and an
    // endpoint whose scrapes fail is avoided while another serves (all 8 requests then went to
    // one endpoint once).
    eventually_sync("both endpoints scraped", Duration::from_secs(10), || {
        control.reachable_endpoints() == 2
    })
    .await;
    // Held in flight until all are routed, so that each one's booking makes its endpoint
    // dearer for the next: one request at a time, every one would find the first endpoint
    // holding the chat template's first block and idle again, and a fresh sample (the ages
    // that widen the softmax count 0 for an endpoint that holds only this picker's requests)
    // lets that small prefix hit decide, as it should.
    let mut seen = std::collections::HashSet::new();
    let mut streams = Vec::new();
    for i in 0..8 {
        let (s, r) = route(&epp, &format!("hello {i}")).await;
        seen.insert(r.expect("routed"));
        streams.push(s);
    }
    for s in streams {
        finish(s).await;
    }
    assert_eq!(
        seen,
        addrs.iter().cloned().collect(),
        "both endpoints serve"
    );
    let mut serving = 0;
    for _ in 0..100 {
        serving = health(&epp).await;
        if serving == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(serving, 1, "SERVING after the pod list synced");
    {
        let pools = fake.pools.lock().unwrap();
        assert!(
            pools
                .queries
                .iter()
                .any(|q| q.contains("fieldSelector=metadata.name%3Dsim-pool")),
            "{:?}",
            pools.queries
        );
        let pods = fake.pods.lock().unwrap();
        assert!(
            pods.queries
                .iter()
                .any(|q| q.contains("labelSelector=app%3Dsim")),
            "{:?}",
            pods.queries
        );
        assert!(
            pods.queries.iter().any(|q| q.contains("watch=true")),
            "{:?}",
            pods.queries
        );
    }

    // The pool drops its second port: that endpoint drains and gets nothing new.
    fake.pools.lock().unwrap().put(pool(&ports[..1]));
    eventually_sync("second endpoint drained", Duration::from_secs(10), || {
        control.ready_endpoints() == 1
    })
    .await;
    for i in 0..6 {
        let (s, r) = route(&epp, &format!("after shrink {i}")).await;
        assert_eq!(r.expect("routed"), addrs[0]);
        finish(s).await;
    }

    // The pod starts terminating with a request in flight: no new requests unless nothing else
    // can serve (here nothing else can), and the in-flight one finishes before removal.
    let (in_flight, r) = route(&epp, "long running").await;
    assert_eq!(r.expect("routed"), addrs[0]);
    fake.pods.lock().unwrap().put(pod("sim-0", true, true));
    eventually_sync("endpoint draining", Duration::from_secs(10), || {
        control.ready_endpoints() == 0
    })
    .await;
    // Well past the reaper's period, the endpoint is kept for its in-flight request and is
    // still the last resort.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (s, r) = route(&epp, "last resort").await;
    assert_eq!(r.expect("a draining endpoint is a last resort"), addrs[0]);
    finish(s).await;
    finish(in_flight).await;
    // Once the last in-flight request ended the endpoint is removed: no ready endpoint → 503.
    eventually_sync("drained endpoint removed", Duration::from_secs(10), || {
        control.endpoint_ids([addrs[0].as_str()]).is_empty()
    })
    .await;
    let (_s, r) = route(&epp, "anyone?").await;
    assert_eq!(r, Err(503));

    // The pod is replaced by a ready one: the endpoint joins again.
    fake.pods.lock().unwrap().delete("sim-0");
    fake.pods.lock().unwrap().put(pod("sim-1", true, false));
    eventually_sync("endpoint back", Duration::from_secs(10), || {
        control.ready_endpoints() == 1
    })
    .await;
    let (s, r) = route(&epp, "welcome back").await;
    assert_eq!(r.expect("routed"), addrs[0]);
    finish(s).await;

    // The pool is deleted: everything drains away.
    fake.pools.lock().unwrap().delete("sim-pool");
    eventually_sync("pool gone", Duration::from_secs(10), || {
        control.ready_endpoints() == 0
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pool deleted while the picker's watch was down (its delete never seen, the history
/// compacted): the relist does not show it, and the endpoint set empties as for a delete
/// (the picker kept routing to the old selector's pods before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_deleted_while_the_watch_was_down_empties_the_set() {
    let (fake, api) = start_fake().await;
    fake.pools.lock().unwrap().put(pool(&[9, 10]));
    fake.pods.lock().unwrap().put(pod("sim-0", true, false));
    let (epp, dir) = pool_picker(
        api,
        "vanish",
        RoutingFlags {
            models: vec![MODEL.into()],
            ..RoutingFlags::default()
        },
    )
    .await;
    let control = epp.control.clone();
    eventually_sync("the pool's endpoints", Duration::from_secs(10), || {
        control.endpoint_addresses().len() == 2
    })
    .await;
    fake.pools.lock().unwrap().vanish("sim-pool");
    eventually_sync("the set emptied", Duration::from_secs(20), || {
        control.endpoint_addresses().is_empty()
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
