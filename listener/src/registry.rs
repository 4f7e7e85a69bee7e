//! The in-memory store of mailboxes: each one's credentials, its worker's observable status,
//! where its catch-up stands, the items already handed to Creatio (so a mail announced twice,
//! or seen again after a reconnect, is posted once), and the mail Creatio never took (dead
//! letters). This is the embedded store; a shared one for several replicas keeps the same
//! records.
//!
//! Delivered items are remembered as 64-bit digests of their ids for a bounded time: the sync
//! cursor says what was seen for good, the digests only bridge the minutes between a streamed
//! delivery and the next catch-up, so an idle mailbox remembers nothing.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::contract::Credentials;
use crate::mail::unix_now_ms;

/// Where a mailbox's worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum WorkerState {
    Starting,
    /// Waiting for a free slot under the replica's cap on active mailboxes.
    Queued,
    Subscribing,
    /// Reading what arrived while no stream was open (SyncFolderItems).
    CatchingUp,
    /// A stream is open and healthy.
    Streaming,
    /// Waiting before a retry after a transient failure.
    Backoff,
    /// Stopped trying at full speed: the credentials or configuration are wrong. Retries
    /// continue slowly, and new credentials restart at once.
    Failed,
}

/// What any caller may see of a mailbox: no credentials.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct MailboxStatus {
    pub state: WorkerState,
    /// What keeps the mailbox from streaming now; none while it streams.
    pub error: Option<String>,
    /// The most recent failure, kept after recovery, and when it happened.
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<i64>,
    /// Since when the mailbox has had no healthy stream; none while it streams.
    pub unhealthy_since_unix_ms: Option<i64>,
    pub delivered: u64,
    pub dead_letters: u64,
    /// New items that were gone (deleted or moved) before they could be read.
    pub skipped: u64,
    pub reconnects: u64,
    /// Times the worker died unexpectedly and was restarted.
    pub restarts: u64,
    pub updated_unix_ms: i64,
}

impl Default for MailboxStatus {
    fn default() -> Self {
        let now = unix_now_ms();
        MailboxStatus {
            state: WorkerState::Starting,
            error: None,
            last_error: None,
            last_error_unix_ms: None,
            unhealthy_since_unix_ms: Some(now),
            delivered: 0,
            dead_letters: 0,
            skipped: 0,
            reconnects: 0,
            restarts: 0,
            updated_unix_ms: now,
        }
    }
}

impl MailboxStatus {
    /// Moves to `state`; an error becomes both the current and the last error. Streaming
    /// clears the current error and the unhealthy clock.
    fn transition(&mut self, state: WorkerState, error: Option<String>, now: i64) {
        self.state = state;
        if let Some(e) = error {
            self.error = Some(e.clone());
            self.last_error = Some(e);
            self.last_error_unix_ms = Some(now);
        }
        if state == WorkerState::Streaming {
            self.error = None;
            self.unhealthy_since_unix_ms = None;
        } else if self.unhealthy_since_unix_ms.is_none() {
            self.unhealthy_since_unix_ms = Some(now);
        }
    }
}

/// A mail Creatio did not take, kept so an administrator can see it and replay it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeadLetter {
    pub item_id: String,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub error: String,
    pub unix_ms: i64,
}

/// What became of a new item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Gone from the mailbox before it could be read.
    Skipped,
    DeadLettered(DeadLetter),
}

/// How long, and how many, delivered items a mailbox remembers.
#[derive(Debug, Clone, Copy)]
pub struct SeenLimits {
    pub retention: Duration,
    pub max: usize,
}

impl Default for SeenLimits {
    fn default() -> Self {
        // A stream lives at most 30 minutes before the next catch-up moves the cursor past
        // what it delivered; twice that covers a reconnect that waits a while.
        SeenLimits {
            retention: Duration::from_secs(2 * 3600),
            max: 10_000,
        }
    }
}

/// Digests of delivered item ids, oldest first, forgotten after the retention time.
#[derive(Debug, Default)]
struct SeenSet {
    order: VecDeque<(u64, Instant)>,
    set: HashSet<u64>,
}

/// The digest under which an item id is remembered; stable across processes and versions.
pub fn item_digest(item_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(item_id.as_bytes())
}

impl SeenSet {
    fn trim(&mut self, limits: SeenLimits, now: Instant) {
        while let Some(&(digest, at)) = self.order.front() {
            if self.order.len() <= limits.max && now.duration_since(at) < limits.retention {
                break;
            }
            self.order.pop_front();
            self.set.remove(&digest);
        }
        if self.order.capacity() > 64 && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to_fit();
            self.set.shrink_to_fit();
        }
    }

    fn contains(&self, digest: u64) -> bool {
        self.set.contains(&digest)
    }

    fn insert(&mut self, digest: u64, limits: SeenLimits, now: Instant) -> bool {
        if !self.set.insert(digest) {
            return false;
        }
        self.order.push_back((digest, now));
        self.trim(limits, now);
        true
    }

    fn forget(&mut self, digest: u64) {
        if self.set.remove(&digest) {
            self.order.retain(|(d, _)| *d != digest);
        }
    }
}

/// Where a mailbox's inbox sync stands, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncCursor {
    /// Exchange's SyncFolderItems state.
    pub state: String,
    /// When the server last gave it: everything received before then was seen.
    pub at_unix_ms: i64,
}

#[derive(Debug)]
struct Entry {
    credentials: Credentials,
    status: MailboxStatus,
    seen: SeenSet,
    /// Where the inbox's SyncFolderItems catch-up stands; `None` until the first sync.
    sync: Option<SyncCursor>,
    /// Dead-lettered items an administrator asked to deliver again.
    replay: Vec<String>,
    replay_signal: Arc<Notify>,
}

/// Dead letters kept per mailbox; the oldest go first.
const DEAD_LETTERS_KEPT: usize = 1_000;

#[derive(Debug, Default)]
struct Inner {
    mailboxes: HashMap<String, Entry>,
    /// Kept across Close so an administrator can still see what was lost.
    dead: HashMap<String, VecDeque<DeadLetter>>,
}

/// A cheap, cloneable handle to the store.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    seen_limits: SeenLimits,
}

impl Registry {
    pub fn new(seen_limits: SeenLimits) -> Self {
        Registry {
            inner: Arc::default(),
            seen_limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a mailbox's credentials; the ones already stored change nothing. New
    /// credentials restart the status (counters are kept); the delivered set and sync state
    /// are kept, so a recreated mailbox catches up on what arrived meanwhile.
    pub fn upsert(&self, credentials: Credentials) {
        let mut inner = self.lock();
        match inner.mailboxes.get_mut(&credentials.id) {
            Some(entry) if entry.credentials == credentials => {}
            Some(entry) => {
                entry.credentials = credentials;
                entry.status = MailboxStatus {
                    delivered: entry.status.delivered,
                    dead_letters: entry.status.dead_letters,
                    skipped: entry.status.skipped,
                    restarts: entry.status.restarts,
                    ..MailboxStatus::default()
                };
            }
            None => {
                inner.mailboxes.insert(
                    credentials.id.clone(),
                    Entry {
                        credentials,
                        status: MailboxStatus::default(),
                        seen: SeenSet::default(),
                        sync: None,
                        replay: Vec::new(),
                        replay_signal: Arc::new(Notify::new()),
                    },
                );
            }
        }
    }

    pub fn remove(&self, id: &str) -> bool {
        self.lock().mailboxes.remove(id).is_some()
    }

    pub fn status(&self, id: &str) -> Option<MailboxStatus> {
        self.lock().mailboxes.get(id).map(|e| e.status.clone())
    }

    pub fn credentials(&self, id: &str) -> Option<Credentials> {
        self.lock().mailboxes.get(id).map(|e| e.credentials.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().mailboxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many mailboxes are in each state (states with none are left out).
    pub fn count_by_state(&self) -> BTreeMap<WorkerState, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.lock().mailboxes.values() {
            *counts.entry(entry.status.state).or_default() += 1;
        }
        counts
    }

    pub fn sync_state(&self, id: &str) -> Option<SyncCursor> {
        self.lock().mailboxes.get(id).and_then(|e| e.sync.clone())
    }

    /// Stores where the catch-up stands, as of now.
    pub fn set_sync_state(&self, id: &str, state: &str) {
        if let Some(entry) = self.lock().mailboxes.get_mut(id) {
            entry.sync = Some(SyncCursor {
                state: state.to_owned(),
                at_unix_ms: unix_now_ms(),
            });
        }
    }

    /// Moves the mailbox's worker to `state`, with the error that caused it, if any.
    pub fn transition(&self, id: &str, state: WorkerState, error: Option<String>) {
        if let Some(entry) = self.lock().mailboxes.get_mut(id) {
            let now = unix_now_ms();
            entry.status.transition(state, error, now);
            entry.status.updated_unix_ms = now;
        }
    }

    /// Changes a mailbox's counters in place (nothing happens if it was removed meanwhile).
    pub fn count(&self, id: &str, f: impl FnOnce(&mut MailboxStatus)) {
        if let Some(entry) = self.lock().mailboxes.get_mut(id) {
            f(&mut entry.status);
            entry.status.updated_unix_ms = unix_now_ms();
        }
    }

    /// True if this item was not delivered (or dead-lettered) before for this mailbox.
    pub fn is_new(&self, id: &str, item_id: &str) -> bool {
        let limits = self.seen_limits;
        let mut inner = self.lock();
        let Some(entry) = inner.mailboxes.get_mut(id) else {
            return false;
        };
        entry.seen.trim(limits, Instant::now());
        !entry.seen.contains(item_digest(item_id))
    }

    /// Records what became of a new item: it will not be posted again.
    pub fn record(&self, id: &str, item_id: &str, outcome: Outcome) {
        let limits = self.seen_limits;
        let mut inner = self.lock();
        let Some(entry) = inner.mailboxes.get_mut(id) else {
            return;
        };
        if !entry
            .seen
            .insert(item_digest(item_id), limits, Instant::now())
        {
            return;
        }
        match outcome {
            Outcome::Delivered => entry.status.delivered += 1,
            Outcome::Skipped => entry.status.skipped += 1,
            Outcome::DeadLettered(letter) => {
                entry.status.dead_letters += 1;
                let kept = inner.dead.entry(id.to_owned()).or_default();
                kept.push_back(letter);
                if kept.len() > DEAD_LETTERS_KEPT {
                    kept.pop_front();
                }
            }
        }
    }

    /// The mailbox's dead letters, oldest first (also after the mailbox was closed).
    pub fn dead_letters(&self, id: &str) -> Vec<DeadLetter> {
        self.lock()
            .dead
            .get(id)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Hands every dead letter of an open mailbox back to its worker for another delivery;
    /// answers how many, or `None` when the mailbox is not open.
    pub fn replay_dead_letters(&self, id: &str) -> Option<usize> {
        let mut inner = self.lock();
        let letters = inner.dead.remove(id).unwrap_or_default();
        let Some(entry) = inner.mailboxes.get_mut(id) else {
            if !letters.is_empty() {
                inner.dead.insert(id.to_owned(), letters);
            }
            return None;
        };
        for letter in &letters {
            entry.seen.forget(item_digest(&letter.item_id));
            entry.replay.push(letter.item_id.clone());
        }
        entry.replay_signal.notify_one();
        Some(letters.len())
    }

    /// The signal a mailbox's worker waits on for replays.
    pub fn replay_signal(&self, id: &str) -> Option<Arc<Notify>> {
        self.lock()
            .mailboxes
            .get(id)
            .map(|e| e.replay_signal.clone())
    }

    /// Takes the items waiting to be replayed.
    pub fn take_replay(&self, id: &str) -> Vec<String> {
        self.lock()
            .mailboxes
            .get_mut(id)
            .map(|e| std::mem::take(&mut e.replay))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SeenLimits = SeenLimits {
        retention: Duration::from_secs(60),
        max: 100,
    };

    #[test]
    fn seen_set_forgets_the_oldest_beyond_its_count() {
        let now = Instant::now();
        let mut s = SeenSet::default();
        for i in 0..=LIMITS.max as u64 {
            assert!(s.insert(i, LIMITS, now));
        }
        assert!(!s.insert(LIMITS.max as u64, LIMITS, now));
        assert!(s.insert(0, LIMITS, now), "the oldest digest was forgotten");
        assert_eq!(s.set.len(), LIMITS.max);
        assert_eq!(s.order.len(), LIMITS.max);
    }

    #[test]
    fn seen_set_forgets_after_the_retention_time_and_gives_memory_back() {
        let start = Instant::now();
        let mut s = SeenSet::default();
        for i in 0..LIMITS.max as u64 {
            s.insert(i, LIMITS, start);
        }
        assert!(s.contains(7));
        s.trim(LIMITS, start + LIMITS.retention - Duration::from_secs(1));
        assert!(s.contains(7), "still within the retention time");
        s.trim(LIMITS, start + LIMITS.retention);
        assert!(!s.contains(7));
        assert!(s.order.is_empty() && s.set.is_empty());
        assert!(s.order.capacity() <= 64, "an idle mailbox holds no memory");
    }

    #[test]
    fn digests_are_stable() {
        // Replicas and versions must agree on what was delivered.
        assert_eq!(item_digest("AAMkAD"), item_digest("AAMkAD"));
        assert_ne!(item_digest("AAMkAD"), item_digest("AAMkAE"));
        assert_eq!(item_digest(""), 0x2d06800538d394c2);
    }
}
