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
//! dead-lettered. While it streams, a history load Creatio asked for runs a page at a time
//! whenever the stream is quiet.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::creatio::contract::{self, CallbackMode, Credentials};
use crate::creatio::delivery::{Creatio, DeliveryError, idempotency_key};
use crate::creatio::mail::unix_now_ms;
use crate::engine::backoff::{Backoff, BackoffPolicy};
use crate::engine::coordinator::Leases;
use crate::engine::gate::Gate;
use crate::engine::metrics::Metrics;
use crate::engine::protocol::{
    Connect, Disposition, Failure, Item, Limits, MailServer, Watch, within,
};
use crate::engine::store::{
    Counter, DeadLetter, Fence, Outcome, Store, StoreError, SyncCursor, SyncPhase, WorkerState,
};

mod catch_up;
mod delivery;
mod history;
mod streaming;

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
    /// Backoff after transient failures of the mail server.
    pub retry: BackoffPolicy,
    /// Backoff while the mailbox is `Failed` (rejected credentials, wrong configuration).
    pub failed_retry: BackoffPolicy,
}

#[cfg(test)]
impl WorkerSettings {
    /// For tests under paused time: retries from 1 s doubling to 60 s; a failed mailbox from
    /// 60 s to 30 min; a stream's head and first envelope within 30 s, later ones within
    /// 120 s.
    pub(crate) fn for_tests() -> Self {
        let second = Duration::from_secs(1);
        WorkerSettings {
            connection_timeout_minutes: 30,
            idle_timeout: 120 * second,
            limits: Limits {
                request_timeout: 30 * second,
                max_body_bytes: 1 << 20,
            },
            retry: BackoffPolicy::new(second, 60 * second).expect("a valid policy"),
            failed_retry: BackoffPolicy::new(60 * second, 1800 * second).expect("a valid policy"),
        }
    }
}

/// New items asked for per sync page (ids only, so a page is small).
const SYNC_PAGE: u16 = 512;

/// Items listed per search page when recovering a gap (ids and times only).
const FIND_PAGE: u16 = 200;

/// The most items one gap recovery delivers: the newest, when more arrived.
const MAX_GAP_ITEMS: usize = 10_000;

/// How far before the last sync a gap recovery looks: covers the difference between the
/// listener's clock and the server's when the server never said its time. What it finds twice is
/// filtered as already delivered.
const GAP_MARGIN_MS: i64 = 5 * 60 * 1000;

/// Servers give received times in whole seconds: a mail received just after a moment may
/// carry a time up to a second before it.
const RECEIVED_ROUNDING_MS: i64 = 1000;

/// Items fetched per call: a batch of full mails is read whole, so it stays small.
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
    /// Reaches each mailbox's server, by its protocol.
    pub servers: Arc<dyn Connect>,
    pub creatio: Arc<dyn Creatio>,
    pub settings: Arc<WorkerSettings>,
    pub gate: Arc<Gate>,
}

enum StreamEnd {
    Cancelled,
    /// The server ended the connection (Closed or end of body); the subscription lives.
    Ended,
    /// The subscription is gone.
    SubscriptionLost(Failure),
    /// A folder was created, moved or deleted: the set of folders to watch is read again.
    FoldersChanged,
}

enum Flow {
    Cancelled,
    Resubscribe,
    Failed(Failure),
}

struct Worker {
    ctx: Arc<WorkerContext>,
    server: Box<dyn MailServer>,
    creds: Arc<Credentials>,
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
    /// The history load (by its moment) this worker has taken up.
    history_resumed: Option<i64>,
    /// The folders watched, as resolved before the current subscription.
    folders: Vec<String>,
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
///
/// A worker's task lives as long as its mailbox, and its future is as large as its largest
/// state: what it starts from is handed in boxed (an async function's arguments stay in its
/// future to the end), and the brief, large states (catching up, delivering, a history page)
/// are boxed where they are awaited, so an idle mailbox holds little more than its `Worker`
/// and the wait on its stream.
pub fn run(
    ctx: Arc<WorkerContext>,
    creds: Arc<Credentials>,
    fence: Fence,
    cancel: CancellationToken,
) -> impl Future<Output = ()> + Send {
    // Debug formatting escapes what an Id may carry into a text log.
    let span = tracing::info_span!("mailbox", id = ?creds.id);
    let start = Box::new(Start {
        ctx,
        creds,
        fence,
        cancel,
    });
    async move {
        let mut worker = match start.worker() {
            Ok(worker) => worker,
            Err(not_started) => return Box::pin(not_started.settle()).await,
        };
        worker.run().await;
        if worker.cancel.is_cancelled() {
            // Stopped (moved, closed, lease lost, shutdown): no stream here any more. Unless
            // the next owner has written its own state already.
            worker.set_state(WorkerState::Starting, None).await;
        }
    }
    .instrument(span)
}

/// What a worker starts from.
struct Start {
    ctx: Arc<WorkerContext>,
    creds: Arc<Credentials>,
    fence: Fence,
    cancel: CancellationToken,
}

/// A worker that could not start, and why.
struct NotStarted {
    start: Start,
    why: Why,
}

enum Why {
    /// The callback URL is none Creatio sends (the API validates it before a worker starts).
    Endpoint(String),
    /// No mail server could be made from the credentials.
    Server(Failure),
}

impl Start {
    /// The worker, or why there is none (with what to record it with).
    fn worker(self: Box<Self>) -> Result<Worker, Box<NotStarted>> {
        let not_started = |start: Box<Start>, why| Box::new(NotStarted { start: *start, why });
        let mode = match contract::callback_mode(&self.creds.bpm_endpoint) {
            Ok(mode) => mode,
            Err(e) => return Err(not_started(self, Why::Endpoint(e.to_string()))),
        };
        let server = match self.ctx.servers.connect(&self.creds) {
            Ok(server) => server,
            Err(f) => return Err(not_started(self, Why::Server(f))),
        };
        let Start {
            ctx,
            creds,
            fence,
            cancel,
        } = *self;
        let settings = ctx.settings.clone();
        Ok(Worker {
            retry: settings.retry.start(),
            failed_retry: settings.failed_retry.start(),
            ctx,
            server,
            creds,
            fence,
            mode,
            cancel,
            reported_unavailable: false,
            streaming_since: None,
            token_refresh_asked: false,
            counted_as: std::sync::Mutex::new(None),
            history_resumed: None,
            folders: Vec::new(),
        })
    }
}

impl NotStarted {
    /// Records why the worker could not start, and waits to be stopped.
    async fn settle(self: Box<Self>) {
        let NotStarted {
            start:
                Start {
                    ctx,
                    creds,
                    fence,
                    cancel,
                },
            why,
        } = *self;
        match why {
            Why::Endpoint(e) => {
                // Keep the state truthful.
                let _ = ctx
                    .store
                    .transition(&creds.id, WorkerState::Failed, Some(e), Some(&fence))
                    .await;
            }
            Why::Server(f) => {
                // Nothing to retry until Creatio sends other credentials (a kind of server
                // not served is accepted and shown: Creatio hears why).
                report_unavailable(&ctx, &creds, &fence, &f).await;
                cancel.cancelled().await;
            }
        }
    }
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
        tracing::info!(url = ?self.server.url(), "mailbox worker started");
        // Subscribe calls are paced per server.
        let server = server_key(&self.server.url());
        loop {
            self.set_state(WorkerState::Subscribing, None).await;
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                _ = gate.pace(&server) => {}
            }
            // Which folders to watch: Creatio's choice, or every mail folder there is now.
            let folders = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                f = self.server.watched_folders(&self.creds.folder_ids) => f,
            };
            match folders {
                Ok(folders) => {
                    if folders != self.folders {
                        tracing::info!(folders = folders.len(), "watching the mailbox's folders");
                    }
                    self.folders = folders;
                }
                Err(f) => {
                    if self.pause(&f).await {
                        continue;
                    }
                    return;
                }
            }
            // Not cancelled half-way: a Subscribe the server has taken must be answered by
            // an Unsubscribe, or the subscription lingers on the server.
            let sub_id = match self.server.subscribe(&self.folders).await {
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
                    // the next one, or they pile up toward the server's per-mailbox limit.
                    self.unsubscribe(&sub_id).await;
                    if !self.pause(&f).await {
                        return;
                    }
                }
            }
        }
    }

    /// Another replica owns the mailbox now: stop at once, posting nothing more.
    fn lost_lease(&self) {
        // Not this replica's any more: the next pass claims it again if the spread says so.
        self.ctx.leases.lost(self.id(), &self.fence);
        if !self.cancel.is_cancelled() {
            tracing::warn!("the mailbox's lease passed to another replica; stopping here");
            self.cancel.cancel();
        }
    }

    /// Waits after a failure as its disposition says; false when cancelled meanwhile.
    async fn pause(&mut self, f: &Failure) -> bool {
        let delay = match f.disposition() {
            // An OAuth token expires: the first rejection asks Creatio for a new one, which
            // arrives as an Update and restarts this mailbox; only a second one is a failure.
            Disposition::Fatal
                if f.credentials_rejected()
                    && self.creds.access_token.is_some()
                    && !self.token_refresh_asked =>
            {
                self.token_refresh_asked = true;
                self.set_state(
                    WorkerState::Backoff,
                    Some(
                        "The mail server rejected the access token; asked Creatio for a new one (RefreshToken)"
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
        tracing::warn!(error = %f, retry_in_ms = delay.as_millis() as u64, "mail server call failed");
        self.sleep(delay).await
    }

    /// Marks the mailbox failed and tells Creatio, once per failure episode.
    async fn report_failed(&mut self, f: &Failure) {
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
        match self.server.unsubscribe(sub_id).await {
            Ok(()) => tracing::info!("unsubscribed"),
            Err(e) => {
                tracing::info!(error = %e, "unsubscribe failed; the server will expire the subscription")
            }
        }
    }
}

/// The server a mailbox's calls go to, as the Subscribe pace counts them: the scheme, host
/// and port of its URL.
fn server_key(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}:{}",
            u.scheme(),
            u.host_str().unwrap_or_default(),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_owned(),
    }
}

/// Marks the mailbox failed and tells Creatio it is unavailable.
async fn report_unavailable(ctx: &WorkerContext, creds: &Credentials, fence: &Fence, f: &Failure) {
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

#[cfg(test)]
mod tests;
