//! The embedded store: everything in this process's memory, gone when it exits (Creatio's
//! one-minute SubscriptionsState loop recreates the mailboxes). One replica, no Redis.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    Beat, CHANGELOG, Counter, Counts, DeadLetter, Fence, HistoryJob, MailboxStatus, Outcome,
    SEND_REMEMBERED, SEND_STALE_AFTER, SeenLimits, SendClaim, Store, StoreError, Stored,
    SyncCursor, Wanted, WorkerState, item_digest, push_capped,
};
use crate::creatio::contract::Credentials;
use crate::creatio::mail::unix_now_ms;

/// Digests of delivered item ids with when they were recorded (Unix ms), oldest first: 16
/// bytes a mail and no index (looking one up reads at most `max` of them), so a busy
/// mailbox's 10,000 take 160 KB.
#[derive(Debug, Default)]
struct SeenSet {
    order: VecDeque<(u64, i64)>,
}

impl SeenSet {
    /// Forgets the oldest beyond `max`, and those recorded before `before` (Unix ms).
    fn trim(&mut self, max: usize, before: i64) {
        while let Some(&(_, at)) = self.order.front() {
            if self.order.len() <= max && at >= before {
                break;
            }
            self.order.pop_front();
        }
        if self.order.capacity() > 64 && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to_fit();
        }
    }

    fn contains(&self, digest: u64) -> bool {
        self.order.iter().any(|(d, _)| *d == digest)
    }

    fn insert(&mut self, digest: u64, max: usize, now: i64) -> bool {
        if self.contains(digest) {
            return false;
        }
        push_capped(&mut self.order, (digest, now), max);
        true
    }

    fn forget(&mut self, digest: u64) {
        self.order.retain(|(d, _)| *d != digest);
    }
}

#[derive(Debug)]
struct Entry {
    credentials: Arc<Credentials>,
    generation: u64,
    status: MailboxStatus,
    seen: SeenSet,
    /// Where the inbox's SyncFolderItems catch-up stands.
    sync: Option<SyncCursor>,
    /// Dead-lettered items an administrator asked to deliver again.
    replay: Vec<String>,
    replay_signal: Arc<Notify>,
    /// The history load Creatio asked for, while it runs.
    history: Option<HistoryJob>,
}

/// Dead letters kept per mailbox; the oldest go first.
const DEAD_LETTERS_KEPT: usize = 1_000;

#[derive(Debug, Default)]
struct Inner {
    /// Boxed: a table of thousands keeps a pointer per slot, not a 340-byte entry, in the
    /// slots it holds free.
    mailboxes: HashMap<String, Box<Entry>>,
    /// Kept across Close so an administrator can still see what was lost.
    dead: HashMap<String, VecDeque<DeadLetter>>,
    /// The last generation given out.
    generation: u64,
    /// Replica → until when it is alive.
    replicas: BTreeMap<String, Instant>,
    /// Mailbox → its lease, valid while its replica is alive.
    leases: HashMap<String, Lease>,
    /// Moves whenever the spread's inputs change ([`Beat::version`]).
    version: u64,
    /// Which mailbox got a new generation at which version, the last [`CHANGELOG`] versions.
    changelog: VecDeque<(u64, String)>,
    /// Mailbox → the last fencing token given out (kept across Close, so tokens only grow).
    fences: HashMap<String, u64>,
    /// Mails sent or being sent, by key: when the send began, and until when a sent one is
    /// remembered (`None` while it is being sent).
    sends: HashMap<String, (Instant, Option<Instant>)>,
}

#[derive(Debug, Clone)]
struct Lease {
    replica: String,
    token: u64,
}

impl Inner {
    /// The lease on `id`, whether its holder is alive or not.
    fn lease(&self, id: &str) -> Option<&Lease> {
        self.leases.get(id)
    }

    fn alive(&self, replica: &str) -> bool {
        self.replicas
            .get(replica)
            .is_some_and(|until| *until > Instant::now())
    }

    /// The live replica holding the lease on `id`.
    fn owner(&self, id: &str) -> Option<&str> {
        self.lease(id)
            .map(|l| l.replica.as_str())
            .filter(|r| self.alive(r))
    }

    fn holds(&self, id: &str, fence: &Fence) -> bool {
        self.lease(id)
            .is_some_and(|l| *l.replica == *fence.replica && l.token == fence.token)
    }
}

/// The in-memory [`Store`]; a cheap, cloneable handle.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    seen_limits: SeenLimits,
    changes: tokio::sync::broadcast::Sender<String>,
    nudges: tokio::sync::broadcast::Sender<String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(SeenLimits::default())
    }
}

/// An answer that is ready at once.
fn ready<T: Send + 'static>(value: T) -> Stored<'static, T> {
    std::future::ready(Ok(value)).boxed()
}

impl MemoryStore {
    pub fn new(seen_limits: SeenLimits) -> Self {
        MemoryStore {
            inner: Arc::default(),
            seen_limits,
            changes: tokio::sync::broadcast::channel(1024).0,
            nudges: tokio::sync::broadcast::channel(4096).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_entry<T>(&self, id: &str, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        self.lock().mailboxes.get_mut(id).map(|e| f(e))
    }

    /// Records the credentials; true when the mailbox got a new generation.
    fn put(&self, credentials: Credentials) -> bool {
        let mut inner = self.lock();
        inner.generation += 1;
        let generation = inner.generation;
        match inner.mailboxes.get_mut(&credentials.id) {
            Some(entry) if entry.credentials.same_settings(&credentials) => false,
            Some(entry) => {
                entry.credentials = Arc::new(credentials);
                entry.generation = generation;
                entry.status = MailboxStatus {
                    delivered: entry.status.delivered,
                    dead_letters: entry.status.dead_letters,
                    skipped: entry.status.skipped,
                    restarts: entry.status.restarts,
                    ..MailboxStatus::default()
                };
                true
            }
            None => {
                inner.mailboxes.insert(
                    credentials.id.clone(),
                    Box::new(Entry {
                        credentials: Arc::new(credentials),
                        generation,
                        status: MailboxStatus::default(),
                        seen: SeenSet::default(),
                        sync: Some(SyncCursor::new_mailbox(unix_now_ms())),
                        replay: Vec::new(),
                        replay_signal: Arc::new(Notify::new()),
                        history: None,
                    }),
                );
                true
            }
        }
    }

    /// One pass over the mailboxes in this process's memory: no network, a few microseconds
    /// a thousand.
    fn counts_now(&self) -> Counts {
        let inner = self.lock();
        let mut counts = Counts::default();
        for entry in inner.mailboxes.values() {
            *counts.states.entry(entry.status.state).or_default() += 1;
        }
        for lease in inner.leases.values() {
            if inner.alive(&lease.replica) {
                *counts.held.entry(lease.replica.clone()).or_default() += 1;
            }
        }
        counts
    }

    fn is_new_now(&self, id: &str, item_id: &str) -> bool {
        self.with_entry(id, |entry| !entry.seen.contains(item_digest(item_id)))
            .unwrap_or(false)
    }

    fn record_now(&self, id: &str, item_id: &str, outcome: Outcome) {
        let limits = self.seen_limits;
        let mut inner = self.lock();
        let Some(entry) = inner.mailboxes.get_mut(id) else {
            return;
        };
        entry.replay.retain(|r| r != item_id);
        if !entry
            .seen
            .insert(item_digest(item_id), limits.max, unix_now_ms())
        {
            return;
        }
        match outcome {
            Outcome::Delivered => entry.status.delivered += 1,
            Outcome::Skipped => entry.status.skipped += 1,
            Outcome::DeadLettered(letter) => {
                entry.status.dead_letters += 1;
                entry.status.last_error = Some(letter.error.clone());
                entry.status.last_error_unix_ms = Some(letter.unix_ms);
                let kept = inner.dead.entry(id.to_owned()).or_default();
                kept.push_back(letter);
                if kept.len() > DEAD_LETTERS_KEPT
                    && let Some(dropped) = kept.pop_front()
                {
                    tracing::warn!(id = ?id, kept = DEAD_LETTERS_KEPT, item = ?dropped.item_id, message_id = ?dropped.message_id, "the mailbox's oldest dead letter made way for a new one");
                }
            }
        }
    }

    fn replay_now(&self, id: &str) -> Option<usize> {
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
            if !entry.replay.contains(&letter.item_id) {
                entry.replay.push(letter.item_id.clone());
            }
        }
        entry.replay_signal.notify_one();
        Some(letters.len())
    }
}

impl Store for MemoryStore {
    fn put_mailbox(&self, creds: Credentials) -> Stored<'_, ()> {
        let id = creds.id.clone();
        if self.put(creds) {
            let mut inner = self.lock();
            inner.version += 1;
            let version = inner.version;
            inner.changelog.push_back((version, id.clone()));
            while inner
                .changelog
                .front()
                .is_some_and(|(v, _)| *v + CHANGELOG <= version)
            {
                inner.changelog.pop_front();
            }
        }
        let _ = self.changes.send(id);
        ready(())
    }

    fn remove_mailbox<'a>(&'a self, id: &'a str) -> Stored<'a, bool> {
        let existed = {
            let mut inner = self.lock();
            inner.version += 1;
            // A lease whose holder is gone would never be given back.
            if inner.lease(id).is_some() && inner.owner(id).is_none() {
                inner.leases.remove(id);
            }
            inner.mailboxes.remove(id).is_some()
        };
        let _ = self.changes.send(id.to_owned());
        ready(existed)
    }

    fn wanted<'a>(&'a self, id: &'a str) -> Stored<'a, Option<Wanted>> {
        ready(self.with_entry(id, |e| Wanted {
            creds: e.credentials.clone(),
            generation: e.generation,
        }))
    }

    fn statuses<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<MailboxStatus>>> {
        let inner = self.lock();
        ready(
            ids.iter()
                .map(|id| inner.mailboxes.get(id).map(|e| e.status.clone()))
                .collect(),
        )
    }

    fn counts(&self) -> Stored<'_, Counts> {
        ready(self.counts_now())
    }

    fn transition<'a>(
        &'a self,
        id: &'a str,
        state: WorkerState,
        error: Option<String>,
        fence: Option<&'a Fence>,
    ) -> Stored<'a, ()> {
        let mut inner = self.lock();
        let another = fence.is_some_and(|f| inner.lease(id).is_some() && !inner.holds(id, f));
        if let Some(entry) = inner.mailboxes.get_mut(id).filter(|_| !another) {
            let now = unix_now_ms();
            entry.status.transition(state, error, now);
            entry.status.updated_unix_ms = now;
        }
        ready(())
    }

    fn bump<'a>(&'a self, id: &'a str, counter: Counter) -> Stored<'a, ()> {
        self.with_entry(id, |entry| {
            match counter {
                Counter::Reconnects => entry.status.reconnects += 1,
                Counter::Restarts => entry.status.restarts += 1,
            }
            entry.status.updated_unix_ms = unix_now_ms();
        });
        ready(())
    }

    fn note_event<'a>(&'a self, id: &'a str) -> Stored<'a, ()> {
        self.with_entry(id, |entry| {
            entry.status.last_event_unix_ms = Some(unix_now_ms());
        });
        ready(())
    }

    fn sync_state<'a>(&'a self, id: &'a str) -> Stored<'a, Option<SyncCursor>> {
        ready(self.with_entry(id, |e| e.sync.clone()).flatten())
    }

    fn set_sync_state<'a>(
        &'a self,
        id: &'a str,
        cursor: &'a SyncCursor,
        fence: &'a Fence,
    ) -> Stored<'a, ()> {
        let mut inner = self.lock();
        if !inner.holds(id, fence) {
            return std::future::ready(Err(StoreError::Fenced)).boxed();
        }
        let limits = self.seen_limits;
        if let Some(entry) = inner.mailboxes.get_mut(id) {
            entry.sync = Some(cursor.clone());
            if let Some(before) = limits.forget_before(cursor) {
                entry.seen.trim(limits.max, before);
            }
        }
        ready(())
    }

    fn is_new<'a>(&'a self, id: &'a str, item_id: &'a str) -> Stored<'a, bool> {
        ready(self.is_new_now(id, item_id))
    }

    fn record<'a>(
        &'a self,
        id: &'a str,
        item_id: &'a str,
        outcome: Outcome,
        fence: &'a Fence,
    ) -> Stored<'a, ()> {
        // The outcome is a fact whoever holds the lease now: written either way.
        let held = self.lock().holds(id, fence);
        self.record_now(id, item_id, outcome);
        if !held {
            return std::future::ready(Err(StoreError::Fenced)).boxed();
        }
        ready(())
    }

    fn dead_letters<'a>(&'a self, id: &'a str) -> Stored<'a, Vec<DeadLetter>> {
        ready(
            self.lock()
                .dead
                .get(id)
                .map(|d| d.iter().cloned().collect())
                .unwrap_or_default(),
        )
    }

    fn replay_dead_letters<'a>(&'a self, id: &'a str) -> Stored<'a, Option<usize>> {
        ready(self.replay_now(id))
    }

    fn replays<'a>(&'a self, id: &'a str) -> Stored<'a, Vec<String>> {
        ready(
            self.with_entry(id, |e| e.replay.clone())
                .unwrap_or_default(),
        )
    }

    fn replay_signal(&self, id: &str) -> Option<Arc<Notify>> {
        self.with_entry(id, |e| e.replay_signal.clone())
    }

    fn ask_history<'a>(
        &'a self,
        id: &'a str,
        since_unix_ms: i64,
    ) -> Stored<'a, Option<HistoryJob>> {
        ready(self.with_entry(id, |e| {
            let job = match e.history {
                Some(job) if job.since_unix_ms <= since_unix_ms => job,
                _ => HistoryJob::new(since_unix_ms),
            };
            e.history = Some(job);
            e.replay_signal.notify_one();
            job
        }))
    }

    fn history<'a>(&'a self, id: &'a str) -> Stored<'a, Option<HistoryJob>> {
        ready(self.with_entry(id, |e| e.history).flatten())
    }

    fn set_history<'a>(
        &'a self,
        id: &'a str,
        since_unix_ms: i64,
        progress: Option<&'a HistoryJob>,
        fence: &'a Fence,
    ) -> Stored<'a, bool> {
        let mut inner = self.lock();
        if !inner.holds(id, fence) {
            return std::future::ready(Err(StoreError::Fenced)).boxed();
        }
        let Some(entry) = inner.mailboxes.get_mut(id) else {
            return ready(false);
        };
        if entry.history.map(|h| h.since_unix_ms) != Some(since_unix_ms) {
            return ready(false);
        }
        entry.history = progress.copied();
        ready(true)
    }

    fn epoch<'a>(&'a self, _proposal: &'a str) -> Stored<'a, String> {
        // Memory is lost only with the process.
        ready("memory".to_owned())
    }

    fn heartbeat<'a>(
        &'a self,
        replica: &'a str,
        _nonce: &'a str,
        ttl: Duration,
    ) -> Stored<'a, Beat> {
        // One process: no other can share its replica id.
        let mut inner = self.lock();
        let now = Instant::now();
        let before = inner.replicas.insert(replica.to_owned(), now + ttl);
        let unbroken = before.is_some_and(|until| until > now);
        let count = inner.replicas.len();
        inner.replicas.retain(|_, until| *until > now);
        if before.is_none() || inner.replicas.len() != count {
            inner.version += 1;
        }
        ready(Beat {
            live: inner.replicas.keys().cloned().collect(),
            unbroken,
            version: inner.version,
        })
    }

    fn leave<'a>(&'a self, replica: &'a str) -> Stored<'a, ()> {
        let mut inner = self.lock();
        inner.replicas.remove(replica);
        inner.version += 1;
        ready(())
    }

    fn open_mailboxes(&self) -> Stored<'_, Vec<String>> {
        ready(self.lock().mailboxes.keys().cloned().collect())
    }

    fn claim_all<'a>(
        &'a self,
        ids: &'a [String],
        replica: &'a str,
    ) -> Stored<'a, Vec<Option<u64>>> {
        let mut inner = self.lock();
        if !inner.alive(replica) {
            return ready(vec![None; ids.len()]);
        }
        let tokens: Vec<Option<u64>> = ids
            .iter()
            .map(|id| {
                let free = match inner.lease(id) {
                    Some(lease) => lease.replica == replica || !inner.alive(&lease.replica),
                    None => true,
                };
                if !free {
                    return None;
                }
                let fence = inner.fences.entry(id.to_owned()).or_default();
                *fence += 1;
                let token = *fence;
                inner.leases.insert(
                    id.to_owned(),
                    Lease {
                        replica: replica.to_owned(),
                        token,
                    },
                );
                Some(token)
            })
            .collect();
        if tokens.iter().any(Option::is_some) {
            inner.version += 1;
        }
        ready(tokens)
    }

    fn held<'a>(&'a self, leases: &'a [(String, Fence)]) -> Stored<'a, Vec<bool>> {
        let inner = self.lock();
        ready(leases.iter().map(|(id, f)| inner.holds(id, f)).collect())
    }

    fn release<'a>(&'a self, id: &'a str, fence: &'a Fence) -> Stored<'a, ()> {
        let mut inner = self.lock();
        if inner.holds(id, fence) {
            inner.leases.remove(id);
            inner.version += 1;
        }
        ready(())
    }

    fn write_back(&self) -> Stored<'_, usize> {
        // This store is the process's own memory: it never loses what the process knows.
        ready(0)
    }

    fn forget(&self, _id: &str) {}

    fn generations<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<u64>>> {
        let inner = self.lock();
        ready(
            ids.iter()
                .map(|id| inner.mailboxes.get(id).map(|e| e.generation))
                .collect(),
        )
    }

    fn owners<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<String>>> {
        let inner = self.lock();
        ready(
            ids.iter()
                .map(|id| inner.owner(id).map(str::to_owned))
                .collect(),
        )
    }

    fn changed_since(&self, since: u64) -> Stored<'_, Option<Vec<String>>> {
        let inner = self.lock();
        if since > inner.version || since + CHANGELOG < inner.version {
            return ready(None);
        }
        ready(Some(
            inner
                .changelog
                .iter()
                .filter(|(v, _)| *v > since)
                .map(|(_, id)| id.clone())
                .collect(),
        ))
    }

    fn holders(&self) -> Stored<'_, HashMap<String, String>> {
        let inner = self.lock();
        ready(
            inner
                .leases
                .iter()
                .filter(|(_, l)| inner.alive(&l.replica))
                .map(|(id, l)| (id.clone(), l.replica.clone()))
                .collect(),
        )
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.changes.subscribe())
    }

    fn nudge<'a>(&'a self, note: &'a str) -> Stored<'a, ()> {
        let _ = self.nudges.send(note.to_owned());
        ready(())
    }

    fn nudges(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.nudges.subscribe())
    }

    fn begin_send<'a>(&'a self, key: &'a str) -> Stored<'a, SendClaim> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.sends.retain(|_, (began, until)| match until {
            Some(until) => *until > now,
            None => now.duration_since(*began) < SEND_REMEMBERED,
        });
        let claim = match inner.sends.get(key) {
            Some((_, Some(_))) => return ready(SendClaim::Sent),
            Some((began, None)) if now.duration_since(*began) < SEND_STALE_AFTER => {
                return ready(SendClaim::Busy);
            }
            Some(_) => SendClaim::Stale,
            None => SendClaim::New,
        };
        inner.sends.insert(key.to_owned(), (now, None));
        ready(claim)
    }

    fn end_send<'a>(&'a self, key: &'a str, sent: bool) -> Stored<'a, ()> {
        let mut inner = self.lock();
        if sent {
            let now = Instant::now();
            inner
                .sends
                .insert(key.to_owned(), (now, Some(now + SEND_REMEMBERED)));
        } else {
            inner.sends.remove(key);
        }
        ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 100;

    #[tokio::test(start_paused = true)]
    async fn a_send_never_ended_is_taken_over_once_stale_and_a_sent_one_forgotten_after_a_day() {
        let store = MemoryStore::default();
        assert_eq!(store.begin_send("k").await.unwrap(), SendClaim::New);
        tokio::time::advance(SEND_STALE_AFTER - Duration::from_secs(1)).await;
        assert_eq!(store.begin_send("k").await.unwrap(), SendClaim::Busy);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.begin_send("k").await.unwrap(), SendClaim::Stale);
        store.end_send("k", true).await.unwrap();
        tokio::time::advance(SEND_REMEMBERED - Duration::from_secs(1)).await;
        assert_eq!(store.begin_send("k").await.unwrap(), SendClaim::Sent);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.begin_send("k").await.unwrap(), SendClaim::New);
    }

    #[test]
    fn seen_set_forgets_the_oldest_beyond_its_count() {
        let mut s = SeenSet::default();
        for i in 0..=MAX as u64 {
            assert!(s.insert(i, MAX, 0));
        }
        assert!(!s.insert(MAX as u64, MAX, 0));
        assert!(s.insert(0, MAX, 0), "the oldest digest was forgotten");
        assert_eq!(s.order.len(), MAX);
        assert!(
            s.order.capacity() <= MAX + 1,
            "{} kept room",
            s.order.capacity()
        );
    }

    #[test]
    fn seen_set_forgets_what_the_cursor_passed_and_gives_memory_back() {
        let mut s = SeenSet::default();
        for i in 0..MAX as u64 {
            s.insert(i, MAX, 1_000 + i as i64);
        }
        s.trim(MAX, 1_000);
        assert!(s.contains(0), "recorded at the cursor's bound");
        s.trim(MAX, 1_050);
        assert!(!s.contains(49) && s.contains(50));
        s.trim(MAX, 2_000);
        assert!(s.order.is_empty());
        assert!(s.order.capacity() <= 64, "an idle mailbox holds no memory");
    }

    #[test]
    fn digests_are_stable() {
        // Replicas and versions must agree on what was delivered.
        assert_eq!(item_digest("AAMkAD"), 0xb3bdac851f82c408);
        assert_ne!(item_digest("AAMkAD"), item_digest("AAMkAE"));
        assert_eq!(item_digest(""), 0x2d06800538d394c2);
    }
}
