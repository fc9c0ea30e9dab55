//! The Kubernetes manifests in deploy/kubernetes/ are valid and agree with the binary they run:
//! - every object validates (strictly: unknown fields fail) against the Kubernetes OpenAPI
//!   schemas bundled by PyPI `kubernetes-validate`, and the InferencePool against the
//!   openAPIV3Schema of the vendored CRD (deploy/kubernetes/crds/); the validators are shown to
//!   reject a broken copy, so a pass means something;
//! - the pieces fit: the Role grants what the picker watches, the InferencePool names the
//!   picker's Service and gRPC port and selects the model-server pods, Services target declared
//!   container ports, probes hit the ports the flags open;
//! - the real `kvgate` starts with each Deployment's command, args, env and mounted ConfigMap
//!   (ports moved to loopback port 0, and for the picker a kubeconfig pointing at a closed port,
//!   since no cluster is reachable here) and answers its probes on the probed port: HTTP GETs
//!   for `kvgate serve`, gRPC health checks (as the kubelet sends them) for `kvgate epp`.
//!
//! kubernetes-validate is installed by scripts/setup-monitoring-deps.sh into a venv under
//! ~/.cache/kvgate; the test fails, naming the script, when it is missing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvgate_testkit::process::{Proc, TempDir, field};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kvgate");
const SETUP_HINT: &str = "run scripts/setup-monitoring-deps.sh (installs kubernetes-validate into ~/.cache/kvgate/manifests-venv), or set KVGATE_MANIFESTS_VENV";
/// The Kubernetes release whose schemas the manifests must satisfy (kvgate's k8s-openapi
/// feature, `v1_34`).
const KUBERNETES_VERSION: &str = "1.34";
/// kvgate epp's default `--pool-group`: the API group of the v1 InferencePool it watches.
const POOL_GROUP: &str = "inference.networking.k8s.io";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifest_files() -> Vec<PathBuf> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

fn crd_file() -> PathBuf {
    repo().join("deploy/kubernetes/crds/inference.networking.k8s.io_inferencepools.yaml")
}

/// Every object of every manifest, as JSON, with the file it came from.
fn objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for f in manifest_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).expect("YAML document");
            if !v.is_null() {
                out.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    out
}

fn find<'a>(objs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("KVGATE_MANIFESTS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("KVGATE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kvgate")
                });
            cache.join("manifests-venv")
        });
    let python = venv.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import kubernetes_validate, jsonschema, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "kubernetes-validate not found in {}: {SETUP_HINT}",
        venv.display()
    );
    python
}

/// Validates each file's objects; prints one JSON line per object:
/// `{"file", "kind", "name", "schema", "error"}` (`error` null when valid). InferencePools are
/// checked against the CRD's openAPIV3Schema for their version (jsonschema; the CRD's CEL
/// `x-kubernetes-validations` are not evaluated, the structural schema is), everything else
/// with kubernetes-validate, strictly.
const VALIDATE_PY: &str = r#"
import json, sys, yaml, jsonschema, kubernetes_validate
k8s_version, crd_path, files = sys.argv[1], sys.argv[2], sys.argv[3:]
crd = yaml.safe_load(open(crd_path))
group = crd["spec"]["group"]
schemas = {f"{group}/{v['name']}": v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
kind = crd["spec"]["names"]["kind"]
for f in files:
    for doc in yaml.safe_load_all(open(f)):
        if doc is None:
            continue
        out = {"file": f, "kind": doc.get("kind"), "name": doc.get("metadata", {}).get("name"), "error": None}
        try:
            if doc.get("kind") == kind:
                schema = schemas.get(doc.get("apiVersion"))
                if schema is None:
                    raise ValueError(f"no {kind} version {doc.get('apiVersion')} in the CRD")
                out["schema"] = "crd " + doc["apiVersion"]
                errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
                if errors:
                    raise ValueError("; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors))
            else:
                out["schema"] = "kubernetes " + k8s_version
                kubernetes_validate.validate(doc, k8s_version, strict=True)
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out))
"#;

fn validate(python: &Path, files: &[PathBuf], crd: &Path) -> Vec<Value> {
    let out = Command::new(python)
        .arg("-c")
        .arg(VALIDATE_PY)
        .arg(KUBERNETES_VERSION)
        .arg(crd)
        .args(files)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "validator crashed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("validator output"))
        .collect()
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas_and_the_inferencepool_crd() {
    let python = venv_python();
    let files = manifest_files();
    let results = validate(&python, &files, &crd_file());
    let failed: Vec<&Value> = results.iter().filter(|r| !r["error"].is_null()).collect();
    assert!(failed.is_empty(), "invalid manifests: {failed:#?}");
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        *kinds
            .entry(r["kind"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for (kind, at_least) in [
        ("Deployment", 2),
        ("Service", 2),
        ("ServiceAccount", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("ConfigMap", 2),
        ("InferencePool", 1),
    ] {
        assert!(
            kinds.get(kind).copied().unwrap_or(0) >= at_least,
            "expected at least {at_least} {kind} among {kinds:?}"
        );
    }
    assert!(
        results
            .iter()
            .any(|r| r["kind"] == "InferencePool"
                && r["schema"] == "crd inference.networking.k8s.io/v1"),
        "the InferencePool was not checked against the CRD: {results:#?}"
    );

    // The same validators reject broken copies: a misspelt Deployment field (strict mode), and
    // an InferencePool without its required targetPorts.
    let dir = TempDir::new("manifests-broken");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replica: 1\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec: {containers: [{name: c, image: i}]}\n---\napiVersion: inference.networking.k8s.io/v1\nkind: InferencePool\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {a: b}}\n  endpointPickerRef: {name: e, port: {number: 9002}}\n",
    )
    .unwrap();
    let results = validate(&python, &[broken], &crd_file());
    drop(dir);
    assert_eq!(results.len(), 2, "{results:#?}");
    assert!(
        results
            .iter()
            .all(|r| r["error"].as_str().is_some_and(|e| !e.is_empty())),
        "the validators accepted broken manifests: {results:#?}"
    );
    assert!(results[0]["error"].as_str().unwrap().contains("replica"));
    assert!(
        results[1]["error"]
            .as_str()
            .unwrap()
            .contains("targetPorts")
    );
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

fn container(deploy: &Value) -> &Value {
    let cs = deploy["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(cs.len(), 1, "one container per kvgate pod");
    &cs[0]
}

/// containerPort of a named port.
fn port_number(c: &Value, name_or_number: &Value) -> u64 {
    if let Some(n) = name_or_number.as_u64() {
        return n;
    }
    let name = name_or_number.as_str().expect("port name or number");
    c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

#[test]
fn manifests_agree_with_each_other() {
    let objs = objects();
    let epp = find(&objs, "Deployment", "kvgate-epp");
    let c = container(epp);
    let args = strings(&c["args"]);
    assert_eq!(args.first().map(String::as_str), Some("epp"));

    // RBAC: the Deployment's ServiceAccount is bound to a Role granting get/list/watch on
    // InferencePools (in the group the picker watches) and Pods.
    let sa = epp["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    find(&objs, "ServiceAccount", sa);
    let binding = objs
        .iter()
        .map(|(_, o)| o)
        .find(|o| {
            (o["kind"] == "RoleBinding" || o["kind"] == "ClusterRoleBinding")
                && o["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa)
        })
        .expect("a binding for the picker's ServiceAccount");
    let role = find(
        &objs,
        binding["roleRef"]["kind"].as_str().unwrap(),
        binding["roleRef"]["name"].as_str().unwrap(),
    );
    let group = flag(&args, "--pool-group").unwrap_or(POOL_GROUP);
    let grants = |api_group: &str, resource: &str| {
        role["rules"].as_array().into_iter().flatten().any(|r| {
            strings(&r["apiGroups"]).iter().any(|g| g == api_group)
                && strings(&r["resources"]).iter().any(|x| x == resource)
                && ["get", "list", "watch"]
                    .iter()
                    .all(|v| strings(&r["verbs"]).iter().any(|x| x == v))
        })
    };
    assert!(
        grants(group, "inferencepools"),
        "no inferencepools access in {role:#}"
    );
    assert!(grants("", "pods"), "no pods access in {role:#}");

    // The InferencePool is the one the picker serves, names the picker's Service and gRPC port,
    // and selects the model-server pods on their serving port.
    let pool_name = flag(&args, "--pool-name").expect("--pool-name");
    let pool = find(&objs, "InferencePool", pool_name);
    assert_eq!(pool["apiVersion"], format!("{group}/v1"));
    let svc_name = pool["spec"]["endpointPickerRef"]["name"].as_str().unwrap();
    let svc = find(&objs, "Service", svc_name);
    let grpc_port: u64 = flag(&args, "--grpc-port")
        .expect("--grpc-port")
        .parse()
        .unwrap();
    let pick_port = pool["spec"]["endpointPickerRef"]["port"]["number"]
        .as_u64()
        .unwrap();
    let svc_port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"].as_u64() == Some(pick_port))
        .unwrap_or_else(|| panic!("Service {svc_name} has no port {pick_port}"));
    assert_eq!(port_number(c, &svc_port["targetPort"]), grpc_port);
    let selector = pool["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let servers = objs
        .iter()
        .map(|(_, o)| o)
        .find(|o| {
            matches!(o["kind"].as_str(), Some("StatefulSet" | "Deployment"))
                && selector
                    .iter()
                    .all(|(k, v)| &o["spec"]["template"]["metadata"]["labels"][k] == v)
        })
        .expect("model-server pods the InferencePool selects");
    let server = container(servers);
    for p in pool["spec"]["targetPorts"].as_array().unwrap() {
        assert!(
            server["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|sp| sp["containerPort"] == p["number"]),
            "target port {p} is not a model-server container port"
        );
    }
    let kv_events: u64 = flag(&args, "--pod-kv-events-port")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        server["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|sp| sp["containerPort"].as_u64() == Some(kv_events)),
        "--pod-kv-events-port {kv_events} is not a model-server container port"
    );

    // Every Service's selector matches a pod template and targets declared container ports.
    for svc in objs
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == "Service")
    {
        let sel = svc["spec"]["selector"].as_object().unwrap();
        let owner = objs
            .iter()
            .map(|(_, o)| o)
            .find(|o| {
                matches!(o["kind"].as_str(), Some("StatefulSet" | "Deployment"))
                    && sel
                        .iter()
                        .all(|(k, v)| &o["spec"]["template"]["metadata"]["labels"][k] == v)
            })
            .unwrap_or_else(|| panic!("Service {} selects no pods", svc["metadata"]["name"]));
        for p in svc["spec"]["ports"].as_array().unwrap() {
            port_number(container(owner), &p["targetPort"]);
        }
    }
}

/// `kvgate` with a Deployment's `args` and `env`, and its ` listening ` line once printed.
fn start(args: &[String], env: &[(String, String)]) -> (Proc, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    let mut p = Proc::spawn(format!("kvgate {args:?}"), cmd);
    let line = p.wait_line(" listening ", Duration::from_secs(20));
    (p, line)
}

/// A Deployment's container as a loopback command line.
struct Local {
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Port flag → the port number the manifest gives it.
    ports: BTreeMap<String, u64>,
}

/// The Deployment's container as a loopback command line: ConfigMap mounts written to a temp
/// dir (paths in args rewritten), ports that the flags open set to 0 (their manifest numbers
/// kept by flag), `--host 127.0.0.1`, `fieldRef` env given this test's values.
fn localize(objs: &[(String, Value)], deploy: &Value, dir: &Path, port_flags: &[&str]) -> Local {
    let c = container(deploy);
    assert_eq!(
        strings(&c["command"]),
        ["kvgate"],
        "the container runs kvgate"
    );
    let mut args = strings(&c["args"]);
    let volumes = deploy["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vol = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("mounted volume is declared");
        let cm = find(
            objs,
            "ConfigMap",
            vol["configMap"]["name"].as_str().unwrap(),
        );
        let local = dir.join(m["name"].as_str().unwrap());
        std::fs::create_dir_all(&local).unwrap();
        for (file, text) in cm["data"].as_object().unwrap() {
            std::fs::write(local.join(file), text.as_str().unwrap()).unwrap();
        }
        let mount = m["mountPath"].as_str().unwrap();
        for a in &mut args {
            if let Some(rest) = a.strip_prefix(mount) {
                *a = format!("{}{rest}", local.display());
            }
        }
    }
    let mut ports = BTreeMap::new();
    for f in port_flags {
        let i = args
            .iter()
            .position(|a| a == f)
            .unwrap_or_else(|| panic!("{f} is set in the manifest"));
        ports.insert((*f).to_owned(), args[i + 1].parse().expect("port number"));
        args[i + 1] = "0".into();
    }
    assert!(
        flag(&args, "--host").is_none(),
        "the manifest binds all interfaces"
    );
    args.extend(["--host".into(), "127.0.0.1".into()]);
    let env = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::String(p)) if p == "metadata.namespace" => {
                    deploy["metadata"]["namespace"].as_str().unwrap().to_owned()
                }
                other => panic!("env {e}: unsupported {other:?}"),
            };
            (e["name"].as_str().unwrap().to_owned(), value)
        })
        .collect();
    Local { args, env, ports }
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus` values.
const SERVING: u64 = 1;
const NOT_SERVING: u64 = 2;

/// One `grpc.health.v1.Health/Check` call over plaintext HTTP/2, as the kubelet's gRPC probe
/// makes it: the status in the response, or the gRPC error.
async fn grpc_health_check(addr: SocketAddr, service: &str) -> Result<u64, String> {
    use http_body_util::{BodyExt, Full};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1 }, in a gRPC length-prefixed frame.
    let mut msg = vec![
        0x0a,
        u8::try_from(service.len()).expect("short service name"),
    ];
    msg.extend_from_slice(service.as_bytes());
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = hyper::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let in_headers = resp.headers().get("grpc-status").cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let grpc_status = in_headers
        .or_else(|| body.trailers().and_then(|t| t.get("grpc-status").cloned()))
        .ok_or("no grpc-status")?;
    if grpc_status != "0" {
        return Err(format!("grpc-status {grpc_status:?}"));
    }
    // HealthCheckResponse { ServingStatus status = 1 }: frame header, then tag 0x08 and a
    // one-byte varint (absent when 0, UNKNOWN).
    match &body.to_bytes()[..] {
        [0, _, _, _, _, 0x08, status] => Ok(u64::from(*status)),
        [0, 0, 0, 0, 0] => Ok(0),
        other => Err(format!("unexpected response {other:?}")),
    }
}

async fn status(url: &str) -> u16 {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_binary_runs_the_manifests_args_and_config_and_answers_the_probes() {
    let objs = objects();
    let tmp = TempDir::new("manifests-run");
    let dir = tmp.path();

    // kvgate serve: starts with the manifest's args and ConfigMap; the liveness probe's path
    // answers 200 and the readiness probe's path answers (503 here: the vLLM pods it lists do
    // not exist) on the port each probe names.
    let serve = find(&objs, "Deployment", "kvgate-serve");
    let Local { args, env, ports } = localize(&objs, serve, dir, &["--port", "--admin-port"]);
    let (p, line) = start(&args, &env);
    let by_port: BTreeMap<u64, SocketAddr> = [
        (ports["--port"], field(&line, "api_addr")),
        (ports["--admin-port"], field(&line, "admin_addr")),
    ]
    .into();
    let c = container(serve);
    for (probe, ok) in [
        ("livenessProbe", &[200][..]),
        ("readinessProbe", &[200, 503][..]),
    ] {
        let get = &c[probe]["httpGet"];
        let port = port_number(c, &get["port"]);
        let at = by_port
            .get(&port)
            .unwrap_or_else(|| panic!("{probe} port {port} is not opened by a flag"));
        let url = format!("http://{at}{}", get["path"].as_str().unwrap());
        let code = status(&url).await;
        assert!(ok.contains(&code), "{probe} {url} answered {code}");
    }
    drop(p);

    // kvgate epp: starts with the manifest's args, env and EndpointPickerConfig (parsed by the
    // real config parser), with a kubeconfig whose API server is a closed loopback port; its
    // probes are gRPC health checks on --grpc-health-port, and /metrics answers.
    let epp = find(&objs, "Deployment", "kvgate-epp");
    let Local {
        mut args,
        env,
        ports,
    } = localize(
        &objs,
        epp,
        dir,
        &["--grpc-port", "--grpc-health-port", "--metrics-port"],
    );
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster: {server: \"https://127.0.0.1:9\"}\nusers:\n- name: none\n  user: {token: unused}\ncontexts:\n- name: none\n  context: {cluster: none, user: none}\ncurrent-context: none\n",
    )
    .unwrap();
    args.extend(["--kubeconfig".into(), kubeconfig.display().to_string()]);
    let (p, line) = start(&args, &env);
    let c = container(epp);
    // The kubelet's gRPC probes, as it sends them: liveness passes at once; readiness fails
    // until the pod list is known (never, here: no API server).
    let health: SocketAddr = field(&line, "health_addr");
    for (probe, expected) in [("livenessProbe", SERVING), ("readinessProbe", NOT_SERVING)] {
        let port = port_number(c, &c[probe]["grpc"]["port"]);
        assert_eq!(
            port, ports["--grpc-health-port"],
            "{probe} targets the health port"
        );
        let service = c[probe]["grpc"]["service"].as_str().unwrap_or("");
        let got = grpc_health_check(health, service).await;
        assert_eq!(
            got,
            Ok(expected),
            "{probe}: grpc.health.v1 Check({service:?})"
        );
    }
    let metrics: SocketAddr = field(&line, "metrics_addr");
    assert_eq!(status(&format!("http://{metrics}/metrics")).await, 200);
    drop(p);
}
