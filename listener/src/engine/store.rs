//! Where the listener keeps what must outlive a worker, and what every replica may read: the
//! mailboxes Creatio asked for, each worker's observable status, where each mailbox's catch-up
//! stands, the items already handed to Creatio (so a mail announced twice, or found again after a
//! reconnect, is posted once), and the mail Creatio never took (dead letters).
//!
//! [`Store`] is the one interface; [`memory::MemoryStore`] the embedded implementation (one
//! process, no Redis). Calls are asynchronous and may fail, because a shared store is a network
//! away; each one is a single atomic step, never a read and a write that another caller could
//! interleave.
//!
//! Delivered items are remembered as 64-bit digests of their ids until the sync cursor moves
//! past them: the cursor says what was seen for good, the digests bridge the time between a
//! streamed delivery and the next catch-up, however long that is (a mailbox failing for a day
//! keeps them).

pub mod memory;
pub mod redis;
pub mod seal;
#[cfg(test)]
pub mod slow;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::Notify;

use crate::creatio::contract::Credentials;
use crate::creatio::mail::unix_now_ms;

/// Why the store did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A write under a lease this replica no longer holds: another replica owns the mailbox.
    #[error("this replica no longer holds the mailbox's lease")]
    Fenced,
    /// Another live process heartbeats under this replica's id (two pods with one name, a
    /// copied `--replica-id`): this one stays out until that one is gone.
    #[error(
        "another process is alive as replica {0}; this one serves nothing until it is gone (give each replica its own --replica-id)"
    )]
    Duplicate(String),
    /// The mailbox's stored credentials cannot be opened here (sealed with another key, or
    /// damaged): the sentence says which.
    #[error("{0}")]
    Unreadable(String),
}

/// The lease under which a worker writes: its replica and the fencing token it was given.
/// A write under an older token is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// Shared: every running mailbox carries a fence, several times over.
    pub replica: Arc<str>,
    pub token: u64,
}

/// An answer from the store, later.
pub type Stored<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// What a mailbox should run with. `generation` changes whenever the credentials change or the
/// mailbox is created anew (after a Close): a worker started for an older generation is
/// replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Shared, not copied, by the store's entry, the supervisor and the mailbox's worker.
    pub creds: Arc<Credentials>,
    pub generation: u64,
}

/// Counters a worker or its supervisor moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Reconnects,
    Restarts,
}

/// The store of mailboxes.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Records the credentials a mailbox should run with. Equal credentials change nothing;
    /// new ones start a new generation and a fresh status (counters are kept), and keep the
    /// delivered set and sync state, so a recreated mailbox catches up on what arrived meanwhile.
    /// A mailbox not open before gets [`SyncCursor::new_mailbox`] as of now.
    fn put_mailbox(&self, creds: Credentials) -> Stored<'_, ()>;
    /// Forgets a mailbox (its dead letters are kept); false if it was unknown.
    fn remove_mailbox<'a>(&'a self, id: &'a str) -> Stored<'a, bool>;
    fn wanted<'a>(&'a self, id: &'a str) -> Stored<'a, Option<Wanted>>;
    /// Each mailbox's status, in one round trip (no credentials are read).
    fn statuses<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<MailboxStatus>>>;
    /// [`Store::statuses`] of one mailbox.
    fn status<'a>(&'a self, id: &'a str) -> Stored<'a, Option<MailboxStatus>> {
        Box::pin(async move {
            let ids = [id.to_owned()];
            Ok(self.statuses(&ids).await?.pop().flatten())
        })
    }
    /// How many mailboxes are in each state, and how many leases each live replica holds, at
    /// a cost that does not grow with the mailboxes.
    fn counts(&self) -> Stored<'_, Counts>;
    /// Moves the mailbox's worker to `state`, with the error that caused it, if any. With a
    /// fence, only while no other lease holds the mailbox (its lease held under the fence,
    /// or by no one): a worker that lost its mailbox never overwrites its new owner's state.
    fn transition<'a>(
        &'a self,
        id: &'a str,
        state: WorkerState,
        error: Option<String>,
        fence: Option<&'a Fence>,
    ) -> Stored<'a, ()>;
    fn bump<'a>(&'a self, id: &'a str, counter: Counter) -> Stored<'a, ()>;
    /// Notes that Exchange announced new mail for the mailbox, now.
    fn note_event<'a>(&'a self, id: &'a str) -> Stored<'a, ()>;
    fn sync_state<'a>(&'a self, id: &'a str) -> Stored<'a, Option<SyncCursor>>;
    /// Stores where the catch-up stands, if `fence` still holds the lease.
    fn set_sync_state<'a>(
        &'a self,
        id: &'a str,
        cursor: &'a SyncCursor,
        fence: &'a Fence,
    ) -> Stored<'a, ()>;
    /// True if this item was neither delivered nor dead-lettered before for this mailbox.
    fn is_new<'a>(&'a self, id: &'a str, item_id: &'a str) -> Stored<'a, bool>;
    /// Records what became of a new item: it will not be posted again. A dead letter is kept
    /// (the last 1,000 per mailbox) and becomes the mailbox's last error. The outcome is
    /// recorded even when `fence` no longer holds the lease (a post that got through just
    /// before the lease moved is still a post, and the next owner must not repeat it); the
    /// answer is then [`StoreError::Fenced`], and the worker stops.
    fn record<'a>(
        &'a self,
        id: &'a str,
        item_id: &'a str,
        outcome: Outcome,
        fence: &'a Fence,
    ) -> Stored<'a, ()>;
    /// The mailbox's dead letters, oldest first (also after the mailbox was closed).
    fn dead_letters<'a>(&'a self, id: &'a str) -> Stored<'a, Vec<DeadLetter>>;
    /// Hands every dead letter of an open mailbox back for another delivery, and wakes its
    /// worker on whichever replica runs it; answers how many, or `None` when the mailbox is
    /// not open.
    fn replay_dead_letters<'a>(&'a self, id: &'a str) -> Stored<'a, Option<usize>>;
    /// The items handed back for another delivery, oldest first. Each stays listed until its
    /// outcome is recorded, so a delivery cut short (a cancel, a lease moving, a crash)
    /// leaves the rest to the mailbox's next worker.
    fn replays<'a>(&'a self, id: &'a str) -> Stored<'a, Vec<String>>;
    /// What a mailbox's worker waits on, in this process, for work handed to it from any
    /// replica: dead letters to replay, a history load to run.
    fn replay_signal(&self, id: &str) -> Option<Arc<Notify>>;
    /// Asks for a history load of an open mailbox from `since_unix_ms`, and wakes its worker
    /// wherever it runs. A load running already from that moment or earlier covers it and
    /// goes on; otherwise the load starts over from the earlier moment (never two side by
    /// side). Answers the load, or `None` when the mailbox is not open.
    fn ask_history<'a>(&'a self, id: &'a str, since_unix_ms: i64)
    -> Stored<'a, Option<HistoryJob>>;
    /// The mailbox's history load, while one runs.
    fn history<'a>(&'a self, id: &'a str) -> Stored<'a, Option<HistoryJob>>;
    /// Saves how far the load from `since_unix_ms` got (`None`: it is done) under the lease;
    /// false, writing nothing, when that load was replaced meanwhile by one from an earlier
    /// moment. [`StoreError::Fenced`] when the lease is gone.
    fn set_history<'a>(
        &'a self,
        id: &'a str,
        since_unix_ms: i64,
        progress: Option<&'a HistoryJob>,
        fence: &'a Fence,
    ) -> Stored<'a, bool>;

    // Coordination of replicas.

    /// The store's epoch: `proposal` if the store had none, else the one it has. A different
    /// answer than before means the store lost its data.
    fn epoch<'a>(&'a self, proposal: &'a str) -> Stored<'a, String>;
    /// Says this replica is alive for `ttl`, as the process `nonce` names, which keeps every
    /// lease it holds; answers what it found (see [`Beat`]), or [`StoreError::Duplicate`]
    /// while another process is alive under the same replica id.
    fn heartbeat<'a>(&'a self, replica: &'a str, nonce: &'a str, ttl: Duration)
    -> Stored<'a, Beat>;
    /// Says this replica is gone (on shutdown), so others need not wait for its heartbeat to
    /// lapse.
    fn leave<'a>(&'a self, replica: &'a str) -> Stored<'a, ()>;
    /// Every open mailbox id.
    fn open_mailboxes(&self) -> Stored<'_, Vec<String>>;
    /// Takes each mailbox's lease where it is free: held by no one, by a replica that is not
    /// alive, or by this replica under a token it no longer acts on (a process before this
    /// one, or a heartbeat that came too late). Answers, for each, the new fencing token,
    /// which grows with every claim, or `None` where another live replica holds it; `None`
    /// for all while `replica` itself is not alive. A lease lasts as long as its holder's
    /// heartbeat: it is never renewed by itself.
    fn claim_all<'a>(&'a self, ids: &'a [String], replica: &'a str)
    -> Stored<'a, Vec<Option<u64>>>;
    /// [`Store::claim_all`] of one mailbox.
    fn claim<'a>(&'a self, id: &'a str, replica: &'a str) -> Stored<'a, Option<u64>> {
        Box::pin(async move {
            let ids = [id.to_owned()];
            Ok(self.claim_all(&ids, replica).await?.pop().flatten())
        })
    }
    /// Whether each lease is still held under its fence (read only: a lease lasts as long as
    /// its holder's heartbeat).
    fn held<'a>(&'a self, leases: &'a [(String, Fence)]) -> Stored<'a, Vec<bool>>;
    /// Gives a lease back, if still held under `fence`.
    fn release<'a>(&'a self, id: &'a str, fence: &'a Fence) -> Stored<'a, ()>;
    /// Writes back what this process remembers of every mailbox it served (its sealed
    /// credentials, its sync cursor, the items it recorded lately) into a store that lost its
    /// data, so the mailboxes are open again and catch up from where they stood: mail that
    /// arrived meanwhile is delivered, and only once. A mailbox already back is left alone,
    /// unless it too was written back, with an older cursor, and no replica has leased it
    /// yet. Answers how many were written. A store that cannot lose its data has nothing to do.
    fn write_back(&self) -> Stored<'_, usize>;
    /// Forgets what this process remembers of a mailbox it no longer serves (moved to another
    /// replica, or closed), so only its last server writes it back.
    fn forget(&self, id: &str);
    /// The generation each mailbox should run with (see [`Wanted`]); `None` where closed.
    fn generations<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<u64>>>;
    /// The mailboxes given a new generation (created, or their credentials changed) after
    /// spread version `since` ([`Beat::version`]); `None` when the store no longer knows
    /// that far back (the last [`CHANGELOG`] versions are kept).
    fn changed_since(&self, since: u64) -> Stored<'_, Option<Vec<String>>>;
    /// Which live replica holds each mailbox's lease (`None`: no one, or a replica that is
    /// not alive).
    fn owners<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<String>>>;
    /// Every mailbox a live replica holds the lease of, with that replica, in one call.
    fn holders(&self) -> Stored<'_, HashMap<String, String>>;
    /// Ids of mailboxes whose record changed (created, updated, closed) anywhere, as they
    /// change; `None` when the store cannot say.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>>;
    /// Passes a mail server's news about a mailbox (a push that reached this replica, not
    /// necessarily the one serving the mailbox) to every replica: `note` names the mailbox
    /// and what the protocol needs to know. Best effort: a nudge lost is news found later by
    /// the mailbox's own polling.
    fn nudge<'a>(&'a self, note: &'a str) -> Stored<'a, ()>;
    /// The nudges from every replica, as they come; `None` when the store cannot say.
    fn nudges(&self) -> Option<tokio::sync::broadcast::Receiver<String>>;
    /// Claims the sending of the mail known by `key` (a digest of the sender and the mail's
    /// Message-ID), across every replica; see [`SendClaim`].
    fn begin_send<'a>(&'a self, key: &'a str) -> Stored<'a, SendClaim>;
    /// Says how a claimed send ended: sent (remembered for [`SEND_REMEMBERED`]) or not
    /// (forgotten, so that a retry sends it).
    fn end_send<'a>(&'a self, key: &'a str, sent: bool) -> Stored<'a, ()>;
}

/// How the mailboxes stand, in numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counts {
    /// Mailboxes in each state (states with none are left out).
    pub states: BTreeMap<WorkerState, usize>,
    /// Leases each live replica holds (replicas with none are left out).
    pub held: BTreeMap<String, usize>,
}

/// What a replica's heartbeat found in the store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Beat {
    /// Every live replica, sorted.
    pub live: Vec<String>,
    /// True when this process was alive in the store without a break since its previous
    /// heartbeat. False on its first one, and after one that came too late: its leases may
    /// have passed to other replicas meanwhile.
    pub unbroken: bool,
    /// Moves whenever what the spread is computed from changes: a mailbox opened, changed or
    /// closed, a lease taken or given back, a replica joining or leaving. While it stands
    /// still, the spread of the last pass stands too.
    pub version: u64,
}

/// Appends to a list kept to `max` entries, oldest first, dropping the oldest beyond it. The
/// list grows by doubling while far from `max` and then to exactly `max + 1`, so a full one
/// holds no more room than it needs.
pub(crate) fn push_capped<T>(list: &mut std::collections::VecDeque<T>, item: T, max: usize) {
    if list.len() == list.capacity() && list.capacity() * 2 > max {
        list.reserve_exact((max + 1).saturating_sub(list.len()).max(1));
    }
    list.push_back(item);
    while list.len() > max {
        list.pop_front();
    }
}

/// A load of a mailbox's history Creatio asked for (`email/synchronize`): every mail received
/// since a moment, posted oldest first, a page at a time. It lives in the store, so that it
/// resumes where it stood after a restart, or on the replica the mailbox moves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HistoryJob {
    /// Mail received at or after this moment (Unix ms) is loaded.
    pub since_unix_ms: i64,
    /// Which of the watched folders (their index, in the order they are watched) the load
    /// is in; they are loaded one after another.
    #[serde(skip)]
    pub folder: u32,
    /// Where in that folder's list of that mail, oldest first, the load stands.
    #[serde(skip)]
    pub offset: u32,
    /// Mails handled so far: posted, or found delivered already.
    pub done: u64,
    /// How many mails the list held when last read.
    pub total: u64,
}

impl HistoryJob {
    /// A load from `since_unix_ms`, not begun.
    pub fn new(since_unix_ms: i64) -> HistoryJob {
        HistoryJob {
            since_unix_ms,
            folder: 0,
            offset: 0,
            done: 0,
            total: 0,
        }
    }
}

/// Where the sending of one mail stands, as [`Store::begin_send`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendClaim {
    /// Not sent lately, nor being sent: the caller holds it and sends it now.
    New,
    /// Sent within [`SEND_REMEMBERED`]: not again.
    Sent,
    /// Another call is sending it now.
    Busy,
    /// A call began sending it more than [`SEND_STALE_AFTER`] ago and never said how it ended
    /// (its replica died): the caller holds it now, and looks whether it went out before
    /// sending it again.
    Stale,
}

/// How many spread versions back [`Store::changed_since`] can answer.
pub const CHANGELOG: u64 = 10_000;

/// How long a sent mail is remembered, so that Creatio's retry does not send it twice.
pub const SEND_REMEMBERED: Duration = Duration::from_secs(24 * 3600);

/// A send that has not ended after this long is taken for dead: longer than any send may take.
pub const SEND_STALE_AFTER: Duration = Duration::from_secs(10 * 60);

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

impl WorkerState {
    /// The name written to the store, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Starting => "Starting",
            WorkerState::Queued => "Queued",
            WorkerState::Subscribing => "Subscribing",
            WorkerState::CatchingUp => "CatchingUp",
            WorkerState::Streaming => "Streaming",
            WorkerState::Backoff => "Backoff",
            WorkerState::Failed => "Failed",
        }
    }

    /// The state of this name, as [`WorkerState::name`] writes it.
    pub fn from_name(name: &str) -> Option<WorkerState> {
        WorkerState::ALL.into_iter().find(|s| s.name() == name)
    }

    pub const ALL: [WorkerState; 7] = [
        WorkerState::Starting,
        WorkerState::Queued,
        WorkerState::Subscribing,
        WorkerState::CatchingUp,
        WorkerState::Streaming,
        WorkerState::Backoff,
        WorkerState::Failed,
    ];
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
    /// When Exchange last announced new mail on the stream.
    pub last_event_unix_ms: Option<i64>,
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
            last_event_unix_ms: None,
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
    pub(crate) fn transition(&mut self, state: WorkerState, error: Option<String>, now: i64) {
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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

/// Which delivered items a mailbox remembers: those recorded after its live cursor's time
/// less `before_cursor`, at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct SeenLimits {
    /// A catch-up lists what arrived after the cursor, and a gap recovery reaches five
    /// minutes before it: what was recorded earlier than this before the cursor is never
    /// found again.
    pub before_cursor: Duration,
    pub max: usize,
}

impl Default for SeenLimits {
    fn default() -> Self {
        SeenLimits {
            before_cursor: Duration::from_secs(15 * 60),
            max: 10_000,
        }
    }
}

impl SeenLimits {
    /// Digests recorded before this moment (Unix ms) may go once `cursor` is stored; none
    /// while a baseline or a recovery is under way.
    pub fn forget_before(&self, cursor: &SyncCursor) -> Option<i64> {
        (cursor.phase == SyncPhase::Live)
            .then(|| cursor.at_unix_ms - self.before_cursor.as_millis() as i64)
    }
}

/// Where a mailbox's inbox sync stands, and what is still owed to Creatio. A mailbox created
/// anew starts in [`SyncPhase::Baseline`] with the moment Creatio asked for it, so mail that
/// arrives before its first sync is delivered, not taken for old mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncCursor {
    /// Exchange's SyncFolderItems state; empty before a baseline's first page.
    pub state: String,
    /// When the request that gave `state` was sent (this process's clock): everything the
    /// inbox received before then was seen.
    pub at_unix_ms: i64,
    pub phase: SyncPhase,
}

/// What a mailbox's catch-up is doing, kept in the store so an interruption (a failure, an
/// Update, a lease moving, a shutdown) resumes it instead of starting over or skipping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPhase {
    /// Every item after the state is new.
    Live,
    /// The inbox as it stands is being listed, page by page: none of it is new. Once
    /// listed, mail received since `recover_since_unix_ms` is recovered, if set.
    Baseline { recover_since_unix_ms: Option<i64> },
    /// The baseline is complete; mail received since then is still to be delivered (what was
    /// delivered before is filtered out).
    Recovering { since_unix_ms: i64 },
}

impl SyncCursor {
    /// A new mailbox's cursor: list the inbox, then deliver what arrived since `asked_unix_ms`.
    pub fn new_mailbox(asked_unix_ms: i64) -> Self {
        SyncCursor {
            state: String::new(),
            at_unix_ms: asked_unix_ms,
            phase: SyncPhase::Baseline {
                recover_since_unix_ms: Some(asked_unix_ms),
            },
        }
    }

    /// The phase as stored: its name, and its moment if it has one.
    pub fn phase_fields(&self) -> (&'static str, Option<i64>) {
        match self.phase {
            SyncPhase::Live => ("live", None),
            SyncPhase::Baseline {
                recover_since_unix_ms,
            } => ("baseline", recover_since_unix_ms),
            SyncPhase::Recovering { since_unix_ms } => ("recovering", Some(since_unix_ms)),
        }
    }

    /// The phase from its stored fields; a cursor stored without one is live.
    pub fn phase_from_fields(name: Option<&str>, since: Option<i64>) -> SyncPhase {
        match (name, since) {
            (Some("baseline"), since) => SyncPhase::Baseline {
                recover_since_unix_ms: since,
            },
            (Some("recovering"), Some(since)) => SyncPhase::Recovering {
                since_unix_ms: since,
            },
            _ => SyncPhase::Live,
        }
    }
}

/// The digest under which an item id is remembered; stable across processes and versions.
pub fn item_digest(item_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(item_id.as_bytes())
}
