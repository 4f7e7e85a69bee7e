//! Starts, replaces and stops mailbox workers.
//!
//! Creatio's calls only record what is wanted (the credentials a mailbox should run with, or
//! that it should be closed) and return at once; one reconciler task per mailbox then brings
//! the running worker to what is wanted, stopping the old worker (which unsubscribes) before
//! it starts a new one. So a mailbox never has two workers, whatever Creatio sends and however
//! its calls interleave, and a Create of thousands of mailboxes answers in milliseconds.
//! Credentials equal to the running ones change nothing: the worker keeps its state and its
//! backoff, which is what keeps Creatio's once-a-minute Recreate of a failing mailbox from
//! turning into a login attempt a minute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::contract::Credentials;
use crate::mail::unix_now_ms;
use crate::registry::{Registry, WorkerState};
use crate::worker::{self, WorkerContext};

#[derive(Debug)]
struct Running {
    creds: Credentials,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Cancels the worker and waits until it has finished: it unsubscribes, and a post to
    /// Creatio already under way completes and is recorded. Every step of that is bounded by
    /// the request timeout, so the wait is too.
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// What the mailbox should run with; `None` once closed.
    wanted: Option<Credentials>,
    running: Option<Running>,
    /// A reconciler task is bringing `running` to `wanted`.
    reconciling: bool,
    /// The mailbox was closed since `running` started: even the same credentials start a
    /// new worker, whose status starts afresh.
    restart: bool,
}

#[derive(Debug, Default)]
struct Slots {
    map: HashMap<String, Slot>,
    /// Shutting down: no worker starts any more.
    closed: bool,
}

#[derive(Debug)]
pub struct Supervisor {
    ctx: WorkerContext,
    slots: Mutex<Slots>,
    /// A mailbox this long without a healthy stream is reported `failed` to Creatio.
    unhealthy_after: Duration,
}

impl Supervisor {
    pub fn new(ctx: WorkerContext, unhealthy_after: Duration) -> Arc<Self> {
        Arc::new(Supervisor {
            ctx,
            slots: Mutex::default(),
            unhealthy_after,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.ctx.registry
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the mailbox should run with these credentials; its worker is (re)started
    /// in the background unless it already runs with exactly these.
    pub fn start(self: &Arc<Self>, creds: Credentials) {
        let mut slots = self.lock();
        if slots.closed {
            return;
        }
        let id = creds.id.clone();
        // The store changes under the same lock as the wish, so calls take effect in order.
        self.ctx.registry.upsert(creds.clone());
        let slot = slots.map.entry(id.clone()).or_default();
        slot.wanted = Some(creds);
        self.reconcile_soon(&id, slot);
    }

    /// Records that the mailbox should be closed and forgets it; its worker stops (and
    /// unsubscribes) in the background. False if the mailbox was unknown.
    pub fn stop(self: &Arc<Self>, id: &str) -> bool {
        let mut slots = self.lock();
        let known = self.ctx.registry.remove(id);
        if let Some(slot) = slots.map.get_mut(id) {
            slot.wanted = None;
            slot.restart = slot.running.is_some();
            self.reconcile_soon(id, slot);
        }
        known
    }

    fn reconcile_soon(self: &Arc<Self>, id: &str, slot: &mut Slot) {
        let settled = match (&slot.wanted, &slot.running) {
            (Some(wanted), Some(running)) => !slot.restart && *wanted == running.creds,
            (None, None) => true,
            _ => false,
        };
        if settled || slot.reconciling {
            return;
        }
        slot.reconciling = true;
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { this.reconcile(id).await });
    }

    /// Brings the mailbox's worker to what is wanted, one step at a time; the only place
    /// that starts or stops workers.
    async fn reconcile(self: Arc<Self>, id: String) {
        loop {
            let old = {
                let mut slots = self.lock();
                let closed = slots.closed;
                let Some(slot) = slots.map.get_mut(&id) else {
                    return;
                };
                match (&slot.wanted, &slot.running) {
                    (Some(wanted), Some(running)) if !slot.restart && *wanted == running.creds => {
                        slot.reconciling = false;
                        return;
                    }
                    (None, None) => {
                        slots.map.remove(&id);
                        return;
                    }
                    (Some(wanted), None) => {
                        if !closed {
                            slot.running = Some(self.spawn_worker(wanted.clone()));
                        }
                        slot.reconciling = false;
                        return;
                    }
                    (_, Some(_)) => {
                        slot.restart = false;
                        slot.running.take()
                    }
                }
            };
            if let Some(old) = old {
                old.stop().await;
            }
        }
    }

    fn spawn_worker(&self, creds: Credentials) -> Running {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(supervise(self.ctx.clone(), creds.clone(), cancel.clone()));
        Running {
            creds,
            cancel,
            task,
        }
    }

    /// What Creatio's SubscriptionsState reports: `exists` for a mailbox being served and
    /// not failing for longer than it may.
    pub fn state(&self, id: &str) -> &'static str {
        match self.ctx.registry.status(id) {
            None => "notExists",
            Some(s) if s.state == WorkerState::Failed => "failed",
            Some(s) => match s.unhealthy_since_unix_ms {
                Some(since)
                    if unix_now_ms().saturating_sub(since)
                        > self.unhealthy_after.as_millis() as i64 =>
                {
                    "failed"
                }
                _ => "exists",
            },
        }
    }

    /// Stops every worker (each unsubscribes), in parallel, and starts no new one.
    pub async fn shutdown(&self) {
        let all: Vec<Running> = {
            let mut slots = self.lock();
            slots.closed = true;
            slots
                .map
                .values_mut()
                .filter_map(|s| s.running.take())
                .collect()
        };
        futures_util::future::join_all(all.into_iter().map(Running::stop)).await;
    }
}

/// Runs a mailbox's worker; a worker that dies (a bug, never an input) is noticed, marked
/// and restarted after a growing delay, instead of leaving the mailbox silently dead.
async fn supervise(ctx: WorkerContext, creds: Credentials, cancel: CancellationToken) {
    let mut backoff = ctx.settings.retry.start();
    loop {
        let run =
            std::panic::AssertUnwindSafe(worker::run(ctx.clone(), creds.clone(), cancel.clone()));
        match run.catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let delay = backoff.next_delay();
                tracing::error!(id = ?creds.id, panic = ?what, retry_in_ms = delay.as_millis() as u64, "mailbox worker died; restarting it");
                ctx.registry.count(&creds.id, |s| s.restarts += 1);
                ctx.registry.transition(
                    &creds.id,
                    WorkerState::Backoff,
                    Some("internal error: the mailbox worker died and is restarted".into()),
                );
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
