//! Exchange over EWS: the per-mailbox [`client`], NTLM logins ([`ntlm`]), service accounts
//! that impersonate mailboxes ([`service_account`]) and the streams they share
//! ([`stream_groups`]).

pub mod client;
pub mod ntlm;
pub mod service_account;
pub mod stream_groups;

use std::time::Duration;

use ews::response::StreamBatch;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;

use crate::creatio::contract::Credentials;
use crate::creatio::contract::send::OutgoingEmail;
use crate::creatio::mail::to_email;
use crate::engine::protocol::{
    Answer, Connect, FindPage, Folder, Found, Item, MailServer, SyncPage, Watch, WatchBatch,
};
use client::{EventStream, EwsClient, EwsFailure, ItemFate, Limits, Servers, item_fate};
use stream_groups::{GroupEvents, StreamGroups};

/// EWS over HTTP, one [`EwsClient`] per mailbox; a mailbox a service account serves shares
/// its group's streaming connection.
#[derive(Debug, Clone)]
pub struct HttpExchange {
    pub http: reqwest::Client,
    /// Exchange's certificates go unchecked (`--ews-tls-insecure`): said on every connect.
    pub insecure: bool,
    /// The request version each Exchange server takes, and its service account.
    pub servers: Servers,
    pub limits: Limits,
    pub groups: StreamGroups,
}

impl Connect for HttpExchange {
    fn connect(
        &self,
        creds: &Credentials,
    ) -> Result<Box<dyn MailServer>, crate::engine::protocol::Failure> {
        if self.insecure {
            tracing::warn!(
                "Exchange's certificate is not checked for this mailbox (--ews-tls-insecure)"
            );
        }
        let client = EwsClient::new(self.http.clone(), creds, self.servers.clone(), self.limits)?;
        let groups = client.impersonating().map(|_| self.groups.clone());
        Ok(Box::new(Mailbox { client, groups }))
    }

    fn address(&self, creds: &Credentials) -> Option<String> {
        client::ews_url(creds.service_url.as_deref(), creds.use_ssl).ok()
    }
}

/// One mailbox on Exchange: its own calls, and its own stream or, when a service account
/// serves it, its group's.
#[derive(Debug)]
pub struct Mailbox {
    client: EwsClient,
    groups: Option<StreamGroups>,
}

impl Mailbox {
    pub fn new(client: EwsClient) -> Mailbox {
        Mailbox {
            client,
            groups: None,
        }
    }
}

/// Raw streaming messages, from a connection of the mailbox's own or its group's.
trait Envelopes: Send {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<StreamBatch>, EwsFailure>>;
}

impl Envelopes for EventStream {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<StreamBatch>, EwsFailure>> {
        EventStream::next(self).boxed()
    }
}

impl Envelopes for GroupEvents {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<StreamBatch>, EwsFailure>> {
        GroupEvents::next(self).boxed()
    }
}

/// A subscription's view of a stream: what concerns it, in the engine's terms.
struct SubscriptionWatch<E> {
    envelopes: E,
    subscription: String,
}

impl<E: Envelopes> Watch for SubscriptionWatch<E> {
    fn next(&mut self) -> Answer<'_, Option<WatchBatch>> {
        async move {
            let batch = self.envelopes.next_batch().await?;
            Ok(batch.map(|b| watch_batch(&b, &self.subscription)))
        }
        .boxed()
    }
}

/// What a streaming message says about one subscription: its new items (each once), whether
/// a folder was created, moved or deleted, an error naming it (or no subscription), and
/// whether the server closes the connection.
fn watch_batch(batch: &StreamBatch, subscription: &str) -> WatchBatch {
    let mine = || {
        batch
            .notifications
            .iter()
            .filter(move |n| n.subscription_id == subscription)
            .flat_map(|n| &n.events)
    };
    let mut new_items: Vec<String> = Vec::new();
    for item in mine().filter_map(ews::Event::new_item) {
        if !new_items.contains(&item.id) {
            new_items.push(item.id.clone());
        }
    }
    let folders_changed = mine().any(|e| {
        matches!(e.target, Some(ews::EventTarget::Folder(_)))
            && matches!(
                e.kind,
                ews::EventKind::Created
                    | ews::EventKind::Deleted
                    | ews::EventKind::Moved
                    | ews::EventKind::Copied
            )
    });
    let failure = batch
        .errors
        .iter()
        .find(|err| {
            err.subscription_ids.is_empty()
                || err.subscription_ids.iter().any(|id| id == subscription)
        })
        .map(|err| EwsFailure::Ews(ews::EwsError::Response(err.error.clone())).into());
    WatchBatch {
        new_items,
        folders_changed,
        failure,
        closed: batch.closed(),
    }
}

fn sync_page(page: ews::SyncPage) -> SyncPage {
    SyncPage {
        state: page.sync_state,
        complete: page.includes_last_item_in_range,
        added: page
            .changes
            .into_iter()
            .filter_map(|c| match c {
                ews::SyncChange::Create(id) => Some(id.id),
                _ => None,
            })
            .collect(),
    }
}

fn find_page(page: ews::FindPage) -> FindPage {
    FindPage {
        items: page
            .items
            .into_iter()
            .map(|i| Found {
                received_unix_ms: i
                    .date_time_received
                    .as_deref()
                    .and_then(crate::creatio::mail::parse_xs_datetime),
                id: i.id.id,
            })
            .collect(),
        next_offset: page.next_offset,
        complete: page.includes_last_item_in_range,
        total: page.total_items_in_view,
    }
}

impl MailServer for Mailbox {
    fn url(&self) -> String {
        self.client.url()
    }

    fn validate(&self) -> Answer<'_, ()> {
        async move {
            self.client.get_inbox().await?;
            Ok(())
        }
        .boxed()
    }

    fn folders(&self) -> Answer<'_, Vec<Folder>> {
        async move {
            let found = self.client.find_folders().await?;
            Ok(found
                .into_iter()
                .map(|f| Folder {
                    id: f.id,
                    name: f.display_name,
                    parent_id: f.parent_id,
                    class: f.folder_class,
                })
                .collect())
        }
        .boxed()
    }

    fn watched_folders<'a>(&'a self, asked: &'a [String]) -> Answer<'a, Vec<String>> {
        async move { Ok(self.client.watched_folders(asked).await?) }.boxed()
    }

    fn subscribe<'a>(&'a self, folders: &'a [String]) -> Answer<'a, String> {
        async move { Ok(self.client.subscribe(folders).await?) }.boxed()
    }

    fn unsubscribe<'a>(&'a self, subscription_id: &'a str) -> Answer<'a, ()> {
        async move { Ok(self.client.unsubscribe(subscription_id).await?) }.boxed()
    }

    fn open_watch<'a>(
        &'a self,
        subscription_id: &'a str,
        timeout_minutes: u8,
    ) -> Answer<'a, Box<dyn Watch>> {
        async move {
            let subscription = subscription_id.to_owned();
            Ok(match &self.groups {
                Some(groups) => Box::new(SubscriptionWatch {
                    envelopes: groups
                        .join(&self.client, subscription_id, timeout_minutes)
                        .await?,
                    subscription,
                }) as Box<dyn Watch>,
                None => Box::new(SubscriptionWatch {
                    envelopes: self
                        .client
                        .open_stream(subscription_id, timeout_minutes)
                        .await?,
                    subscription,
                }),
            })
        }
        .boxed()
    }

    fn open_allowance(&self) -> Duration {
        match self.groups {
            Some(_) => stream_groups::FORM_MAX,
            None => Duration::ZERO,
        }
    }

    fn clock_offset_ms(&self) -> Option<i64> {
        self.client.clock_offset_ms()
    }

    fn sync_folder<'a>(
        &'a self,
        folder: &'a str,
        state: Option<&'a str>,
        max_changes: u16,
    ) -> Answer<'a, SyncPage> {
        async move {
            let page = self.client.sync_folder(folder, state, max_changes).await?;
            Ok(sync_page(page))
        }
        .boxed()
    }

    fn find_recent_items<'a>(
        &'a self,
        folder: &'a str,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage> {
        async move {
            let page = self
                .client
                .find_recent_items(folder, offset, max_entries)
                .await?;
            Ok(find_page(page))
        }
        .boxed()
    }

    fn find_received_since<'a>(
        &'a self,
        folder: &'a str,
        since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage> {
        async move {
            let page = self
                .client
                .find_received_since(folder, since_unix_ms, offset, max_entries)
                .await?;
            Ok(find_page(page))
        }
        .boxed()
    }

    fn find_by_message_id<'a>(
        &'a self,
        folder: &'a str,
        message_id: &'a str,
    ) -> Answer<'a, Vec<String>> {
        async move { Ok(self.client.find_by_message_id(folder, message_id).await?) }.boxed()
    }

    fn get_items<'a>(
        &'a self,
        ids: &'a [&'a str],
    ) -> Answer<'a, Vec<Result<Item, crate::engine::protocol::Failure>>> {
        async move {
            let results = self.client.get_items(ids).await?;
            Ok(ids
                .iter()
                .zip(results)
                .map(|(id, result)| match result {
                    Ok(msg) => Ok(Item::Mail(Box::new(to_email(id, msg)))),
                    Err(e) => match item_fate(&e.code) {
                        ItemFate::Gone => Ok(Item::Gone),
                        ItemFate::Dead => Ok(Item::Dead(format!(
                            "Exchange would not give the item: {}",
                            e.code
                        ))),
                        ItemFate::Retry => Err(EwsFailure::Ews(ews::EwsError::Response(e)).into()),
                    },
                })
                .collect())
        }
        .boxed()
    }

    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> Answer<'a, ()> {
        async move { Ok(self.client.send_mail(email).await?) }.boxed()
    }

    fn was_sent<'a>(&'a self, message_id: &'a str) -> Answer<'a, bool> {
        async move { Ok(self.client.was_sent(message_id).await?) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use ews::{Event, EventKind, EventTarget, ItemId, Notification, SubscriptionError};

    use super::*;
    use crate::engine::protocol::Disposition;

    fn event(kind: EventKind, target: EventTarget) -> Event {
        Event {
            kind,
            timestamp: None,
            target: Some(target),
            parent_folder_id: None,
        }
    }

    fn item(id: &str) -> EventTarget {
        EventTarget::Item(ItemId {
            id: id.into(),
            change_key: None,
        })
    }

    fn error(code: &str, subscriptions: &[&str]) -> SubscriptionError {
        SubscriptionError {
            error: ews::ResponseError {
                code: code.into(),
                message: String::new(),
                back_off: None,
            },
            subscription_ids: subscriptions.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_subscription_reads_its_own_news_from_a_shared_message() {
        let batch = StreamBatch {
            notifications: vec![
                Notification {
                    subscription_id: "mine".into(),
                    events: vec![
                        event(EventKind::Created, item("a")),
                        event(EventKind::NewMail, item("a")),
                        event(EventKind::Modified, item("b")),
                        event(EventKind::NewMail, item("c")),
                    ],
                },
                Notification {
                    subscription_id: "theirs".into(),
                    events: vec![
                        event(EventKind::NewMail, item("x")),
                        event(EventKind::Created, EventTarget::Folder("f".into())),
                    ],
                },
            ],
            errors: vec![error("ErrorSubscriptionNotFound", &["theirs"])],
            status: None,
        };
        let mine = watch_batch(&batch, "mine");
        assert_eq!(mine.new_items, ["a", "c"], "each new item once, in order");
        assert!(!mine.folders_changed, "another subscription's folder");
        assert!(
            mine.failure.is_none(),
            "an error naming another subscription"
        );
        assert!(!mine.closed);

        let theirs = watch_batch(&batch, "theirs");
        assert_eq!(theirs.new_items, ["x"]);
        assert!(theirs.folders_changed);
        assert_eq!(
            theirs.failure.map(|f| f.disposition()),
            Some(Disposition::Resubscribe)
        );
    }

    #[test]
    fn an_error_naming_no_subscription_concerns_all_and_closed_ends_the_connection() {
        let batch = StreamBatch {
            notifications: Vec::new(),
            errors: vec![error("ErrorServerBusy", &[])],
            status: Some(ews::ConnectionStatus::Closed),
        };
        let got = watch_batch(&batch, "any");
        assert!(matches!(
            got.failure.map(|f| f.disposition()),
            Some(Disposition::Retry { .. })
        ));
        assert!(got.closed);
        for kind in [EventKind::Deleted, EventKind::Moved, EventKind::Copied] {
            let moved = StreamBatch {
                notifications: vec![Notification {
                    subscription_id: "any".into(),
                    events: vec![event(kind, EventTarget::Folder("f".into()))],
                }],
                ..StreamBatch::default()
            };
            assert!(watch_batch(&moved, "any").folders_changed);
        }
    }
}
