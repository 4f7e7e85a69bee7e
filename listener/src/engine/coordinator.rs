//! Which mailboxes this replica serves. Each replica heartbeats into the store; every tick it
//! computes the spread of open mailboxes over live replicas ([`balance::assign`]), claims the
//! leases of its own share, renews the leases it holds in one batch, and gives back those that
//! are no longer its own. The supervisor runs a worker only under a lease this replica holds,
//! and every write a worker makes carries the lease's fencing token.
//!
//! A lease is trusted locally only until `renewed + ttl − margin`: a replica that cannot reach
//! the store stops its workers before another replica could claim their mailboxes, so two
//! replicas never serve one mailbox.
//!
//! [`balance::assign`]: crate::engine::balance::assign

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::balance;
use crate::engine::metrics::Metrics;
use crate::engine::store::{Fence, Store, StoreError, WorkerState};
use crate::engine::supervisor::Supervisor;

/// Leases claimed in one call to the store.
const CLAIM_BATCH: usize = 500;

/// How a replica takes part.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub replica: String,
    /// How long a lease and a heartbeat last unless renewed.
    pub lease: Duration,
    /// Most mailboxes this replica serves.
    pub cap: usize,
}

impl CoordinatorSettings {
    /// Renewals come three times per lease.
    pub fn tick(&self) -> Duration {
        self.lease / 3
    }

    /// A lease is acted on only while this much of it is left.
    fn margin(&self) -> Duration {
        self.lease / 3
    }
}

#[derive(Debug, Clone, Copy)]
struct Held {
    token: u64,
    /// Past this moment the lease may have passed to another replica.
    safe_until: Instant,
}

/// The leases this replica holds, as far as it may trust them now.
#[derive(Debug)]
pub struct Leases {
    replica: String,
    held: Mutex<HashMap<String, Held>>,
}

impl Leases {
    pub fn new(replica: &str) -> Self {
        Leases {
            replica: replica.to_owned(),
            held: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The fence under which this replica may act on the mailbox now, if any.
    pub fn fence(&self, id: &str) -> Option<Fence> {
        self.lock()
            .get(id)
            .filter(|h| h.safe_until > Instant::now())
            .map(|h| Fence {
                replica: self.replica.clone(),
                token: h.token,
            })
    }

    /// True while `fence` is this replica's current, trusted lease on the mailbox.
    pub fn holds(&self, id: &str, fence: &Fence) -> bool {
        self.fence(id).is_some_and(|f| f == *fence)
    }

    /// Trusts a lease just claimed until `safe_until`.
    pub fn insert(&self, id: &str, token: u64, safe_until: Instant) {
        self.lock()
            .insert(id.to_owned(), Held { token, safe_until });
    }

    fn remove(&self, id: &str) -> Option<u64> {
        self.lock().remove(id).map(|h| h.token)
    }

    fn all(&self) -> Vec<(String, Fence)> {
        self.lock()
            .iter()
            .map(|(id, h)| {
                (
                    id.clone(),
                    Fence {
                        replica: self.replica.clone(),
                        token: h.token,
                    },
                )
            })
            .collect()
    }

    /// The mailboxes whose lease may be acted on now.
    fn trusted(&self) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, h)| h.safe_until > now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Forgets the leases that may no longer be acted on; answers their mailboxes.
    fn drop_lapsed(&self) -> Vec<String> {
        let now = Instant::now();
        let mut lapsed = Vec::new();
        self.lock().retain(|id, h| {
            let keep = h.safe_until > now;
            if !keep {
                lapsed.push(id.clone());
            }
            keep
        });
        lapsed
    }

    fn extend(&self, id: &str, token: u64, safe_until: Instant) {
        if let Some(h) = self.lock().get_mut(id).filter(|h| h.token == token) {
            h.safe_until = safe_until;
        }
    }
}

/// One replica's part in sharing the mailboxes.
#[derive(Debug)]
pub struct Coordinator {
    settings: CoordinatorSettings,
    store: Arc<dyn Store>,
    leases: Arc<Leases>,
    supervisor: Arc<Supervisor>,
    /// The store's epoch as first seen; another one means the store lost its data.
    epoch: Mutex<Option<String>>,
    /// Mailboxes this replica stopped serving, whose memory in the store goes at the next
    /// pass that finds the store's data intact.
    forgettable: Mutex<Vec<String>>,
    /// Leases no longer this replica's share whose workers are still stopping: renewed, not
    /// trusted, given back once the worker has stopped.
    leaving: Mutex<HashMap<String, Fence>>,
    /// Shutting down: no claims.
    draining: std::sync::atomic::AtomicBool,
    /// This process among any that might share its replica id.
    nonce: String,
    metrics: Metrics,
}

impl Coordinator {
    pub fn new(
        settings: CoordinatorSettings,
        store: Arc<dyn Store>,
        leases: Arc<Leases>,
        supervisor: Arc<Supervisor>,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Coordinator {
            epoch: Mutex::new(None),
            forgettable: Mutex::default(),
            leaving: Mutex::default(),
            draining: Default::default(),
            nonce: format!("{:016x}", fastrand::u64(..)),
            metrics,
            settings,
            store,
            leases,
            supervisor,
        })
    }

    /// Runs until `stop` fires: a pass every tick, and one soon after any mailbox changes;
    /// `ready` says whether the last pass reached the store.
    async fn run(
        self: Arc<Self>,
        ready: Arc<std::sync::atomic::AtomicBool>,
        stop: CancellationToken,
    ) {
        let mut changes = self.store.changes();
        let mut tick = tokio::time::interval(self.settings.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut changed: HashSet<String> = HashSet::new();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                id = async {
                    match &mut changes {
                        Some(rx) => rx.recv().await.ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(id) = id {
                        changed.insert(id);
                    }
                    // Let a burst of changes (a Create of many mailboxes) settle into one pass.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Some(rx) = &mut changes {
                        while let Ok(id) = rx.try_recv() {
                            changed.insert(id);
                        }
                    }
                }
            }
            let reached = self.pass(&changed).await;
            // A replica shutting down stays unready.
            if !self.draining.load(std::sync::atomic::Ordering::Relaxed) {
                ready.store(reached, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Runs until `stop` fires, first trying until the store answers; `ready` is set once this
    /// replica has registered and claimed its share, and cleared while the store does not
    /// answer.
    pub async fn run_when_ready(
        self: Arc<Self>,
        ready: Arc<std::sync::atomic::AtomicBool>,
        stop: CancellationToken,
    ) {
        while !self.pass(&HashSet::new()).await {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.settings.tick()) => {}
            }
        }
        if !stop.is_cancelled() && !self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            ready.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.run(ready, stop).await;
    }

    /// One round: heartbeat, spread, give back, renew, claim. Mailboxes in `changed` are
    /// re-read by the supervisor even when their lease did not change. False when the store
    /// could not be reached.
    pub async fn pass(&self, changed: &HashSet<String>) -> bool {
        let started = Instant::now();
        self.metrics.pass_claims.set(0);
        let reached = self.pass_once(changed).await;
        let took = started.elapsed();
        self.metrics.pass_seconds.observe(took.as_secs_f64());
        self.metrics.last_pass_ms.set(took.as_millis() as i64);
        self.count_leases();
        reached
    }

    /// Sets the lease gauges from where the leases stand now.
    fn count_leases(&self) {
        let held = self.leases.all();
        let trusted = self.leases.trusted();
        let idle = trusted
            .iter()
            .filter(|id| !self.supervisor.has_worker(id))
            .count();
        let gauge =
            |kind: &str, n: usize| self.metrics.leases.with_label_values(&[kind]).set(n as i64);
        gauge("held", held.len());
        gauge("trusted", trusted.len());
        gauge("idle", idle);
        gauge("leaving", self.leaving().len());
    }

    async fn pass_once(&self, changed: &HashSet<String>) -> bool {
        let replica = self.settings.replica.as_str();
        match self.check_epoch().await {
            Ok(None) => self.forget_given_back(),
            Ok(Some(epoch)) => {
                // Taken as known only once healed: a failed write-back is tried again.
                if self.heal().await {
                    *self.epoch.lock().unwrap_or_else(|p| p.into_inner()) = Some(epoch);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the store does not answer");
                self.drop_untrusted();
                return false;
            }
        }
        let live = match self
            .store
            .heartbeat(replica, &self.nonce, self.settings.lease)
            .await
        {
            Ok(live) => live,
            Err(e @ StoreError::Duplicate(_)) => {
                tracing::error!(error = %e, "this replica's id is taken");
                self.drop_untrusted();
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                self.drop_untrusted();
                return false;
            }
        };
        let open = match self.store.open_mailboxes().await {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the mailboxes");
                self.drop_untrusted();
                return false;
            }
        };
        // Mailboxes served now keep their places while there is room: a Create or a Close
        // moves no other mailbox, and when the caps leave some waiting, those are the
        // unserved ones.
        let served = match self.store.owners(&open).await {
            Ok(owners) => open
                .iter()
                .zip(owners)
                .filter_map(|(id, owner)| owner.map(|o| (id.clone(), o)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the lease holders");
                self.drop_untrusted();
                return false;
            }
        };
        let assigned = balance::assign(&live, &open, self.settings.cap, &served);
        let mine: HashSet<&str> = assigned
            .iter()
            .filter(|(_, r)| r.as_str() == replica)
            .map(|(m, _)| m.as_str())
            .collect();

        // Mailboxes no replica has room for wait, and say so; one replica writes that.
        if live.first().map(String::as_str) == Some(replica) && assigned.len() < open.len() {
            self.mark_waiting(&open, &assigned).await;
        }

        // Give back what is no longer ours (closed, or another replica's share now). Its
        // worker stops in the background, bounded, off this pass's path; the lease is renewed
        // until it has stopped, so the next owner never overlaps it, and given back then.
        for (id, fence) in self.leases.all() {
            if !mine.contains(id.as_str()) {
                self.leases.remove(&id);
                self.leaving().insert(id.clone(), fence);
                self.supervisor.poke(&id);
            }
        }
        let stopped: Vec<(String, Fence)> = {
            let mut leaving = self.leaving();
            let ids: Vec<String> = leaving
                .keys()
                .filter(|id| self.supervisor.idle(id))
                .cloned()
                .collect();
            ids.into_iter()
                .filter_map(|id| leaving.remove_entry(&id))
                .collect()
        };
        for (id, fence) in &stopped {
            if let Err(e) = self.store.release(id, fence).await {
                tracing::warn!(id = ?id, error = %e, "could not give a lease back; it will lapse");
            }
        }
        self.forget_later(stopped.into_iter().map(|(id, _)| id));

        // Renew the rest in one batch, with the leases of workers still stopping; a lease
        // found lost stops its worker at once. A lease is trusted from the moment its
        // renewal was asked, not from the pass's start: a slow pass must not leave leases
        // held but distrusted.
        let held = self.leases.all();
        let stopping: Vec<(String, Fence)> = self
            .leaving()
            .iter()
            .map(|(id, f)| (id.clone(), f.clone()))
            .collect();
        if !held.is_empty() || !stopping.is_empty() {
            let batch = [held.as_slice(), stopping.as_slice()].concat();
            let asked = Instant::now();
            match self.store.renew(&batch, self.settings.lease).await {
                Ok(still) => {
                    let safe_until = self.trusted_until(asked);
                    for ((id, fence), ok) in held.iter().zip(&still) {
                        if *ok {
                            self.leases.extend(id, fence.token, safe_until);
                        } else {
                            tracing::warn!(id = ?id, "lease lost to another replica");
                            self.leases.remove(id);
                            self.supervisor.poke(id);
                            self.forget_later([id.clone()]);
                        }
                    }
                    for ((id, _), ok) in stopping.iter().zip(&still[held.len()..]) {
                        if !*ok {
                            self.leaving().remove(id);
                            self.forget_later([id.clone()]);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    self.drop_untrusted();
                }
            }
        }

        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            // Shutting down: the workers stop, the leases are kept until they have.
            return true;
        }

        // Claim our share, in batches, each trusted from when it was asked.
        let mut wanted: Vec<String> = Vec::new();
        for id in mine {
            if self.leases.fence(id).is_some() {
                if changed.contains(id) {
                    self.supervisor.poke(id);
                }
            } else {
                wanted.push(id.to_owned());
            }
        }
        self.metrics.pass_claims.set(wanted.len() as i64);
        for batch in wanted.chunks(CLAIM_BATCH) {
            let Some((taken, safe_until)) = self.claim(batch).await else {
                break;
            };
            for (id, fence) in &taken {
                self.trust(id, fence, safe_until);
            }
        }

        // A trusted lease without a worker (its claim was distrusted for a moment, its
        // reconciler gave up) gets one.
        let held = self.leases.trusted();
        for id in &held {
            if !self.supervisor.has_worker(id) {
                self.supervisor.poke(id);
            }
        }
        // A worker runs with what the store wants now, even when the news of a change was lost
        // (pub/sub delivers at most once).
        self.follow_generations(&held).await;
        true
    }

    /// Pokes every mailbox whose worker here runs with another generation than the stored one.
    async fn follow_generations(&self, held: &[String]) {
        if held.is_empty() {
            return;
        }
        let stored = match self.store.generations(held).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the mailboxes' generations");
                return;
            }
        };
        let running = self.supervisor.generations(held);
        for ((id, stored), running) in held.iter().zip(stored).zip(running) {
            if running.is_some() && running != stored {
                self.supervisor.poke(id);
            }
        }
    }

    /// Until when a lease renewed or claimed by a call sent at `asked` may be acted on.
    fn trusted_until(&self, asked: Instant) -> Instant {
        asked + self.settings.lease - self.settings.margin()
    }

    /// Claims the leases of `ids` in one call; answers those taken, and until when they may
    /// be trusted. `None` when the store failed.
    async fn claim(&self, ids: &[String]) -> Option<(Vec<(String, Fence)>, Instant)> {
        let asked = Instant::now();
        let tokens = match self
            .store
            .claim_all(ids, &self.settings.replica, self.settings.lease)
            .await
        {
            Ok(tokens) => tokens,
            Err(e) => {
                tracing::warn!(mailboxes = ids.len(), error = %e, "claim failed");
                return None;
            }
        };
        let taken = ids
            .iter()
            .zip(tokens)
            .filter_map(|(id, token)| {
                let fence = Fence {
                    replica: self.settings.replica.clone(),
                    token: token?,
                };
                Some((id.clone(), fence))
            })
            .collect();
        Some((taken, self.trusted_until(asked)))
    }

    /// Trusts a lease just taken and starts its worker.
    fn trust(&self, id: &str, fence: &Fence, safe_until: Instant) {
        // Ours again before its worker had stopped: the lease was never let go.
        self.leaving().remove(id);
        self.metrics.leases_taken.inc();
        self.leases.insert(id, fence.token, safe_until);
        self.supervisor.poke(id);
    }

    fn leaving(&self) -> MutexGuard<'_, HashMap<String, Fence>> {
        self.leaving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes mailboxes this replica no longer serves, to forget at the next sound pass.
    fn forget_later(&self, ids: impl IntoIterator<Item = String>) {
        self.forgettable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
    }

    /// Claims nothing more; the leases held are renewed until [`Coordinator::leave`], so the
    /// workers stop (and their posts finish) before another replica may take over.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets the mailboxes given back or lost to another replica before this pass, now
    /// that the store is known to have kept its data since (had it not, they would be
    /// written back: an empty store lists no mailbox, which looks like every one closed).
    fn forget_given_back(&self) {
        let ids = std::mem::take(&mut *self.forgettable.lock().unwrap_or_else(|p| p.into_inner()));
        for id in ids {
            if self.leases.fence(&id).is_none() && !self.supervisor.has_worker(&id) {
                self.store.forget(&id);
            }
        }
    }

    /// The store's epoch when it is not the one known here (the store lost its data); `None`
    /// while it is, and on first sight, which it becomes.
    async fn check_epoch(&self) -> Result<Option<String>, StoreError> {
        let proposal = format!("{:016x}", fastrand::u64(..));
        let epoch = self.store.epoch(&proposal).await?;
        let mut known = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        match known.as_ref() {
            Some(k) if *k != epoch => Ok(Some(epoch)),
            Some(_) => Ok(None),
            None => {
                *known = Some(epoch);
                Ok(None)
            }
        }
    }

    /// The store lost its data (Redis restarted empty): this replica writes back every
    /// mailbox it served, whether its lease lapsed meanwhile or not, with what it knows of
    /// their progress (sync cursor, recent deliveries). They are open again, and whichever
    /// replica the spread gives each to catches up from where it stood: mail that arrived
    /// meanwhile is delivered, and only once. False when the write-back failed.
    async fn heal(&self) -> bool {
        self.forgettable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        match self.store.write_back().await {
            Ok(written) => {
                tracing::warn!(
                    mailboxes = written,
                    "the store lost its data; wrote back the mailboxes served here"
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the store lost its data and writing back the mailboxes served here failed; trying again next pass"
                );
                false
            }
        }
    }

    /// Marks `Queued` the open mailboxes left out of the spread (every replica at its cap).
    async fn mark_waiting(&self, open: &[String], assigned: &HashMap<String, String>) {
        for id in open.iter().filter(|id| !assigned.contains_key(*id)) {
            let waiting = matches!(
                self.store.status(id).await,
                Ok(Some(s)) if s.state == WorkerState::Queued
            );
            if !waiting {
                let _ = self
                    .store
                    .transition(
                        id,
                        WorkerState::Queued,
                        Some(
                            "every replica serves its most mailboxes (--max-active-mailboxes)"
                                .into(),
                        ),
                        None,
                    )
                    .await;
            }
        }
    }

    /// Stops the workers whose leases can no longer be trusted.
    fn drop_untrusted(&self) {
        for id in self.leases.drop_lapsed() {
            tracing::warn!(id = ?id, "lease not renewed in time; stopping the mailbox here");
            self.supervisor.poke(&id);
        }
    }

    /// On shutdown, after the workers stopped: every lease given back and the replica gone, so
    /// the others take over at once instead of waiting for the leases to lapse.
    pub async fn leave(&self) {
        let stopping: Vec<(String, Fence)> = self.leaving().drain().collect();
        for (id, fence) in stopping {
            let _ = self.store.release(&id, &fence).await;
        }
        for (id, fence) in self.leases.all() {
            self.leases.remove(&id);
            let _ = self.store.release(&id, &fence).await;
        }
        let _ = self.store.leave(&self.settings.replica).await;
    }
}

#[cfg(test)]
mod tests;
