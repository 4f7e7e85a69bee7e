//! The mock server's whole world: mailboxes, their items, subscriptions with their event
//! queues, and the counters the harness reads. One mutex guards it; no lock is held across an
//! await, and a streaming connection is woken through its own `Notify`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::{Duration, Instant};

use crate::faults::{Armed, Fault, FaultKind, Settings};
use crate::folders::{self, INBOX, SENT_ITEMS};
use crate::mail::{InjectedMail, Item, NewMail, SentMail};

/// One queued notification event.
#[derive(Debug, Clone)]
pub(crate) struct QueuedEvent {
    /// `CreatedEvent`, `NewMailEvent`, `ModifiedEvent`, ...
    pub kind: &'static str,
    pub timestamp: i64,
    pub target: Target,
}

#[derive(Debug, Clone)]
pub(crate) enum Target {
    Item {
        id: String,
        change_key: String,
        /// The folder holding it.
        folder: &'static str,
    },
    /// A folder itself, with its unread count after the change.
    Folder { name: &'static str, unread: usize },
}

#[derive(Debug)]
struct Mailbox {
    email: String,
    password: String,
    /// Every item of every folder, in arrival order.
    items: Vec<Item>,
    /// Every change to a folder, by folder, in order: what SyncFolderItems replays from a sync
    /// state.
    changes: Vec<(&'static str, Change)>,
}

impl Mailbox {
    fn in_folder(&self, folder: &str) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(move |i| i.folder == folder)
    }
}

/// One entry of a mailbox's change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Create { id: String, change_key: String },
}

/// A page of changes for SyncFolderItems.
#[derive(Debug)]
pub(crate) struct SyncPage {
    pub state: String,
    pub includes_last: bool,
    pub changes: Vec<Change>,
}

#[derive(Debug)]
struct Subscription {
    mailbox: String,
    /// The folders it watches; every folder when `None` (`SubscribeToAllFolders`).
    folders: Option<Vec<&'static str>>,
    /// The account that made it (impersonating or not): only it may stream or end it.
    owner: String,
    event_types: Vec<String>,
    queue: VecDeque<QueuedEvent>,
    /// The streaming connection currently serving this subscription, if any.
    waker: Option<Arc<Notify>>,
    /// Since when no connection has served it (for idle expiry).
    idle_since: Option<Instant>,
}

impl Subscription {
    fn wants(&self, kind: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == kind)
    }

    fn watches(&self, folder: &str) -> bool {
        self.folders.as_ref().is_none_or(|f| f.contains(&folder))
    }
}

/// Counters the harness and tests read through the control API or the handle.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Requests by SOAP operation (`Subscribe`, `GetItem`, ...), counted before auth.
    pub requests: BTreeMap<String, u64>,
    /// Answers by SOAP operation and HTTP status (`{"Subscribe": {"200": 3, "503": 1}}`).
    pub responses: BTreeMap<String, BTreeMap<u16, u64>>,
    /// Requests answered 401.
    pub unauthorized: u64,
    pub open_streams: usize,
    pub live_subscriptions: usize,
    pub events_queued: u64,
    /// Events written to a stream.
    pub events_delivered: u64,
    /// Events dropped by a fault (missed notifications, a cut connection).
    pub events_dropped: u64,
}

/// One EWS request as the server answered it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestRecord {
    pub operation: String,
    /// The mailbox the request acted as (empty when it did not authenticate).
    pub mailbox: String,
    pub status: u16,
    /// Arrival, milliseconds since the Unix epoch.
    pub at_unix_ms: u128,
    /// Arrival on the server's monotonic clock, for in-process tests.
    #[serde(skip, default = "Instant::now")]
    pub at: Instant,
}

/// The largest message sent when no setting says: Exchange Online's limit.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 35 * 1024 * 1024;

/// How many requests the log keeps (the oldest are dropped first).
const REQUEST_LOG: usize = 10_000;

/// Why a control call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("mailbox {0} does not exist")]
    NoSuchMailbox(String),
    #[error("mailbox {0} already exists")]
    MailboxExists(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// One call counted in flight for its account.
pub(crate) struct CallInFlight {
    world: Arc<World>,
    principal: String,
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        let mut inner = self.world.lock();
        if let Some(n) = inner.calls.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Queued events taken for a stream: subscription id, its mailbox, the events.
pub(crate) type Drained = (String, String, Vec<QueuedEvent>);

/// Subscription ids a stream may not carry.
#[derive(Debug, Default)]
pub(crate) struct Unfit {
    /// Not known on the server the request reached.
    pub unknown: Vec<String>,
    /// Made by another account.
    pub denied: Vec<String>,
}

/// A limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    TooManySubscriptions,
    TooManyStreams,
}

#[derive(Debug, Default)]
struct Inner {
    mailboxes: HashMap<String, Mailbox>,
    subscriptions: HashMap<String, Subscription>,
    /// Open streaming connections by mailbox.
    streams: HashMap<String, usize>,
    /// Calls being answered, by the account that made them.
    calls: HashMap<String, usize>,
    faults: Vec<Armed>,
    settings: Settings,
    stats: Stats,
    log: VecDeque<RequestRecord>,
}

impl Inner {
    /// Forgets subscriptions idle past the expiry setting.
    fn expire(&mut self) {
        let Some(ms) = self.settings.subscription_expiry_ms else {
            return;
        };
        let horizon = Instant::now().checked_sub(Duration::from_millis(ms));
        self.subscriptions.retain(
            |_, s| !matches!((s.idle_since, horizon), (Some(since), Some(h)) if since <= h),
        );
    }

    /// The mailbox server a mailbox lives on: one of `mbx0`..`mbxN-1` by a hash of its
    /// address, or `mock-ews` when there is one server.
    fn backend_of(&self, mailbox: &str) -> String {
        match self.settings.backends {
            Some(n) if n > 1 => {
                // FNV-1a: stable across runs and builds, so a test may name a mailbox's server.
                let hash = key(mailbox)
                    .bytes()
                    .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
                    });
                format!("mbx{}", hash % u64::from(n))
            }
            _ => "mock-ews".to_owned(),
        }
    }

    /// Wakes the streams serving `mailbox`'s subscriptions (all streams for `None`).
    fn wake(&self, mailbox: Option<&str>) {
        for sub in self.subscriptions.values() {
            if mailbox.is_none_or(|m| key(m) == sub.mailbox)
                && let Some(w) = &sub.waker
            {
                w.notify_one();
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct World {
    inner: Mutex<Inner>,
}

fn key(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

/// An opaque, EWS-looking id.
fn opaque_id(kind: &str) -> String {
    let raw = format!("{kind}:{}", uuid::Uuid::new_v4().simple());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

impl World {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn create_mailbox(&self, email: &str, password: &str) -> Result<(), ControlError> {
        if !email.contains('@') {
            return Err(ControlError::Invalid {
                field: "email",
                reason: "must be an SMTP address".into(),
            });
        }
        let mut inner = self.lock();
        let k = key(email);
        if inner.mailboxes.contains_key(&k) {
            return Err(ControlError::MailboxExists(email.to_owned()));
        }
        inner.mailboxes.insert(
            k,
            Mailbox {
                email: email.trim().to_owned(),
                password: password.to_owned(),
                items: Vec::new(),
                changes: Vec::new(),
            },
        );
        Ok(())
    }

    pub fn set_password(&self, email: &str, password: &str) -> Result<(), ControlError> {
        let mut inner = self.lock();
        let mb = inner
            .mailboxes
            .get_mut(&key(email))
            .ok_or_else(|| ControlError::NoSuchMailbox(email.to_owned()))?;
        mb.password = password.to_owned();
        Ok(())
    }

    /// The mailbox a Basic-auth user may act as, when the password matches.
    pub fn authenticate(&self, user: &str, password: &str) -> Option<String> {
        let inner = self.lock();
        // Accept `user@domain` and `DOMAIN\user@domain` alike.
        let user = user.rsplit('\\').next().unwrap_or(user);
        let mb = inner.mailboxes.get(&key(user))?;
        (mb.password == password).then(|| key(user))
    }

    /// The mailbox and password of a user as NTLM names it: a UPN (`alice@contoso.example`), or
    /// an account name and domain (`alice`, `CONTOSO`), matched to the one mailbox whose
    /// address starts with that name.
    pub fn password_of(&self, user: &str, _domain: &str) -> Option<(String, String)> {
        let inner = self.lock();
        if let Some(mb) = inner.mailboxes.get(&key(user)) {
            return Some((key(user), mb.password.clone()));
        }
        let prefix = format!("{}@", user.to_ascii_lowercase());
        let mut matching = inner
            .mailboxes
            .iter()
            .filter(|(email, _)| email.starts_with(&prefix));
        match (matching.next(), matching.next()) {
            (Some((email, mb)), None) => Some((email.clone(), mb.password.clone())),
            _ => None,
        }
    }

    pub fn mailbox_exists(&self, email: &str) -> bool {
        self.lock().mailboxes.contains_key(&key(email))
    }

    pub fn count_request(&self, operation: &str) {
        *self
            .lock()
            .stats
            .requests
            .entry(operation.to_owned())
            .or_default() += 1;
    }

    pub fn record(&self, operation: &str, mailbox: &str, status: u16, at: Instant) {
        let at_unix_ms = crate::clock::now_unix_ms().saturating_sub(at.elapsed().as_millis());
        let mut inner = self.lock();
        *inner
            .stats
            .responses
            .entry(operation.to_owned())
            .or_default()
            .entry(status)
            .or_default() += 1;
        if inner.log.len() == REQUEST_LOG {
            inner.log.pop_front();
        }
        inner.log.push_back(RequestRecord {
            operation: operation.to_owned(),
            mailbox: mailbox.to_owned(),
            status,
            at_unix_ms,
            at,
        });
    }

    /// The most recent requests, oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.lock().log.iter().cloned().collect()
    }

    pub fn count_unauthorized(&self) {
        self.lock().stats.unauthorized += 1;
    }

    pub fn stats(&self) -> Stats {
        let mut inner = self.lock();
        inner.expire();
        let mut stats = inner.stats.clone();
        stats.live_subscriptions = inner.subscriptions.len();
        stats
    }

    pub fn inject(&self, mailbox: &str, mail: NewMail) -> Result<InjectedMail, ControlError> {
        if mail.from.is_empty() {
            return Err(ControlError::Invalid {
                field: "from",
                reason: "is required".into(),
            });
        }
        let folder = match mail.folder.as_deref() {
            None => INBOX,
            Some(name) => {
                folders::by_name(name)
                    .filter(|f| f.1 == "IPF.Note")
                    .ok_or_else(|| ControlError::Invalid {
                        field: "folder",
                        reason: format!("{name:?} is not a mail folder of the mailbox"),
                    })?
                    .0
            }
        };
        Self::deliver(&mut self.lock(), mailbox, mail, folder)
    }

    /// Sends a message as `sender`: the recipients that live on this server (To, Cc and Bcc)
    /// find it in their inboxes, and the sender keeps a copy when `keep_copy`. Answers the
    /// Message-ID, or the EWS error code refusing the message.
    pub fn send(
        &self,
        sender: &str,
        mut mail: NewMail,
        bcc: &[String],
        keep_copy: bool,
    ) -> Result<String, &'static str> {
        let mut inner = self.lock();
        let limit = inner
            .settings
            .max_message_bytes
            .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        let Some(from) = inner.mailboxes.get(&key(sender)).map(|m| m.email.clone()) else {
            return Err("ErrorNonExistentMailbox");
        };
        if mail.to.is_empty() && mail.cc.is_empty() && bcc.is_empty() {
            return Err("ErrorInvalidRecipients");
        }
        mail.from = from.clone();
        let mut copy = Item::new(opaque_id("item"), &from, mail.clone());
        if copy.mime.len() > limit {
            return Err("ErrorMessageSizeExceeded");
        }
        mail.message_id = Some(copy.message_id.clone());
        let mut local: Vec<String> = Vec::new();
        for rcpt in mail.to.iter().chain(&mail.cc).chain(bcc) {
            let k = key(rcpt);
            if inner.mailboxes.contains_key(&k) && !local.contains(&k) {
                local.push(k);
            }
        }
        for rcpt in local {
            let _ = Self::deliver(&mut inner, &rcpt, mail.clone(), INBOX);
        }
        let message_id = copy.message_id.clone();
        if keep_copy {
            copy.folder = SENT_ITEMS;
            let _ = Self::file(&mut inner, sender, copy);
        }
        Ok(message_id)
    }

    /// What a mailbox sent, oldest first.
    pub fn outgoing(&self, mailbox: &str) -> Result<Vec<SentMail>, ControlError> {
        let inner = self.lock();
        let mb = inner
            .mailboxes
            .get(&key(mailbox))
            .ok_or_else(|| ControlError::NoSuchMailbox(mailbox.to_owned()))?;
        Ok(mb.in_folder(SENT_ITEMS).map(Item::summary).collect())
    }

    /// Puts a mail into one of a mailbox's folders (see [`World::file`]).
    fn deliver(
        inner: &mut Inner,
        mailbox: &str,
        mail: NewMail,
        folder: &'static str,
    ) -> Result<InjectedMail, ControlError> {
        let email = inner
            .mailboxes
            .get(&key(mailbox))
            .map(|mb| mb.email.clone())
            .ok_or_else(|| ControlError::NoSuchMailbox(mailbox.to_owned()))?;
        let mut item = Item::new(opaque_id("item"), &email, mail);
        item.folder = folder;
        Self::file(inner, mailbox, item)
    }

    /// Files an item into its folder of a mailbox and queues the events real Exchange fires
    /// for the subscriptions watching that folder.
    fn file(inner: &mut Inner, mailbox: &str, item: Item) -> Result<InjectedMail, ControlError> {
        let k = key(mailbox);
        let folder = item.folder;
        let mb = inner
            .mailboxes
            .get_mut(&k)
            .ok_or_else(|| ControlError::NoSuchMailbox(mailbox.to_owned()))?;
        let injected = InjectedMail {
            item_id: item.id.clone(),
            message_id: item.message_id.clone(),
        };
        let (at, change_key) = (item.received, item.change_key.clone());
        mb.changes.push((
            folder,
            Change::Create {
                id: item.id.clone(),
                change_key: change_key.clone(),
            },
        ));
        mb.items.push(item);
        let unread = mb.in_folder(folder).count();
        let created = Target::Item {
            id: injected.item_id.clone(),
            change_key,
            folder,
        };
        // What real Exchange fires: the item's CreatedEvent, a NewMailEvent for mail received
        // (not for a sender's own copy), and a ModifiedEvent on the folder.
        let mut events = vec![("CreatedEvent", created.clone())];
        if folder != SENT_ITEMS {
            events.push(("NewMailEvent", created));
        }
        events.push((
            "ModifiedEvent",
            Target::Folder {
                name: folder,
                unread,
            },
        ));
        let mut queued = 0;
        for sub in inner
            .subscriptions
            .values_mut()
            .filter(|s| s.mailbox == k && s.watches(folder))
        {
            for (kind, target) in &events {
                if sub.wants(kind) {
                    sub.queue.push_back(QueuedEvent {
                        kind,
                        timestamp: at,
                        target: target.clone(),
                    });
                    queued += 1;
                }
            }
            if let Some(w) = &sub.waker {
                w.notify_one();
            }
        }
        inner.stats.events_queued += queued;
        Ok(injected)
    }

    /// Items of a mailbox by id, in the order asked; `None` where an id is unknown.
    pub fn items(&self, mailbox: &str, ids: &[String]) -> Vec<Option<Item>> {
        let inner = self.lock();
        let mb = inner.mailboxes.get(&key(mailbox));
        ids.iter()
            .map(|id| mb.and_then(|m| m.items.iter().find(|i| &i.id == id).cloned()))
            .collect()
    }

    /// The changes to a folder after `state` (all of them without one), at most `max`;
    /// `None` when the state is not one this mailbox issued for that folder.
    pub fn sync(
        &self,
        mailbox: &str,
        folder: &str,
        state: Option<&str>,
        max: usize,
    ) -> Option<SyncPage> {
        let inner = self.lock();
        let k = key(mailbox);
        let mb = inner.mailboxes.get(&k)?;
        let changes: Vec<&Change> = mb
            .changes
            .iter()
            .filter(|(f, _)| *f == folder)
            .map(|(_, c)| c)
            .collect();
        let owner = format!("{k}:{folder}");
        let from = match state {
            None => 0,
            Some(s) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(s.trim())
                    .ok()?;
                let raw = String::from_utf8(raw).ok()?;
                let (issued_to, at) = raw.strip_prefix("sync:")?.rsplit_once(':')?;
                let at: usize = at.parse().ok()?;
                if issued_to != owner || at > changes.len() {
                    return None;
                }
                at
            }
        };
        let to = (from + max).min(changes.len());
        Some(SyncPage {
            state: base64::engine::general_purpose::STANDARD.encode(format!("sync:{owner}:{to}")),
            includes_last: to == changes.len(),
            changes: changes[from..to].iter().map(|c| (*c).clone()).collect(),
        })
    }

    /// Every mailbox's address key, sorted (so seeded picks are reproducible).
    pub fn mailbox_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.lock().mailboxes.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Every mail a mailbox received (in any folder but Sent Items), in delivery order.
    pub fn sent(&self, mailbox: &str) -> Result<Vec<SentMail>, ControlError> {
        let inner = self.lock();
        let mb = inner
            .mailboxes
            .get(&key(mailbox))
            .ok_or_else(|| ControlError::NoSuchMailbox(mailbox.to_owned()))?;
        Ok(mb
            .items
            .iter()
            .filter(|i| i.folder != SENT_ITEMS)
            .map(Item::summary)
            .collect())
    }

    /// A page of a folder of the items the query admits, by received time (newest first
    /// unless asked otherwise; in arrival order among equal times); and how many there are in
    /// all.
    pub fn page(
        &self,
        mailbox: &str,
        folder: &str,
        (offset, max): (usize, usize),
        query: &crate::soap::ItemQuery,
    ) -> (Vec<Item>, usize) {
        let inner = self.lock();
        let Some(mb) = inner.mailboxes.get(&key(mailbox)) else {
            return (Vec::new(), 0);
        };
        let mut matching: Vec<(usize, &Item)> = mb
            .in_folder(folder)
            .enumerate()
            .filter(|(_, i)| query.message_id.as_ref().is_none_or(|m| &i.message_id == m))
            .filter(|(_, i)| query.received_since.is_none_or(|since| i.received >= since))
            .collect();
        matching.sort_by_key(|(at, i)| (i.received, *at));
        if !query.oldest_first {
            matching.reverse();
        }
        let total = matching.len();
        let page = matching
            .into_iter()
            .skip(offset)
            .take(max)
            .map(|(_, i)| i.clone())
            .collect();
        (page, total)
    }

    /// How many items a folder holds.
    pub fn item_count(&self, mailbox: &str, folder: &str) -> usize {
        self.lock()
            .mailboxes
            .get(&key(mailbox))
            .map_or(0, |m| m.in_folder(folder).count())
    }

    pub fn subscribe(
        &self,
        mailbox: &str,
        owner: &str,
        folders: Option<Vec<&'static str>>,
        event_types: Vec<String>,
    ) -> Result<String, Refused> {
        let mut inner = self.lock();
        inner.expire();
        let k = key(mailbox);
        if let Some(max) = inner.settings.max_subscriptions_per_mailbox
            && inner
                .subscriptions
                .values()
                .filter(|s| s.mailbox == k)
                .count()
                >= max
        {
            return Err(Refused::TooManySubscriptions);
        }
        let id = opaque_id("sub");
        inner.subscriptions.insert(
            id.clone(),
            Subscription {
                mailbox: k,
                folders,
                owner: key(owner),
                event_types,
                queue: VecDeque::new(),
                waker: None,
                idle_since: Some(Instant::now()),
            },
        );
        Ok(id)
    }

    /// Removes a subscription the account made; false when there is none.
    pub fn unsubscribe(&self, principal: &str, id: &str) -> bool {
        let mut inner = self.lock();
        match inner.subscriptions.get(id) {
            Some(s) if s.owner == key(principal) => {
                if let Some(sub) = inner.subscriptions.remove(id) {
                    // A stream serving it learns at once that it is gone.
                    if let Some(w) = sub.waker {
                        w.notify_one();
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Sorts out the ids a stream may not carry: those no live subscription on the `backend`
    /// the request reached has (any backend when `None`), and those another account made.
    pub fn check_subscriptions(
        &self,
        principal: &str,
        backend: Option<&str>,
        ids: &[String],
    ) -> Unfit {
        let mut inner = self.lock();
        inner.expire();
        let mut unfit = Unfit::default();
        for id in ids {
            match inner.subscriptions.get(id) {
                Some(s) if backend.is_some_and(|b| inner.backend_of(&s.mailbox) != b) => {
                    unfit.unknown.push(id.clone())
                }
                Some(s) if s.owner != key(principal) => unfit.denied.push(id.clone()),
                Some(_) => {}
                None => unfit.unknown.push(id.clone()),
            }
        }
        unfit
    }

    /// The mailbox server `mailbox` lives on.
    pub fn backend_of(&self, mailbox: &str) -> String {
        self.lock().backend_of(mailbox)
    }

    /// Whether the endpoint fronts more than one mailbox server.
    pub fn has_backends(&self) -> bool {
        self.lock().settings.backends.is_some_and(|n| n > 1)
    }

    /// Points the subscriptions at a streaming connection's waker, unless `mailbox` already
    /// has as many streams open as it may.
    pub fn attach(
        &self,
        mailbox: &str,
        ids: &[String],
        waker: &Arc<Notify>,
    ) -> Result<(), Refused> {
        let mut inner = self.lock();
        let k = key(mailbox);
        let open = inner.streams.get(&k).copied().unwrap_or(0);
        if inner
            .settings
            .max_streams_per_user
            .is_some_and(|max| open >= max)
        {
            return Err(Refused::TooManyStreams);
        }
        for id in ids {
            if let Some(sub) = inner.subscriptions.get_mut(id) {
                sub.waker = Some(waker.clone());
                sub.idle_since = None;
            }
        }
        *inner.streams.entry(k).or_default() += 1;
        inner.stats.open_streams += 1;
        waker.notify_one();
        Ok(())
    }

    /// Releases the subscriptions still pointing at this connection's waker.
    pub fn detach(&self, mailbox: &str, ids: &[String], waker: &Arc<Notify>) {
        let mut inner = self.lock();
        let now = Instant::now();
        for id in ids {
            if let Some(sub) = inner.subscriptions.get_mut(id)
                && sub.waker.as_ref().is_some_and(|w| Arc::ptr_eq(w, waker))
            {
                sub.waker = None;
                sub.idle_since = Some(now);
            }
        }
        if let Some(n) = inner.streams.get_mut(&key(mailbox)) {
            *n = n.saturating_sub(1);
        }
        inner.stats.open_streams = inner.stats.open_streams.saturating_sub(1);
    }

    /// Counts a call of `principal` in flight until the guard drops; `None` when the account
    /// already has as many as it may.
    pub fn begin_call(self: &Arc<Self>, principal: &str) -> Option<CallInFlight> {
        let mut inner = self.lock();
        let k = key(principal);
        let now = inner.calls.get(&k).copied().unwrap_or(0);
        if inner
            .settings
            .max_concurrent_calls_per_user
            .is_some_and(|max| now >= max)
        {
            return None;
        }
        inner.calls.insert(k.clone(), now + 1);
        Some(CallInFlight {
            world: self.clone(),
            principal: k,
        })
    }

    /// Forgets subscriptions, as a server that lost them would.
    pub fn forget(&self, ids: &[String]) {
        let mut inner = self.lock();
        for id in ids {
            inner.subscriptions.remove(id);
        }
    }

    /// Arms a fault; stream faults wake the streams they may act on.
    pub fn add_fault(&self, fault: Fault) -> Result<(), ControlError> {
        let armed = Armed::new(fault).map_err(|reason| ControlError::Invalid {
            field: "times",
            reason,
        })?;
        let mut inner = self.lock();
        if armed.fault.kind.on_stream() {
            inner.wake(armed.fault.mailbox.as_deref());
        }
        inner.faults.push(armed);
        Ok(())
    }

    /// The faults still armed.
    pub fn faults(&self) -> Vec<Fault> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.faults.retain(|a| !a.expired(now));
        inner.faults.iter().map(|a| a.fault.clone()).collect()
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Fires the first armed fault that matches and that `wanted` accepts; answers its kind and,
    /// for a timed fault, when it ends.
    pub fn take_fault(
        &self,
        mailbox: &str,
        operation: &str,
        wanted: impl Fn(&FaultKind) -> bool,
    ) -> Option<(FaultKind, Option<Instant>)> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.faults.retain(|a| !a.expired(now));
        let armed = inner
            .faults
            .iter_mut()
            .find(|a| wanted(&a.fault.kind) && a.matches(mailbox, operation))?;
        Some((armed.fire(), armed.silence_until()))
    }

    pub fn settings(&self) -> Settings {
        self.lock().settings.clone()
    }

    pub fn set_settings(&self, settings: Settings) {
        self.lock().settings = settings;
    }

    pub fn delete_mailbox(&self, email: &str) -> Result<(), ControlError> {
        let mut inner = self.lock();
        let k = key(email);
        inner
            .mailboxes
            .remove(&k)
            .ok_or_else(|| ControlError::NoSuchMailbox(email.to_owned()))?;
        inner.wake(Some(&k));
        inner.subscriptions.retain(|_, s| s.mailbox != k);
        Ok(())
    }

    /// Takes the queued events of these subscriptions: `(id, mailbox, events)` for each that
    /// has some, and the ids that no longer exist.
    pub fn drain(&self, ids: &[String]) -> (Vec<Drained>, Vec<String>) {
        let mut inner = self.lock();
        inner.expire();
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for id in ids {
            match inner.subscriptions.get_mut(id) {
                Some(sub) if !sub.queue.is_empty() => {
                    let events: Vec<_> = sub.queue.drain(..).collect();
                    out.push((id.clone(), sub.mailbox.clone(), events));
                }
                Some(_) => {}
                None => gone.push(id.clone()),
            }
        }
        (out, gone)
    }

    /// Counts drained events as written to a stream, or as dropped.
    pub fn count_events(&self, n: u64, dropped: bool) {
        let mut inner = self.lock();
        if dropped {
            inner.stats.events_dropped += n;
        } else {
            inner.stats.events_delivered += n;
        }
    }
}
