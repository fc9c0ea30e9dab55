//! The accept loop under a real file-descriptor shortage (issue 10.3): the process's descriptor
//! limit is lowered with `setrlimit` and every descriptor is taken, so the kernel's `accept4`
//! fails with `EMFILE` while a client waits in the backlog. Lowering the limit affects the whole
//! process, so the test re-runs itself in a child process and only the child does it.

use std::io::Write;
use std::time::Duration;

use kvgate_gateway::server;
use kvgate_runtime::config::Limits;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const CHILD_ENV: &str = "KVGATE_TEST_ACCEPT_CHILD";

/// How long the shortage lasts: long enough that a spinning loop burns a measurable amount of
/// CPU even on a machine busy with other work.
const SHORTAGE: Duration = Duration::from_secs(2);

/// CPU the whole process may spend during the shortage. A loop that retries at once spends all
/// of it (one core); one that backs off wakes about ten times.
const MAX_CPU_DURING_SHORTAGE: Duration = Duration::from_millis(200);

fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[test]
fn accept_loop_backs_off_when_file_descriptors_run_out() {
    if std::env::var_os(CHILD_ENV).is_some() {
        exhaust_descriptors_then_recover();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "accept_loop_backs_off_when_file_descriptors_run_out",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("the test binary re-runs itself");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran the test:\n{text}");
}

fn exhaust_descriptors_then_recover() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let server = tokio::spawn(server::serve(
            listener,
            app,
            Limits::default(),
            stop.clone(),
        ));
        tokio::task::yield_now().await;

        // A few descriptors of headroom, then take them all.
        let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        let limit = getrlimit(Resource::Nofile);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(open + 16),
                maximum: limit.maximum,
            },
        )
        .unwrap();
        let mut hog = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => hog.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(24), "EMFILE: {e}");
                    break;
                }
            }
        }
        // One descriptor for the client; the server has none left to accept it with.
        hog.pop();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        client.set_nonblocking(true).unwrap();
        let mut client = tokio::net::TcpStream::from_std(client).unwrap();

        let cpu_before = process_cpu();
        tokio::time::sleep(SHORTAGE).await;
        let cpu = process_cpu() - cpu_before;
        assert!(
            cpu < MAX_CPU_DURING_SHORTAGE,
            "the accept loop spent {cpu:?} of CPU in {SHORTAGE:?} without descriptors"
        );

        // Descriptors are back: the waiting client is accepted and answered.
        drop(hog);
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
            .await
            .expect("the waiting connection is served once descriptors are back")
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        stop.cancel();
        server.await.unwrap();
    });
}
