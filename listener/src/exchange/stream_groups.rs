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
//! Notifications are routed by subscription, whichever connection they come on: a mailbox
//! that left a connection Exchange keeps open (to catch up after `ErrorMissedNotificationEvents`,
//! say) leaves its subscription on it until it ends, and what is announced there meanwhile
//! reaches the mailbox where it joined again, or is held for it until it does.
//!
//! New subscriptions gather for a moment before their connection opens ([`FORM_QUIET`],
//! at most [`FORM_MAX`]): a connection's ids are fixed while it is open, since closing it to
//! add one could lose events already on the wire. A connection Exchange ends (its
//! `ConnectionTimeout`) reopens at once, taking in subscriptions waiting for the same group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ews::response::{Notification, StreamBatch, SubscriptionError};
use tokio::time::Instant;

use crate::engine::protocol::within;
use crate::exchange::client::{EventStream, EwsClient, EwsFailure, Limits, Servers};
use crate::exchange::service_account::ServiceAccount;

mod inbox;

use inbox::{Receiver, Sender, inbox};

/// Subscription ids per GetStreamingEvents: Exchange's limit, and Microsoft's group size.
pub const MAX_GROUP: usize = 200;

/// A forming group opens its connection once no subscription joined for this long...
pub const FORM_QUIET: Duration = Duration::from_millis(500);

/// ...or this long after its first one joined, whichever comes first.
pub const FORM_MAX: Duration = Duration::from_secs(5);

/// How often a connection looks for members that left.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// How long notifications for a subscription whose mailbox left its connection are held for
/// it to join again (it catches up first) before they are dropped: a subscription replaced
/// in the meantime is caught up on anyway.
const HOLD_FOR: Duration = Duration::from_secs(600);

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
    tx: Sender<Message>,
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

/// Where a subscription's notifications go. A connection Exchange keeps open carries the
/// subscriptions it was opened with until it ends, also those whose mailbox left it (after an
/// error such as `ErrorMissedNotificationEvents`, to catch up and join again): their
/// notifications are held until the mailbox is back, never dropped on the floor.
enum Route {
    To(Sender<Message>),
    Held {
        notifications: Vec<Notification>,
        since: Instant,
    },
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
    /// By subscription id, over every connection.
    routes: Mutex<HashMap<String, Route>>,
    /// When the routes were last swept for mailboxes that left.
    swept: Mutex<Instant>,
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
                routes: Mutex::default(),
                swept: Mutex::new(Instant::now()),
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
        let (Some(mailbox), Some(account)) = (client.impersonating(), client.service_account())
        else {
            return Err(EwsFailure::Config(
                "a shared stream needs a mailbox served by a service account".into(),
            ));
        };
        let (tx, mut rx) = inbox();
        let key = GroupKey {
            url,
            affinity: client.affinity(),
        };
        self.shared.route_to(subscription_id, &tx);
        let member = Member {
            subscription_id: subscription_id.to_owned(),
            mailbox: mailbox.to_ascii_lowercase(),
            tx,
        };
        self.shared
            .clone()
            .add(key, member, account.clone(), timeout_minutes);
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

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subscription's notifications go to `tx` from now on; what was held for it first.
    fn route_to(&self, subscription_id: &str, tx: &Sender<Message>) {
        let mut routes = self.routes();
        let old = routes.insert(subscription_id.to_owned(), Route::To(tx.clone()));
        if let Some(Route::Held { notifications, .. }) = old
            && !notifications.is_empty()
        {
            let _ = tx.send(Ok(Some(StreamBatch {
                notifications,
                ..StreamBatch::default()
            })));
        }
    }

    /// Hands a notification to its subscription's mailbox, or holds it while the mailbox is
    /// away; one for a subscription never routed here is dropped.
    fn deliver(&self, n: Notification) {
        let mut routes = self.routes();
        let Some(route) = routes.get_mut(&n.subscription_id) else {
            return;
        };
        let batch = StreamBatch {
            notifications: vec![n],
            ..StreamBatch::default()
        };
        let notifications = match route {
            Route::To(tx) => match tx.send(Ok(Some(batch))) {
                Ok(()) => return,
                // The mailbox left: hold what it did not take.
                Err(message) => message
                    .ok()
                    .flatten()
                    .map(|b| b.notifications)
                    .unwrap_or_default(),
            },
            Route::Held { notifications, .. } => {
                notifications.extend(batch.notifications);
                return;
            }
        };
        *route = Route::Held {
            notifications,
            since: Instant::now(),
        };
    }

    /// Starts the clock on routes whose mailbox left, and forgets them (with what was held)
    /// once they were away too long: a connection may still carry their subscription.
    fn expire_held(&self) {
        let now = Instant::now();
        {
            // Every connection asks; once a second is enough.
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(*swept) < PRUNE_EVERY {
                return;
            }
            *swept = now;
        }
        let mut routes = self.routes();
        for route in routes.values_mut() {
            if matches!(route, Route::To(tx) if tx.is_closed()) {
                *route = Route::Held {
                    notifications: Vec::new(),
                    since: now,
                };
            }
        }
        routes.retain(|_, r| match r {
            Route::Held { since, .. } => now.duration_since(*since) < HOLD_FOR,
            Route::To(_) => true,
        });
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
        // Anchors under which the connection failed to open: the next open acts as another.
        let mut avoided: Vec<String> = Vec::new();
        loop {
            members.retain(|m| !m.left());
            self.top_up(&key, &mut members);
            if members.is_empty() {
                return;
            }
            members.sort_by(|a, b| a.mailbox.cmp(&b.mailbox));
            let anchor = members
                .iter()
                .find(|m| !avoided.contains(&m.mailbox))
                .unwrap_or(&members[0])
                .mailbox
                .clone();
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
                    if let Some(at) = members.iter().position(|m| m.mailbox == anchor) {
                        members.remove(at).tell(Err(f));
                    }
                    continue;
                }
                Err(f)
                    if may_be_the_anchors(&f)
                        && avoided.len() + 1 < members.len().min(ANCHOR_TRIES) =>
                {
                    // The anchor's database or its server may be the one in trouble (the
                    // request is routed to it): another member anchors the next try.
                    tracing::info!(error = %f, anchor = ?anchor, "shared stream did not open; the next mailbox anchors it");
                    avoided.push(anchor);
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
            let reopen = self.pump(&mut stream, &mut members).await;
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

/// Anchors a connection tries before its members are told it failed.
const ANCHOR_TRIES: usize = 3;

/// Failures that may concern only the mailbox a connection acts as (its database, the server
/// the request is routed to, its throttling budget), not the account or the configuration.
fn may_be_the_anchors(f: &EwsFailure) -> bool {
    matches!(
        f,
        EwsFailure::Transport(_)
            | EwsFailure::Http { .. }
            | EwsFailure::Ews(_)
            | EwsFailure::Idle(_)
    )
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

impl Shared {
    /// Hands one connection's messages to its members until it ends: true when Exchange
    /// ended it and it should reopen, false when it failed (every member was told) or has no
    /// member left.
    async fn pump(&self, stream: &mut EventStream, members: &mut Vec<Member>) -> bool {
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.tick().await;
        loop {
            let message = tokio::select! {
                _ = prune.tick() => {
                    members.retain(|m| !m.left());
                    self.expire_held();
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
            let closed = batch.closed();
            if !self.route(batch, members) {
                return false;
            }
            if closed {
                return true;
            }
        }
    }

    /// Hands a message's parts to the mailboxes they concern; false when an error concerned
    /// every member of the connection (each was told).
    fn route(&self, batch: StreamBatch, members: &mut Vec<Member>) -> bool {
        if batch.notifications.is_empty() && batch.errors.is_empty() {
            // A keep-alive, or the connection's first message: every member hears it.
            if !batch.closed() {
                tell_all(members, &Ok(Some(StreamBatch::default())));
            }
            return true;
        }
        for n in batch.notifications {
            self.deliver(n);
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
}

fn tell_all(members: &[Member], message: &Message) {
    for m in members {
        m.tell(message.clone());
    }
}

/// One mailbox's view of its group's connection.
#[derive(Debug)]
pub struct GroupEvents {
    rx: Receiver<Message>,
    first: Option<StreamBatch>,
}

impl GroupEvents {
    /// The next message for this mailbox; `None` when its connection ended.
    pub async fn next(&mut self) -> Result<Option<StreamBatch>, EwsFailure> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        // The group let the mailbox go without a word: as a stream that ended.
        self.rx.recv().await.unwrap_or(Ok(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EwsAuth;

    fn groups() -> StreamGroups {
        let http = reqwest::Client::new();
        let factory: crate::exchange::client::ClientFactory = Arc::new(move || http.clone());
        StreamGroups::new(
            reqwest::Client::new(),
            Servers::new(ews::ServerVersion::Exchange2013Sp1, EwsAuth::Auto, factory),
            Limits {
                request_timeout: Duration::from_secs(1),
                max_body_bytes: 1024,
            },
            prometheus::IntGauge::new("open", "open").unwrap(),
        )
    }

    fn note(sub: &str) -> Notification {
        Notification {
            subscription_id: sub.into(),
            events: Vec::new(),
        }
    }

    fn received(rx: &mut Receiver<Message>) -> Vec<String> {
        let mut subs = Vec::new();
        while let Some(Ok(Some(batch))) = rx.try_recv() {
            subs.extend(batch.notifications.into_iter().map(|n| n.subscription_id));
        }
        subs
    }

    #[test]
    fn notifications_for_a_mailbox_away_are_held_until_it_is_back() {
        let shared = groups().shared;
        let (first, mut here) = inbox();
        shared.route_to("s1", &first);
        shared.deliver(note("s1"));
        assert_eq!(received(&mut here), ["s1"]);

        // The mailbox left to catch up: what its connection still announces waits for it.
        drop(here);
        shared.deliver(note("s1"));
        shared.deliver(note("s1"));
        // Nobody ever routed this one: dropped, and nothing breaks.
        shared.deliver(note("s2"));

        let (again, mut back) = inbox();
        shared.route_to("s1", &again);
        assert_eq!(received(&mut back), ["s1", "s1"]);
        shared.deliver(note("s1"));
        assert_eq!(received(&mut back), ["s1"]);
    }
}
