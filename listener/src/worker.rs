//! One task per mailbox: subscribe, stream, fetch each new item, hand it to Creatio.
//!
//! The worker is an explicit state machine (`Queued → Subscribing → CatchingUp → Streaming`,
//! with `Backoff` and `Failed` on the way) whose transitions are the only writers of its
//! state in the [`Registry`], so any caller sees the truth. A streaming connection that ends
//! (`Closed`, end of body, idle watchdog) is reopened at once with the same subscription when
//! it had been healthy, and after a backoff otherwise; a lost subscription is replaced;
//! credentials the server rejects put the mailbox in `Failed`, which is reported to Creatio and
//! retried only slowly. Before every connection it catches up from the stored sync state,
//! and the cursor only moves past items that were delivered, skipped as gone, or
//! dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::backoff::{Backoff, BackoffPolicy};
use crate::contract::{self, CallbackMode, Credentials, ServerType};
use crate::coordinator::Leases;
use crate::delivery::{DeliveryError, idempotency_key};
use crate::ews_client::{Disposition, EwsFailure, ItemFate, Limits, item_fate};
use crate::gate::Gate;
use crate::mail::{parse_xs_datetime, to_email, unix_now_ms};
use crate::metrics::Metrics;
use crate::store::{
    Counter, DeadLetter, Fence, Outcome, Store, StoreError, SyncCursor, SyncPhase, WorkerState,
};
use crate::transport::{Connect, Creatio, Events, Exchange, within};

/// How workers behave; shared by all of them.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// `ConnectionTimeout` asked of the server, in minutes (1..=30).
    pub connection_timeout_minutes: u8,
    /// Silence on a stream longer than this reopens it.
    pub idle_timeout: Duration,
    /// Bounds every call; a stream's response head and its first envelope must arrive within
    /// `request_timeout` too.
    pub limits: Limits,
    /// Backoff after transient EWS failures.
    pub retry: BackoffPolicy,
    /// Backoff while the mailbox is `Failed` (rejected credentials, wrong configuration).
    pub failed_retry: BackoffPolicy,
}

/// Changes asked for per SyncFolderItems page (ids only, so a page is small).
const SYNC_PAGE: u16 = 512;

/// Items listed per FindItem page when recovering a gap (ids and times only).
const FIND_PAGE: u16 = 200;

/// The most items one gap recovery delivers: the newest, when more arrived.
const MAX_GAP_ITEMS: usize = 10_000;

/// How far before the last sync a gap recovery looks: covers the difference between the
/// listener's clock and Exchange's when Exchange never said its time. What it finds twice is
/// filtered as already delivered.
const GAP_MARGIN_MS: i64 = 5 * 60 * 1000;

/// Exchange gives received times in whole seconds: a mail received just after a moment may
/// carry a time up to a second before it.
const RECEIVED_ROUNDING_MS: i64 = 1000;

/// Items asked for per GetItem: a batch of full mails is read whole, so it stays small.
pub const FETCH_BATCH: usize = 16;

/// Attempts to fetch announced items before the connection is given up.
const FETCH_ATTEMPTS: u32 = 5;

/// A connection that streamed at least this long from its first message was healthy: when it
/// ends, reopen at once.
const HEALTHY_CONNECTION: Duration = Duration::from_secs(5);

/// What a worker needs from the rest of the service.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    pub store: Arc<dyn Store>,
    /// The leases this replica holds.
    pub leases: Arc<Leases>,
    pub metrics: Metrics,
    /// Makes each mailbox's Exchange client.
    pub exchange: Arc<dyn Connect>,
    pub creatio: Arc<dyn Creatio>,
    pub settings: Arc<WorkerSettings>,
    pub gate: Arc<Gate>,
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

/// What one fetched item turned out to be.
enum Fetched {
    Mail(Box<ews::Message>),
    /// Deleted or moved before it could be read.
    Gone,
    /// Exchange will not give it; the reason is kept with the dead letter.
    Dead(String),
}

struct Worker {
    ctx: WorkerContext,
    exchange: Box<dyn Exchange>,
    creds: Credentials,
    /// The lease this worker runs under; every write carries it.
    fence: Fence,
    mode: CallbackMode,
    cancel: CancellationToken,
    retry: Backoff,
    failed_retry: Backoff,
    /// Creatio was told this mailbox is unavailable and has not been told otherwise since.
    reported_unavailable: bool,
    /// When the current connection's first message came.
    streaming_since: Option<Instant>,
    /// Creatio was asked for a new access token since the last success.
    token_refresh_asked: bool,
    /// The state this worker counts itself in, in the metrics.
    counted_as: std::sync::Mutex<Option<WorkerState>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let counted = self.counted_as.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = *counted {
            self.ctx
                .metrics
                .mailboxes
                .with_label_values(&[state.name()])
                .dec();
        }
    }
}

/// Runs a mailbox until `cancel` fires; on the way out it unsubscribes.
pub async fn run(ctx: WorkerContext, creds: Credentials, fence: Fence, cancel: CancellationToken) {
    // Debug formatting escapes what an Id may carry into a text log.
    let span = tracing::info_span!("mailbox", id = ?creds.id);
    async move {
        let mode = match contract::callback_mode(&creds.bpm_endpoint) {
            Ok(mode) => mode,
            Err(e) => {
                // The API validates this before a worker starts; keep the state truthful.
                let _ = ctx
                    .store
                    .transition(
                        &creds.id,
                        WorkerState::Failed,
                        Some(e.to_string()),
                        Some(&fence),
                    )
                    .await;
                return;
            }
        };
        if creds.server_type != ServerType::Exchange {
            // Accepted and shown, not yet served: Creatio hears why.
            let f = EwsFailure::unsupported_server(creds.server_type);
            report_unavailable(&ctx, &creds, &fence, &f).await;
            cancel.cancelled().await;
            return;
        }
        let exchange = match ctx.exchange.connect(&creds) {
            Ok(exchange) => exchange,
            Err(f) => {
                // Nothing to retry until Creatio sends other credentials.
                report_unavailable(&ctx, &creds, &fence, &f).await;
                cancel.cancelled().await;
                return;
            }
        };
        let settings = ctx.settings.clone();
        let mut worker = Worker {
            retry: settings.retry.start(),
            failed_retry: settings.failed_retry.start(),
            ctx,
            exchange,
            creds,
            fence,
            mode,
            cancel,
            reported_unavailable: false,
            streaming_since: None,
            token_refresh_asked: false,
            counted_as: std::sync::Mutex::new(None),
        };
        worker.run().await;
        if worker.cancel.is_cancelled() {
            // Stopped (moved, closed, lease lost, shutdown): no stream here any more. Unless
            // the next owner has written its own state already.
            worker.set_state(WorkerState::Starting, None).await;
        }
    }
    .instrument(span)
    .await;
}

impl Worker {
    fn id(&self) -> &str {
        &self.creds.id
    }

    /// Records the worker's state; the store being unavailable does not stop the worker.
    async fn set_state(&self, state: WorkerState, error: Option<String>) {
        {
            let mut counted = self.counted_as.lock().unwrap_or_else(|p| p.into_inner());
            if *counted != Some(state) {
                let gauge = &self.ctx.metrics.mailboxes;
                if let Some(old) = *counted {
                    gauge.with_label_values(&[old.name()]).dec();
                }
                gauge.with_label_values(&[state.name()]).inc();
                *counted = Some(state);
            }
        }
        if let Err(e) = self
            .ctx
            .store
            .transition(self.id(), state, error, Some(&self.fence))
            .await
        {
            self.store_failed("transition");
            tracing::warn!(error = %e, state = ?state, "could not record the mailbox's state");
        }
    }

    fn store_failed(&self, operation: &str) {
        self.ctx
            .metrics
            .store_errors
            .with_label_values(&[operation])
            .inc();
    }

    fn operation(&self) -> &'static str {
        match self.mode {
            CallbackMode::NewEmail => "NewEmail",
            CallbackMode::ProcessFullEmail => "ProcessFullEmail",
        }
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
        let gate = self.ctx.gate.clone();
        if gate.full() {
            self.set_state(WorkerState::Queued, None).await;
        }
        let _place = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return,
            p = gate.admit() => p,
        };
        tracing::info!(url = ?self.exchange.url(), "mailbox worker started");
        loop {
            self.set_state(WorkerState::Subscribing, None).await;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                _ = gate.pace() => {}
            }
            // Not cancelled half-way: a Subscribe the server has taken must be answered by
            // an Unsubscribe, or the subscription lingers on the server.
            let sub_id = match self.exchange.subscribe().await {
                Ok(id) if self.cancel.is_cancelled() => {
                    self.unsubscribe(&id).await;
                    return;
                }
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
            match self.stream_subscription(&sub_id).await {
                Flow::Cancelled => {
                    self.unsubscribe(&sub_id).await;
                    return;
                }
                Flow::Resubscribe => continue,
                Flow::Failed(f) => {
                    // The subscription may still live on the server: give it back before
                    // the next one, or they pile up toward Exchange's per-mailbox limit.
                    self.unsubscribe(&sub_id).await;
                    if !self.pause(&f).await {
                        return;
                    }
                }
            }
        }
    }

    /// Keeps one subscription streamed until it is lost, fails for good, or is cancelled.
    async fn stream_subscription(&mut self, sub_id: &str) -> Flow {
        loop {
            self.streaming_since = None;
            let end = match self.catch_up().await {
                Ok(true) => self.stream_once(sub_id).await,
                Ok(false) => Ok(StreamEnd::Cancelled),
                Err(f) => Err(f),
            };
            // How long the server asked us to wait before reconnecting, if it said.
            let server_asked = match end {
                Ok(StreamEnd::Cancelled) => return Flow::Cancelled,
                Ok(StreamEnd::SubscriptionLost(f)) => {
                    tracing::info!(error = %f, "subscription lost, subscribing again");
                    self.set_state(WorkerState::Subscribing, Some(f.to_string()))
                        .await;
                    return Flow::Resubscribe;
                }
                Ok(StreamEnd::Ended) => None,
                Err(f) => match f.disposition() {
                    Disposition::Resubscribe => {
                        self.set_state(WorkerState::Subscribing, Some(f.to_string()))
                            .await;
                        return Flow::Resubscribe;
                    }
                    Disposition::Fatal => return Flow::Failed(f),
                    Disposition::Retry { after } => {
                        tracing::info!(error = %f, "event stream interrupted");
                        self.set_state(WorkerState::Backoff, Some(f.to_string()))
                            .await;
                        after
                    }
                },
            };
            if let Err(e) = self.ctx.store.bump(self.id(), Counter::Reconnects).await {
                tracing::warn!(error = %e, "could not count a reconnect");
            }
            let healthy = self
                .streaming_since
                .is_some_and(|since| since.elapsed() >= HEALTHY_CONNECTION);
            match server_asked {
                None if healthy => self.retry.reset(),
                after => {
                    let d = self.retry.next_delay_at_least(after);
                    self.set_state(WorkerState::Backoff, None).await;
                    if !self.sleep(d).await {
                        return Flow::Cancelled;
                    }
                }
            }
        }
    }

    /// Delivers what arrived while no stream was open, from the stored cursor, whose phase
    /// says what is owed: a baseline lists the inbox without delivering it (a new mailbox's
    /// existing mail is not new), a recovery delivers what was received since a moment, and
    /// a live cursor delivers every item after it. Each step is saved before the next, so an
    /// interruption resumes where it stood. Runs before every connection; events that arrive
    /// meanwhile wait on the subscription. False when cancelled.
    async fn catch_up(&mut self) -> Result<bool, EwsFailure> {
        self.set_state(WorkerState::CatchingUp, None).await;
        // A mailbox stored before cursors had phases, or created without one, takes a baseline.
        let mut cursor = self
            .ctx
            .store
            .sync_state(self.id())
            .await?
            .unwrap_or(SyncCursor {
                state: String::new(),
                at_unix_ms: unix_now_ms(),
                phase: SyncPhase::Baseline {
                    recover_since_unix_ms: None,
                },
            });
        loop {
            if let SyncPhase::Recovering { since_unix_ms } = cursor.phase {
                if !self.recover_since(since_unix_ms).await? {
                    return Ok(false);
                }
                cursor.phase = SyncPhase::Live;
                if !self.save_cursor(&cursor).await? {
                    return Ok(false);
                }
                continue;
            }
            let asked_at = unix_now_ms();
            let known = (!cursor.state.is_empty()).then_some(cursor.state.as_str());
            let page = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(false),
                r = self.exchange.sync_inbox(known, SYNC_PAGE) => r,
            };
            let page = match page {
                Ok(page) => page,
                Err(f) if known.is_some() && f.code() == Some("ErrorInvalidSyncStateData") => {
                    // The server no longer knows our state: take a new baseline, then find
                    // what arrived since the last sync by its received time.
                    tracing::warn!(
                        "sync state rejected by the server; taking a new baseline and recovering the gap"
                    );
                    let since = match cursor.phase {
                        SyncPhase::Baseline {
                            recover_since_unix_ms,
                        } => recover_since_unix_ms,
                        _ => Some(cursor.at_unix_ms - GAP_MARGIN_MS),
                    };
                    cursor.state.clear();
                    cursor.phase = SyncPhase::Baseline {
                        recover_since_unix_ms: since,
                    };
                    if !self.save_cursor(&cursor).await? {
                        return Ok(false);
                    }
                    continue;
                }
                Err(f) => return Err(f),
            };
            if cursor.phase == SyncPhase::Live {
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
                    if !self.deliver(created).await? {
                        return Ok(false);
                    }
                }
            }
            cursor.state = page.sync_state;
            let complete = page.includes_last_item_in_range;
            if complete {
                // Everything received before the request was listed.
                cursor.at_unix_ms = asked_at;
                if let SyncPhase::Baseline {
                    recover_since_unix_ms,
                } = cursor.phase
                {
                    cursor.phase = match recover_since_unix_ms {
                        Some(since_unix_ms) => SyncPhase::Recovering { since_unix_ms },
                        None => SyncPhase::Live,
                    };
                }
            }
            if !self.save_cursor(&cursor).await? {
                return Ok(false);
            }
            if complete && cursor.phase == SyncPhase::Live {
                return Ok(true);
            }
        }
    }

    /// Saves the cursor under the lease; false when the lease is gone (the worker stops).
    async fn save_cursor(&self, cursor: &SyncCursor) -> Result<bool, EwsFailure> {
        match self
            .ctx
            .store
            .set_sync_state(self.id(), cursor, &self.fence)
            .await
        {
            Ok(()) => Ok(true),
            Err(StoreError::Fenced) => {
                self.lost_lease();
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Delivers what the inbox received since `since_unix_ms` of this process's clock, read
    /// on the server's clock, less the second its received times are rounded to.
    async fn recover_since(&mut self, since_unix_ms: i64) -> Result<bool, EwsFailure> {
        let offset = self.exchange.clock_offset_ms().unwrap_or(0);
        self.recover_gap(since_unix_ms + offset - RECEIVED_ROUNDING_MS)
            .await
    }

    /// Delivers what the inbox received since `since_unix_ms` (newest first from FindItem,
    /// handed on oldest first); what was already delivered is filtered out on the way. Runs
    /// after a new baseline, so mail arriving meanwhile is found by the next sync as well,
    /// and posted once. False when cancelled.
    async fn recover_gap(&mut self, since_unix_ms: i64) -> Result<bool, EwsFailure> {
        let mut found: Vec<String> = Vec::new();
        let mut offset = 0u32;
        loop {
            let page = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(false),
                r = self.exchange.find_recent_items(offset, FIND_PAGE) => r?,
            };
            let listed = page.items.len();
            let mut reached_older = false;
            for item in page.items {
                // An item without a readable time is kept: a duplicate is filtered, a loss is not.
                let received = item
                    .date_time_received
                    .as_deref()
                    .and_then(parse_xs_datetime);
                if received.is_some_and(|t| t < since_unix_ms) {
                    reached_older = true;
                    break;
                }
                found.push(item.id.id);
            }
            if found.len() >= MAX_GAP_ITEMS {
                tracing::warn!(
                    items = found.len(),
                    "the gap holds more mail than is recovered at once; older mail in it is not posted"
                );
                found.truncate(MAX_GAP_ITEMS);
                break;
            }
            if reached_older || listed == 0 || page.includes_last_item_in_range {
                break;
            }
            offset = page
                .next_offset
                .filter(|&next| next > offset)
                .unwrap_or(offset + listed as u32);
        }
        found.reverse();
        tracing::info!(
            items = found.len(),
            "recovering mail received since the last sync"
        );
        self.deliver(found).await
    }

    /// One streaming connection, from open to end. The response head and the first envelope
    /// (Exchange sends one at once) must come within the request timeout, and each later one
    /// within the idle timeout.
    async fn stream_once(&mut self, sub_id: &str) -> Result<StreamEnd, EwsFailure> {
        let settings = self.ctx.settings.clone();
        let head_timeout = settings.limits.request_timeout;
        let open_timeout = head_timeout + self.exchange.open_allowance();
        let open = within(
            open_timeout,
            self.exchange
                .open_stream(sub_id, settings.connection_timeout_minutes),
            || {
                EwsFailure::Transport(format!(
                    "no answer to GetStreamingEvents within {open_timeout:?}"
                ))
            },
        );
        let mut stream = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Ok(StreamEnd::Cancelled),
            s = open => s?,
        };
        // The server accepted the stream: it is open and healthy until it says otherwise.
        self.set_state(WorkerState::Streaming, None).await;
        let replay = self.ctx.store.replay_signal(self.id());
        // Dead letters handed back before this worker started (or left by one that stopped
        // half-way) go first.
        if !self.replay().await? {
            return Ok(StreamEnd::Cancelled);
        }
        let mut silence_allowed = head_timeout.min(settings.idle_timeout);
        loop {
            let batch = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(StreamEnd::Cancelled),
                _ = async { match &replay { Some(r) => r.notified().await, None => std::future::pending().await } } => {
                    if !self.replay().await? {
                        return Ok(StreamEnd::Cancelled);
                    }
                    continue;
                }
                b = next_within(stream.as_mut(), silence_allowed) => b?,
            };
            if self.streaming_since.is_none() {
                self.streaming_since = Some(Instant::now());
                silence_allowed = settings.idle_timeout;
            }
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
            self.ctx.metrics.events.inc_by(new_items.len() as u64);
            if !new_items.is_empty()
                && let Err(e) = self.ctx.store.note_event(self.id()).await
            {
                self.store_failed("note_event");
                tracing::warn!(error = %e, "could not note an event");
            }
            if !new_items.is_empty() && !self.deliver(new_items).await? {
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

    /// Delivers the dead letters handed back for another try; false when cancelled.
    async fn replay(&mut self) -> Result<bool, EwsFailure> {
        let items = self.ctx.store.replays(self.id()).await?;
        if items.is_empty() {
            return Ok(true);
        }
        tracing::info!(items = items.len(), "replaying dead letters");
        self.deliver(items).await
    }

    /// Hands new items to Creatio, each recorded as delivered, skipped or dead-lettered;
    /// false when cancelled on the way (what was not recorded is found again by catch-up).
    async fn deliver(&mut self, item_ids: Vec<String>) -> Result<bool, EwsFailure> {
        let mut fresh: Vec<String> = Vec::with_capacity(item_ids.len());
        for id in item_ids {
            if self.ctx.store.is_new(self.id(), &id).await? {
                fresh.push(id);
            }
        }
        let mut pending = Pending::new(self.ctx.metrics.pending.clone(), fresh.len());
        match self.mode {
            CallbackMode::NewEmail => {
                // Creatio fetches the items itself; one call per item, so each carries its
                // own idempotency key.
                for id in &fresh {
                    let body = contract::new_email_payload(
                        &self.creds,
                        std::slice::from_ref(id),
                        contract::ticks_now(),
                    );
                    if !self.post(&body, id, None).await {
                        return Ok(false);
                    }
                    pending.settle(1);
                }
                Ok(true)
            }
            CallbackMode::ProcessFullEmail => {
                for batch in fresh.chunks(FETCH_BATCH) {
                    let Some(fetched) = self.fetch(batch).await? else {
                        return Ok(false);
                    };
                    for (id, item) in batch.iter().zip(fetched) {
                        match item {
                            Fetched::Mail(msg) => {
                                self.fetched("mail");
                                let email = to_email(id, *msg);
                                let body = contract::full_email_payload(
                                    &self.creds,
                                    std::slice::from_ref(&email),
                                    contract::ticks_now(),
                                );
                                if !self.post(&body, id, Some(&email)).await {
                                    return Ok(false);
                                }
                            }
                            Fetched::Gone => {
                                self.fetched("gone");
                                tracing::info!(item = ?id, "new item gone before it could be read; skipped");
                                self.record(id, Outcome::Skipped).await;
                            }
                            Fetched::Dead(why) => {
                                self.fetched("dead");
                                self.dead_letter(id, None, why).await;
                            }
                        }
                        pending.settle(1);
                    }
                }
                Ok(true)
            }
        }
    }

    /// Fetches a batch of items, one result per id in order. Transient failures, of the call
    /// or of single items, are retried in place: the notification is already consumed. A
    /// batch too large to read is fetched one by one; one mail too large is a dead letter.
    /// `None` when cancelled.
    async fn fetch(&mut self, ids: &[String]) -> Result<Option<Vec<Fetched>>, EwsFailure> {
        let mut results: Vec<Option<Fetched>> = ids.iter().map(|_| None).collect();
        // Indices into `ids` still to fetch, and how many go in one call.
        let mut pending: Vec<usize> = (0..ids.len()).collect();
        let mut per_call = ids.len();
        let mut backoff = self.ctx.settings.retry.start();
        while !pending.is_empty() {
            let call: Vec<usize> = pending.iter().copied().take(per_call).collect();
            let refs: Vec<&str> = call.iter().map(|&i| ids[i].as_str()).collect();
            let result = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(None),
                r = self.exchange.get_items(&refs) => r,
            };
            let failure = match result {
                Ok(items) => {
                    let mut transient = None;
                    for (&i, item) in call.iter().zip(items) {
                        match item {
                            Ok(msg) => results[i] = Some(Fetched::Mail(Box::new(msg))),
                            Err(e) => match item_fate(&e.code) {
                                ItemFate::Gone => results[i] = Some(Fetched::Gone),
                                ItemFate::Dead => {
                                    results[i] = Some(Fetched::Dead(format!(
                                        "Exchange would not give the item: {}",
                                        e.code
                                    )))
                                }
                                ItemFate::Retry => transient = Some(e),
                            },
                        }
                    }
                    pending.retain(|&i| results[i].is_none());
                    match transient {
                        None => {
                            backoff.reset();
                            continue;
                        }
                        Some(e) => EwsFailure::Ews(ews::EwsError::Response(e)),
                    }
                }
                Err(EwsFailure::TooLarge { limit }) => {
                    if call.len() == 1 {
                        let i = call[0];
                        results[i] = Some(Fetched::Dead(format!(
                            "the mail is larger than the {limit}-byte limit on EWS answers"
                        )));
                        pending.retain(|&p| p != i);
                    }
                    per_call = 1;
                    continue;
                }
                Err(f) => f,
            };
            match failure.disposition() {
                Disposition::Retry { after } if backoff.attempts() + 1 < FETCH_ATTEMPTS => {
                    let delay = backoff.next_delay_at_least(after);
                    tracing::info!(error = %failure, retry_in_ms = delay.as_millis() as u64, "fetching new items failed");
                    if !self.sleep(delay).await {
                        return Ok(None);
                    }
                }
                _ => return Err(failure),
            }
        }
        Ok(Some(results.into_iter().flatten().collect()))
    }

    /// Posts one mail's callback and records the outcome; false when cancelled before it
    /// got through.
    async fn post(
        &self,
        body: &serde_json::Value,
        item_id: &str,
        email: Option<&contract::Email>,
    ) -> bool {
        // Nothing is posted once the lease may have passed to another replica.
        if self.cancel.is_cancelled() || !self.ctx.leases.holds(self.id(), &self.fence) {
            self.lost_lease();
            return false;
        }
        let key = idempotency_key(self.id(), item_id);
        let started = Instant::now();
        let outcome = self
            .ctx
            .creatio
            .post(&self.creds.bpm_endpoint, body, Some(&key), &self.cancel)
            .await;
        let delivered = match &outcome {
            Ok(()) => Some("delivered"),
            Err(DeliveryError::Cancelled) => None,
            Err(_) => Some("dead_letter"),
        };
        if let Some(result) = delivered {
            let m = &self.ctx.metrics;
            m.deliveries
                .with_label_values(&[result, self.operation()])
                .inc();
            if outcome.is_ok() {
                m.delivery_seconds
                    .with_label_values(&[self.operation()])
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        match outcome {
            Ok(()) => {
                self.record(item_id, Outcome::Delivered).await;
                tracing::debug!(item = ?item_id, "delivered to Creatio");
            }
            Err(DeliveryError::Cancelled) => return false,
            Err(e) => self.dead_letter(item_id, email, e.to_string()).await,
        }
        true
    }

    async fn dead_letter(&self, item_id: &str, email: Option<&contract::Email>, error: String) {
        let message_id = email.map(|e| e.message_id.clone());
        tracing::error!(item = ?item_id, message_id = ?message_id, error = %error, "mail dead-lettered");
        let letter = DeadLetter {
            item_id: item_id.to_owned(),
            message_id,
            subject: email.map(|e| e.subject.clone()),
            error,
            unix_ms: unix_now_ms(),
        };
        self.record(item_id, Outcome::DeadLettered(letter)).await;
    }

    /// Records what became of an item. Should the store fail here, the item may be posted
    /// again later, under the same idempotency key: a duplicate Creatio can recognise, never
    /// a loss.
    async fn record(&self, item_id: &str, outcome: Outcome) {
        match self
            .ctx
            .store
            .record(self.id(), item_id, outcome, &self.fence)
            .await
        {
            Ok(()) => {}
            Err(StoreError::Fenced) => self.lost_lease(),
            Err(e) => {
                self.store_failed("record");
                tracing::warn!(item = ?item_id, error = %e, "could not record a delivered item")
            }
        }
    }

    fn fetched(&self, outcome: &str) {
        self.ctx.metrics.fetches.with_label_values(&[outcome]).inc();
    }

    /// Another replica owns the mailbox now: stop at once, posting nothing more.
    fn lost_lease(&self) {
        if !self.cancel.is_cancelled() {
            tracing::warn!("the mailbox's lease passed to another replica; stopping here");
            self.cancel.cancel();
        }
    }

    /// Waits after a failure as its disposition says; false when cancelled meanwhile.
    async fn pause(&mut self, f: &EwsFailure) -> bool {
        let delay = match f.disposition() {
            // An OAuth token expires: the first rejection asks Creatio for a new one, which
            // arrives as an Update and restarts this mailbox; only a second one is a failure.
            Disposition::Fatal
                if matches!(f, EwsFailure::Unauthorized)
                    && self.creds.access_token.is_some()
                    && !self.token_refresh_asked =>
            {
                self.token_refresh_asked = true;
                self.set_state(
                    WorkerState::Backoff,
                    Some(
                        "Exchange rejected the access token; asked Creatio for a new one (RefreshToken)"
                            .into(),
                    ),
                )
                .await;
                let body = contract::refresh_token_payload(&self.creds);
                let url = contract::sibling_url(&self.creds.bpm_endpoint, "RefreshToken");
                self.ctx.creatio.report(&url, &body).await;
                self.failed_retry.next_delay()
            }
            Disposition::Fatal => {
                self.report_failed(f).await;
                self.failed_retry.next_delay()
            }
            Disposition::Retry { after } => {
                self.set_state(WorkerState::Backoff, Some(f.to_string()))
                    .await;
                self.retry.next_delay_at_least(after)
            }
            Disposition::Resubscribe => {
                self.set_state(WorkerState::Backoff, Some(f.to_string()))
                    .await;
                self.retry.next_delay()
            }
        };
        tracing::warn!(error = %f, retry_in_ms = delay.as_millis() as u64, "EWS call failed");
        self.sleep(delay).await
    }

    /// Marks the mailbox failed and tells Creatio, once per failure episode.
    async fn report_failed(&mut self, f: &EwsFailure) {
        if self.reported_unavailable {
            self.set_state(WorkerState::Failed, Some(f.to_string()))
                .await;
        } else {
            self.reported_unavailable = true;
            report_unavailable(&self.ctx, &self.creds, &self.fence, f).await;
        }
    }

    /// After a successful subscribe: reset backoffs, and tell Creatio if it was told otherwise.
    async fn recovered(&mut self) {
        self.retry.reset();
        self.failed_retry.reset();
        self.token_refresh_asked = false;
        if self.reported_unavailable {
            self.reported_unavailable = false;
            let body = contract::mailbox_state_payload(&self.creds, true, None);
            let url = contract::sibling_url(&self.creds.bpm_endpoint, "ProcessMailboxState");
            self.ctx.creatio.report(&url, &body).await;
        }
    }

    async fn unsubscribe(&self, sub_id: &str) {
        match self.exchange.unsubscribe(sub_id).await {
            Ok(()) => tracing::info!("unsubscribed"),
            Err(e) => {
                tracing::info!(error = %e, "unsubscribe failed; the server will expire the subscription")
            }
        }
    }
}

/// Items of one delivery counted in the outbox gauge until each is settled; what is left
/// when the delivery ends early (cancelled, fetch failed) leaves the gauge with it, since
/// catch-up finds it again.
struct Pending {
    gauge: prometheus::IntGauge,
    left: usize,
}

impl Pending {
    fn new(gauge: prometheus::IntGauge, items: usize) -> Self {
        gauge.add(items as i64);
        Pending { gauge, left: items }
    }

    fn settle(&mut self, items: usize) {
        let n = items.min(self.left);
        self.left -= n;
        self.gauge.sub(n as i64);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.gauge.sub(self.left as i64);
    }
}

/// Marks the mailbox failed and tells Creatio it is unavailable.
async fn report_unavailable(
    ctx: &WorkerContext,
    creds: &Credentials,
    fence: &Fence,
    f: &EwsFailure,
) {
    let _ = ctx
        .store
        .transition(
            &creds.id,
            WorkerState::Failed,
            Some(f.to_string()),
            Some(fence),
        )
        .await;
    tracing::warn!(error = %f, "mailbox unavailable; reporting to Creatio");
    let body =
        contract::mailbox_state_payload(creds, false, Some((f.class_name(), &f.to_string())));
    let url = contract::sibling_url(&creds.bpm_endpoint, "ProcessMailboxState");
    ctx.creatio.report(&url, &body).await;
}

/// The stream's next message, or [`EwsFailure::Idle`] after `silence` without one.
async fn next_within(
    stream: &mut dyn Events,
    silence: Duration,
) -> Result<Option<ews::StreamBatch>, EwsFailure> {
    within(silence, stream.next(), || EwsFailure::Idle(silence)).await
}

#[cfg(test)]
mod tests;
