//! Which mailboxes this replica serves. Each replica heartbeats into the store every tick; a
//! mailbox's lease names its replica and a fencing token, and lasts as long as that replica's
//! heartbeat: one heartbeat keeps them all, whatever their number. When the spread's inputs
//! moved (a mailbox opened or closed, a replica joined or left, a lease changed hands), the
//! replica computes the spread of open mailboxes over live replicas ([`balance::assign`]),
//! claims the leases of its own share, most recently active first, and gives back those that
//! are no longer its own once their workers have stopped. The supervisor runs a worker only
//! under a lease this replica holds, and every write a worker makes carries the lease's
//! fencing token; a claim changes the token, so a replica that lost a mailbox can never write
//! its cursor or deliveries.
//!
//! The leases are trusted locally only until `heartbeat sent + ttl − margin`: a replica that
//! cannot reach the store stops its workers before another replica could claim their
//! mailboxes, so two replicas never serve one mailbox. A heartbeat that finds this replica
//! was not alive in the store meanwhile drops every lease: its share is claimed afresh.
//!
//! [`balance::assign`]: crate::engine::balance::assign

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::balance;
use crate::engine::metrics::Metrics;
use crate::engine::store::{Beat, Fence, Store, StoreError, WorkerState};
use crate::engine::supervisor::Supervisor;

/// Leases claimed in one call to the store.
const CLAIM_BATCH: usize = 500;

/// The spread is computed again at least this often, even when nothing seems to have moved.
const RESPREAD_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

/// The last spread computed: at which version of the store's inputs, when, and whether it
/// left work undone (claims refused, leases still to give back, mailboxes waiting for room).
#[derive(Debug, Default)]
struct Spread {
    version: Option<u64>,
    at: Option<Instant>,
    redo: bool,
    /// A spread was due while the last one rested: it runs once the rest is over, whatever
    /// the tick (twenty minutes for a replica alone on its store).
    deferred: bool,
    /// How long computing it took: the next waits ten times as long (at most a second), so
    /// that a burst of Creates at thousands of mailboxes does not turn into a spread each.
    took: Duration,
    /// The version up to which the running workers were checked against the generations
    /// the store wants.
    followed: Option<u64>,
}

impl Spread {
    /// True when the spread must be computed again now. One that must but is still resting
    /// is deferred to the rest's end ([`Spread::deferred_to`]).
    fn due(&mut self, version: u64) -> bool {
        let stale = self.redo
            || self.version != Some(version)
            || self
                .at
                .is_none_or(|at| at.elapsed() >= RESPREAD_AT_LEAST_EVERY);
        let rested = self.resting_until().is_none();
        if stale && !rested {
            self.deferred = true;
        }
        stale && rested
    }

    /// Until when the last spread rests, while it does.
    fn resting_until(&self) -> Option<Instant> {
        let until = self.at? + (self.took * 10).min(Duration::from_secs(1));
        (until > Instant::now()).then_some(until)
    }

    /// When a deferred spread is due: once the last one has rested, which it may have done
    /// already (the pass that deferred it ran on past the rest's end). A spread that left work
    /// undone waits for the next tick instead: work a store refuses now is refused a moment
    /// later too.
    fn deferred_to(&self) -> Option<Instant> {
        self.deferred
            .then(|| self.resting_until().unwrap_or_else(Instant::now))
    }
}

/// How a replica takes part.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub replica: String,
    /// How long a heartbeat (and with it every lease of the replica) lasts unless renewed.
    pub lease: Duration,
    /// Most mailboxes this replica serves.
    pub cap: usize,
}

impl CoordinatorSettings {
    /// Heartbeats come three times per lease.
    pub fn tick(&self) -> Duration {
        self.lease / 3
    }

    /// A lease is acted on only while this much of it is left.
    fn margin(&self) -> Duration {
        self.lease / 3
    }
}

/// The leases this replica holds: each mailbox's fencing token, and one moment for all of
/// them, past which they may have passed to other replicas (the last heartbeat that reached
/// the store, plus the lease, minus a margin).
#[derive(Debug, Default)]
struct Held {
    tokens: HashMap<String, u64>,
    safe_until: Option<Instant>,
    /// Mailboxes whose lease was found taken since the last pass.
    lost: Vec<String>,
}

/// The leases this replica holds, as far as it may trust them now.
#[derive(Debug)]
pub struct Leases {
    /// Shared with every fence this replica's workers carry.
    replica: Arc<str>,
    held: Mutex<Held>,
}

impl Leases {
    pub fn new(replica: &str) -> Self {
        Leases {
            replica: replica.into(),
            held: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    fn fence_of(&self, token: u64) -> Fence {
        Fence {
            replica: self.replica.clone(),
            token,
        }
    }

    /// The fence under which this replica may act on the mailbox now, if any.
    pub fn fence(&self, id: &str) -> Option<Fence> {
        let held = self.lock();
        let trusted = held.safe_until.is_some_and(|t| t > Instant::now());
        held.tokens
            .get(id)
            .filter(|_| trusted)
            .map(|t| self.fence_of(*t))
    }

    /// True while `fence` is this replica's current, trusted lease on the mailbox.
    pub fn holds(&self, id: &str, fence: &Fence) -> bool {
        self.fence(id).is_some_and(|f| f == *fence)
    }

    /// Holds a lease just claimed.
    pub fn insert(&self, id: &str, token: u64) {
        self.lock().tokens.insert(id.to_owned(), token);
    }

    /// Trusts every lease held until `safe_until` (a heartbeat reached the store), unless a
    /// later heartbeat already said longer.
    pub fn trust_until(&self, safe_until: Instant) {
        let mut held = self.lock();
        held.safe_until = held.safe_until.max(Some(safe_until));
    }

    fn remove(&self, id: &str) -> Option<u64> {
        self.lock().tokens.remove(id)
    }

    /// Forgets a lease a write found taken by another holder (if still held under `fence`),
    /// so that it is not trusted, and the next pass claims it again if it is still this
    /// replica's share.
    pub fn lost(&self, id: &str, fence: &Fence) {
        let mut held = self.lock();
        if *fence.replica == *self.replica && held.tokens.get(id) == Some(&fence.token) {
            held.tokens.remove(id);
            held.lost.push(id.to_owned());
        }
    }

    /// The mailboxes whose lease was found lost since this was last asked.
    fn take_lost(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().lost)
    }

    fn all(&self) -> Vec<(String, Fence)> {
        self.lock()
            .tokens
            .iter()
            .map(|(id, t)| (id.clone(), self.fence_of(*t)))
            .collect()
    }

    fn count(&self) -> usize {
        self.lock().tokens.len()
    }

    /// The mailboxes whose lease may be acted on now.
    fn trusted(&self) -> Vec<String> {
        let held = self.lock();
        if held.safe_until.is_some_and(|t| t > Instant::now()) {
            held.tokens.keys().cloned().collect()
        } else {
            Vec::new()
        }
    }

    /// Forgets every lease, when they may no longer be acted on (`all`: whether or not);
    /// answers their mailboxes.
    fn drop_lapsed(&self, all: bool) -> Vec<String> {
        let mut held = self.lock();
        if !all && held.safe_until.is_some_and(|t| t > Instant::now()) {
            return Vec::new();
        }
        held.tokens.drain().map(|(id, _)| id).collect()
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
    /// Leases no longer this replica's share whose workers are still stopping: kept, not
    /// trusted, given back once the worker has stopped.
    leaving: Mutex<HashMap<String, Fence>>,
    /// Shutting down: no claims.
    draining: std::sync::atomic::AtomicBool,
    spread: Mutex<Spread>,
    /// The last heartbeat the store took, and when it was sent.
    last_beat: Mutex<Option<(Instant, Beat)>>,
    /// A heartbeat found this replica was not alive in between; the next pass starts over.
    broken: std::sync::atomic::AtomicBool,
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
            spread: Mutex::default(),
            last_beat: Mutex::default(),
            broken: Default::default(),
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
            // A spread deferred while the last one rested is done once it has.
            let rested = self.spread().deferred_to();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = async {
                    match rested {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                news = async {
                    match &mut changes {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.take_news(news, &mut changed, &mut changes);
                    // Let a burst of changes (a Create of many mailboxes) settle into one pass.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while let Some(rx) = &mut changes {
                        let news = match rx.try_recv() {
                            Err(TryRecvError::Empty) => break,
                            Ok(id) => Ok(id),
                            Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                            Err(TryRecvError::Closed) => Err(RecvError::Closed),
                        };
                        self.take_news(news, &mut changed, &mut changes);
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

    /// Notes one piece of news from the store's change channel. News lost to a burst (more
    /// Creates at once than the channel holds) is made up for by a spread computed afresh at
    /// the next pass; a closed channel is not listened to again.
    fn take_news(
        &self,
        news: Result<String, RecvError>,
        changed: &mut HashSet<String>,
        changes: &mut Option<tokio::sync::broadcast::Receiver<String>>,
    ) {
        match news {
            Ok(id) => {
                changed.insert(id);
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(
                    missed,
                    "changes came faster than they were read; spreading afresh"
                );
                self.spread().redo = true;
            }
            Err(RecvError::Closed) => *changes = None,
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
        tokio::spawn(self.clone().heartbeats(stop.clone()));
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

    /// One round: heartbeat, give back, and when its inputs moved, spread and claim. Mailboxes in `changed` are
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
        let held = self.leases.count();
        let trusted = self.leases.trusted();
        let idle = trusted
            .iter()
            .filter(|id| !self.supervisor.has_worker(id))
            .count();
        let gauge =
            |kind: &str, n: usize| self.metrics.leases.with_label_values(&[kind]).set(n as i64);
        gauge("held", held);
        gauge("trusted", trusted.len());
        gauge("idle", idle);
        gauge("leaving", self.leaving().len());
    }

    async fn pass_once(&self, changed: &HashSet<String>) -> bool {
        let mut fresh_beat = !changed.is_empty();
        match self.check_epoch().await {
            Ok(None) => self.forget_given_back(),
            Ok(Some(epoch)) => {
                fresh_beat = true;
                // Taken as known only once healed: a failed write-back is tried again.
                if self.heal().await {
                    *self.epoch.lock().unwrap_or_else(|p| p.into_inner()) = Some(epoch);
                }
                self.spread().redo = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the store does not answer");
                self.drop_untrusted();
                return false;
            }
        }
        // A pass on the tick takes the heartbeat task's last word when it is fresh; one
        // after a change asks, so that it sees the change's version, and so does one that
        // found the store lost its data (this replica must register again before it claims).
        let recent = self
            .last_beat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|(at, _)| !fresh_beat && at.elapsed() < self.settings.tick());
        if recent.is_none() && self.heartbeat().await.is_none() {
            return false;
        }
        let Some((asked, beat)) = self
            .last_beat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return false;
        };
        self.start_over(asked);
        let lost = self.leases.take_lost();
        if !lost.is_empty() {
            // Claimed again if still this replica's share; forgotten here otherwise, so that
            // only their new server writes them back should the store lose its data.
            self.spread().redo = true;
            self.forget_later(lost);
        }

        // Leases no longer ours whose workers have stopped go back.
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
                tracing::warn!(id = ?id, error = %e, "could not give a lease back");
                self.spread().redo = true;
            }
        }
        self.forget_later(stopped.into_iter().map(|(id, _)| id));

        // The spread is computed again only when its inputs moved, when the last one left
        // work undone, and now and then as a net: an idle cluster costs the store one
        // heartbeat per replica per tick, whatever the number of mailboxes.
        if self.spread().due(beat.version) {
            let began = Instant::now();
            if !self.respread(&beat, changed).await {
                return false;
            }
            self.spread().took = began.elapsed();
        } else {
            for id in changed {
                if self.leases.fence(id).is_some() {
                    self.supervisor.poke(id);
                }
            }
        }

        // A trusted lease without a worker (its claim was distrusted for a moment, its
        // reconciler gave up) gets one.
        for id in self.leases.trusted() {
            if !self.supervisor.has_worker(&id) {
                self.supervisor.poke(&id);
            }
        }
        true
    }

    /// Says this replica is alive, which keeps every lease it holds: trusted from when the
    /// heartbeat was sent. `None` when the store did not take it.
    async fn heartbeat(&self) -> Option<Beat> {
        let asked = Instant::now();
        let beat = match self
            .store
            .heartbeat(&self.settings.replica, &self.nonce, self.settings.lease)
            .await
        {
            Ok(beat) => beat,
            Err(e @ StoreError::Duplicate(_)) => {
                tracing::error!(error = %e, "this replica's id is taken");
                self.drop_untrusted();
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                self.drop_untrusted();
                return None;
            }
        };
        // Not alive in the store for a while (or never before): other replicas may hold any
        // of the leases now. Nothing is trusted again until the pass (the one place that
        // changes which leases are held) has dropped them all.
        if !beat.unbroken {
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if !self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            self.leases.trust_until(self.trusted_until(asked));
        }
        *self.last_beat.lock().unwrap_or_else(|p| p.into_inner()) = Some((asked, beat.clone()));
        Some(beat)
    }

    /// After a heartbeat found this replica was not alive in between: every worker stops, and
    /// the share is claimed afresh under new tokens; the leases are trusted from the heartbeat
    /// sent at `asked`.
    fn start_over(&self, asked: Instant) {
        if !self.broken.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let lost = self.leases.drop_lapsed(true);
        let stopping: Vec<String> = self.leaving().drain().map(|(id, _)| id).collect();
        if !lost.is_empty() || !stopping.is_empty() {
            tracing::warn!(
                mailboxes = lost.len() + stopping.len(),
                "this replica's heartbeat came too late; its mailboxes start over"
            );
        }
        for id in lost.iter().chain(&stopping) {
            self.supervisor.poke(id);
        }
        self.forget_later(lost.into_iter().chain(stopping));
        self.spread().redo = true;
        self.leases.trust_until(self.trusted_until(asked));
    }

    /// Heartbeats every tick until `stop` fires, apart from the passes: a pass slowed by a
    /// spread of thousands of mailboxes (claims, workers starting) never delays the heartbeat
    /// that keeps every lease.
    async fn heartbeats(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Answered or not, the next comes a tick later; a failure already distrusted
            // what it had to.
            let _ = tokio::time::timeout(self.settings.tick(), self.heartbeat()).await;
        }
    }

    /// Computes the spread, gives back what is no longer this replica's, and claims its
    /// share. False when the store could not be reached.
    async fn respread(&self, beat: &Beat, changed: &HashSet<String>) -> bool {
        let replica = self.settings.replica.as_str();
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
        let served = match self.store.holders().await {
            Ok(served) => served,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the lease holders");
                self.drop_untrusted();
                return false;
            }
        };
        let assigned = balance::assign(&beat.live, &open, self.settings.cap, &served);
        let mine: HashSet<&str> = assigned
            .iter()
            .filter(|(_, r)| r.as_str() == replica)
            .map(|(m, _)| m.as_str())
            .collect();
        let mut settled = true;

        // Leases the store says are this replica's that it does not know it holds: a claim
        // carried out whose answer was lost, a release undone by a Redis failover. Those of
        // its share are claimed again below, like any other; the rest must go back, or no
        // other replica could claim them while this one lives.
        let unknown: Vec<String> = {
            let leaving = self.leaving();
            let known: HashSet<String> = self.leases.all().into_iter().map(|(id, _)| id).collect();
            served
                .iter()
                .filter(|(id, r)| {
                    r.as_str() == replica
                        && !mine.contains(id.as_str())
                        && !known.contains(id.as_str())
                        && !leaving.contains_key(id.as_str())
                })
                .map(|(id, _)| id.clone())
                .collect()
        };

        // Mailboxes no replica has room for wait, and say so; one replica writes that.
        if assigned.len() < open.len() {
            settled = false;
            if beat.live.first().map(String::as_str) == Some(replica) {
                self.mark_waiting(&open, &assigned).await;
            }
        }

        // Give back what is no longer ours (closed, or another replica's share now). Its
        // worker stops in the background, bounded, off this pass's path; the lease is kept
        // until it has stopped, so the next owner never overlaps it, and given back then.
        for (id, fence) in self.leases.all() {
            if !mine.contains(id.as_str()) {
                self.leases.remove(&id);
                self.leaving().insert(id.clone(), fence);
                self.supervisor.poke(&id);
            }
        }
        if !self.leaving().is_empty() {
            settled = false;
        }

        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            // Shutting down: the workers stop, the leases are kept until they have.
            return true;
        }
        if !self.give_back_unknown(&unknown).await {
            settled = false;
        }

        let mut wanted: Vec<String> = Vec::new();
        for &id in &mine {
            if self.leases.fence(id).is_some() {
                if changed.contains(id) {
                    self.supervisor.poke(id);
                }
            } else {
                wanted.push(id.to_owned());
            }
        }
        // What this replica believes it holds, checked against the store (a command per
        // thousand leases): a lease a worker never wrote under since it was taken is found
        // here, not only by the worker's next write.
        let mine_now = self.leases.all();
        match self.store.held(&mine_now).await {
            Ok(still) => {
                for ((id, fence), ok) in mine_now.iter().zip(still) {
                    if !ok {
                        tracing::warn!(id = ?id, "lease lost to another replica");
                        self.leases.lost(id, fence);
                        self.supervisor.poke(id);
                        if mine.contains(id.as_str()) {
                            wanted.push(id.clone());
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the leases held here");
                settled = false;
            }
        }
        self.metrics.pass_claims.set(wanted.len() as i64);
        self.most_recent_first(&mut wanted).await;
        for batch in wanted.chunks(CLAIM_BATCH) {
            let Some(taken) = self.claim(batch).await else {
                settled = false;
                break;
            };
            if taken.len() < batch.len() {
                // Another replica still holds some (its worker is stopping).
                settled = false;
            }
            for (id, fence) in &taken {
                self.trust(id, fence);
            }
        }
        // A worker runs with what the store wants now, even when the news of a change was lost
        // (pub/sub delivers at most once): a change moved the version.
        let followed = self.spread().followed;
        if followed != Some(beat.version) {
            if self.follow_changes(followed).await {
                self.spread().followed = Some(beat.version);
            } else {
                settled = false;
            }
        }

        let mut spread = self.spread();
        spread.version = Some(beat.version);
        spread.at = Some(Instant::now());
        spread.redo = !settled;
        spread.deferred = false;
        true
    }

    /// Gives back leases held in the store under this replica's name that it did not know
    /// of: each is taken under a new token (no worker here acts on the old one), then given
    /// back. False when the store failed.
    async fn give_back_unknown(&self, ids: &[String]) -> bool {
        if ids.is_empty() {
            return true;
        }
        tracing::warn!(
            mailboxes = ids.len(),
            "leases held under this replica's name that it did not know of; given back"
        );
        let Some(taken) = self.claim(ids).await else {
            return false;
        };
        for (id, fence) in &taken {
            if let Err(e) = self.store.release(id, fence).await {
                tracing::warn!(id = ?id, error = %e, "could not give a lease back");
                return false;
            }
        }
        true
    }

    /// Orders mailboxes about to be claimed by when they last had mail, most recent first:
    /// after a failover, the busiest stream again first. Unknown ones keep their order, last.
    async fn most_recent_first(&self, ids: &mut [String]) {
        if ids.len() < 2 {
            return;
        }
        let Ok(statuses) = self.store.statuses(ids).await else {
            return;
        };
        let mut keyed: Vec<(std::cmp::Reverse<i64>, String)> = ids
            .iter()
            .zip(statuses)
            .map(|(id, s)| {
                let last = s.and_then(|s| s.last_event_unix_ms).unwrap_or(i64::MIN);
                (std::cmp::Reverse(last), id.clone())
            })
            .collect();
        // Stable: mailboxes never active keep their order.
        keyed.sort_by_key(|k| k.0);
        for (slot, (_, id)) in ids.iter_mut().zip(keyed) {
            *slot = id;
        }
    }

    /// Checks the workers of the mailboxes given a new generation since version `since`
    /// (every worker here when the store's changelog does not reach back that far). False
    /// when the store could not say.
    async fn follow_changes(&self, since: Option<u64>) -> bool {
        let held = self.leases.trusted();
        let changed = match since {
            Some(v) => self.store.changed_since(v).await.ok().flatten(),
            None => None,
        };
        let check: Vec<String> = match changed {
            Some(ids) => {
                let ids: HashSet<String> = ids.into_iter().collect();
                held.into_iter().filter(|id| ids.contains(id)).collect()
            }
            None => held,
        };
        self.follow_generations(&check).await
    }

    /// Pokes every mailbox whose worker here runs with another generation than the stored
    /// one. False when the store could not say.
    async fn follow_generations(&self, held: &[String]) -> bool {
        if held.is_empty() {
            return true;
        }
        let stored = match self.store.generations(held).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the mailboxes' generations");
                return false;
            }
        };
        let running = self.supervisor.generations(held);
        for ((id, stored), running) in held.iter().zip(stored).zip(running) {
            if running.is_some() && running != stored {
                self.supervisor.poke(id);
            }
        }
        true
    }

    /// Until when the leases kept by a heartbeat sent at `asked` may be acted on.
    fn trusted_until(&self, asked: Instant) -> Instant {
        asked + self.settings.lease - self.settings.margin()
    }

    /// Claims the leases of `ids` in one call; answers those taken. `None` when the store
    /// failed.
    async fn claim(&self, ids: &[String]) -> Option<Vec<(String, Fence)>> {
        let tokens = match self.store.claim_all(ids, &self.settings.replica).await {
            Ok(tokens) => tokens,
            Err(e) => {
                tracing::warn!(mailboxes = ids.len(), error = %e, "claim failed");
                return None;
            }
        };
        let taken = ids
            .iter()
            .zip(tokens)
            .filter_map(|(id, token)| Some((id.clone(), self.leases.fence_of(token?))))
            .collect();
        Some(taken)
    }

    /// Holds a lease just taken and starts its worker.
    fn trust(&self, id: &str, fence: &Fence) {
        // Ours again before its worker had stopped: that worker's token is spent.
        self.leaving().remove(id);
        self.metrics.leases_taken.inc();
        self.leases.insert(id, fence.token);
        self.supervisor.poke(id);
    }

    fn spread(&self) -> MutexGuard<'_, Spread> {
        self.spread.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Claims nothing more; the leases held are kept until [`Coordinator::leave`], so the
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
        for id in self.leases.drop_lapsed(false) {
            tracing::warn!(id = ?id, "no heartbeat reached the store in time; stopping the mailbox here");
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
