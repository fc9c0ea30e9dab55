//! Processes under test: the real `kvgate` binary (sim, serve, epp), Prometheus, Envoy.
//!
//! Each integration test used to carry its own copy of "spawn, read the log on a thread, wait
//! for a line, pull `key=value` out of it, kill on drop"; the copies differed only in details
//! nobody chose (which stream was read, whether colours were stripped, whether a stopped
//! process was resumed before the kill). [`Proc`] is the one copy: it always collects stdout
//! and stderr, strips ANSI colours, and on drop resumes, kills and reaps the child and removes
//! its temp dir, so a panicking test leaks no process.
//!
//! The binary's path is a parameter: Cargo sets `CARGO_BIN_EXE_kvgate` only for the tests of
//! the crate that owns the binary, so the caller passes `env!("CARGO_BIN_EXE_kvgate")`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often [`Proc::wait_line`] and [`Proc::wait_exit`] look again: a line is usually there
/// within a poll or two, and the reader threads need the CPU more than the poller.
const PROC_POLL_MS: u64 = 20;

/// Lines shown by [`Proc::tail`]: enough for a panic's cause, few enough to read in a failure.
const TAIL_LINES: usize = 30;

/// A loopback TCP port that was free a moment ago, for servers that cannot listen on port 0
/// (Prometheus, or a `kvgate sim` whose address must be known before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Removes ANSI colour sequences (`ESC [ ... m`) from a log line.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=value` in a tracing log line (up to the next whitespace), if present.
pub fn try_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    let start = line.find(&pat)? + pat.len();
    line[start..].split_whitespace().next()
}

/// The value of `key=value` in a tracing log line, parsed (a `SocketAddr`, usually); panics
/// naming the key and the line when it is missing or does not parse.
pub fn field<T>(line: &str, key: &str) -> T
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let value = try_field(line, key).unwrap_or_else(|| panic!("no {key} in {line:?}"));
    value
        .parse()
        .unwrap_or_else(|e| panic!("{key}={value}: {e}"))
}

/// A temp dir removed on drop, panics included.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory named after `name`, this process and a counter.
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kvgate-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `kvgate` command logging at `info` (a later `.env("RUST_LOG", …)` overrides it); `bin` is
/// `env!("CARGO_BIN_EXE_kvgate")` in the caller.
pub fn kvgate(bin: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("RUST_LOG", "info");
    cmd
}

/// The log line `kvgate serve` prints once both its listeners are bound (with `api_addr=` and
/// `admin_addr=`).
pub const GATEWAY_LISTENING: &str = "kvgate gateway listening";

/// `kvgate serve` on loopback with both listeners on ephemeral ports, logging at `info` ([`kvgate`]);
/// read the ports with [`Proc::gateway_addrs`] or from the [`GATEWAY_LISTENING`] line.
pub fn kvgate_serve(bin: impl AsRef<OsStr>) -> Command {
    let mut cmd = kvgate(bin);
    cmd.args([
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--admin-port",
        "0",
    ]);
    cmd
}

/// A child process whose output is collected line by line; resumed (if a test stopped it),
/// killed and reaped on drop, and its [`TempDir`] removed, so nothing outlives a panic.
pub struct Proc {
    name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    stopped: AtomicBool,
    dir: Option<TempDir>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.stopped.load(Ordering::Relaxed) {
            let _ = send_signal(self.child.id(), "CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send_signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

impl Proc {
    /// Starts `cmd` (stdin closed, `NO_COLOR=1`) with stdout and stderr read line by line into
    /// the log on their own threads, so the child never blocks on a full pipe.
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Proc {
        let name = name.into();
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(strip_ansi(&line));
                }
            });
        }
        Proc {
            name,
            child,
            log,
            stopped: AtomicBool::new(false),
            dir: None,
        }
    }

    /// Removes `dir` when this process is dropped (after the kill).
    pub fn owning(mut self, dir: TempDir) -> Proc {
        self.dir = Some(dir);
        self
    }

    /// The directory given to [`Proc::owning`].
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `name` (`TERM`, `INT`, `STOP`, `CONT`…) with kill(1); panics if it fails.
    /// A process left stopped is resumed before the kill on drop.
    pub fn signal(&self, name: &str) {
        assert!(send_signal(self.child.id(), name), "kill -{name} failed");
        match name {
            "STOP" => self.stopped.store(true, Ordering::Relaxed),
            "CONT" => self.stopped.store(false, Ordering::Relaxed),
            _ => {}
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Blocks until the process exits.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("wait")
    }

    /// Polls (without blocking the runtime) until the process exits; `None` after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(PROC_POLL_MS)).await;
        }
    }

    /// Every line so far, stdout and stderr interleaved as they arrived.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The whole log so far, for assertion messages.
    pub fn dump(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The last lines, headed by the process name, for assertion messages.
    pub fn tail(&self) -> String {
        let log = self.log.lock().unwrap();
        let from = log.len().saturating_sub(TAIL_LINES);
        format!(
            "--- {} (last lines) ---\n{}",
            self.name,
            log[from..].join("\n")
        )
    }

    /// Whether some line contains `s`.
    pub fn log_contains(&self, s: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(s))
    }

    /// `key=` of the first log line containing `message`.
    pub fn log_field(&self, message: &str, key: &str) -> Option<String> {
        let log = self.log.lock().unwrap();
        let line = log.iter().find(|l| l.contains(message))?;
        try_field(line, key).map(str::to_owned)
    }

    /// The API and admin addresses of a `kvgate serve` ([`kvgate_serve`]), once its
    /// [`GATEWAY_LISTENING`] line is out.
    pub fn gateway_addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        let addr = |key| self.log_field(GATEWAY_LISTENING, key)?.parse().ok();
        addr("api_addr").zip(addr("admin_addr"))
    }

    /// Waits (blocking this thread) for a `kvgate serve`'s [`GATEWAY_LISTENING`] line and returns
    /// its API and admin addresses; panics as [`Proc::wait_line`] does.
    pub fn wait_gateway_addrs(&mut self, within: Duration) -> (SocketAddr, SocketAddr) {
        let line = self.wait_line(GATEWAY_LISTENING, within);
        (field(&line, "api_addr"), field(&line, "admin_addr"))
    }

    /// Waits (blocking this thread) for a line containing `marker` and returns it; panics with
    /// the log's tail if the process exits first or nothing comes within `within`.
    pub fn wait_line(&mut self, marker: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(marker)) {
                return l.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader threads drain what the process wrote before it died.
                std::thread::sleep(Duration::from_millis(100));
                panic!("{} exited with {status}\n{}", self.name, self.tail());
            }
            assert!(
                Instant::now() < deadline,
                "{} printed no line with {marker:?}\n{}",
                self.name,
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(PROC_POLL_MS));
        }
    }
}

/// The addresses of one engine of a `kvgate sim` process, as `--print-json` prints them.
#[derive(Clone, Debug)]
pub struct SimEngine {
    /// OpenAI-compatible HTTP server, `host:port`.
    pub http: String,
    /// KV-event publisher, a ZMQ endpoint.
    pub kv_pub: String,
    /// KV-event replay, a ZMQ endpoint.
    pub kv_replay: String,
}

impl SimEngine {
    /// The `kvgate serve` / `kvgate epp` flags naming this engine: its HTTP endpoint and its
    /// KV-event publisher and replay.
    pub fn flags(&self) -> [String; 6] {
        [
            "--endpoint".into(),
            format!("http://{}", self.http),
            "--kv-events".into(),
            self.kv_pub.clone(),
            "--kv-replay".into(),
            self.kv_replay.clone(),
        ]
    }
}

/// Starts `kvgate sim` (`bin`) with `engines` engines on loopback port 0, printing their
/// addresses as JSON, plus `args`; waits up to 20 s for the addresses.
pub fn spawn_sim(bin: impl AsRef<OsStr>, engines: usize, args: &[&str]) -> (Proc, Vec<SimEngine>) {
    let mut cmd = kvgate(bin);
    cmd.args(["sim", "--engines", &engines.to_string()])
        .args(["--port", "0", "--zmq-port", "0", "--print-json"])
        .args(args);
    let mut p = Proc::spawn("kvgate sim", cmd);
    let line = p.wait_line("\"engines\"", Duration::from_secs(20));
    let v: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("kvgate sim --print-json printed {line:?}: {e}"));
    let engines = v["engines"]
        .as_array()
        .expect("engines")
        .iter()
        .map(|e| SimEngine {
            http: e["http"].as_str().unwrap().to_owned(),
            kv_pub: e["kv_pub"].as_str().unwrap().to_owned(),
            kv_replay: e["kv_replay"].as_str().unwrap().to_owned(),
        })
        .collect();
    (p, engines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_up_to_whitespace_and_colours_are_stripped() {
        let line = strip_ansi(
            "INFO kvgate: listening \u{1b}[3mapi_addr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:80 admin_addr=127.0.0.1:81",
        );
        assert_eq!(try_field(&line, "api_addr"), Some("127.0.0.1:80"));
        let admin: std::net::SocketAddr = field(&line, "admin_addr");
        assert_eq!(admin.port(), 81);
        assert_eq!(try_field(&line, "grpc_addr"), None);
    }

    #[test]
    fn a_stopped_process_is_killed_on_drop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let p = Proc::spawn("sleep", cmd);
        let pid = p.id();
        p.signal("STOP");
        drop(p);
        // Reaped: the pid no longer names a process of ours.
        assert!(!send_signal(pid, "0"), "pid {pid} survived the drop");
    }
}
