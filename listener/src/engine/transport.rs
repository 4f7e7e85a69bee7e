//! What a mailbox worker asks of the outside world, as traits: Exchange (subscribe, sync,
//! fetch, stream) and Creatio (post). The service's implementations speak HTTP
//! ([`EwsClient`], [`Delivery`]); the worker's unit tests script others, so its state machine
//! runs under paused time without a socket.
//!
//! Every call is a network round trip, so the methods return boxed futures and the worker holds
//! trait objects: the indirection costs nothing next to the call, and keeps the worker, the
//! supervisor and the service free of type parameters.

use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::creatio::contract::Credentials;
use crate::creatio::delivery::{Delivery, DeliveryError};
use crate::exchange::client::{EventStream, EwsClient, EwsFailure, Limits, Servers};
use crate::exchange::stream_groups::StreamGroups;

/// An answer from Exchange, later.
pub type Answer<'a, T> = BoxFuture<'a, Result<T, EwsFailure>>;

/// One per-item result of a GetItem.
pub type ItemResult = Result<ews::Message, ews::ResponseError>;

/// One mailbox's Exchange.
pub trait Exchange: Send + Sync {
    /// The endpoint, for logs (without credentials).
    fn url(&self) -> String;
    /// The folders the mailbox's mail is watched in: `asked` (Creatio's `FolderIds`), or
    /// every mail folder when it names none; the inbox as `inbox`.
    fn watched_folders<'a>(&'a self, asked: &'a [String]) -> Answer<'a, Vec<String>>;
    /// Subscribes to new mail in these folders; answers the subscription id.
    fn subscribe<'a>(&'a self, folders: &'a [String]) -> Answer<'a, String>;
    fn unsubscribe<'a>(&'a self, subscription_id: &'a str) -> Answer<'a, ()>;
    /// One result per id, in order.
    fn get_items<'a>(&'a self, ids: &'a [&'a str]) -> Answer<'a, Vec<ItemResult>>;
    /// One page of a folder's changes after `sync_state` (from the beginning when `None`).
    fn sync_folder<'a>(
        &'a self,
        folder: &'a str,
        sync_state: Option<&'a str>,
        max_changes: u16,
    ) -> Answer<'a, ews::SyncPage>;
    /// One page of a folder's items, newest first by received time, from `offset`.
    fn find_recent_items<'a>(
        &'a self,
        folder: &'a str,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, ews::FindPage>;
    /// One page of a folder's items received at or after `since_unix_ms`, oldest first, from
    /// `offset`.
    fn find_received_since<'a>(
        &'a self,
        folder: &'a str,
        since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, ews::FindPage>;
    /// Opens a streaming connection; answers once the server has accepted it.
    fn open_stream<'a>(
        &'a self,
        subscription_id: &'a str,
        timeout_minutes: u8,
    ) -> Answer<'a, Box<dyn Events>>;
    /// How far the server's clock is ahead of this process's, at most (its answers' `Date`);
    /// `None` until it said.
    fn clock_offset_ms(&self) -> Option<i64> {
        None
    }
    /// How much longer than a call `open_stream` may take: a shared stream first waits for
    /// its group to gather.
    fn open_allowance(&self) -> Duration {
        Duration::ZERO
    }
}

/// An open streaming connection.
pub trait Events: Send {
    /// The next message; `None` when the server ended the connection cleanly. It may wait for
    /// ever: the worker bounds the wait.
    fn next(&mut self) -> Answer<'_, Option<ews::StreamBatch>>;
}

/// Makes a mailbox's [`Exchange`] from its credentials.
pub trait Connect: Send + Sync + std::fmt::Debug {
    fn connect(&self, creds: &Credentials) -> Result<Box<dyn Exchange>, EwsFailure>;
}

/// Creatio's callbacks.
pub trait Creatio: Send + Sync + std::fmt::Debug {
    /// Posts one mail's callback, retried until accepted, rejected, out of time or cancelled.
    fn post<'a>(
        &'a self,
        url: &'a str,
        body: &'a Value,
        idempotency_key: Option<&'a str>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), DeliveryError>>;
    /// Posts a report once; its loss is harmless.
    fn report<'a>(&'a self, url: &'a str, body: &'a Value) -> BoxFuture<'a, ()>;
}

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
    fn connect(&self, creds: &Credentials) -> Result<Box<dyn Exchange>, EwsFailure> {
        if self.insecure {
            tracing::warn!(
                "Exchange's certificate is not checked for this mailbox (--ews-tls-insecure)"
            );
        }
        let client = EwsClient::new(self.http.clone(), creds, self.servers.clone(), self.limits)?;
        if client.impersonating().is_some() {
            return Ok(Box::new(Grouped {
                client,
                groups: self.groups.clone(),
            }));
        }
        Ok(Box::new(client))
    }
}

/// A mailbox a service account serves: its own calls, its group's stream.
struct Grouped {
    client: EwsClient,
    groups: StreamGroups,
}

impl Exchange for Grouped {
    fn url(&self) -> String {
        self.client.url()
    }

    fn watched_folders<'a>(&'a self, asked: &'a [String]) -> Answer<'a, Vec<String>> {
        self.client.watched_folders(asked).boxed()
    }

    fn subscribe<'a>(&'a self, folders: &'a [String]) -> Answer<'a, String> {
        self.client.subscribe(folders).boxed()
    }

    fn unsubscribe<'a>(&'a self, subscription_id: &'a str) -> Answer<'a, ()> {
        self.client.unsubscribe(subscription_id).boxed()
    }

    fn get_items<'a>(&'a self, ids: &'a [&'a str]) -> Answer<'a, Vec<ItemResult>> {
        self.client.get_items(ids).boxed()
    }

    fn sync_folder<'a>(
        &'a self,
        folder: &'a str,
        sync_state: Option<&'a str>,
        max_changes: u16,
    ) -> Answer<'a, ews::SyncPage> {
        self.client
            .sync_folder(folder, sync_state, max_changes)
            .boxed()
    }

    fn find_recent_items<'a>(
        &'a self,
        folder: &'a str,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, ews::FindPage> {
        self.client
            .find_recent_items(folder, offset, max_entries)
            .boxed()
    }

    fn find_received_since<'a>(
        &'a self,
        folder: &'a str,
        since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, ews::FindPage> {
        self.client
            .find_received_since(folder, since_unix_ms, offset, max_entries)
            .boxed()
    }

    fn open_stream<'a>(
        &'a self,
        subscription_id: &'a str,
        timeout_minutes: u8,
    ) -> Answer<'a, Box<dyn Events>> {
        async move {
            let events = self
                .groups
                .join(&self.client, subscription_id, timeout_minutes)
                .await?;
            Ok(Box::new(events) as Box<dyn Events>)
        }
        .boxed()
    }

    fn open_allowance(&self) -> Duration {
        crate::exchange::stream_groups::FORM_MAX
    }

    fn clock_offset_ms(&self) -> Option<i64> {
        self.client.clock_offset_ms()
    }
}

impl Exchange for EwsClient {
    fn url(&self) -> String {
        EwsClient::url(self)
    }

    fn watched_folders<'a>(&'a self, asked: &'a [String]) -> Answer<'a, Vec<String>> {
        EwsClient::watched_folders(self, asked).boxed()
    }

    fn subscribe<'a>(&'a self, folders: &'a [String]) -> Answer<'a, String> {
        EwsClient::subscribe(self, folders).boxed()
    }

    fn unsubscribe<'a>(&'a self, subscription_id: &'a str) -> Answer<'a, ()> {
        EwsClient::unsubscribe(self, subscription_id).boxed()
    }

    fn get_items<'a>(&'a self, ids: &'a [&'a str]) -> Answer<'a, Vec<ItemResult>> {
        EwsClient::get_items(self, ids).boxed()
    }

    fn sync_folder<'a>(
        &'a self,
        folder: &'a str,
        sync_state: Option<&'a str>,
        max_changes: u16,
    ) -> Answer<'a, ews::SyncPage> {
        EwsClient::sync_folder(self, folder, sync_state, max_changes).boxed()
    }

    fn find_recent_items<'a>(
        &'a self,
        folder: &'a str,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, ews::FindPage> {
        EwsClient::find_recent_items(self, folder, offset, max_entries).boxed()
    }

    fn find_received_since<'a>(
        &'a self,
        folder: &'a str,
        since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, ews::FindPage> {
        EwsClient::find_received_since(self, folder, since_unix_ms, offset, max_entries).boxed()
    }

    fn open_stream<'a>(
        &'a self,
        subscription_id: &'a str,
        timeout_minutes: u8,
    ) -> Answer<'a, Box<dyn Events>> {
        async move {
            let stream = EwsClient::open_stream(self, subscription_id, timeout_minutes).await?;
            Ok(Box::new(stream) as Box<dyn Events>)
        }
        .boxed()
    }

    fn clock_offset_ms(&self) -> Option<i64> {
        EwsClient::clock_offset_ms(self)
    }
}

impl Events for EventStream {
    fn next(&mut self) -> Answer<'_, Option<ews::StreamBatch>> {
        EventStream::next(self).boxed()
    }
}

impl Creatio for Delivery {
    fn post<'a>(
        &'a self,
        url: &'a str,
        body: &'a Value,
        idempotency_key: Option<&'a str>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Delivery::post(self, url, body, idempotency_key, cancel).boxed()
    }

    fn report<'a>(&'a self, url: &'a str, body: &'a Value) -> BoxFuture<'a, ()> {
        Delivery::post_once_quietly(self, url, body).boxed()
    }
}

/// Waits for `fut` at most `limit`; past it, the failure `late` names.
pub async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, EwsFailure>>,
    late: impl FnOnce() -> EwsFailure,
) -> Result<T, EwsFailure> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(late()))
}
