//! The shared store: Redis. Every state change is one Lua script, so no caller ever reads,
//! decides and writes across round trips.
//!
//! Keys, under one prefix per deployment (`el:` by default), with the mailbox id in braces so a
//! mailbox's keys share a slot should Redis Cluster ever be used:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `el:mbx:{id}` | hash | sealed credentials and their fingerprint, the generation, the status fields and counters, the sync state, when it was given and the catch-up's phase |
//! | `el:open` | set | every open mailbox id |
//! | `el:generation` | string | the last generation given out (INCR) |
//! | `el:seen:{id}` | sorted set | digests of delivered item ids → when, until the live cursor passes them (at most a count) |
//! | `el:dead:{id}` | list | dead letters, oldest first, the last 1,000 (kept after Close) |
//! | `el:replay:{id}` | list | dead-lettered items handed back for delivery |
//! | `el:replicas` | sorted set | replica id → until when it is alive (Redis's clock) |
//! | `el:replica-process` | hash | replica id → the nonce of the process heartbeating as it |
//! | `el:lease:{id}` | string | `replica:token`; held while that replica is alive in `el:replicas` |
//! | `el:fence:{id}` | string | the last fencing token given out (INCR) |
//! | `el:holders` | hash | mailbox id → its lease, as `el:lease:{id}` holds it |
//! | `el:held` | hash | replica id → how many leases it holds |
//! | `el:states` | hash | worker state → how many mailboxes are in it |
//! | `el:spread` | string | the version of the spread's inputs, moved by every change to them |
//! | `el:changelog` | sorted set | mailbox id → the version at which it got a new generation, over the last 10,000 versions |
//! | `el:send:{key}` | string | a send under way or done, by Creatio's idempotency key, for a while |
//! | `el:changes` | channel | the id of every mailbox created, updated or closed |
//! | `el:replays` | channel | the id of every mailbox whose dead letters were handed back |
//! | `el:nudges` | channel | a hint for the replica that runs a mailbox a push notification concerns (Graph) |
//! | `el:epoch` | string | a random id written once; gone or changed means Redis lost its data |

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
mod link;

use link::Link;
use redis::{AsyncCommands as _, Script};
use tokio::sync::Notify;

use super::seal::Sealer;
use super::{
    Beat, CHANGELOG, Counter, Counts, DeadLetter, Fence, HistoryJob, MailboxStatus, Outcome,
    SEND_REMEMBERED, SEND_STALE_AFTER, SeenLimits, SendClaim, Store, StoreError, Stored,
    SyncCursor, Wanted, WorkerState, item_digest,
};
use crate::creatio::contract::Credentials;
use crate::creatio::mail::unix_now_ms;

/// Dead letters kept per mailbox; the oldest go first.
const DEAD_LETTERS_KEPT: i64 = 1_000;

fn store_error(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// What a fenced script answers when the lease is not held under the fence.
const FENCED: i64 = -1;

fn fenced(answer: i64) -> Result<(), StoreError> {
    if answer == FENCED {
        Err(StoreError::Fenced)
    } else {
        Ok(())
    }
}

fn fence_value(fence: &Fence) -> String {
    format!("{}:{}", fence.replica, fence.token)
}

/// A script with `redis/clock.lua` put before it: Redis's time, the replica a lease names,
/// whether a replica is alive.
macro_rules! with_clock {
    ($script:literal) => {
        concat!(include_str!("redis/clock.lua"), include_str!($script))
    };
}

/// Records or updates a mailbox. KEYS: mbx, open, generation, seen, replay, changes, spread,
/// states, changelog. ARGV: id, fingerprint, sealed credentials, now, the changelog's length.
/// Answers the generation, or 0 when nothing changed.
const PUT: &str = include_str!("redis/put.lua");

/// Forgets a mailbox. KEYS: mbx, open, seen, replay, changes. ARGV: id. Answers 1 if it
/// existed.
const REMOVE: &str = with_clock!("redis/remove.lua");

/// Moves a mailbox's state, unless another lease holds it. KEYS: mbx, lease. ARGV: state,
/// error or '', now, fence or '' (then whoever holds the lease).
const TRANSITION: &str = include_str!("redis/transition.lua");

/// Notes an event on an existing mailbox. KEYS: mbx. ARGV: now.
const EVENT: &str = include_str!("redis/event.lua");

/// Adds one to a counter of an existing mailbox. KEYS: mbx. ARGV: field, now.
const BUMP: &str = include_str!("redis/bump.lua");

/// Records what became of an item. KEYS: mbx, seen, dead, lease, replay. ARGV: digest, now,
/// most digests kept, counter field, dead-letter entry or '', its error, dead letters kept,
/// fence, item id. The outcome is a fact whoever holds the lease now (a post that got
/// through before the lease moved), so it is written either way; the answer says whether the
/// lease is still held under the fence: 1 (2 when the oldest dead letter made way), or -1.
const RECORD: &str = include_str!("redis/record.lua");

/// Stores the sync cursor under a lease and forgets the delivered items it has passed. KEYS:
/// mbx, lease, seen. ARGV: fence, state, given at, phase, since or '', forget digests recorded
/// before this (Unix ms) or ''.
const CURSOR: &str = include_str!("redis/cursor.lua");

/// Hands dead letters back and announces it to the replica that runs the mailbox. KEYS: mbx,
/// seen, dead, replay, replays channel. ARGV: id. Each dead-letter entry is
/// "digest\nitem id\njson". Answers how many, or -1 when the mailbox is not open.
const REPLAY: &str = include_str!("redis/replay.lua");

/// Writes a mailbox back into a Redis that lost its data. KEYS: mbx, open, generation, seen,
/// lease, changes, spread, states. ARGV: id, fingerprint, sealed credentials, now, the cursor (state, given
/// at, phase, since or ''), then digest and when, pairs. A mailbox back already is left alone
/// unless another replica wrote it back with an older cursor and no lease is held on it.
/// Answers 1 if written.
const WRITE_BACK: &str = include_str!("redis/write-back.lua");

/// Reads generations. KEYS: mbx of each mailbox. Answers each one's generation, or 0 where
/// the mailbox is closed.
const GENERATIONS: &str = include_str!("redis/generations.lua");

/// Says a replica is alive, unless another process is alive under its id: this keeps every
/// lease it holds. KEYS: replicas, the process behind each replica, spread. ARGV: replica,
/// ttl ms, this process's nonce, whether the commands moved to another master since the last
/// heartbeat (then the spread's version moves). Answers {unbroken, spread version, live replicas}, or a
/// DUPLICATE error. The time is Redis's own, so replicas with skewed clocks agree.
const HEARTBEAT: &str = with_clock!("redis/heartbeat.lua");

/// Takes the leases that are free. KEYS: replicas, holders, spread, then lease and fence of
/// each mailbox. ARGV: replica, then each mailbox's id. Answers, per mailbox, the new token,
/// or 0 where another live replica holds it.
const CLAIM: &str = with_clock!("redis/claim.lua");

/// Gives a lease back if still held. KEYS: lease, holders, spread, held. ARGV: fence, id,
/// replica.
const RELEASE: &str = include_str!("redis/release.lua");

/// Reads lease holders that are alive. KEYS: replicas, then leases. Answers each holder, or
/// '' where none is alive.
const OWNERS: &str = with_clock!("redis/owners.lua");

/// Reads the counts of mailboxes by state and of leases by live replica, making them again
/// from every mailbox and lease when missing or older than ARGV[2]. KEYS: states, held, open,
/// replicas, holders.
/// ARGV: the key prefix, that age in ms. Answers {state, n, ..., replica, n, ...}.
const COUNTS: &str = with_clock!("redis/counts.lua");

/// Reads the changelog. KEYS: spread, changelog. ARGV: since (a spread version), the
/// changelog's length. Answers {'1', ids...}, or {'0'} when it does not reach back that far.
const CHANGED: &str = include_str!("redis/changed.lua");

/// How often the counts are made again from every mailbox, as a net under the scripts that
/// keep them (a rolling upgrade from a version that did not).
const COUNTS_REMADE_EVERY: Duration = Duration::from_secs(3600);

/// Reads every lease a live replica holds. KEYS: replicas, holders. Answers mailbox,
/// replica, pairs.
const HOLDERS: &str = with_clock!("redis/holders.lua");

/// Claims a send. KEYS: the send's key. ARGV: how long a send is remembered, after how long
/// an unfinished one is taken for dead (ms). Answers `new`, `sent`, `busy` or `stale`
/// ([`SendClaim`]); the time is Redis's own.
const BEGIN_SEND: &str = with_clock!("redis/begin-send.lua");

/// Asks for a history load. KEYS: mbx, the replays channel. ARGV: since (Unix ms), the
/// mailbox id. Answers the load (since, folder, offset, done, total), or nil when the mailbox is not
/// open; wakes the mailbox's worker.
const ASK_HISTORY: &str = include_str!("redis/ask-history.lua");

/// Saves a history load's progress under the lease. KEYS: mbx, lease. ARGV: fence, the load's
/// since, then its folder, offset, done and total (none: it is done). Answers 1 if written, 0 if the
/// load was replaced, -1 if fenced.
const SET_HISTORY: &str = include_str!("redis/set-history.lua");

#[derive(Debug)]
struct Scripts {
    put: Script,
    remove: Script,
    transition: Script,
    cursor: Script,
    bump: Script,
    event: Script,
    record: Script,
    replay: Script,
    heartbeat: Script,
    claim: Script,
    release: Script,
    owners: Script,
    holders: Script,
    counts: Script,
    changed: Script,
    write_back: Script,
    generations: Script,
    begin_send: Script,
    ask_history: Script,
    set_history: Script,
}

/// The Redis [`Store`].
#[derive(Clone)]
pub struct RedisStore {
    link: Link,
    prefix: String,
    sealer: Sealer,
    seen_limits: SeenLimits,
    scripts: Arc<Scripts>,
    /// Replay signals of the mailboxes this process runs.
    signals: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// Fed from the `changes` channel.
    changes: tokio::sync::broadcast::Sender<String>,
    /// Fed from the `nudges` channel.
    nudges: tokio::sync::broadcast::Sender<String>,
    /// What this process knows of each mailbox it serves, to write back should Redis lose
    /// its data.
    progress: Arc<Mutex<HashMap<String, Progress>>>,
}

/// A mailbox as this process saw it while serving it: its sealed credentials (with their
/// fingerprint), the last sync cursor read or written, and the digests of the items it
/// recorded lately (with when), as the `seen` set keeps them.
#[derive(Debug, Default)]
struct Progress {
    creds: Option<(String, Vec<u8>)>,
    cursor: Option<SyncCursor>,
    /// Fixed-size: 16 bytes a mail, at most the `seen` set's count.
    seen: std::collections::VecDeque<(u64, i64)>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("sealer", &self.sealer)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects (and keeps reconnecting) to the Redis at `url`, on first use. With
    /// `rediss://`, the server's certificate is checked against `ca_pem` when given (an
    /// internal CA), else against the system's roots.
    pub async fn connect(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        prefix: &str,
        sealer: Sealer,
        seen_limits: SeenLimits,
    ) -> Result<RedisStore, StoreError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2);
        // Lazily: a replica started before its Redis runs, and says it is not ready until
        // Redis answers.
        let link = if url.starts_with(link::SENTINEL_SCHEME) {
            let target = link::SentinelTarget::parse(url).map_err(StoreError::Unavailable)?;
            Link::following(target, config)?
        } else {
            let client = match ca_pem {
                Some(root_cert) => redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                ),
                None => redis::Client::open(url),
            }
            .map_err(store_error)?;
            Link::fixed(client, config)?
        };
        let signals: Arc<Mutex<HashMap<String, Arc<Notify>>>> = Arc::default();
        let (changes, nudges) = follow_changes(link.clone(), prefix, signals.clone());
        Ok(RedisStore {
            changes,
            nudges,
            link,
            prefix: prefix.to_owned(),
            sealer,
            seen_limits,
            scripts: Arc::new(Scripts {
                put: Script::new(PUT),
                remove: Script::new(REMOVE),
                transition: Script::new(TRANSITION),
                cursor: Script::new(CURSOR),
                bump: Script::new(BUMP),
                event: Script::new(EVENT),
                record: Script::new(RECORD),
                replay: Script::new(REPLAY),
                heartbeat: Script::new(HEARTBEAT),
                claim: Script::new(CLAIM),
                release: Script::new(RELEASE),
                owners: Script::new(OWNERS),
                holders: Script::new(HOLDERS),
                counts: Script::new(COUNTS),
                changed: Script::new(CHANGED),
                write_back: Script::new(WRITE_BACK),
                generations: Script::new(GENERATIONS),
                begin_send: Script::new(BEGIN_SEND),
                ask_history: Script::new(ASK_HISTORY),
                set_history: Script::new(SET_HISTORY),
            }),
            signals,
            progress: Arc::default(),
        })
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{{{id}}}", self.prefix)
    }

    fn open_set(&self) -> String {
        format!("{}open", self.prefix)
    }

    /// A key of the whole deployment: `replicas` (replica → alive until), `holders`
    /// (mailbox → its lease), `held` (replica → leases it holds), `states` (state →
    /// mailboxes in it), `spread` (the version of the spread's inputs, [`Beat::version`]),
    /// `changelog` (mailbox → the version at which it got a new generation).
    fn global(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn changes_channel(&self) -> String {
        format!("{}changes", self.prefix)
    }

    fn replays_channel(&self) -> String {
        format!("{}replays", self.prefix)
    }

    /// Notes what this process knows of a mailbox's progress.
    fn remember(&self, id: &str, note: impl FnOnce(&mut Progress)) {
        let mut all = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        note(all.entry(id.to_owned()).or_default());
    }

    async fn write_back_now(&self) -> Result<usize, StoreError> {
        // A mailbox is written back with its cursor, or not at all: without one, its next
        // catch-up could not know what it missed (Creatio's minute loop recreates it).
        type Known = (String, (String, Vec<u8>), SyncCursor, Vec<(u64, i64)>);
        let known: Vec<Known> = {
            let all = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            all.iter()
                .filter_map(|(id, p)| {
                    Some((
                        id.clone(),
                        p.creds.clone()?,
                        p.cursor.clone()?,
                        p.seen.iter().cloned().collect(),
                    ))
                })
                .collect()
        };
        let mut conn = self.link.conn()?;
        let mut written = 0;
        for (id, (fp, sealed), cursor, seen) in known {
            let mut call = self.scripts.write_back.prepare_invoke();
            call.key(self.key("mbx", &id))
                .key(self.open_set())
                .key(format!("{}generation", self.prefix))
                .key(self.key("seen", &id))
                .key(self.key("lease", &id))
                .key(self.changes_channel())
                .key(self.global("spread"))
                .key(self.global("states"))
                .arg(&id)
                .arg(fp)
                .arg(sealed)
                .arg(unix_now_ms());
            let (phase, since) = cursor.phase_fields();
            call.arg(&cursor.state)
                .arg(cursor.at_unix_ms)
                .arg(phase)
                .arg(since.map(|s| s.to_string()).unwrap_or_default());
            for (digest, at) in &seen {
                call.arg(digest).arg(*at);
            }
            let answer: i64 = call.invoke_async(&mut conn).await.map_err(store_error)?;
            written += answer as usize;
        }
        Ok(written)
    }

    fn signal(&self, id: &str) -> Arc<Notify> {
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    async fn put(&self, creds: Credentials) -> Result<(), StoreError> {
        let id = creds.id.clone();
        let fp = self.sealer.fingerprint(&creds);
        let sealed = self.sealer.seal(&creds);
        let mut conn = self.link.conn()?;
        let _: i64 = self
            .scripts
            .put
            .key(self.key("mbx", &id))
            .key(self.open_set())
            .key(format!("{}generation", self.prefix))
            .key(self.key("seen", &id))
            .key(self.key("replay", &id))
            .key(self.changes_channel())
            .key(self.global("spread"))
            .key(self.global("states"))
            .key(self.global("changelog"))
            .arg(&id)
            .arg(&fp)
            .arg(&sealed)
            .arg(unix_now_ms())
            .arg(CHANGELOG)
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        self.remember(&id, |p| p.creds = Some((fp, sealed)));
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let mut conn = self.link.conn()?;
        let existed: i64 = self
            .scripts
            .remove
            .key(self.key("mbx", id))
            .key(self.open_set())
            .key(self.key("seen", id))
            .key(self.key("replay", id))
            .key(self.changes_channel())
            .key(self.key("lease", id))
            .key(self.global("replicas"))
            .key(self.global("holders"))
            .key(self.global("spread"))
            .key(self.global("states"))
            .key(self.global("held"))
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(existed == 1)
    }

    async fn wanted_now(&self, id: &str) -> Result<Option<Wanted>, StoreError> {
        let mut conn = self.link.conn()?;
        let (blob, generation, fp): (Option<Vec<u8>>, Option<u64>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.key("mbx", id))
                .arg("creds")
                .arg("gen")
                .arg("fp")
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
        let (Some(blob), Some(generation)) = (blob, generation) else {
            return Ok(None);
        };
        let creds = self
            .sealer
            .open(id, &blob)
            .map_err(|e| StoreError::Unreadable(e.to_string()))?;
        // What this replica is about to serve, it can write back (with a cursor).
        self.remember(id, |p| p.creds = Some((fp.unwrap_or_default(), blob)));
        Ok(Some(Wanted {
            creds: Arc::new(creds),
            generation,
        }))
    }

    async fn statuses_now(&self, ids: &[String]) -> Result<Vec<Option<MailboxStatus>>, StoreError> {
        let mut conn = self.link.conn()?;
        let mut statuses = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET")
                    .arg(self.key("mbx", id))
                    .arg(&STATUS_FIELDS[..]);
            }
            let rows: Vec<Vec<Option<String>>> =
                pipe.query_async(&mut conn).await.map_err(store_error)?;
            for row in rows {
                // Every record has a generation: none means no mailbox.
                if row.first().is_none_or(Option::is_none) {
                    statuses.push(None);
                    continue;
                }
                let fields: HashMap<String, String> = STATUS_FIELDS
                    .iter()
                    .zip(row)
                    .filter_map(|(f, v)| Some(((*f).to_owned(), v?)))
                    .collect();
                statuses.push(Some(status_from(&fields)));
            }
        }
        Ok(statuses)
    }

    async fn counts_now(&self) -> Result<Counts, StoreError> {
        let mut conn = self.link.conn()?;
        type Pairs = Vec<(String, usize)>;
        let (states, held): (Pairs, Pairs) = self
            .scripts
            .counts
            .key(self.global("states"))
            .key(self.global("held"))
            .key(self.open_set())
            .key(self.global("replicas"))
            .key(self.global("holders"))
            .arg(&self.prefix)
            .arg(COUNTS_REMADE_EVERY.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(Counts {
            states: states
                .into_iter()
                .filter_map(|(s, n)| Some((WorkerState::from_name(&s)?, n)))
                .collect(),
            held: held.into_iter().collect(),
        })
    }

    async fn transition_now(
        &self,
        id: &str,
        state: WorkerState,
        error: Option<String>,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        let mut conn = self.link.conn()?;
        let _: i64 = self
            .scripts
            .transition
            .key(self.key("mbx", id))
            .key(self.key("lease", id))
            .key(self.global("states"))
            .arg(state.name())
            .arg(error.unwrap_or_default())
            .arg(unix_now_ms())
            .arg(fence.map(fence_value).unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn bump_now(&self, id: &str, counter: Counter) -> Result<(), StoreError> {
        let field = match counter {
            Counter::Reconnects => "reconnects",
            Counter::Restarts => "restarts",
        };
        let mut conn = self.link.conn()?;
        let _: i64 = self
            .scripts
            .bump
            .key(self.key("mbx", id))
            .arg(field)
            .arg(unix_now_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn sync_state_now(&self, id: &str) -> Result<Option<SyncCursor>, StoreError> {
        let mut conn = self.link.conn()?;
        // `sync_since_ms` is empty for a phase without a moment.
        let (state, at, phase, since): (
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
        ) = redis::cmd("HMGET")
            .arg(self.key("mbx", id))
            .arg("sync_state")
            .arg("sync_at_ms")
            .arg("sync_phase")
            .arg("sync_since_ms")
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        if state.is_none() && phase.is_none() {
            return Ok(None);
        }
        let cursor = SyncCursor {
            state: state.unwrap_or_default(),
            at_unix_ms: at.unwrap_or(0),
            phase: SyncCursor::phase_from_fields(
                phase.as_deref(),
                since.and_then(|s| s.parse().ok()),
            ),
        };
        // A cursor without a state is a new record's (after a Create, or written by the API
        // into a Redis that lost its data): what this process knew before outranks it.
        self.remember(id, |p| {
            if p.cursor.is_none() || !cursor.state.is_empty() {
                p.cursor = Some(cursor.clone());
            }
        });
        Ok(Some(cursor))
    }

    async fn set_sync_state_now(
        &self,
        id: &str,
        cursor: &SyncCursor,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        // The worker moves its cursor only past what it settled: true here whatever Redis says.
        let forget = self.seen_limits.forget_before(cursor);
        self.remember(id, |p| {
            p.cursor = Some(cursor.clone());
            if let Some(before) = forget {
                p.seen.retain(|(_, at)| *at >= before);
            }
        });
        let (phase, since) = cursor.phase_fields();
        let mut conn = self.link.conn()?;
        let answer: i64 = self
            .scripts
            .cursor
            .key(self.key("mbx", id))
            .key(self.key("lease", id))
            .key(self.key("seen", id))
            .arg(fence_value(fence))
            .arg(&cursor.state)
            .arg(cursor.at_unix_ms)
            .arg(phase)
            .arg(since.map(|s| s.to_string()).unwrap_or_default())
            .arg(forget.map(|f| f.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        fenced(answer)
    }

    async fn is_new_now(&self, id: &str, item_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.link.conn()?;
        let (exists, score): (bool, Option<f64>) = redis::pipe()
            .exists(self.key("mbx", id))
            .zscore(self.key("seen", id), item_digest(item_id).to_string())
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(exists && score.is_none())
    }

    async fn record_now(
        &self,
        id: &str,
        item_id: &str,
        outcome: Outcome,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        let digest = item_digest(item_id);
        let now = unix_now_ms();
        // Posted (or settled) already: remembered here even if Redis does not take it.
        let limits = self.seen_limits;
        self.remember(id, |p| {
            super::push_capped(&mut p.seen, (digest, now), limits.max);
        });
        let (field, entry, error) = match &outcome {
            Outcome::Delivered => ("delivered", String::new(), String::new()),
            Outcome::Skipped => ("skipped", String::new(), String::new()),
            Outcome::DeadLettered(letter) => (
                "dead_letters",
                format!(
                    "{digest}\n{item_id}\n{}",
                    serde_json::to_string(letter).unwrap_or_default()
                ),
                letter.error.clone(),
            ),
        };
        let mut conn = self.link.conn()?;
        let answer: i64 = self
            .scripts
            .record
            .key(self.key("mbx", id))
            .key(self.key("seen", id))
            .key(self.key("dead", id))
            .key(self.key("lease", id))
            .key(self.key("replay", id))
            .arg(digest)
            .arg(now)
            .arg(self.seen_limits.max)
            .arg(field)
            .arg(entry)
            .arg(error)
            .arg(DEAD_LETTERS_KEPT)
            .arg(fence_value(fence))
            .arg(item_id)
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        if answer == 2 {
            tracing::warn!(id = ?id, kept = DEAD_LETTERS_KEPT, "the mailbox's oldest dead letter made way for a new one (each was logged when it was dead-lettered)");
        }
        fenced(answer)
    }

    async fn dead_letters_now(&self, id: &str) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.link.conn()?;
        let entries: Vec<String> = conn
            .lrange(self.key("dead", id), 0, -1)
            .await
            .map_err(store_error)?;
        Ok(entries
            .iter()
            .filter_map(|e| e.splitn(3, '\n').nth(2))
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }

    async fn replay_now(&self, id: &str) -> Result<Option<usize>, StoreError> {
        let mut conn = self.link.conn()?;
        let n: i64 = self
            .scripts
            .replay
            .key(self.key("mbx", id))
            .key(self.key("seen", id))
            .key(self.key("dead", id))
            .key(self.key("replay", id))
            .key(self.replays_channel())
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        if n < 0 {
            return Ok(None);
        }
        Ok(Some(n as usize))
    }

    async fn replays_now(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.link.conn()?;
        conn.lrange(self.key("replay", id), 0, -1)
            .await
            .map_err(store_error)
    }
}

/// The fields of a mailbox's record its status is read from; the generation first, which
/// every record has.
const STATUS_FIELDS: [&str; 13] = [
    "gen",
    "state",
    "error",
    "last_error",
    "last_error_ms",
    "unhealthy_since_ms",
    "last_event_ms",
    "delivered",
    "dead_letters",
    "skipped",
    "reconnects",
    "restarts",
    "updated_ms",
];

fn status_from(fields: &HashMap<String, String>) -> MailboxStatus {
    let text = |f: &str| fields.get(f).cloned();
    let int = |f: &str| fields.get(f).and_then(|v| v.parse::<i64>().ok());
    let count = |f: &str| {
        fields
            .get(f)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    MailboxStatus {
        state: text("state")
            .as_deref()
            .and_then(WorkerState::from_name)
            .unwrap_or(WorkerState::Starting),
        error: text("error"),
        last_error: text("last_error"),
        last_error_unix_ms: int("last_error_ms"),
        unhealthy_since_unix_ms: int("unhealthy_since_ms"),
        last_event_unix_ms: int("last_event_ms"),
        delivered: count("delivered"),
        dead_letters: count("dead_letters"),
        skipped: count("skipped"),
        reconnects: count("reconnects"),
        restarts: count("restarts"),
        updated_unix_ms: int("updated_ms").unwrap_or(0),
    }
}

impl Store for RedisStore {
    fn put_mailbox(&self, creds: Credentials) -> Stored<'_, ()> {
        self.put(creds).boxed()
    }

    fn remove_mailbox<'a>(&'a self, id: &'a str) -> Stored<'a, bool> {
        self.remove(id).boxed()
    }

    fn wanted<'a>(&'a self, id: &'a str) -> Stored<'a, Option<Wanted>> {
        self.wanted_now(id).boxed()
    }

    fn statuses<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<MailboxStatus>>> {
        self.statuses_now(ids).boxed()
    }

    fn counts(&self) -> Stored<'_, Counts> {
        self.counts_now().boxed()
    }

    fn transition<'a>(
        &'a self,
        id: &'a str,
        state: WorkerState,
        error: Option<String>,
        fence: Option<&'a Fence>,
    ) -> Stored<'a, ()> {
        self.transition_now(id, state, error, fence).boxed()
    }

    fn bump<'a>(&'a self, id: &'a str, counter: Counter) -> Stored<'a, ()> {
        self.bump_now(id, counter).boxed()
    }

    fn note_event<'a>(&'a self, id: &'a str) -> Stored<'a, ()> {
        async move {
            let mut conn = self.link.conn()?;
            let _: i64 = self
                .scripts
                .event
                .key(self.key("mbx", id))
                .arg(unix_now_ms())
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(())
        }
        .boxed()
    }

    fn sync_state<'a>(&'a self, id: &'a str) -> Stored<'a, Option<SyncCursor>> {
        self.sync_state_now(id).boxed()
    }

    fn set_sync_state<'a>(
        &'a self,
        id: &'a str,
        cursor: &'a SyncCursor,
        fence: &'a Fence,
    ) -> Stored<'a, ()> {
        self.set_sync_state_now(id, cursor, fence).boxed()
    }

    fn is_new<'a>(&'a self, id: &'a str, item_id: &'a str) -> Stored<'a, bool> {
        self.is_new_now(id, item_id).boxed()
    }

    fn record<'a>(
        &'a self,
        id: &'a str,
        item_id: &'a str,
        outcome: Outcome,
        fence: &'a Fence,
    ) -> Stored<'a, ()> {
        self.record_now(id, item_id, outcome, fence).boxed()
    }

    fn dead_letters<'a>(&'a self, id: &'a str) -> Stored<'a, Vec<DeadLetter>> {
        self.dead_letters_now(id).boxed()
    }

    fn replay_dead_letters<'a>(&'a self, id: &'a str) -> Stored<'a, Option<usize>> {
        self.replay_now(id).boxed()
    }

    fn replays<'a>(&'a self, id: &'a str) -> Stored<'a, Vec<String>> {
        self.replays_now(id).boxed()
    }

    fn replay_signal(&self, id: &str) -> Option<Arc<Notify>> {
        Some(self.signal(id))
    }

    fn epoch<'a>(&'a self, proposal: &'a str) -> Stored<'a, String> {
        async move {
            let mut conn = self.link.conn()?;
            let key = format!("{}epoch", self.prefix);
            let (_, epoch): (bool, String) = redis::pipe()
                .set_nx(&key, proposal)
                .get(&key)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(epoch)
        }
        .boxed()
    }

    fn heartbeat<'a>(
        &'a self,
        replica: &'a str,
        nonce: &'a str,
        ttl: Duration,
    ) -> Stored<'a, Beat> {
        async move {
            // After a failover the new master may lack the old one's last writes (a claim,
            // a release): every replica spreads again and checks its leases. Taken before
            // the connection, so that a move in between is told again next time.
            let moved = self.link.take_moved();
            let answer: Result<(i64, u64, Vec<String>), StoreError> = async {
                let mut conn = self.link.conn()?;
                self.scripts
                    .heartbeat
                    .key(self.global("replicas"))
                    .key(format!("{}replica-process", self.prefix))
                    .key(self.global("spread"))
                    .arg(replica)
                    .arg(ttl.as_millis() as u64)
                    .arg(nonce)
                    .arg(u8::from(moved))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| match e.code() {
                        Some("DUPLICATE") => StoreError::Duplicate(replica.to_owned()),
                        _ => store_error(e),
                    })
            }
            .await;
            if moved && answer.is_err() {
                self.link.note_moved();
            }
            let (unbroken, version, mut live) = answer?;
            // Redis lists them by deadline; every replica must see the same order.
            live.sort();
            Ok(Beat {
                live,
                unbroken: unbroken == 1,
                version,
            })
        }
        .boxed()
    }

    fn leave<'a>(&'a self, replica: &'a str) -> Stored<'a, ()> {
        async move {
            let mut conn = self.link.conn()?;
            let _: () = redis::pipe()
                .atomic()
                .zrem(self.global("replicas"), replica)
                .ignore()
                .incr(self.global("spread"), 1)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(())
        }
        .boxed()
    }

    fn open_mailboxes(&self) -> Stored<'_, Vec<String>> {
        async move {
            let mut conn = self.link.conn()?;
            conn.smembers(self.open_set()).await.map_err(store_error)
        }
        .boxed()
    }

    fn claim_all<'a>(
        &'a self,
        ids: &'a [String],
        replica: &'a str,
    ) -> Stored<'a, Vec<Option<u64>>> {
        async move {
            let mut tokens = Vec::with_capacity(ids.len());
            let mut conn = self.link.conn()?;
            for chunk in ids.chunks(500) {
                let mut call = self.scripts.claim.prepare_invoke();
                call.key(self.global("replicas"))
                    .key(self.global("holders"))
                    .key(self.global("spread"))
                    .key(self.global("held"))
                    .arg(replica);
                for id in chunk {
                    call.key(self.key("lease", id))
                        .key(self.key("fence", id))
                        .arg(id);
                }
                let answers: Vec<u64> = call.invoke_async(&mut conn).await.map_err(store_error)?;
                tokens.extend(answers.into_iter().map(|t| (t > 0).then_some(t)));
            }
            Ok(tokens)
        }
        .boxed()
    }

    fn held<'a>(&'a self, leases: &'a [(String, Fence)]) -> Stored<'a, Vec<bool>> {
        async move {
            let mut held = Vec::with_capacity(leases.len());
            let mut conn = self.link.conn()?;
            for chunk in leases.chunks(1000) {
                let keys: Vec<String> = chunk.iter().map(|(id, _)| self.key("lease", id)).collect();
                let values: Vec<Option<String>> = redis::cmd("MGET")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(store_error)?;
                held.extend(
                    chunk
                        .iter()
                        .zip(values)
                        .map(|((_, f), v)| v.as_deref() == Some(fence_value(f).as_str())),
                );
            }
            Ok(held)
        }
        .boxed()
    }

    fn release<'a>(&'a self, id: &'a str, fence: &'a Fence) -> Stored<'a, ()> {
        async move {
            let mut conn = self.link.conn()?;
            let _: i64 = self
                .scripts
                .release
                .key(self.key("lease", id))
                .key(self.global("holders"))
                .key(self.global("spread"))
                .key(self.global("held"))
                .arg(fence_value(fence))
                .arg(id)
                .arg(&*fence.replica)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(())
        }
        .boxed()
    }

    fn write_back(&self) -> Stored<'_, usize> {
        self.write_back_now().boxed()
    }

    fn forget(&self, id: &str) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        // No worker of it runs here: nothing waits on its replay signal.
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    fn generations<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<u64>>> {
        async move {
            let mut generations = Vec::with_capacity(ids.len());
            let mut conn = self.link.conn()?;
            for chunk in ids.chunks(1000) {
                let mut call = self.scripts.generations.prepare_invoke();
                for id in chunk {
                    call.key(self.key("mbx", id));
                }
                let answers: Vec<u64> = call.invoke_async(&mut conn).await.map_err(store_error)?;
                generations.extend(answers.into_iter().map(|g| (g > 0).then_some(g)));
            }
            Ok(generations)
        }
        .boxed()
    }

    fn owners<'a>(&'a self, ids: &'a [String]) -> Stored<'a, Vec<Option<String>>> {
        async move {
            let mut owners = Vec::with_capacity(ids.len());
            let mut conn = self.link.conn()?;
            for chunk in ids.chunks(1000) {
                let mut call = self.scripts.owners.prepare_invoke();
                call.key(self.global("replicas"));
                for id in chunk {
                    call.key(self.key("lease", id));
                }
                let answers: Vec<String> =
                    call.invoke_async(&mut conn).await.map_err(store_error)?;
                owners.extend(answers.into_iter().map(|o| (!o.is_empty()).then_some(o)));
            }
            Ok(owners)
        }
        .boxed()
    }

    fn changed_since(&self, since: u64) -> Stored<'_, Option<Vec<String>>> {
        async move {
            let mut conn = self.link.conn()?;
            let mut answer: Vec<String> = self
                .scripts
                .changed
                .key(self.global("spread"))
                .key(self.global("changelog"))
                .arg(since)
                .arg(CHANGELOG)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            if answer.first().map(String::as_str) != Some("1") {
                return Ok(None);
            }
            answer.remove(0);
            Ok(Some(answer))
        }
        .boxed()
    }

    fn holders(&self) -> Stored<'_, HashMap<String, String>> {
        async move {
            let mut conn = self.link.conn()?;
            let held: HashMap<String, String> = self
                .scripts
                .holders
                .key(self.global("replicas"))
                .key(self.global("holders"))
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(held)
        }
        .boxed()
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.changes.subscribe())
    }

    fn nudge<'a>(&'a self, note: &'a str) -> Stored<'a, ()> {
        async move {
            let mut conn = self.link.conn()?;
            let _: i64 = redis::cmd("PUBLISH")
                .arg(format!("{}nudges", self.prefix))
                .arg(note)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(())
        }
        .boxed()
    }

    fn nudges(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.nudges.subscribe())
    }

    fn ask_history<'a>(
        &'a self,
        id: &'a str,
        since_unix_ms: i64,
    ) -> Stored<'a, Option<HistoryJob>> {
        async move {
            let mut conn = self.link.conn()?;
            let job: Option<Vec<i64>> = self
                .scripts
                .ask_history
                .key(self.key("mbx", id))
                .key(self.replays_channel())
                .arg(since_unix_ms)
                .arg(id)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(job.as_deref().and_then(history_job))
        }
        .boxed()
    }

    fn history<'a>(&'a self, id: &'a str) -> Stored<'a, Option<HistoryJob>> {
        async move {
            let mut conn = self.link.conn()?;
            let fields: Vec<Option<i64>> = redis::cmd("HMGET")
                .arg(self.key("mbx", id))
                .arg(&HISTORY_FIELDS)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            let fields: Option<Vec<i64>> = fields.into_iter().collect();
            Ok(fields.as_deref().and_then(history_job))
        }
        .boxed()
    }

    fn set_history<'a>(
        &'a self,
        id: &'a str,
        since_unix_ms: i64,
        progress: Option<&'a HistoryJob>,
        fence: &'a Fence,
    ) -> Stored<'a, bool> {
        async move {
            let mut conn = self.link.conn()?;
            let mut call = self.scripts.set_history.prepare_invoke();
            call.key(self.key("mbx", id))
                .key(self.key("lease", id))
                .arg(fence_value(fence))
                .arg(since_unix_ms);
            if let Some(p) = progress {
                call.arg(p.folder).arg(p.offset).arg(p.done).arg(p.total);
            }
            let answer: i64 = call.invoke_async(&mut conn).await.map_err(store_error)?;
            fenced(answer)?;
            Ok(answer == 1)
        }
        .boxed()
    }

    fn begin_send<'a>(&'a self, key: &'a str) -> Stored<'a, SendClaim> {
        async move {
            let mut conn = self.link.conn()?;
            let answer: String = self
                .scripts
                .begin_send
                .key(self.key("send", key))
                .arg(SEND_REMEMBERED.as_millis() as u64)
                .arg(SEND_STALE_AFTER.as_millis() as u64)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            match answer.as_str() {
                "new" => Ok(SendClaim::New),
                "sent" => Ok(SendClaim::Sent),
                "busy" => Ok(SendClaim::Busy),
                "stale" => Ok(SendClaim::Stale),
                other => Err(StoreError::Unavailable(format!(
                    "Redis answered {other:?} to a send's claim"
                ))),
            }
        }
        .boxed()
    }

    fn end_send<'a>(&'a self, key: &'a str, sent: bool) -> Stored<'a, ()> {
        async move {
            let mut conn = self.link.conn()?;
            let key = self.key("send", key);
            if sent {
                let _: () = conn
                    .pset_ex(key, "sent", SEND_REMEMBERED.as_millis() as u64)
                    .await
                    .map_err(store_error)?;
            } else {
                let _: i64 = conn.del(key).await.map_err(store_error)?;
            }
            Ok(())
        }
        .boxed()
    }
}

/// The fields of a mailbox's hash that hold its history load.
const HISTORY_FIELDS: [&str; 5] = [
    "history_since",
    "history_folder",
    "history_offset",
    "history_done",
    "history_total",
];

/// A history load from its five fields, in [`HISTORY_FIELDS`]' order.
fn history_job(fields: &[i64]) -> Option<HistoryJob> {
    match *fields {
        [since, folder, offset, done, total] => Some(HistoryJob {
            since_unix_ms: since,
            folder: u32::try_from(folder).unwrap_or(0),
            offset: u32::try_from(offset).unwrap_or(0),
            done: u64::try_from(done).unwrap_or(0),
            total: u64::try_from(total).unwrap_or(0),
        }),
        _ => None,
    }
}

/// Follows the `changes`, `replays` and `nudges` channels for as long as the process lives,
/// listening again after a lost connection: hands each changed id to the first returned
/// sender's subscribers and each nudge to the second's, and wakes this process's worker of
/// each mailbox whose dead letters were handed back.
fn follow_changes(
    link: Link,
    prefix: &str,
    signals: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
) -> (
    tokio::sync::broadcast::Sender<String>,
    tokio::sync::broadcast::Sender<String>,
) {
    let (tx, _) = tokio::sync::broadcast::channel(4096);
    let (nudge_tx, _) = tokio::sync::broadcast::channel(4096);
    let sender = tx.clone();
    let nudge_sender = nudge_tx.clone();
    let changes = format!("{prefix}changes");
    let replays = format!("{prefix}replays");
    let nudges = format!("{prefix}nudges");
    tokio::spawn(async move {
        loop {
            let listened = async {
                let Some(client) = link.client() else {
                    return Ok(());
                };
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&[&changes, &replays, &nudges]).await?;
                let mut messages = pubsub.on_message();
                while let Some(msg) = futures_util::StreamExt::next(&mut messages).await {
                    let Ok(id) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if msg.get_channel_name() == nudges {
                        let _ = nudge_sender.send(id);
                    } else if msg.get_channel_name() == replays {
                        // Only the replica whose worker waits has a signal for it.
                        let signal = signals
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&id)
                            .cloned();
                        if let Some(signal) = signal {
                            signal.notify_one();
                        }
                    } else {
                        let _ = sender.send(id);
                    }
                }
                redis::RedisResult::Ok(())
            }
            .await;
            if let Err(e) = listened {
                tracing::warn!(error = %e, "lost the store's change channel; listening again");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    (tx, nudge_tx)
}
