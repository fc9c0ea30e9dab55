//! The pure crates must stay pure: no async runtime, socket or RPC library may enter their
//! dependency graph, or the discrete-event benchmark would stop running the production policy.

use std::process::Command;

fn normal_deps(package: &str) -> String {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree", "--edges", "normal", "--prefix", "none", "-p", package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn pure_crates_have_no_io_dependencies() {
    for package in ["kvgate-tokens", "kvgate-core", "kvgate-engine"] {
        let tree = normal_deps(package);
        for banned in [
            "tokio ",
            "hyper ",
            "tonic ",
            "reqwest ",
            "zeromq ",
            "zmq ",
            "axum ",
            "mio ",
            // Thread pools: the HF tokenizer (rayon) is an opt-in feature of kvgate-tokens.
            "rayon ",
            "tokenizers ",
        ] {
            assert!(
                !tree.lines().any(|l| l.starts_with(banned)),
                "{package} depends on {banned}:\n{tree}"
            );
        }
    }
}
