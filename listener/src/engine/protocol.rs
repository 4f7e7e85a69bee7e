//! The seam between the engine and a mail protocol: what a worker and Creatio's operations
//! ask of one mailbox's server, in terms that name no protocol. Each protocol implements
//! [`MailServer`] in its own module and is chosen by the mailbox's `ServerTypeId` in
//! [`Protocols`]; the engine knows folders by opaque names, items by opaque ids, and a folder's
//! sync position by an opaque state string it keeps under the lease.
//!
//! Every call is a network round trip, so the methods return boxed futures and the worker holds
//! trait objects: the indirection costs nothing next to the call, and keeps the worker, the
//! supervisor and the service free of type parameters. The worker's unit tests script a
//! server of their own, so its state machine runs under paused time without a socket.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::creatio::contract::send::OutgoingEmail;
use crate::creatio::contract::{Credentials, Email, ServerType};
use crate::engine::store::StoreError;

/// An answer from the mail server, later.
pub type Answer<'a, T> = BoxFuture<'a, Result<T, Failure>>;

/// Limits on one mailbox's conversation with its server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Timeout of every call that is not a watch, and of the wait for a watch to open.
    pub request_timeout: Duration,
    /// The largest answer read from the server, but for a watch's reports (each is capped
    /// by its protocol).
    pub max_body_bytes: u64,
}

/// One mailbox's server, as a worker and Creatio's operations drive it.
pub trait MailServer: Send + Sync {
    /// The endpoint, for logs (without credentials).
    fn url(&self) -> String;

    /// Logs in and reads the mailbox: proves the credentials work.
    fn validate(&self) -> Answer<'_, ()>;
    /// Every folder of the mailbox, for Creatio's user to choose from.
    fn folders(&self) -> Answer<'_, Vec<Folder>>;
    /// The folders the mailbox's mail is watched in: `asked` (Creatio's `FolderIds`), or
    /// every mail folder when it names none.
    fn watched_folders<'a>(&'a self, asked: &'a [String]) -> Answer<'a, Vec<String>>;

    /// Starts watching these folders for new mail; answers the watch's id.
    fn subscribe<'a>(&'a self, folders: &'a [String]) -> Answer<'a, String>;
    /// Gives a watch back to the server.
    fn unsubscribe<'a>(&'a self, subscription_id: &'a str) -> Answer<'a, ()>;
    /// Opens a connection that reports new mail for a watch; answers once the server has
    /// accepted it. `timeout_minutes` is how long the server may keep it open.
    fn open_watch<'a>(
        &'a self,
        subscription_id: &'a str,
        timeout_minutes: u8,
    ) -> Answer<'a, Box<dyn Watch>>;
    /// How much longer than a call `open_watch` may take (a shared connection first waits
    /// for its group to gather).
    fn open_allowance(&self) -> Duration {
        Duration::ZERO
    }
    /// How far the server's clock is ahead of this process's, at most; `None` until it said.
    fn clock_offset_ms(&self) -> Option<i64> {
        None
    }

    /// One page of a folder's new items after `state` (from the beginning when `None`: a
    /// baseline that lists nothing as new).
    fn sync_folder<'a>(
        &'a self,
        folder: &'a str,
        state: Option<&'a str>,
        max_changes: u16,
    ) -> Answer<'a, SyncPage>;
    /// One page of a folder's items, newest first by received time, from `offset`.
    fn find_recent_items<'a>(
        &'a self,
        folder: &'a str,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage>;
    /// One page of a folder's items received at or after `since_unix_ms`, oldest first,
    /// from `offset`.
    fn find_received_since<'a>(
        &'a self,
        folder: &'a str,
        since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage>;
    /// The ids of a folder's items whose Message-ID is `message_id`.
    fn find_by_message_id<'a>(
        &'a self,
        folder: &'a str,
        message_id: &'a str,
    ) -> Answer<'a, Vec<String>>;
    /// The items, one result per id in order; an `Err` is a failure of that item alone that
    /// may pass (ask again).
    fn get_items<'a>(&'a self, ids: &'a [&'a str]) -> Answer<'a, Vec<Result<Item, Failure>>>;

    /// Sends a mail and keeps a copy where the mailbox keeps what it sent.
    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> Answer<'a, ()>;
    /// Whether the mailbox's sent mail holds this Message-ID: a send that may have gone out.
    fn was_sent<'a>(&'a self, message_id: &'a str) -> Answer<'a, bool>;
}

/// An open connection reporting new mail.
pub trait Watch: Send {
    /// The next report; `None` when the server ended the connection cleanly. It may wait for
    /// ever: the worker bounds the wait. Cancel-safe: the worker drops a call it waits on when
    /// other work comes first, and the next call must lose nothing the dropped one had seen.
    fn next(&mut self) -> Answer<'_, Option<WatchBatch>>;
}

/// Makes a mailbox's [`MailServer`] from its credentials.
pub trait Connect: Send + Sync + std::fmt::Debug {
    fn connect(&self, creds: &Credentials) -> Result<Box<dyn MailServer>, Failure>;
    /// Whether this protocol serves the mailbox (one that serves some mailboxes of a kind is
    /// asked before the one that serves the rest).
    fn serves(&self, _creds: &Credentials) -> bool {
        true
    }
    /// The URL the mailbox's server is reached at, as this protocol reads `ServiceUrl`; `None`
    /// when it cannot read it.
    fn address(&self, _creds: &Credentials) -> Option<String> {
        None
    }
}

/// The protocols this listener serves, chosen by the mailbox's `ServerTypeId`; an Exchange
/// mailbox in Exchange Online goes through Graph when an app registration serves its domain.
#[derive(Debug, Clone)]
pub struct Protocols {
    pub exchange: Arc<dyn Connect>,
    pub imap: Arc<dyn Connect>,
    pub graph: Option<Arc<dyn Connect>>,
}

impl Protocols {
    fn chosen(&self, creds: &Credentials) -> &dyn Connect {
        match creds.server_type {
            ServerType::Exchange => match &self.graph {
                Some(graph) if graph.serves(creds) => graph.as_ref(),
                _ => self.exchange.as_ref(),
            },
            ServerType::Imap => self.imap.as_ref(),
        }
    }
}

impl Connect for Protocols {
    fn connect(&self, creds: &Credentials) -> Result<Box<dyn MailServer>, Failure> {
        self.chosen(creds).connect(creds)
    }

    fn address(&self, creds: &Credentials) -> Option<String> {
        self.chosen(creds).address(creds)
    }
}

/// A folder as Creatio lists it: `Id` what comes back in `FolderIds`, `ParentId` another
/// folder's `Id` (none at the top).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub id: String,
    pub name: String,
    pub parent_id: Option<String>,
    /// The kind of items it holds, where the protocol says (`IPF.Note` for mail).
    pub class: Option<String>,
}

/// One page of a folder's new items.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPage {
    /// Where the folder stands after this page.
    pub state: String,
    /// False when more wait: call again with `state`.
    pub complete: bool,
    /// The items new in this page, oldest first.
    pub added: Vec<String>,
}

/// An item listed by a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: String,
    /// When the server received it, when it said.
    pub received_unix_ms: Option<i64>,
}

/// One page of a search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FindPage {
    pub items: Vec<Found>,
    /// The offset of the next page, when the server said.
    pub next_offset: Option<u32>,
    /// True when this page holds the last item.
    pub complete: bool,
    /// How many items the whole search holds, when the server said.
    pub total: Option<u32>,
}

/// What one fetched item turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Mail(Box<Email>),
    /// Deleted or moved before it could be read.
    Gone,
    /// The server will not give it; the reason is kept with the dead letter.
    Dead(String),
}

/// What one report on a watch says.
#[derive(Debug, Clone, Default)]
pub struct WatchBatch {
    /// Items new in a watched folder, in the order reported.
    pub new_items: Vec<String>,
    /// A folder was created, moved or deleted: which folders hold mail may have changed.
    pub folders_changed: bool,
    /// The watch failed; a failure whose disposition is [`Disposition::Resubscribe`] means the
    /// watch is gone.
    pub failure: Option<Failure>,
    /// The server ends the connection with this report.
    pub closed: bool,
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transient: wait (at least `after`, when the server said) and try again.
    Retry { after: Option<Duration> },
    /// The watch is gone: subscribe afresh.
    Resubscribe,
    /// Credentials or configuration are wrong: report it and retry only slowly.
    Fatal,
}

/// A mail server's failure as its protocol judges it. Displays carry no secrets.
pub trait ServerFailure: std::error::Error + Send + Sync {
    fn disposition(&self) -> Disposition;
    /// One sentence for the administrator (Validate's message, Creatio's error text).
    fn sentence(&self) -> String;
    /// A stable class name for Creatio's `ProcessMailboxState.ExceptionClassName`.
    fn class_name(&self) -> &'static str;
    /// The server rejected the credentials (with OAuth: the access token).
    fn credentials_rejected(&self) -> bool {
        false
    }
    /// The server no longer knows a folder's sync state: take a new baseline and recover the
    /// gap by received time.
    fn cursor_rejected(&self) -> bool {
        false
    }
    /// The answer was larger than the limit on answers (in bytes).
    fn too_large(&self) -> Option<u64> {
        None
    }
    /// A send that failed this way may still have reached the server.
    fn send_in_doubt(&self) -> bool {
        false
    }
    /// The server refused the mail itself (rather than failing to answer).
    fn send_refused(&self) -> bool {
        false
    }
    /// Why a mail was not sent, in words Creatio shows its user.
    fn unsent_sentence(&self) -> String {
        self.sentence()
    }
}

/// Why a call to the mail server, or the engine's own work around it, did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Server(Arc<dyn ServerFailure>),
    #[error("no data on the event stream for {0:?}")]
    Idle(Duration),
    /// The server did not answer in time.
    #[error("{0}")]
    NoAnswer(String),
    /// Not the server's fault: the listener's own store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Failure {
    pub fn server(f: impl ServerFailure + 'static) -> Failure {
        Failure::Server(Arc::new(f))
    }

    pub fn disposition(&self) -> Disposition {
        match self {
            Failure::Server(f) => f.disposition(),
            Failure::Idle(_) | Failure::NoAnswer(_) | Failure::Store(_) => {
                Disposition::Retry { after: None }
            }
        }
    }

    pub fn sentence(&self) -> String {
        match self {
            Failure::Server(f) => f.sentence(),
            Failure::Idle(_) | Failure::NoAnswer(_) => {
                "The mail server could not be reached at ServiceUrl".into()
            }
            Failure::Store(_) => "The listener cannot reach its store; try again".into(),
        }
    }

    pub fn class_name(&self) -> &'static str {
        match self {
            Failure::Server(f) => f.class_name(),
            Failure::Idle(_) => "MailServerIdle",
            Failure::NoAnswer(_) => "MailServerUnreachable",
            Failure::Store(_) => "StoreUnavailable",
        }
    }

    pub fn credentials_rejected(&self) -> bool {
        matches!(self, Failure::Server(f) if f.credentials_rejected())
    }

    pub fn cursor_rejected(&self) -> bool {
        matches!(self, Failure::Server(f) if f.cursor_rejected())
    }

    pub fn too_large(&self) -> Option<u64> {
        match self {
            Failure::Server(f) => f.too_large(),
            _ => None,
        }
    }

    pub fn send_in_doubt(&self) -> bool {
        match self {
            Failure::Server(f) => f.send_in_doubt(),
            Failure::Idle(_) | Failure::NoAnswer(_) => true,
            Failure::Store(_) => false,
        }
    }

    pub fn send_refused(&self) -> bool {
        matches!(self, Failure::Server(f) if f.send_refused())
    }

    pub fn unsent_sentence(&self) -> String {
        match self {
            Failure::Server(f) => f.unsent_sentence(),
            Failure::Idle(_) | Failure::NoAnswer(_) => {
                "The mail server could not be reached at ServiceUrl; the message was not sent"
                    .into()
            }
            Failure::Store(_) => "The Email Listener cannot reach its store; try again".into(),
        }
    }
}

/// Whether the folder `id`, or a folder above it, is one of `roots`; `parent_of` names each
/// folder's parent. A tree is shallow: a walk longer than 64 steps (a server's cycle) counts as
/// inside.
pub fn inside_any<'t>(
    id: &str,
    roots: &[String],
    parent_of: impl Fn(&str) -> Option<&'t str>,
) -> bool {
    if roots.iter().any(|r| r == id) {
        return true;
    }
    let mut at = parent_of(id);
    for _ in 0..64 {
        let Some(here) = at else {
            return false;
        };
        if roots.iter().any(|r| r == here) {
            return true;
        }
        at = parent_of(here);
    }
    true
}

/// Reads a whole HTTP answer of a mail server, giving up as soon as it passes `limit` bytes:
/// `None` when it is larger.
pub async fn read_capped(
    mut answer: reqwest::Response,
    limit: u64,
) -> Result<Option<bytes::Bytes>, reqwest::Error> {
    if answer.content_length().is_some_and(|n| n > limit) {
        return Ok(None);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = answer.chunk().await? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// Waits for `fut` at most `limit`; past it, the failure `late` names.
pub async fn within<T, E>(
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
    late: impl FnOnce() -> E,
) -> Result<T, E> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(late()))
}

/// An error and its causes in one line, each cause said once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !why.contains(&text) {
            why = format!("{why}: {text}");
        }
        source = cause.source();
    }
    why
}
