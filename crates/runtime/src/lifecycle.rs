//! Start-up and shutdown plumbing shared by both data planes (`kvgate serve` and `kvgate epp`):
//! the set of background tasks a running server owns, and the config-file watcher that applies
//! endpoint changes.
//!
//! Both servers own listeners plus helper tasks that must all stop together: on a graceful
//! shutdown (stop accepting, let in-flight requests finish for a bounded time, then cut them) and
//! when the server value is dropped (cut at once, so an embedding test never leaks a listener).
//! Keeping that in one type means the two data planes cannot drift apart on how they end.
//!
//! **Signals.** Kubernetes, systemd and docker stop a process with SIGTERM, people with ctrl-c;
//! both start the same sequence ([`drain`]): readiness turns false at once (so load balancers
//! stop choosing this replica), listeners keep accepting for a grace period (connections sent
//! before the balancer noticed are still served), then stop, and in-flight requests get a
//! bounded time to finish. A process that did all that exits 0: stopping on request is
//! success.

use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{CONFIG_POLL_INTERVAL_MS, DataPlaneConfig, ShutdownTimes};
use crate::control::Control;

/// How long shutdown waits for in-flight requests, ms. Long enough for most generations to
/// finish (a 1,000-token answer at 20 ms per token), short enough for a rolling update.
pub const SHUTDOWN_GRACE_MS: u64 = 30_000;

/// The background tasks of a running server and the token that asks them to stop. Dropping it
/// cancels the token and aborts every task.
#[derive(Debug, Default)]
pub struct Tasks {
    stop: CancellationToken,
    handles: Vec<JoinHandle<()>>,
}

impl Tasks {
    /// No tasks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The token every task watches to stop accepting work; cancelled by [`Tasks::shutdown`]
    /// and on drop.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Spawns `task` on the current runtime and owns it.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.handles.push(tokio::spawn(task));
    }

    /// Cancels the stop token, waits up to `grace` for every task to finish (servers drain
    /// their in-flight requests then), and aborts whatever is still running after it. Returns
    /// whether everything finished in time.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        self.stop.cancel();
        let handles: Vec<_> = self.handles.drain(..).collect();
        let aborts: Vec<_> = handles.iter().map(JoinHandle::abort_handle).collect();
        let drained = tokio::time::timeout(grace, futures::future::join_all(handles)).await;
        if drained.is_err() {
            tracing::warn!(
                "in-flight requests still running after the shutdown grace period; cutting them"
            );
            for a in aborts {
                a.abort();
            }
        }
        drained.is_ok()
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in &self.handles {
            t.abort();
        }
    }
}

/// Waits for SIGTERM or ctrl-c (SIGINT) and returns its name.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map(|()| "ctrl-c")
    }
}

/// The shutdown sequence after `signal` (see the module docs): `control` stops reporting
/// ready at once (the caller flips any other health status first), `tasks` keep serving for
/// `times.accept_grace_ms`, then stop accepting and get `times.drain_timeout_ms` to finish
/// their in-flight requests. Every step is logged.
pub async fn drain(control: &Control, tasks: Tasks, times: ShutdownTimes, signal: &str) {
    control.begin_shutdown();
    tracing::info!(
        signal,
        in_flight = control.in_flight(),
        accept_grace_ms = times.accept_grace_ms,
        drain_timeout_ms = times.drain_timeout_ms,
        "shutting down: readiness is 503 now; still accepting during the grace period"
    );
    tokio::time::sleep(Duration::from_millis(times.accept_grace_ms)).await;
    tracing::info!(
        in_flight = control.in_flight(),
        "grace period over: no longer accepting; waiting for in-flight requests"
    );
    if tasks
        .shutdown(Duration::from_millis(times.drain_timeout_ms))
        .await
    {
        tracing::info!("every in-flight request finished; exiting");
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Polls `path` every [`CONFIG_POLL_INTERVAL_MS`] and, when its modification time changes,
/// reloads the configuration with `load` and applies its endpoints to `control`. A file that
/// fails to load is logged and ignored, keeping the running set. Returns when `stop` is
/// cancelled.
///
/// `load` is the caller's own way of reading the file (the picker also accepts a bare
/// `EndpointPickerConfig`), with its flags re-applied so flag-given endpoints stay fixed.
pub async fn watch_config<E: Display>(
    path: PathBuf,
    load: impl Fn() -> Result<DataPlaneConfig, E>,
    control: Arc<Control>,
    stop: CancellationToken,
) {
    let mut last = modified(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(CONFIG_POLL_INTERVAL_MS));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = modified(&path);
        if now == last {
            continue;
        }
        last = now;
        match load() {
            Ok(cfg) => {
                tracing::info!(path = %path.display(), endpoints = cfg.endpoints.len(), "config changed; applying endpoints");
                control.set_endpoints(&cfg.endpoints);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "config changed but is invalid; keeping the running endpoints");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn shutdown_cuts_tasks_that_outlive_the_grace_period() {
        let mut tasks = Tasks::new();
        let stop = tasks.stop_token();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        // Honours the stop token.
        tasks.spawn(async move {
            stop.cancelled().await;
            let _ = done_tx.send(());
        });
        // Ignores it: must be aborted, not awaited forever.
        let (_keep, never) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _ = never.await;
        });
        // Paused time: the real grace period, without waiting for it.
        let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
        let started = tokio::time::Instant::now();
        tokio::time::timeout(grace * 2, tasks.shutdown(grace))
            .await
            .expect("shutdown is bounded by its grace period");
        assert!(started.elapsed() >= grace, "{:?}", started.elapsed());
        done_rx
            .await
            .expect("the cooperative task saw the stop token");
    }

    #[tokio::test]
    async fn drop_cancels_the_stop_token() {
        let tasks = Tasks::new();
        let stop = tasks.stop_token();
        drop(tasks);
        assert!(stop.is_cancelled());
    }
}
