//! Shared streaming connections for the mailboxes a service account serves.
//!
//! Exchange caps the streaming connections an account holds open (10 by default on 2016 and
//! 2019), so a service account cannot keep one per mailbox. Its mailboxes' subscriptions are
//! grouped instead, as Microsoft describes for impersonation: by EWS server and by the mailbox
//! server Exchange named in the Subscribe's affinity cookie (only that server knows the
//! subscription), at most [`MAX_GROUP`] ids per GetStreamingEvents. Each connection acts as
//! its group's anchor, the first mailbox in address order, and carries the group's cookie, so
//! it reaches the right server and counts against the anchor's budget, not the account's.
//!
//! A mailbox worker still sees a stream of its own ([`GroupEvents`]): its notifications, the
//! connection's keep-alives, and errors naming its subscription or none. An error naming some
//! subscriptions reaches only their mailboxes; the connection goes on (or reopens at once)
//! with the others. A connection that fails is reported to every member, each of which then
//! catches up from its sync state and joins again, as after a lost stream of its own.
//!
//! New subscriptions gather for a moment before their connection opens ([`FORM_QUIET`],
//! at most [`FORM_MAX`]): a connection's ids are fixed while it is open, since closing it to
//! add one could lose events already on the wire. A connection Exchange ends (its
//! `ConnectionTimeout`) reopens at once, taking in subscriptions waiting for the same group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ews::response::{StreamBatch, SubscriptionError};
use futures_util::FutureExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ews_client::{EventStream, EwsClient, EwsFailure, Limits, Servers};
use crate::service_account::ServiceAccount;
use crate::transport::{Answer, Events, within};

/// Subscription ids per GetStreamingEvents: Exchange's limit, and Microsoft's group size.
pub const MAX_GROUP: usize = 200;

/// A forming group opens its connection once no subscription joined for this long...
pub const FORM_QUIET: Duration = Duration::from_millis(500);

/// ...or this long after its first one joined, whichever comes first.
pub const FORM_MAX: Duration = Duration::from_secs(5);

/// How often a connection looks for members that left.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// A connection that lasted less than this before Exchange ended it waits this long before
/// reopening, so a server that ends every connection at once is not called in a loop.
const SHORT_CONNECTION: Duration = Duration::from_secs(1);

/// What a member's stream yields.
type Message = Result<Option<StreamBatch>, EwsFailure>;

/// Which connection a subscription may share: same endpoint, same mailbox server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    url: String,
    /// The affinity cookie Exchange set on the subscription's Subscribe.
    affinity: Option<String>,
}

struct Member {
    subscription_id: String,
    mailbox: String,
    tx: mpsc::UnboundedSender<Message>,
}

impl Member {
    fn left(&self) -> bool {
        self.tx.is_closed()
    }

    fn tell(&self, message: Message) {
        // A member that left meanwhile is pruned later.
        let _ = self.tx.send(message);
    }
}

/// Subscriptions waiting for their connection.
struct Forming {
    members: Vec<Member>,
    since: Instant,
    last_join: Instant,
}

struct Shared {
    http: reqwest::Client,
    servers: Servers,
    limits: Limits,
    forming: Mutex<HashMap<GroupKey, Forming>>,
    /// Connections open now.
    open: prometheus::IntGauge,
}

/// The service accounts' shared streams.
#[derive(Clone)]
pub struct StreamGroups {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StreamGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGroups").finish_non_exhaustive()
    }
}

impl StreamGroups {
    /// `open` counts the connections open.
    pub fn new(
        http: reqwest::Client,
        servers: Servers,
        limits: Limits,
        open: prometheus::IntGauge,
    ) -> Self {
        StreamGroups {
            shared: Arc::new(Shared {
                http,
                servers,
                limits,
                forming: Mutex::default(),
                open,
            }),
        }
    }

    /// Puts the subscription a service account's `client` made into its group; answers once
    /// the group's connection is open (with its first message), or with why it did not open.
    pub async fn join(
        &self,
        client: &EwsClient,
        subscription_id: &str,
        timeout_minutes: u8,
    ) -> Result<GroupEvents, EwsFailure> {
        let url = client.endpoint().to_owned();
        let (Some(mailbox), Some(account)) = (
            client.impersonating(),
            self.shared.servers.account_for(&url),
        ) else {
            return Err(EwsFailure::Config(
                "a shared stream needs a mailbox served by a service account".into(),
            ));
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let key = GroupKey {
            url,
            affinity: client.affinity(),
        };
        let member = Member {
            subscription_id: subscription_id.to_owned(),
            mailbox: mailbox.to_ascii_lowercase(),
            tx,
        };
        self.shared
            .clone()
            .add(key, member, account, timeout_minutes);
        match rx.recv().await {
            Some(Ok(Some(first))) => Ok(GroupEvents {
                rx,
                first: Some(first),
            }),
            Some(Err(f)) => Err(f),
            Some(Ok(None)) | None => Err(EwsFailure::Transport(
                "the shared stream ended before it opened".into(),
            )),
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Forming>> {
        self.forming.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(
        self: Arc<Self>,
        key: GroupKey,
        member: Member,
        account: Arc<ServiceAccount>,
        timeout_minutes: u8,
    ) {
        let now = Instant::now();
        let mut forming = self.lock();
        let group = forming.entry(key.clone()).or_insert_with(|| {
            // The first to wait starts the group's clock.
            tokio::spawn(
                self.clone()
                    .form(key.clone(), account.clone(), timeout_minutes),
            );
            Forming {
                members: Vec::new(),
                since: now,
                last_join: now,
            }
        });
        group.members.push(member);
        group.last_join = now;
        if group.members.len() >= MAX_GROUP {
            let members = std::mem::take(&mut group.members);
            forming.remove(&key);
            drop(forming);
            tokio::spawn(self.connect(key, account, timeout_minutes, members));
        }
    }

    /// Opens a forming group's connection once it is quiet, or full, or old enough.
    async fn form(self: Arc<Self>, key: GroupKey, account: Arc<ServiceAccount>, minutes: u8) {
        loop {
            let due = {
                let mut forming = self.lock();
                let Some(group) = forming.get(&key) else {
                    // Taken whole (full, or by a reopening connection).
                    return;
                };
                let due = (group.last_join + FORM_QUIET).min(group.since + FORM_MAX);
                if Instant::now() >= due {
                    let members = forming.remove(&key).map(|g| g.members).unwrap_or_default();
                    drop(forming);
                    if !members.is_empty() {
                        tokio::spawn(self.clone().connect(key, account, minutes, members));
                    }
                    return;
                }
                due
            };
            tokio::time::sleep_until(due).await;
        }
    }

    /// Takes subscriptions waiting for `key` into a reopening connection, up to the limit.
    fn top_up(&self, key: &GroupKey, members: &mut Vec<Member>) {
        let mut forming = self.lock();
        let Some(group) = forming.get_mut(key) else {
            return;
        };
        group.members.retain(|m| !m.left());
        let room = MAX_GROUP.saturating_sub(members.len());
        let take = room.min(group.members.len());
        members.extend(group.members.drain(..take));
        if group.members.is_empty() {
            forming.remove(key);
        }
    }

    /// Keeps one group's connection open for as long as it has members.
    async fn connect(
        self: Arc<Self>,
        key: GroupKey,
        account: Arc<ServiceAccount>,
        minutes: u8,
        mut members: Vec<Member>,
    ) {
        // Kept while the anchor stays: an NTLM login holds for the connection, which a
        // reopened stream reuses.
        let mut kept: Option<EwsClient> = None;
        loop {
            members.retain(|m| !m.left());
            self.top_up(&key, &mut members);
            if members.is_empty() {
                return;
            }
            members.sort_by(|a, b| a.mailbox.cmp(&b.mailbox));
            let anchor = members[0].mailbox.clone();
            let client = match kept.take() {
                Some(client) if client.impersonating() == Some(anchor.as_str()) => client,
                _ => EwsClient::for_group(
                    self.http.clone(),
                    &key.url,
                    &account,
                    &anchor,
                    key.affinity.clone(),
                    self.servers.clone(),
                    self.limits,
                ),
            };
            let ids: Vec<&str> = members.iter().map(|m| m.subscription_id.as_str()).collect();
            let limit = self.limits.request_timeout;
            let opened = within(limit, client.open_stream_for(&ids, minutes), || {
                EwsFailure::Transport(format!(
                    "no answer to a shared GetStreamingEvents within {limit:?}"
                ))
            })
            .await;
            let mut stream = match opened {
                Ok(stream) => stream,
                Err(f) if refuses_anchor(&f) && members.len() > 1 => {
                    // About the mailbox the connection acted as, not the others: it leaves,
                    // and the group goes on under the next.
                    tracing::info!(error = %f, anchor = ?anchor, "Exchange refused to act as the shared stream's anchor; the next mailbox anchors it");
                    members.remove(0).tell(Err(f));
                    continue;
                }
                Err(f) => {
                    tracing::info!(error = %f, members = members.len(), anchor = ?anchor, "shared stream did not open");
                    tell_all(&members, &Err(f));
                    return;
                }
            };
            tracing::debug!(members = members.len(), anchor = ?anchor, "shared stream open");
            let opened_at = Instant::now();
            self.open.inc();
            let reopen = pump(&mut stream, &mut members).await;
            self.open.dec();
            if !reopen {
                return;
            }
            drop(stream);
            kept = Some(client);
            if opened_at.elapsed() < SHORT_CONNECTION {
                tokio::time::sleep(SHORT_CONNECTION).await;
            }
        }
    }
}

/// Errors a connection gets for the mailbox it acts as: that mailbox is gone, moving, or out
/// of the account's impersonation scope.
fn refuses_anchor(f: &EwsFailure) -> bool {
    matches!(
        f.code(),
        Some(
            "ErrorNonExistentMailbox"
                | "ErrorMailboxMoveInProgress"
                | "ErrorImpersonateUserDenied"
                | "ErrorImpersonationDenied"
        )
    )
}

/// Hands one connection's messages to its members until it ends: true when Exchange ended
/// it and it should reopen, false when it failed (every member was told) or has no member
/// left.
async fn pump(stream: &mut EventStream, members: &mut Vec<Member>) -> bool {
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.tick().await;
    loop {
        let message = tokio::select! {
            _ = prune.tick() => {
                members.retain(|m| !m.left());
                if members.is_empty() {
                    return false;
                }
                continue;
            }
            m = stream.next() => m,
        };
        let batch = match message {
            Ok(Some(batch)) => batch,
            // The body ended without a word: reopen, as after `Closed`.
            Ok(None) => return true,
            Err(f) => {
                tell_all(members, &Err(f));
                return false;
            }
        };
        if !route(batch.clone(), members) {
            return false;
        }
        if batch.closed() {
            return true;
        }
    }
}

/// Hands a message's parts to the members they concern; false when an error concerned them
/// all (each was told).
fn route(batch: StreamBatch, members: &mut Vec<Member>) -> bool {
    if batch.notifications.is_empty() && batch.errors.is_empty() {
        // A keep-alive, or the connection's first message: every member hears it.
        if !batch.closed() {
            tell_all(members, &Ok(Some(StreamBatch::default())));
        }
        return true;
    }
    for n in batch.notifications {
        if let Some(m) = members
            .iter()
            .find(|m| m.subscription_id == n.subscription_id)
        {
            m.tell(Ok(Some(StreamBatch {
                notifications: vec![n],
                ..StreamBatch::default()
            })));
        }
    }
    for err in batch.errors {
        if err.subscription_ids.is_empty() {
            tell_all(
                members,
                &Ok(Some(StreamBatch {
                    errors: vec![err],
                    ..StreamBatch::default()
                })),
            );
            return false;
        }
        for id in &err.subscription_ids {
            if let Some(i) = members.iter().position(|m| &m.subscription_id == id) {
                let m = members.remove(i);
                m.tell(Ok(Some(StreamBatch {
                    errors: vec![SubscriptionError {
                        error: err.error.clone(),
                        subscription_ids: vec![id.clone()],
                    }],
                    ..StreamBatch::default()
                })));
            }
        }
    }
    true
}

fn tell_all(members: &[Member], message: &Message) {
    for m in members {
        m.tell(message.clone());
    }
}

/// One mailbox's view of its group's connection.
#[derive(Debug)]
pub struct GroupEvents {
    rx: mpsc::UnboundedReceiver<Message>,
    first: Option<StreamBatch>,
}

impl Events for GroupEvents {
    fn next(&mut self) -> Answer<'_, Option<StreamBatch>> {
        async move {
            if let Some(first) = self.first.take() {
                return Ok(Some(first));
            }
            // The group let the mailbox go without a word: as a stream that ended.
            self.rx.recv().await.unwrap_or(Ok(None))
        }
        .boxed()
    }
}
