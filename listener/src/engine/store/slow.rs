//! A store for tests of timing: the in-memory store behind a network that can be made slow
//! (every call waits, on tokio's clock, so paused-time tests read delays exactly) or down
//! (every call fails as an unreachable Redis would), that can lose its announcements, or lose
//! its data as a restarted Redis does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::memory::MemoryStore;
use super::{
    Beat, Counter, Counts, DeadLetter, Fence, MailboxStatus, Outcome, Store, StoreError, Stored,
    SyncCursor, Wanted, WorkerState,
};
use crate::creatio::contract::Credentials;

/// The in-memory store, `delay` away, unless `down`.
#[derive(Debug, Clone, Default)]
pub struct SlowStore {
    inner: MemoryStore,
    delay: Arc<Mutex<Duration>>,
    down: Arc<AtomicBool>,
    /// Announces no change: every pub/sub message lost.
    deaf: Arc<AtomicBool>,
    /// The epoch it answers instead of the in-memory store's, as a Redis that lost its data.
    epoch: Arc<Mutex<Option<String>>>,
    /// Write-backs asked for, and how many more of them fail.
    write_backs: Arc<AtomicUsize>,
    failing_write_backs: Arc<AtomicUsize>,
    /// Mailbox ids named in calls about many mailboxes, asked or answered: what a Redis
    /// would spend commands or bytes on.
    named: Arc<AtomicUsize>,
    /// Every lease taken, as replica and mailbox, in the order the claims came.
    claims: Arc<Mutex<Vec<(String, String)>>>,
    /// How many more claims are carried out but their answers lost on the way back.
    lost_claim_answers: Arc<AtomicUsize>,
}

/// Takes one from a count of faults still to come; false when none is left.
fn take_one(count: &AtomicUsize) -> bool {
    count
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

impl SlowStore {
    pub fn new(inner: MemoryStore) -> Self {
        SlowStore {
            inner,
            ..SlowStore::default()
        }
    }

    /// Every call from now on waits this long before it is answered.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// Announces no change from now on, as a pub/sub that drops every message.
    pub fn set_deaf(&self, deaf: bool) {
        self.deaf.store(deaf, Ordering::Relaxed);
    }

    /// Answers `epoch` from now on, as a store that lost its data would; the next `fail`
    /// write-backs fail.
    pub fn lose_data(&self, epoch: &str, fail: usize) {
        *self.epoch.lock().unwrap() = Some(epoch.to_owned());
        self.failing_write_backs.store(fail, Ordering::Relaxed);
    }

    /// How many write-backs were asked for.
    pub fn write_backs(&self) -> usize {
        self.write_backs.load(Ordering::Relaxed)
    }

    /// How many mailbox ids calls about many mailboxes named so far.
    pub fn named(&self) -> usize {
        self.named.load(Ordering::Relaxed)
    }

    /// The mailboxes whose lease `replica` took, in the order it asked for them.
    pub fn claims_by(&self, replica: &str) -> Vec<String> {
        let claims = self.claims.lock().unwrap();
        claims
            .iter()
            .filter(|(r, _)| r == replica)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// The next `n` claims are carried out, but their answers are lost on the way back, as
    /// when a connection to Redis breaks after a script ran.
    pub fn lose_claim_answers(&self, n: usize) {
        self.lost_claim_answers.store(n, Ordering::Relaxed);
    }

    fn name(&self, n: usize) {
        self.named.fetch_add(n, Ordering::Relaxed);
    }

    /// Every call from now on fails (true) or is answered again (false).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// The network: half the delay there, the store's work (unless it is down), half back.
    fn call<'a, T: Send + 'a>(
        &'a self,
        work: impl FnOnce() -> Stored<'a, T> + Send + 'a,
    ) -> Stored<'a, T> {
        let delay = *self.delay.lock().unwrap();
        Box::pin(async move {
            tokio::time::sleep(delay / 2).await;
            if self.down.load(Ordering::Relaxed) {
                return Err(StoreError::Unavailable("the store is down".into()));
            }
            let answer = work().await;
            tokio::time::sleep(delay - delay / 2).await;
            answer
        })
    }
}

impl Store for SlowStore {
    fn put_mailbox(&self, creds: Credentials) -> Stored<'_, ()> {
        self.call(move || self.inner.put_mailbox(creds))
    }
    fn remove_mailbox<'a>(&'a self, id: &'a str) -> Stored<'a, bool> {
        self.call(move || self.inner.remove_mailbox(id))
    }
    fn wanted<'a>(&'a self, id: &'a str) -> Stored<'a, Option<Wanted>> {
        self.call(move || self.inner.wanted(id))
    }
    fn statuses<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<MailboxStatus>>> {
        self.name(ids.len());
        self.call(move || self.inner.statuses(ids))
    }
    fn counts(&self) -> Stored<'_, Counts> {
        self.call(move || self.inner.counts())
    }
    fn transition<'a>(
        &'a self,
        id: &'a str,
        state: WorkerState,
        error: Option<String>,
        fence: Option<&'a Fence>,
    ) -> Stored<'a, ()> {
        self.call(move || self.inner.transition(id, state, error, fence))
    }
    fn bump<'a>(&'a self, id: &'a str, counter: Counter) -> Stored<'a, ()> {
        self.call(move || self.inner.bump(id, counter))
    }
    fn note_event<'a>(&'a self, id: &'a str) -> Stored<'a, ()> {
        self.call(move || self.inner.note_event(id))
    }
    fn sync_state<'a>(&'a self, id: &'a str) -> Stored<'a, Option<SyncCursor>> {
        self.call(move || self.inner.sync_state(id))
    }
    fn set_sync_state<'a>(
        &'a self,
        id: &'a str,
        cursor: &'a SyncCursor,
        fence: &'a Fence,
    ) -> Stored<'a, ()> {
        self.call(move || self.inner.set_sync_state(id, cursor, fence))
    }
    fn is_new<'a>(&'a self, id: &'a str, item_id: &'a str) -> Stored<'a, bool> {
        self.call(move || self.inner.is_new(id, item_id))
    }
    fn record<'a>(
        &'a self,
        id: &'a str,
        item_id: &'a str,
        outcome: Outcome,
        fence: &'a Fence,
    ) -> Stored<'a, ()> {
        self.call(move || self.inner.record(id, item_id, outcome, fence))
    }
    fn dead_letters<'a>(&'a self, id: &'a str) -> Stored<'a, Vec<DeadLetter>> {
        self.call(move || self.inner.dead_letters(id))
    }
    fn replay_dead_letters<'a>(&'a self, id: &'a str) -> Stored<'a, Option<usize>> {
        self.call(move || self.inner.replay_dead_letters(id))
    }
    fn replays<'a>(&'a self, id: &'a str) -> Stored<'a, Vec<String>> {
        self.call(move || self.inner.replays(id))
    }
    fn replay_signal(&self, id: &str) -> Option<Arc<Notify>> {
        self.inner.replay_signal(id)
    }
    fn epoch<'a>(&'a self, proposal: &'a str) -> Stored<'a, String> {
        let lost = self.epoch.lock().unwrap().clone();
        self.call(move || match lost {
            Some(epoch) => Box::pin(async move { Ok(epoch) }),
            None => self.inner.epoch(proposal),
        })
    }
    fn heartbeat<'a>(
        &'a self,
        replica: &'a str,
        nonce: &'a str,
        ttl: Duration,
    ) -> Stored<'a, Beat> {
        self.call(move || self.inner.heartbeat(replica, nonce, ttl))
    }
    fn leave<'a>(&'a self, replica: &'a str) -> Stored<'a, ()> {
        self.call(move || self.inner.leave(replica))
    }
    fn open_mailboxes(&self) -> Stored<'_, Vec<String>> {
        self.call(move || {
            Box::pin(async move {
                let open = self.inner.open_mailboxes().await?;
                self.name(open.len());
                Ok(open)
            })
        })
    }
    fn claim_all<'a>(
        &'a self,
        ids: &'a [String],
        replica: &'a str,
    ) -> Stored<'a, Vec<Option<u64>>> {
        self.name(ids.len());
        self.call(move || {
            Box::pin(async move {
                let tokens = self.inner.claim_all(ids, replica).await?;
                self.claims.lock().unwrap().extend(
                    ids.iter()
                        .zip(&tokens)
                        .filter(|(_, t)| t.is_some())
                        .map(|(id, _)| (replica.to_owned(), id.clone())),
                );
                if take_one(&self.lost_claim_answers) {
                    return Err(StoreError::Unavailable("the answer was lost".into()));
                }
                Ok(tokens)
            })
        })
    }
    fn held<'a>(&'a self, leases: &'a [(String, Fence)]) -> Stored<'a, Vec<bool>> {
        self.call(move || self.inner.held(leases))
    }
    fn release<'a>(&'a self, id: &'a str, fence: &'a Fence) -> Stored<'a, ()> {
        self.call(move || self.inner.release(id, fence))
    }
    fn write_back(&self) -> Stored<'_, usize> {
        self.write_backs.fetch_add(1, Ordering::Relaxed);
        let failing = take_one(&self.failing_write_backs);
        self.call(move || {
            if failing {
                Box::pin(async { Err(StoreError::Unavailable("the write-back failed".into())) })
            } else {
                self.inner.write_back()
            }
        })
    }
    fn forget(&self, id: &str) {
        self.inner.forget(id)
    }
    fn generations<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<u64>>> {
        self.name(ids.len());
        self.call(move || self.inner.generations(ids))
    }
    fn owners<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<String>>> {
        self.name(ids.len());
        self.call(move || self.inner.owners(ids))
    }
    fn changed_since(&self, since: u64) -> Stored<'_, Option<Vec<String>>> {
        self.call(move || self.inner.changed_since(since))
    }
    fn holders(&self) -> Stored<'_, HashMap<String, String>> {
        self.call(move || {
            Box::pin(async move {
                let held = self.inner.holders().await?;
                self.name(held.len());
                Ok(held)
            })
        })
    }
    fn nudge<'a>(&'a self, note: &'a str) -> Stored<'a, ()> {
        self.call(move || self.inner.nudge(note))
    }

    fn nudges(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        if self.deaf.load(Ordering::Relaxed) {
            return None;
        }
        self.inner.nudges()
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        if self.deaf.load(Ordering::Relaxed) {
            return None;
        }
        self.inner.changes()
    }
    fn ask_history<'a>(
        &'a self,
        id: &'a str,
        since_unix_ms: i64,
    ) -> Stored<'a, Option<super::HistoryJob>> {
        self.call(move || self.inner.ask_history(id, since_unix_ms))
    }
    fn history<'a>(&'a self, id: &'a str) -> Stored<'a, Option<super::HistoryJob>> {
        self.call(move || self.inner.history(id))
    }
    fn set_history<'a>(
        &'a self,
        id: &'a str,
        since_unix_ms: i64,
        progress: Option<&'a super::HistoryJob>,
        fence: &'a Fence,
    ) -> Stored<'a, bool> {
        self.call(move || self.inner.set_history(id, since_unix_ms, progress, fence))
    }
    fn begin_send<'a>(&'a self, key: &'a str) -> Stored<'a, super::SendClaim> {
        self.call(move || self.inner.begin_send(key))
    }
    fn end_send<'a>(&'a self, key: &'a str, sent: bool) -> Stored<'a, ()> {
        self.call(move || self.inner.end_send(key, sent))
    }
}
