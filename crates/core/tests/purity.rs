//! The pure crates stay pure, mechanically (DESIGN.md "Shape of the workspace", issue 13.6):
//! the routing core and the engine model build without an async runtime, a socket or HTTP
//! stack, or a thread pool in their normal dependency graph, and their `clippy.toml` bans
//! reading the wall clock (time comes in as `now_us`).
//!
//! The graph is read from `cargo tree`, the same resolution a build of the crate alone uses, so
//! an optional dependency switched on by default (say the HuggingFace tokenizer, which brings
//! rayon, becoming a default feature of `kvgate-tokens`) fails here.

use std::process::Command;

/// Crates that mean an async runtime, networking, or a thread pool.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "hyper",
    "tonic",
    "reqwest",
    "axum",
    "tower",
    "mio",
    "zmq",
    "rayon",
    "rayon-core",
    "threadpool",
    "scoped_threadpool",
    "crossbeam-deque",
    "futures-executor",
    "async-std",
    "smol",
    "prometheus-client",
];

/// The normal (non-dev, non-build) dependencies of `package` with its default features plus
/// `features`, by crate name.
fn normal_dependencies_with(package: &str, features: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .args(features.iter().flat_map(|f| ["--features", f]))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn normal_dependencies(package: &str) -> Vec<String> {
    normal_dependencies_with(package, &[])
}

fn impurities_with(package: &str, features: &[&str]) -> Vec<String> {
    let mut found: Vec<String> = normal_dependencies_with(package, features)
        .into_iter()
        .filter(|d| FORBIDDEN.contains(&d.as_str()))
        .collect();
    found.sort();
    found.dedup();
    found
}

fn impurities(package: &str) -> Vec<String> {
    impurities_with(package, &[])
}

#[test]
fn core_and_engine_depend_on_no_runtime_network_or_thread_pool() {
    for package in ["kvgate-core", "kvgate-engine"] {
        let deps = normal_dependencies(package);
        assert!(deps.iter().any(|d| d == package), "{package}: {deps:?}");
        assert_eq!(impurities(package), Vec::<String>::new(), "{package}");
    }
}

/// The check sees what it bans: the signal adapters run on tokio and speak ZeroMQ, and the
/// tokens crate's optional HuggingFace tokenizer brings rayon's pool — which is why `hf` must
/// stay off by default (the engine and core use the tokens crate only for block hashes).
#[test]
fn the_check_finds_a_runtime_where_there_is_one() {
    let found = impurities("kvgate-signals");
    assert!(found.iter().any(|d| d == "tokio"), "{found:?}");
    assert!(found.iter().any(|d| d == "zmq"), "{found:?}");
    assert!(impurities_with("kvgate-tokens", &["hf"]).contains(&"rayon".to_string()));
    assert_eq!(impurities("kvgate-tokens"), Vec::<String>::new());
}

/// Time and randomness come in as parameters: each pure crate's own `clippy.toml` bans the
/// wall clock (and implicit RNGs). The files are per crate, so the data planes are unaffected.
#[test]
fn clippy_bans_the_wall_clock_in_core_and_engine() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["core", "engine"] {
        let text = std::fs::read_to_string(root.join(krate).join("clippy.toml"))
            .unwrap_or_else(|e| panic!("crates/{krate}/clippy.toml: {e}"));
        for banned in [
            "std::time::Instant::now",
            "std::time::SystemTime::now",
            "rand::rng",
        ] {
            assert!(
                text.contains(&format!("path = \"{banned}\"")),
                "crates/{krate}/clippy.toml does not ban {banned}"
            );
        }
    }
    assert!(
        !root.join("..").join("clippy.toml").exists(),
        "a workspace clippy.toml would apply to every crate"
    );
}
