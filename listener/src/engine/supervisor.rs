//! Starts, replaces and stops mailbox workers.
//!
//! Creatio's calls only write what is wanted to the store (the credentials a mailbox should run
//! with, or that it is closed) and poke the supervisor, which returns at once; one reconciler
//! task per mailbox then reads what the store wants and brings the running worker to it,
//! stopping the old worker (which unsubscribes) before it starts a new one. The store is the
//! truth and the reconciler converges on it, so a mailbox never has two workers, whatever
//! Creatio sends and however its calls interleave, and a Create of thousands of mailboxes
//! answers in milliseconds. Credentials equal to the running ones change nothing (the store
//! keeps the generation): the worker keeps its state and its backoff, which is what keeps
//! Creatio's once-a-minute Recreate of a failing mailbox from turning into a login attempt a
//! minute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::creatio::contract::Credentials;
use crate::creatio::mail::unix_now_ms;
use crate::engine::store::{Counter, Fence, Store, StoreError, Wanted, WorkerState};
use crate::engine::worker::{self, WorkerContext};

#[derive(Debug)]
struct Running {
    creds: Arc<Credentials>,
    generation: u64,
    fence: Fence,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Cancels the worker and waits until it has finished: it unsubscribes, and a post to
    /// Creatio already under way completes and is recorded. Past `bound` the worker is
    /// dropped where it stands (a post cut short is found again by the next catch-up, under
    /// the same idempotency key; an unsubscribe cut short expires on the server).
    async fn stop(mut self, bound: Duration) {
        self.cancel.cancel();
        if tokio::time::timeout(bound, &mut self.task).await.is_err() {
            tracing::warn!(id = ?self.creds.id, bound_ms = bound.as_millis() as u64, "mailbox worker did not stop in time; dropped");
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    running: Option<Running>,
    /// A reconciler task is bringing `running` to what the store wants.
    reconciling: bool,
    /// The store changed while the reconciler was at work: it looks again before it ends.
    dirty: bool,
}

#[derive(Debug, Default)]
struct Slots {
    map: HashMap<String, Slot>,
    /// Shutting down: no worker starts any more.
    closed: bool,
}

/// How long a reconciler waits before asking an unavailable store again.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// How often a mailbox whose credentials this replica cannot open is read again (a Create from
/// Creatio, sealed anew, is read at once).
const UNREADABLE_RETRY: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Supervisor {
    /// Shared by every worker, not copied into each.
    ctx: Arc<WorkerContext>,
    slots: Mutex<Slots>,
    /// A mailbox this long without a healthy stream is reported `failed` to Creatio.
    unhealthy_after: Duration,
    /// A mailbox this long without an owner is reported `notExists`.
    orphan_grace: Duration,
}

impl Supervisor {
    /// `orphan_grace`: how long a mailbox may be without an owner before SubscriptionsState
    /// says so (longer than a takeover takes: two leases).
    pub fn new(ctx: WorkerContext, unhealthy_after: Duration, orphan_grace: Duration) -> Arc<Self> {
        Arc::new(Supervisor {
            ctx: Arc::new(ctx),
            slots: Mutex::default(),
            unhealthy_after,
            orphan_grace,
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.ctx.store
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        self.ctx.leases.replica()
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the mailbox should run with these credentials; its worker is (re)started
    /// in the background unless it already runs with exactly these.
    pub async fn start(self: &Arc<Self>, creds: Credentials) -> Result<(), StoreError> {
        let id = creds.id.clone();
        self.ctx.store.put_mailbox(creds).await?;
        self.poke(&id);
        Ok(())
    }

    /// Records that the mailbox should be closed and forgets it; its worker stops (and
    /// unsubscribes) in the background. False if the mailbox was unknown.
    pub async fn stop(self: &Arc<Self>, id: &str) -> Result<bool, StoreError> {
        let known = self.ctx.store.remove_mailbox(id).await?;
        self.poke(id);
        Ok(known)
    }

    /// Tells the mailbox's reconciler that the store changed.
    pub fn poke(self: &Arc<Self>, id: &str) {
        let mut slots = self.lock();
        if slots.closed {
            return;
        }
        let slot = slots.map.entry(id.to_owned()).or_default();
        if slot.reconciling {
            slot.dirty = true;
            return;
        }
        slot.reconciling = true;
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move { this.reconcile(id).await });
    }

    /// Brings the mailbox's worker to what the store wants, one step at a time; the only place
    /// that starts or stops workers.
    async fn reconcile(self: Arc<Self>, id: String) {
        let mut unreadable = false;
        loop {
            // A worker runs only under a lease this replica holds and trusts.
            let fence = self.ctx.leases.fence(&id);
            let wanted = match &fence {
                None => None,
                Some(_) => match self.ctx.store.wanted(&id).await {
                    Ok(w) => w,
                    Err(StoreError::Unreadable(why)) => {
                        // Said once, as the mailbox's state: Creatio sees it failed and sends
                        // its credentials anew, which this replica seals with its own key.
                        if !std::mem::replace(&mut unreadable, true) {
                            tracing::error!(id = ?id, error = %why, "cannot open the mailbox's credentials");
                            if let Err(e) = self
                                .ctx
                                .store
                                .transition(&id, WorkerState::Failed, Some(why), fence.as_ref())
                                .await
                            {
                                tracing::warn!(id = ?id, error = %e, "could not record the mailbox's state");
                            }
                        }
                        // Read again later, or at once when the store changes (a Create).
                        let until = tokio::time::Instant::now() + UNREADABLE_RETRY;
                        while tokio::time::Instant::now() < until {
                            tokio::time::sleep(STORE_RETRY).await;
                            let mut slots = self.lock();
                            let closed = slots.closed;
                            let changed = slots
                                .map
                                .get_mut(&id)
                                .is_some_and(|slot| std::mem::take(&mut slot.dirty));
                            if closed || changed {
                                break;
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(id = ?id, error = %e, "cannot read the mailbox; trying again");
                        tokio::time::sleep(STORE_RETRY).await;
                        continue;
                    }
                },
            };
            let old = {
                let mut slots = self.lock();
                let closed = slots.closed;
                let Some(slot) = slots.map.get_mut(&id) else {
                    return;
                };
                let settled = match (&wanted, &slot.running) {
                    (Some(w), Some(r)) => {
                        w.generation == r.generation && fence.as_ref() == Some(&r.fence)
                    }
                    (None, None) => true,
                    _ => false,
                };
                if settled || closed {
                    if std::mem::take(&mut slot.dirty) && !closed {
                        continue;
                    }
                    slot.reconciling = false;
                    if slot.running.is_none() {
                        slots.map.remove(&id);
                    }
                    return;
                }
                match (wanted.zip(fence), slot.running.take()) {
                    (Some((w, fence)), None) => {
                        slot.running = Some(self.spawn_worker(w, fence));
                        None
                    }
                    (_, running) => running,
                }
            };
            if let Some(old) = old {
                old.stop(self.stop_bound()).await;
            }
        }
    }

    fn spawn_worker(&self, wanted: Wanted, fence: Fence) -> Running {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(supervise(
            self.ctx.clone(),
            wanted.creds.clone(),
            fence.clone(),
            cancel.clone(),
        ));
        Running {
            creds: wanted.creds,
            generation: wanted.generation,
            fence,
            cancel,
            task,
        }
    }

    /// The credentials of every worker running here.
    pub fn running(&self) -> Vec<Credentials> {
        self.lock()
            .map
            .values()
            .filter_map(|s| s.running.as_ref().map(|r| Credentials::clone(&r.creds)))
            .collect()
    }

    /// The generation each mailbox's worker here runs with, where one runs.
    pub fn generations(&self, ids: &[String]) -> Vec<Option<u64>> {
        let slots = self.lock();
        ids.iter()
            .map(|id| {
                slots
                    .map
                    .get(id)
                    .and_then(|s| s.running.as_ref().map(|r| r.generation))
            })
            .collect()
    }

    /// True when no worker of the mailbox runs here, nor is being started or stopped.
    pub fn idle(&self, id: &str) -> bool {
        self.lock()
            .map
            .get(id)
            .is_none_or(|s| s.running.is_none() && !s.reconciling)
    }

    /// How long a worker may take to stop: a post under way and an unsubscribe, each bounded
    /// by the request timeout.
    fn stop_bound(&self) -> Duration {
        2 * self.ctx.settings.limits.request_timeout
    }

    /// True while a worker of the mailbox runs here.
    pub fn has_worker(&self, id: &str) -> bool {
        self.lock().map.get(id).is_some_and(|s| s.running.is_some())
    }

    /// What Creatio's SubscriptionsState reports: `exists` for a mailbox being served and
    /// not failing for longer than it may.
    pub async fn state(&self, id: &str) -> Result<&'static str, StoreError> {
        Ok(self.states(std::slice::from_ref(&id.to_owned())).await?[0])
    }

    /// [`Supervisor::state`] of each mailbox. A mailbox no replica holds the lease of (its
    /// owner died, or every replica is full) is not `exists` once that has lasted longer than
    /// a takeover takes: Creatio then recreates it, which changes nothing here but keeps its
    /// own view true.
    pub async fn states(&self, ids: &[String]) -> Result<Vec<&'static str>, StoreError> {
        let owners = self.ctx.store.owners(ids).await?;
        let statuses = self.ctx.store.statuses(ids).await?;
        let now = unix_now_ms();
        let mut states = Vec::with_capacity(ids.len());
        for (owner, status) in owners.into_iter().zip(statuses) {
            states.push(match status {
                None => "notExists",
                Some(s) if s.state == WorkerState::Failed => "failed",
                Some(s)
                    if owner.is_none()
                        && now.saturating_sub(s.updated_unix_ms)
                            > self.orphan_grace.as_millis() as i64 =>
                {
                    "notExists"
                }
                Some(s) => match s.unhealthy_since_unix_ms {
                    Some(since)
                        if now.saturating_sub(since) > self.unhealthy_after.as_millis() as i64 =>
                    {
                        "failed"
                    }
                    _ => "exists",
                },
            });
        }
        Ok(states)
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
        let bound = self.stop_bound();
        futures_util::future::join_all(all.into_iter().map(|r| r.stop(bound))).await;
    }
}

/// Runs a mailbox's worker; a worker that dies (a bug, never an input) is noticed, marked
/// and restarted after a growing delay, instead of leaving the mailbox silently dead. So is a
/// worker that stopped itself because the store refused its lease: by then either the
/// coordinator has found the lease lost (and cancels this), or the store holds it again.
async fn supervise(
    ctx: Arc<WorkerContext>,
    creds: Arc<Credentials>,
    fence: Fence,
    cancel: CancellationToken,
) {
    let mut backoff = ctx.settings.retry.start();
    loop {
        let run = std::panic::AssertUnwindSafe(worker::run(
            ctx.clone(),
            creds.clone(),
            fence.clone(),
            cancel.child_token(),
        ));
        match run.catch_unwind().await {
            Ok(()) if cancel.is_cancelled() => return,
            Ok(()) => {
                let delay = backoff.next_delay();
                tracing::info!(id = ?creds.id, retry_in_ms = delay.as_millis() as u64, "mailbox worker stopped itself; starting it again unless its lease is gone");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let delay = backoff.next_delay();
                tracing::error!(id = ?creds.id, panic = ?what, retry_in_ms = delay.as_millis() as u64, "mailbox worker died; restarting it");
                let _ = ctx.store.bump(&creds.id, Counter::Restarts).await;
                let _ = ctx
                    .store
                    .transition(
                        &creds.id,
                        WorkerState::Backoff,
                        Some("internal error: the mailbox worker died and is restarted".into()),
                        Some(&fence),
                    )
                    .await;
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
