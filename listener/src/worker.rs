//! One task per mailbox: subscribe, stream, fetch each new item, hand it to Creatio.
//!
//! The worker is an explicit state machine (`Subscribing → Streaming → Backoff / Failed`)
//! whose state, last error and counters live in the [`Registry`], so any caller can see them.
//! A streaming connection that ends (`Closed`, end of body, idle watchdog) is reopened at once
//! with the same subscription when it had been healthy, and after a backoff otherwise; a lost
//! subscription is replaced; credentials the server rejects put the mailbox in `Failed`, which
//! is reported to Creatio and retried only slowly.

use std::sync::Arc;
use std::time::Duration;

use ews::ServerVersion;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::contract::{self, CallbackMode, Credentials};
use crate::delivery::{Delivery, DeliveryError};
use crate::ews_client::{Disposition, EwsClient, EwsFailure};
use crate::mail::{to_email, unix_now_ms};
use crate::registry::{Registry, WorkerState};

/// How workers behave; shared by all of them.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub server_version: ServerVersion,
    /// `ConnectionTimeout` asked of the server, in minutes (1..=30).
    pub connection_timeout_minutes: u8,
    /// Silence on a stream longer than this reopens it.
    pub idle_timeout: Duration,
    /// Timeout of every non-streaming EWS call.
    pub request_timeout: Duration,
    /// Backoff after transient EWS failures.
    pub retry: BackoffPolicy,
    /// Backoff while the mailbox is `Failed` (rejected credentials, wrong configuration).
    pub failed_retry: BackoffPolicy,
}

/// Changes asked for per SyncFolderItems page.
const SYNC_PAGE: u16 = 512;

/// Attempts to fetch announced items before the connection is given up.
const FETCH_ATTEMPTS: u32 = 5;

/// A connection that lived at least this long was healthy: when it ends, reopen at once.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(5);

/// What a worker needs from the rest of the service.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    pub registry: Registry,
    pub http: reqwest::Client,
    pub delivery: Delivery,
    pub settings: Arc<WorkerSettings>,
}

enum StreamEnd {
    Cancelled,
    /// The server ended the connection (Closed or end of body); the subscription lives.
    Ended,
    /// The subscription is gone.
    SubscriptionLost(EwsFailure),
}

enum Flow {
    Cancelled,
    Resubscribe,
    Failed(EwsFailure),
}

struct Worker {
    ctx: WorkerContext,
    creds: Credentials,
    mode: CallbackMode,
    cancel: CancellationToken,
    retry: Backoff,
    failed_retry: Backoff,
    /// Creatio was told this mailbox is unavailable and has not been told otherwise since.
    reported_unavailable: bool,
}

/// Runs a mailbox until `cancel` fires; on the way out it unsubscribes.
pub async fn run(ctx: WorkerContext, creds: Credentials, cancel: CancellationToken) {
    let mode = match contract::callback_mode(&creds.bpm_endpoint) {
        Ok(mode) => mode,
        Err(e) => {
            // The API validates this before a worker starts; keep the state truthful anyway.
            ctx.registry.update_status(&creds.id, |s| {
                s.state = WorkerState::Failed;
                s.last_error = Some(e.to_string());
            });
            return;
        }
    };
    let settings = ctx.settings.clone();
    let mut worker = Worker {
        retry: settings.retry.start(),
        failed_retry: settings.failed_retry.start(),
        ctx,
        creds,
        mode,
        cancel,
        reported_unavailable: false,
    };
    let span = tracing::info_span!("mailbox", id = %worker.creds.id);
    worker.run().instrument(span).await;
}

impl Worker {
    fn id(&self) -> &str {
        &self.creds.id
    }

    fn set_state(&self, state: WorkerState, error: Option<String>) {
        self.ctx.registry.update_status(self.id(), |s| {
            s.state = state;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// Sleeps unless cancelled first; false when cancelled.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn run(&mut self) {
        let client = match EwsClient::new(
            self.ctx.http.clone(),
            &self.creds,
            self.ctx.settings.server_version,
            self.ctx.settings.request_timeout,
        ) {
            Ok(c) => c,
            Err(f) => {
                // Nothing to retry until Creatio sends other credentials.
                self.report_failed(&f).await;
                self.cancel.cancelled().await;
                return;
            }
        };
        tracing::info!(url = client.url(), "mailbox worker started");
        loop {
            self.set_state(WorkerState::Subscribing, None);
            let subscribed = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                r = client.subscribe() => r,
            };
            let sub_id = match subscribed {
                Ok(id) => id,
                Err(f) => {
                    if self.pause(&f).await {
                        continue;
                    }
                    return;
                }
            };
            tracing::info!("subscribed");
            self.recovered().await;
            match self.stream_subscription(&client, &sub_id).await {
                Flow::Cancelled => {
                    self.unsubscribe(&client, &sub_id).await;
                    return;
                }
                Flow::Resubscribe => continue,
                Flow::Failed(f) => {
                    if !self.pause(&f).await {
                        return;
                    }
                }
            }
        }
    }

    /// Keeps one subscription streamed until it is lost, fails for good, or is cancelled.
    async fn stream_subscription(&mut self, client: &EwsClient, sub_id: &str) -> Flow {
        loop {
            self.set_state(WorkerState::Streaming, None);
            let opened = Instant::now();
            let end = match self.catch_up(client).await {
                Ok(true) => self.stream_once(client, sub_id).await,
                Ok(false) => Ok(StreamEnd::Cancelled),
                Err(f) => Err(f),
            };
            // How long the server asked us to wait before reconnecting, if it said.
            let server_asked = match end {
                Ok(StreamEnd::Cancelled) => return Flow::Cancelled,
                Ok(StreamEnd::SubscriptionLost(f)) => {
                    tracing::info!(error = %f, "subscription lost, subscribing again");
                    self.set_state(WorkerState::Subscribing, Some(f.to_string()));
                    return Flow::Resubscribe;
                }
                Ok(StreamEnd::Ended) => None,
                Err(f) => match f.disposition() {
                    Disposition::Resubscribe => {
                        self.set_state(WorkerState::Subscribing, Some(f.to_string()));
                        return Flow::Resubscribe;
                    }
                    Disposition::Fatal => return Flow::Failed(f),
                    Disposition::Retry { after } => {
                        tracing::info!(error = %f, "event stream interrupted");
                        self.set_state(WorkerState::Streaming, Some(f.to_string()));
                        after
                    }
                },
            };
            self.ctx
                .registry
                .update_status(self.id(), |s| s.reconnects += 1);
            let healthy = opened.elapsed() >= HEALTHY_CONNECTION;
            match server_asked {
                None if healthy => self.retry.reset(),
                after => {
                    let d = self.retry.next_delay_at_least(after);
                    self.set_state(WorkerState::Backoff, None);
                    if !self.sleep(d).await {
                        return Flow::Cancelled;
                    }
                }
            }
        }
    }

    /// Delivers what arrived while no stream was open, from the stored sync state. A
    /// mailbox's first sync only sets the baseline: its existing mail is not new. Runs before
    /// every connection; events that arrive meanwhile wait on the subscription. False when
    /// cancelled.
    async fn catch_up(&mut self, client: &EwsClient) -> Result<bool, EwsFailure> {
        self.set_state(WorkerState::CatchingUp, None);
        let mut state = self.ctx.registry.sync_state(self.id());
        let mut baseline = state.is_none();
        loop {
            let page = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(false),
                r = client.sync_inbox(state.as_deref(), SYNC_PAGE) => r,
            };
            let page = match page {
                Ok(page) => page,
                Err(f) if state.is_some() && f.code() == Some("ErrorInvalidSyncStateData") => {
                    // The server no longer knows our state; mail in the gap cannot be found
                    // without posting the whole inbox again, so start a new baseline.
                    tracing::warn!("sync state rejected by the server; starting a new baseline");
                    state = None;
                    baseline = true;
                    continue;
                }
                Err(f) => return Err(f),
            };
            if !baseline {
                let created: Vec<String> = page
                    .changes
                    .iter()
                    .filter_map(|c| match c {
                        ews::SyncChange::Create(id) => Some(id.id.clone()),
                        _ => None,
                    })
                    .collect();
                if !created.is_empty() {
                    tracing::info!(
                        items = created.len(),
                        "catching up on mail that arrived while not streaming"
                    );
                    if !self.deliver(client, created).await? {
                        return Ok(false);
                    }
                }
            }
            self.ctx
                .registry
                .set_sync_state(self.id(), &page.sync_state);
            if page.includes_last_item_in_range {
                return Ok(true);
            }
            state = Some(page.sync_state);
        }
    }

    /// One streaming connection, from open to end.
    async fn stream_once(
        &mut self,
        client: &EwsClient,
        sub_id: &str,
    ) -> Result<StreamEnd, EwsFailure> {
        let settings = self.ctx.settings.clone();
        let mut stream = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Ok(StreamEnd::Cancelled),
            s = client.open_stream(sub_id, settings.connection_timeout_minutes, settings.idle_timeout) => s?,
        };
        loop {
            let batch = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(StreamEnd::Cancelled),
                b = stream.next() => b?,
            };
            let Some(batch) = batch else {
                return Ok(StreamEnd::Ended);
            };
            let mut new_items: Vec<String> = Vec::new();
            for n in batch
                .notifications
                .iter()
                .filter(|n| n.subscription_id == sub_id)
            {
                for item in n.events.iter().filter_map(ews::Event::new_item) {
                    if !new_items.contains(&item.id) {
                        new_items.push(item.id.clone());
                    }
                }
            }
            if !new_items.is_empty() && !self.deliver(client, new_items).await? {
                return Ok(StreamEnd::Cancelled);
            }
            for err in &batch.errors {
                if err.subscription_ids.is_empty()
                    || err.subscription_ids.iter().any(|id| id == sub_id)
                {
                    let failure = EwsFailure::Ews(ews::EwsError::Response(err.error.clone()));
                    return match failure.disposition() {
                        Disposition::Resubscribe => Ok(StreamEnd::SubscriptionLost(failure)),
                        _ => Err(failure),
                    };
                }
            }
            if batch.closed() {
                return Ok(StreamEnd::Ended);
            }
        }
    }

    /// Hands new items to Creatio; false when cancelled on the way.
    async fn deliver(
        &mut self,
        client: &EwsClient,
        item_ids: Vec<String>,
    ) -> Result<bool, EwsFailure> {
        let fresh: Vec<String> = item_ids
            .into_iter()
            .filter(|id| self.ctx.registry.is_new(self.id(), id))
            .collect();
        if fresh.is_empty() {
            return Ok(true);
        }
        match self.mode {
            CallbackMode::NewEmail => {
                // Creatio fetches the items itself; one call announces them all.
                let body = contract::new_email_payload(&self.creds, &fresh, unix_now_ms());
                let key = format!("{}:{}", self.id(), fresh.join(","));
                Ok(self
                    .post(&self.creds.bpm_endpoint.clone(), &body, &key, &fresh)
                    .await)
            }
            CallbackMode::ProcessFullEmail => {
                let Some(fetched) = self.fetch(client, &fresh).await? else {
                    return Ok(false);
                };
                for (id, result) in fresh.iter().zip(fetched) {
                    match result {
                        Ok(msg) => {
                            let email = to_email(id, msg);
                            let body = contract::full_email_payload(
                                &self.creds,
                                std::slice::from_ref(&email),
                            );
                            let key = format!("{}:{}", self.id(), email.message_id);
                            if !self
                                .post(
                                    &self.creds.bpm_endpoint.clone(),
                                    &body,
                                    &key,
                                    std::slice::from_ref(id),
                                )
                                .await
                            {
                                return Ok(false);
                            }
                        }
                        Err(e) => {
                            // Deleted or moved before it could be read: nothing to deliver.
                            tracing::info!(item = %id, code = %e.code, "new item could not be fetched; skipped");
                        }
                    }
                }
                Ok(true)
            }
        }
    }

    /// Fetches announced items, retrying transient failures in place: the notification is
    /// already consumed, so giving up here would lose the mail. `None` when cancelled.
    async fn fetch(
        &mut self,
        client: &EwsClient,
        ids: &[String],
    ) -> Result<Option<Vec<Result<ews::Message, ews::ResponseError>>>, EwsFailure> {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut backoff = self.ctx.settings.retry.start();
        loop {
            let result = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(None),
                r = client.get_items(&refs) => r,
            };
            match result {
                Ok(items) => return Ok(Some(items)),
                Err(f) => match f.disposition() {
                    Disposition::Retry { after } if backoff.attempts() + 1 < FETCH_ATTEMPTS => {
                        let delay = backoff.next_delay_at_least(after);
                        tracing::info!(error = %f, retry_in_ms = delay.as_millis() as u64, "fetching new items failed");
                        if !self.sleep(delay).await {
                            return Ok(None);
                        }
                    }
                    _ => return Err(f),
                },
            }
        }
    }

    /// Posts one callback and records the items as delivered or dead-lettered; false when
    /// cancelled before it got through.
    async fn post(&self, url: &str, body: &serde_json::Value, key: &str, items: &[String]) -> bool {
        let outcome = self
            .ctx
            .delivery
            .post(url, body, Some(key), &self.cancel)
            .await;
        let dead_letter = match outcome {
            Ok(()) => false,
            Err(DeliveryError::Cancelled) => return false,
            Err(e) => {
                tracing::error!(items = items.len(), error = %e, "delivery to Creatio failed; mail dead-lettered");
                self.set_state(WorkerState::Streaming, Some(e.to_string()));
                true
            }
        };
        for item in items {
            self.ctx
                .registry
                .mark_delivered(self.id(), item, dead_letter);
        }
        if !dead_letter {
            tracing::debug!(items = items.len(), "delivered to Creatio");
        }
        true
    }

    /// Waits after a failure as its disposition says; false when cancelled meanwhile.
    async fn pause(&mut self, f: &EwsFailure) -> bool {
        let delay = match f.disposition() {
            Disposition::Fatal => {
                self.report_failed(f).await;
                self.failed_retry.next_delay()
            }
            Disposition::Retry { after } => {
                self.set_state(WorkerState::Backoff, Some(f.to_string()));
                self.retry.next_delay_at_least(after)
            }
            Disposition::Resubscribe => {
                self.set_state(WorkerState::Backoff, Some(f.to_string()));
                self.retry.next_delay()
            }
        };
        tracing::warn!(error = %f, retry_in_ms = delay.as_millis() as u64, "EWS call failed");
        self.sleep(delay).await
    }

    /// Marks the mailbox failed and tells Creatio, once per failure episode.
    async fn report_failed(&mut self, f: &EwsFailure) {
        self.set_state(WorkerState::Failed, Some(f.to_string()));
        if !self.reported_unavailable {
            self.reported_unavailable = true;
            tracing::warn!(error = %f, "mailbox unavailable; reporting to Creatio");
            let body = contract::mailbox_state_payload(
                &self.creds,
                false,
                Some((f.class_name(), &f.to_string())),
            );
            let url = contract::sibling_url(&self.creds.bpm_endpoint, "ProcessMailboxState");
            self.ctx.delivery.post_once_quietly(&url, &body).await;
        }
    }

    /// After a successful subscribe: reset backoffs, and tell Creatio if it was told otherwise.
    async fn recovered(&mut self) {
        self.retry.reset();
        self.failed_retry.reset();
        if self.reported_unavailable {
            self.reported_unavailable = false;
            let body = contract::mailbox_state_payload(&self.creds, true, None);
            let url = contract::sibling_url(&self.creds.bpm_endpoint, "ProcessMailboxState");
            self.ctx.delivery.post_once_quietly(&url, &body).await;
        }
    }

    async fn unsubscribe(&self, client: &EwsClient, sub_id: &str) {
        match client.unsubscribe(sub_id).await {
            Ok(()) => tracing::info!("unsubscribed"),
            Err(e) => {
                tracing::info!(error = %e, "unsubscribe failed; the server will expire the subscription")
            }
        }
    }
}
