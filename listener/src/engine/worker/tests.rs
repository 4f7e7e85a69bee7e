//! The worker's state machine against a scripted mail server and Creatio, under tokio's paused
//! clock: hours of backoff pass in milliseconds and every delay is read exactly.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::engine::coordinator::Leases;
use crate::engine::protocol::{Answer, FindPage, Found, SyncPage, WatchBatch};
use crate::engine::store::SeenLimits;
use crate::engine::store::memory::MemoryStore;
use crate::engine::supervisor::Supervisor;
use crate::exchange::client::EwsFailure;

const SECOND: Duration = Duration::from_secs(1);

/// How one opening of the stream goes.
enum Open {
    Fail(Failure),
    /// No answer at all, not even a response head.
    Hang,
    /// These messages, then silence.
    Then(Vec<Step>),
}

enum Step {
    Batch(WatchBatch),
    /// The server ends the body.
    End,
}

/// What the fake Exchange answers, call by call; a call with nothing scripted succeeds, and a
/// stream with nothing scripted stays healthy with a keep-alive every 30 s.
#[derive(Default)]
struct Script {
    subscribe: VecDeque<Result<(), Failure>>,
    open: VecDeque<Open>,
    sync: VecDeque<Result<SyncPage, Failure>>,
    find: VecDeque<Result<FindPage, Failure>>,
    /// The history: ids received since a moment, oldest first, listed a page at a time.
    history: Vec<String>,
    /// Every mail folder of the mailbox (the inbox alone when empty).
    folders: Vec<String>,
    /// The server's clock less ours, as its `Date` headers would say.
    clock_offset_ms: Option<i64>,
    /// How long each SyncFolderItems takes on the wall clock (the store's clock).
    sync_takes: Duration,
    /// Subscribe calls that panic, as a bug would.
    panics: usize,
}

/// The state a SyncFolderItems started from, and when it came (wall clock, Unix ms).
type SyncCall = (Option<String>, i64);

/// A scripted Exchange that logs each call with the virtual time it came at.
#[derive(Clone)]
struct FakeExchange {
    script: Arc<Mutex<Script>>,
    calls: Arc<Mutex<Vec<(Duration, String)>>>,
    /// The sync state each SyncFolderItems started from, and when it was asked (wall clock).
    syncs: Arc<Mutex<Vec<SyncCall>>>,
    ids: Arc<AtomicUsize>,
    start: Instant,
}

impl std::fmt::Debug for FakeExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeExchange")
    }
}

impl FakeExchange {
    fn new(script: Script) -> Self {
        FakeExchange {
            script: Arc::new(Mutex::new(script)),
            calls: Arc::default(),
            syncs: Arc::default(),
            ids: Arc::default(),
            start: Instant::now(),
        }
    }

    fn log(&self, call: String) {
        self.calls
            .lock()
            .unwrap()
            .push((self.start.elapsed(), call));
    }

    /// When each call named `name` came, since the start.
    fn times(&self, name: &str) -> Vec<Duration> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| c.split(' ').next() == Some(name))
            .map(|(t, _)| *t)
            .collect()
    }

    fn calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }
}

impl Connect for FakeExchange {
    fn connect(&self, _creds: &Credentials) -> Result<Box<dyn MailServer>, Failure> {
        Ok(Box::new(self.clone()))
    }
}

/// A report that says nothing new: a keep-alive.
fn keep_alive() -> WatchBatch {
    WatchBatch::default()
}

impl MailServer for FakeExchange {
    fn url(&self) -> String {
        "http://exchange.test/EWS/Exchange.asmx".into()
    }

    fn validate(&self) -> Answer<'_, ()> {
        async { Ok(()) }.boxed()
    }

    fn folders(&self) -> Answer<'_, Vec<crate::engine::protocol::Folder>> {
        async { Ok(Vec::new()) }.boxed()
    }

    fn find_by_message_id<'a>(
        &'a self,
        _folder: &'a str,
        _message_id: &'a str,
    ) -> Answer<'a, Vec<String>> {
        async { Ok(Vec::new()) }.boxed()
    }

    fn send<'a>(
        &'a self,
        _email: &'a crate::creatio::contract::send::OutgoingEmail,
    ) -> Answer<'a, ()> {
        async { Ok(()) }.boxed()
    }

    fn was_sent<'a>(&'a self, _message_id: &'a str) -> Answer<'a, bool> {
        async { Ok(false) }.boxed()
    }

    fn watched_folders<'a>(&'a self, asked: &'a [String]) -> Answer<'a, Vec<String>> {
        let folders = if asked.is_empty() {
            self.script.lock().unwrap().folders.clone()
        } else {
            asked.to_vec()
        };
        async move {
            Ok(if folders.is_empty() {
                vec!["inbox".to_owned()]
            } else {
                folders
            })
        }
        .boxed()
    }

    fn subscribe<'a>(&'a self, folders: &'a [String]) -> Answer<'a, String> {
        if folders.len() > 1 {
            self.log(format!("subscribe {}", folders.join(",")));
        } else {
            self.log("subscribe".into());
        }
        let answer = {
            let mut script = self.script.lock().unwrap();
            if script.panics > 0 {
                script.panics -= 1;
                None
            } else {
                Some(script.subscribe.pop_front().unwrap_or(Ok(())))
            }
        };
        let Some(answer) = answer else {
            panic!("a bug in the worker");
        };
        let id = format!("sub-{}", self.ids.fetch_add(1, Ordering::Relaxed) + 1);
        async move { answer.map(|()| id) }.boxed()
    }

    fn unsubscribe<'a>(&'a self, subscription_id: &'a str) -> Answer<'a, ()> {
        self.log(format!("unsubscribe {subscription_id}"));
        async { Ok(()) }.boxed()
    }

    fn get_items<'a>(&'a self, ids: &'a [&'a str]) -> Answer<'a, Vec<Result<Item, Failure>>> {
        self.log(format!("get_items {}", ids.join(",")));
        let mails = ids
            .iter()
            .map(|id| {
                Ok(Item::Mail(Box::new(crate::creatio::mail::to_email(
                    id,
                    ews::Message::default(),
                ))))
            })
            .collect();
        async { Ok(mails) }.boxed()
    }

    fn sync_folder<'a>(
        &'a self,
        folder: &'a str,
        sync_state: Option<&'a str>,
        _max_changes: u16,
    ) -> Answer<'a, SyncPage> {
        if folder == "inbox" {
            self.log("sync".into());
        } else {
            self.log(format!("sync {folder}"));
        }
        self.syncs
            .lock()
            .unwrap()
            .push((sync_state.map(str::to_owned), unix_now_ms()));
        let (answer, takes) = {
            let mut script = self.script.lock().unwrap();
            (script.sync.pop_front(), script.sync_takes)
        };
        // The paused clock does not move the wall clock cursors are dated by: only a real
        // wait does, and it is a few milliseconds in the one test that asks for it.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(takes);
        async {
            answer.unwrap_or_else(|| {
                Ok(SyncPage {
                    state: "state".into(),
                    complete: true,
                    added: Vec::new(),
                })
            })
        }
        .boxed()
    }

    fn find_received_since<'a>(
        &'a self,
        _folder: &'a str,
        _since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage> {
        self.log(format!("history {offset}"));
        let history = self.script.lock().unwrap().history.clone();
        let items: Vec<Found> = history
            .iter()
            .skip(offset as usize)
            .take(usize::from(max_entries))
            .map(|id| found_at(id, 0))
            .collect();
        let next = offset as usize + items.len();
        async move {
            Ok(FindPage {
                items,
                next_offset: Some(next as u32),
                complete: next >= history.len(),
                total: Some(history.len() as u32),
            })
        }
        .boxed()
    }

    fn find_recent_items<'a>(
        &'a self,
        _folder: &'a str,
        offset: u32,
        _max_entries: u16,
    ) -> Answer<'a, FindPage> {
        self.log(format!("find {offset}"));
        let page = self.script.lock().unwrap().find.pop_front();
        async {
            page.unwrap_or(Ok(FindPage {
                items: Vec::new(),
                next_offset: None,
                complete: true,
                total: None,
            }))
        }
        .boxed()
    }

    fn clock_offset_ms(&self) -> Option<i64> {
        self.script.lock().unwrap().clock_offset_ms
    }

    fn open_watch<'a>(
        &'a self,
        subscription_id: &'a str,
        _timeout_minutes: u8,
    ) -> Answer<'a, Box<dyn Watch>> {
        self.log(format!("open {subscription_id}"));
        let next = self.script.lock().unwrap().open.pop_front();
        async move {
            match next {
                Some(Open::Fail(f)) => Err(f),
                Some(Open::Hang) => std::future::pending().await,
                Some(Open::Then(steps)) => Ok(Box::new(FakeStream {
                    steps: steps.into(),
                    healthy: false,
                }) as Box<dyn Watch>),
                None => Ok(Box::new(FakeStream {
                    steps: VecDeque::new(),
                    healthy: true,
                }) as Box<dyn Watch>),
            }
        }
        .boxed()
    }
}

struct FakeStream {
    steps: VecDeque<Step>,
    /// With no step left: keep-alives every 30 s (true), or silence (false).
    healthy: bool,
}

impl Watch for FakeStream {
    fn next(&mut self) -> Answer<'_, Option<WatchBatch>> {
        let step = self.steps.pop_front();
        let healthy = self.healthy;
        async move {
            match step {
                Some(Step::Batch(b)) => Ok(Some(b)),
                Some(Step::End) => Ok(None),
                None if healthy => {
                    tokio::time::sleep(30 * SECOND).await;
                    Ok(Some(keep_alive()))
                }
                None => std::future::pending().await,
            }
        }
        .boxed()
    }
}

/// Creatio that takes everything and remembers what it was sent.
#[derive(Debug, Default)]
struct FakeCreatio {
    reports: Mutex<Vec<Value>>,
    /// The operation (last URL segment) of each report, in order.
    report_ops: Mutex<Vec<String>>,
    /// The item id of every mail posted, in order.
    posted: Mutex<Vec<String>>,
    /// When set, each post waits for a permit: Creatio holding its answer.
    held: Option<Arc<tokio::sync::Semaphore>>,
}

impl Creatio for FakeCreatio {
    fn post<'a>(
        &'a self,
        _url: &'a str,
        body: &'a contract::CallbackBody,
        _idempotency_key: Option<&'a str>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        let body = body.value();
        let ids = body["Emails"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["Id"].as_str().map(str::to_owned));
        let ids: Vec<String> = ids.collect();
        let held = self.held.clone();
        async move {
            if let Some(held) = held {
                // As between two of Delivery's attempts: cancelling ends the wait.
                tokio::select! {
                    _ = cancel.cancelled() => return Err(DeliveryError::Cancelled),
                    permit = held.acquire() => permit.expect("never closed").forget(),
                }
            }
            self.posted.lock().unwrap().extend(ids);
            Ok(())
        }
        .boxed()
    }

    fn report<'a>(&'a self, url: &'a str, body: &'a Value) -> BoxFuture<'a, ()> {
        self.reports.lock().unwrap().push(body.clone());
        self.report_ops
            .lock()
            .unwrap()
            .push(url.rsplit('/').next().unwrap_or_default().to_owned());
        async {}.boxed()
    }
}

struct Rig {
    exchange: FakeExchange,
    creatio: Arc<FakeCreatio>,
    ctx: WorkerContext,
    creds: Credentials,
}

/// The real IMAP connector, trusting no one: no test here reaches an IMAP server.
fn imap_without_roots() -> crate::imap::ImapConnect {
    crate::imap::ImapConnect {
        tls: crate::imap::trusting_no_one(),
        limits: WorkerSettings::for_tests().limits,
        wake: 60 * SECOND,
        slots: Arc::new(crate::imap::Slots::new(8)),
    }
}

/// [`WorkerSettings::for_tests`]; Subscribe paced at 1,000 a second.
fn rig(script: Script) -> Rig {
    let exchange = FakeExchange::new(script);
    let creatio = Arc::new(FakeCreatio::default());
    let ctx = WorkerContext {
        store: Arc::new(MemoryStore::new(SeenLimits::default())),
        servers: Arc::new(crate::engine::protocol::Protocols {
            exchange: Arc::new(exchange.clone()),
            imap: Arc::new(imap_without_roots()),
            graph: None,
        }),
        creatio: creatio.clone(),
        settings: Arc::new(WorkerSettings::for_tests()),
        gate: Arc::new(Gate::new(100, 1000)),
        leases: Arc::new(Leases::new("here")),
        metrics: crate::engine::metrics::Metrics::new(),
    };
    let body = json!([{
        "Id": "mbx",
        "SenderEmailAddress": "alice@contoso.test",
        "Password": "secret",
        "ServiceUrl": "http://exchange.test",
        "BpmEndpoint": "http://creatio.test/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
    }]);
    let creds = contract::parse_credentials_list(body.to_string().as_bytes())
        .unwrap()
        .remove(0);
    Rig {
        exchange,
        creatio,
        ctx,
        creds,
    }
}

impl Rig {
    /// Opens the mailbox under a lease, its cursor live at `state`, as an earlier worker left
    /// it.
    async fn live_at(&self, state: &str) -> Fence {
        self.ctx
            .store
            .put_mailbox(self.creds.clone())
            .await
            .unwrap();
        let fence = self.lease().await;
        self.ctx
            .store
            .set_sync_state("mbx", &live(state), &fence)
            .await
            .unwrap();
        fence
    }

    /// The phase of the mailbox's stored cursor.
    async fn phase(&self) -> SyncPhase {
        self.ctx
            .store
            .sync_state("mbx")
            .await
            .unwrap()
            .unwrap()
            .phase
    }

    /// Runs the mailbox's worker on its own, as the supervisor would.
    async fn spawn(&self) -> CancellationToken {
        self.ctx
            .store
            .put_mailbox(self.creds.clone())
            .await
            .unwrap();
        let fence = self.lease().await;
        self.worker_under(&fence, self.ctx.clone())
    }

    /// Runs a worker under `fence` with this context, as the supervisor would; answers its
    /// cancel.
    fn worker_under(&self, fence: &Fence, ctx: WorkerContext) -> CancellationToken {
        let cancel = CancellationToken::new();
        tokio::spawn(run(
            Arc::new(ctx),
            Arc::new(self.creds.clone()),
            fence.clone(),
            cancel.clone(),
        ));
        cancel
    }

    /// Takes the mailbox's lease for longer than any test runs, as the coordinator would.
    async fn lease(&self) -> Fence {
        let long = 100 * 24 * 3600 * SECOND;
        self.ctx
            .store
            .heartbeat("here", "this process", long)
            .await
            .unwrap();
        let token = self
            .ctx
            .store
            .claim("mbx", "here")
            .await
            .unwrap()
            .expect("the lease is free");
        self.ctx.leases.insert("mbx", token);
        self.ctx.leases.trust_until(Instant::now() + long);
        Fence {
            replica: "here".into(),
            token,
        }
    }

    /// Runs a worker under `fence` whose Creatio takes `mails` and then holds every answer;
    /// answers that Creatio and the worker's cancel.
    fn worker_with_creatio_taking(
        &self,
        mails: usize,
        fence: &Fence,
    ) -> (Arc<FakeCreatio>, CancellationToken) {
        let holding = Arc::new(FakeCreatio {
            held: Some(Arc::new(tokio::sync::Semaphore::new(mails))),
            ..FakeCreatio::default()
        });
        let ctx = WorkerContext {
            creatio: holding.clone(),
            ..self.ctx.clone()
        };
        (holding, self.worker_under(fence, ctx))
    }

    /// Runs the worker on its own for `d` of virtual time.
    async fn run_for(&self, d: Duration) {
        let _cancel = self.spawn().await;
        tokio::time::sleep(d).await;
    }

    async fn status(&self) -> crate::engine::store::MailboxStatus {
        self.ctx.store.status("mbx").await.unwrap().unwrap()
    }

    async fn assert_last_error(&self, part: &str) {
        let status = self.status().await;
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(part)),
            "the last error should mention {part:?}: {status:?}"
        );
    }

    /// The time between the first two stream opens.
    fn reopened_after(&self) -> Duration {
        let opens = self.exchange.times("open");
        assert!(opens.len() >= 2, "{:?}", self.exchange.calls());
        opens[1] - opens[0]
    }
}

/// A cursor that delivers every item after `state`.
fn live(state: &str) -> SyncCursor {
    SyncCursor {
        state: state.into(),
        at_unix_ms: unix_now_ms(),
        phase: SyncPhase::Live,
    }
}

/// The gaps between consecutive times.
fn gaps(times: &[Duration]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Subscribe turns are paced: at 1,000 a second a turn may come up to 1 ms late.
const PACE_SLACK: Duration = Duration::from_millis(2);

fn transport_failure() -> Result<(), Failure> {
    Err(EwsFailure::Transport("connection refused".into()).into())
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_doubling_to_the_maximum() {
    let rig = rig(Script {
        subscribe: std::iter::repeat_with(transport_failure).take(8).collect(),
        ..Script::default()
    });
    rig.run_for(400 * SECOND).await;

    let times = rig.exchange.times("subscribe");
    assert_eq!(times.len(), 9, "eight failures, then success: {times:?}");
    for (k, gap) in gaps(&times).into_iter().enumerate() {
        // Retry k waits a uniform draw from the upper half of min(1 s × 2^k, 60 s).
        let ceiling = (SECOND * (1 << k)).min(60 * SECOND);
        assert!(
            gap >= ceiling / 2 && gap <= ceiling + PACE_SLACK,
            "retry {k} came after {gap:?}, not within [{:?}, {ceiling:?}]",
            ceiling / 2
        );
    }
    let status = rig.status().await;
    assert_eq!(status.state, WorkerState::Streaming);
    assert_eq!(status.error, None);
    rig.assert_last_error("connection refused").await;
}

#[tokio::test(start_paused = true)]
async fn the_servers_back_off_is_a_floor() {
    let busy = EwsFailure::Ews(ews::EwsError::Fault(ews::Fault {
        code: "ErrorServerBusy".into(),
        message: "The server cannot service this request right now.".into(),
        back_off: Some(45 * SECOND),
    }));
    let rig = rig(Script {
        subscribe: [Err(busy.into())].into(),
        ..Script::default()
    });
    rig.run_for(100 * SECOND).await;

    let times = rig.exchange.times("subscribe");
    assert_eq!(times.len(), 2, "{times:?}");
    let gap = times[1] - times[0];
    assert!(
        gap >= 45 * SECOND && gap <= 45 * SECOND + PACE_SLACK,
        "retried after {gap:?}, not after the 45 s the server asked for"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_mailbox_retries_slowly_and_tells_creatio_once() {
    let rig = rig(Script {
        subscribe: std::iter::repeat_with(|| Err(EwsFailure::Unauthorized.into()))
            .take(1000)
            .collect(),
        ..Script::default()
    });
    rig.run_for(4 * 3600 * SECOND).await;

    let times = rig.exchange.times("subscribe");
    for (k, gap) in gaps(&times).into_iter().enumerate() {
        let ceiling = (60 * SECOND * (1 << k)).min(1800 * SECOND);
        assert!(
            gap >= ceiling / 2 && gap <= ceiling + PACE_SLACK,
            "login {} came {gap:?} after the one before, not within [{:?}, {ceiling:?}]",
            k + 2,
            ceiling / 2
        );
    }
    // 30 s, 1, 2, 4, 8, 15, 15, ... minutes at the least: no more than 20 logins in 4 hours.
    assert!(
        (8..=20).contains(&times.len()),
        "{} logins in 4 hours",
        times.len()
    );
    assert_eq!(rig.status().await.state, WorkerState::Failed);
    let reports = rig.creatio.reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 1, "Creatio is told once: {reports:?}");
}

#[tokio::test(start_paused = true)]
async fn creatios_recreate_every_minute_keeps_the_slow_retry() {
    let rig = rig(Script {
        subscribe: std::iter::repeat_with(|| Err(EwsFailure::Unauthorized.into()))
            .take(1000)
            .collect(),
        ..Script::default()
    });
    let supervisor = Supervisor::new(rig.ctx.clone(), 900 * SECOND, 6 * SECOND);
    rig.lease().await;
    // Creatio's loop: the mailbox answers `failed`, so it sends Recreate every minute, with
    // the same credentials, for an hour.
    for _ in 0..60 {
        supervisor.start(rig.creds.clone()).await.unwrap();
        tokio::time::sleep(60 * SECOND).await;
    }

    let logins = rig.exchange.times("subscribe").len();
    // The slow schedule alone allows at most 8 in an hour (30 s, 1, 2, 4, 8, 15, 15 minutes).
    assert!(
        (6..=8).contains(&logins),
        "{logins} logins in an hour of Recreates"
    );
    assert_eq!(rig.creatio.reports.lock().unwrap().len(), 1);
    assert_eq!(rig.status().await.restarts, 0);
}

#[tokio::test(start_paused = true)]
async fn a_stream_whose_head_never_comes_is_given_up_after_the_request_timeout() {
    let rig = rig(Script {
        open: [Open::Hang].into(),
        ..Script::default()
    });
    rig.run_for(100 * SECOND).await;

    let gap = rig.reopened_after();
    // The 30 s request timeout, then the first retry's wait (0.5-1 s).
    assert!(
        gap >= 30 * SECOND + SECOND / 2 && gap <= 31 * SECOND,
        "the hanging stream was given up after {gap:?}"
    );
    assert_eq!(
        rig.exchange.times("subscribe").len(),
        1,
        "the subscription lives on"
    );
    let status = rig.status().await;
    assert_eq!(status.state, WorkerState::Streaming);
    assert_eq!(status.reconnects, 1);
    rig.assert_last_error("no answer to opening the stream")
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_without_its_first_envelope_is_reopened_after_the_request_timeout() {
    let rig = rig(Script {
        open: [Open::Then(Vec::new())].into(),
        ..Script::default()
    });
    rig.run_for(100 * SECOND).await;

    let gap = rig.reopened_after();
    // Not the 120 s idle timeout: Exchange answers a new stream at once. A connection that
    // never said anything was not healthy, so the first retry's wait (0.5-1 s) comes first.
    assert!(
        gap >= 30 * SECOND + SECOND / 2 && gap <= 31 * SECOND,
        "reopened after {gap:?}"
    );
    assert_eq!(rig.exchange.times("subscribe").len(), 1);
    assert_eq!(rig.status().await.state, WorkerState::Streaming);
}

#[tokio::test(start_paused = true)]
async fn a_stream_silent_after_its_first_envelope_is_reopened_after_the_idle_timeout() {
    let rig = rig(Script {
        open: [Open::Then(vec![Step::Batch(keep_alive())])].into(),
        ..Script::default()
    });
    rig.run_for(300 * SECOND).await;

    assert_eq!(rig.reopened_after(), 120 * SECOND);
    assert_eq!(rig.exchange.times("subscribe").len(), 1);
    let status = rig.status().await;
    assert_eq!(status.reconnects, 1);
    rig.assert_last_error("no data on the event stream").await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_keeps_ending_at_once_backs_off() {
    // Each connection ends as soon as it opens: reopening at once would be a tight loop.
    let rig = rig(Script {
        open: std::iter::repeat_with(|| Open::Then(vec![Step::End]))
            .take(6)
            .collect(),
        ..Script::default()
    });
    rig.run_for(120 * SECOND).await;

    let opens = rig.exchange.times("open");
    assert_eq!(opens.len(), 7, "{:?}", rig.exchange.calls());
    for (k, gap) in gaps(&opens).into_iter().enumerate() {
        let ceiling = SECOND * (1 << k);
        assert!(
            gap >= ceiling / 2 && gap <= ceiling,
            "reopen {k} after {gap:?}, not within [{:?}, {ceiling:?}]",
            ceiling / 2
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_panics_is_restarted_after_a_delay() {
    let rig = rig(Script {
        panics: 1,
        ..Script::default()
    });
    let supervisor = Supervisor::new(rig.ctx.clone(), 900 * SECOND, 6 * SECOND);
    rig.lease().await;
    supervisor.start(rig.creds.clone()).await.unwrap();
    tokio::time::sleep(10 * SECOND).await;

    let times = rig.exchange.times("subscribe");
    assert_eq!(times.len(), 2, "{:?}", rig.exchange.calls());
    let gap = times[1] - times[0];
    assert!(
        gap >= SECOND / 2 && gap <= SECOND + PACE_SLACK,
        "restarted after {gap:?}"
    );
    let status = rig.status().await;
    assert_eq!(status.restarts, 1);
    assert_eq!(status.state, WorkerState::Streaming);
    rig.assert_last_error("worker died").await;
}

#[tokio::test(start_paused = true)]
async fn a_subscription_lost_on_the_stream_is_given_back_and_replaced() {
    let lost = WatchBatch {
        failure: Some(response_error("ErrorSubscriptionNotFound")),
        closed: true,
        ..WatchBatch::default()
    };
    let rig = rig(Script {
        open: [Open::Then(vec![Step::Batch(lost)])].into(),
        ..Script::default()
    });
    let cancel = rig.spawn().await;
    tokio::time::sleep(10 * SECOND).await;
    cancel.cancel();
    tokio::time::sleep(SECOND).await;

    assert_eq!(
        rig.exchange.calls(),
        [
            // A new mailbox: its baseline, the mail since the Create, what came meanwhile.
            "subscribe",
            "sync",
            "find 0",
            "sync",
            "open sub-1",
            "subscribe",
            "sync",
            "open sub-2",
            "unsubscribe sub-2",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_fatal_failure_on_the_stream_gives_the_subscription_back() {
    let rig = rig(Script {
        open: [Open::Fail(EwsFailure::Unauthorized.into())].into(),
        ..Script::default()
    });
    rig.run_for(120 * SECOND).await;

    let calls = rig.exchange.calls();
    assert_eq!(
        calls[..7],
        [
            "subscribe",
            "sync",
            "find 0",
            "sync",
            "open sub-1",
            "unsubscribe sub-1",
            "subscribe"
        ],
        "{calls:?}"
    );
    // The second login waits the failed schedule (30-60 s), not the fast one.
    let subscribes = rig.exchange.times("subscribe");
    assert!(
        subscribes[1] - subscribes[0] >= 30 * SECOND,
        "{subscribes:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rejected_sync_state_is_recovered_back_to_the_last_sync() {
    let found = |id: &str, at: &str| Found {
        id: id.into(),
        received_unix_ms: crate::creatio::mail::parse_xs_datetime(at),
    };
    // Newest first, over two pages; the first item older than the last sync ends the search.
    let later = "2999-01-01T00:00:00Z";
    let rejected = response_error("ErrorInvalidSyncStateData");
    let rig = rig(Script {
        sync: [Err(rejected)].into(),
        find: [
            Ok(FindPage {
                items: vec![found("i5", later), found("i4", later)],
                next_offset: Some(2),
                complete: false,
                total: None,
            }),
            Ok(FindPage {
                items: vec![
                    found("i3", later),
                    found("i2", "2000-01-01T00:00:00Z"),
                    found("i1", later),
                ],
                next_offset: Some(5),
                complete: false,
                total: None,
            }),
        ]
        .into(),
        ..Script::default()
    });
    let fence = rig.live_at("a state Exchange forgot").await;
    let store = &rig.ctx.store;
    // Delivered by the stream before the gap: found again, not posted again.
    store
        .record("mbx", "i4", Outcome::Delivered, &fence)
        .await
        .unwrap();
    rig.run_for(10 * SECOND).await;

    let calls = rig.exchange.calls();
    assert_eq!(
        calls[..6],
        [
            "subscribe",
            "sync",
            "sync",
            "find 0",
            "find 2",
            "get_items i3,i5"
        ],
        "{calls:?}"
    );
    assert_eq!(*rig.creatio.posted.lock().unwrap(), ["i3", "i5"]);
    assert_eq!(rig.status().await.state, WorkerState::Streaming);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_token_asks_creatio_for_a_new_one_before_failing() {
    let mut rig = rig(Script {
        subscribe: std::iter::repeat_with(|| Err(EwsFailure::Unauthorized.into()))
            .take(2)
            .collect(),
        ..Script::default()
    });
    let body = json!([{
        "Id": "mbx", "SenderEmailAddress": "alice@contoso.test", "AccessToken": "expired",
        "UseOAuth": true, "BpmUser": "Supervisor", "BpmUserWorkspace": "Sales",
        "ServiceUrl": "http://exchange.test",
        "BpmEndpoint": "http://creatio.test/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
    }]);
    rig.creds = contract::parse_credentials_list(body.to_string().as_bytes())
        .unwrap()
        .remove(0);
    let _cancel = rig.spawn().await;
    tokio::time::sleep(SECOND).await;

    // The first rejection: a RefreshToken call, and no failure yet.
    assert_eq!(*rig.creatio.report_ops.lock().unwrap(), ["RefreshToken"]);
    assert_eq!(
        rig.creatio.reports.lock().unwrap()[0],
        json!({
            "MailboxId": "mbx",
            "SenderEmailAddress": "alice@contoso.test",
            "BpmUserName": "Supervisor",
            "BpmUserWorkspace": "Sales",
        })
    );
    assert_eq!(rig.status().await.state, WorkerState::Backoff);
    rig.assert_last_error("RefreshToken").await;

    // No new token came: the second rejection is a failure, reported as such; the third
    // attempt gets through, and Creatio hears the mailbox is available again.
    tokio::time::sleep(300 * SECOND).await;
    assert_eq!(
        *rig.creatio.report_ops.lock().unwrap(),
        ["RefreshToken", "ProcessMailboxState", "ProcessMailboxState"]
    );
    let reports = rig.creatio.reports.lock().unwrap().clone();
    assert_eq!(
        (&reports[1]["Avaliable"], &reports[2]["Avaliable"]),
        (&json!(false), &json!(true))
    );
    assert_eq!(rig.status().await.state, WorkerState::Streaming);
}

#[tokio::test(start_paused = true)]
async fn mail_waiting_for_creatio_is_counted_as_the_outbox_depth() {
    let rig = rig(Script {
        sync: [Ok(SyncPage {
            state: "after".into(),
            complete: true,
            added: vec![created("i1"), created("i2"), created("i3")],
        })]
        .into(),
        ..Script::default()
    });
    let held = Arc::new(tokio::sync::Semaphore::new(0));
    let rig = Rig {
        creatio: Arc::new(FakeCreatio {
            held: Some(held.clone()),
            ..FakeCreatio::default()
        }),
        ..rig
    };
    let rig = Rig {
        ctx: WorkerContext {
            creatio: rig.creatio.clone(),
            ..rig.ctx.clone()
        },
        ..rig
    };
    let fence = rig.live_at("before").await;
    let cancel = rig.worker_under(&fence, rig.ctx.clone());
    let pending = &rig.ctx.metrics.pending;
    tokio::time::sleep(SECOND).await;
    assert_eq!(pending.get(), 3, "three mails wait for Creatio");

    held.add_permits(1);
    tokio::time::sleep(SECOND).await;
    assert_eq!(pending.get(), 2);
    assert_eq!(*rig.creatio.posted.lock().unwrap(), ["i1"]);

    // Stopped while Creatio holds the rest: they leave the gauge (catch-up finds them again).
    cancel.cancel();
    tokio::time::sleep(SECOND).await;
    assert_eq!(pending.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_imap_mailbox_its_connector_refuses_is_reported_and_left_alone() {
    let mut rig = rig(Script::default());
    let body = json!([{
        "Id": "mbx", "SenderEmailAddress": "alice@contoso.test", "Password": "secret",
        "ServerTypeId": "844F0837-EAA0-4F40-B965-71F5DB9EAE6E", "ServiceUrl": "",
        "Port": 993, "Context": "{UserRequested:true,HasError:false}",
        "BpmEndpoint": "http://creatio.test/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
    }]);
    rig.creds = contract::parse_credentials_list(body.to_string().as_bytes())
        .unwrap()
        .remove(0);
    rig.run_for(60 * SECOND).await;

    assert!(
        rig.exchange.calls().is_empty(),
        "{:?}",
        rig.exchange.calls()
    );
    assert_eq!(rig.status().await.state, WorkerState::Failed);
    rig.assert_last_error("ServiceUrl (the IMAP host) is not set")
        .await;
    assert_eq!(
        *rig.creatio.report_ops.lock().unwrap(),
        ["ProcessMailboxState"]
    );
    let report = rig.creatio.reports.lock().unwrap()[0].clone();
    assert_eq!(report["Avaliable"], json!(false));
    assert_eq!(report["MailboxId"], json!("mbx"));
    assert_eq!(report["ExceptionClassName"], json!("ImapConfiguration"));
    assert_eq!(
        report["Context"],
        json!("{UserRequested:true,HasError:false}")
    );
}

/// An item new in a sync page.
fn created(id: &str) -> String {
    id.to_owned()
}

fn sync_page(state: &str, last: bool, added: Vec<String>) -> SyncPage {
    SyncPage {
        state: state.into(),
        complete: last,
        added,
    }
}

/// An item a search lists, received at `unix_ms` on the server's clock (to the second, as
/// Exchange says it).
fn found_at(id: &str, unix_ms: i64) -> Found {
    Found {
        id: id.into(),
        received_unix_ms: Some(unix_ms.div_euclid(1000) * 1000),
    }
}

/// One search page holding every item, newest first.
fn found_page(items: Vec<Found>) -> Result<FindPage, Failure> {
    Ok(FindPage {
        items,
        next_offset: None,
        complete: true,
        total: None,
    })
}

/// A failure Exchange answers with this response code.
fn response_error(code: &str) -> Failure {
    EwsFailure::Ews(ews::EwsError::Response(ews::ResponseError {
        code: code.into(),
        message: String::new(),
        back_off: None,
    }))
    .into()
}

fn server_busy() -> Failure {
    response_error("ErrorServerBusy")
}

#[tokio::test(start_paused = true)]
async fn mail_received_between_the_create_and_the_first_sync_is_delivered() {
    let asked = unix_now_ms();
    // The first sync lists the inbox as it stands: mail from before the Create, and one that
    // came after it.
    let rig = rig(Script {
        sync: [Ok(sync_page(
            "base",
            true,
            vec![created("old"), created("new")],
        ))]
        .into(),
        find: [found_page(vec![
            found_at("new", asked + 1500),
            found_at("old", asked - 60_000),
        ])]
        .into(),
        ..Script::default()
    });
    rig.run_for(10 * SECOND).await;

    assert_eq!(*rig.creatio.posted.lock().unwrap(), ["new"]);
    assert_eq!(rig.phase().await, SyncPhase::Live);
    assert_eq!(rig.status().await.state, WorkerState::Streaming);
}

#[tokio::test(start_paused = true)]
async fn the_moment_of_the_create_is_read_on_the_servers_clock() {
    let asked = unix_now_ms();
    let hour = 3_600_000;
    // Exchange's clock is an hour behind ours: a mail received a few seconds after the
    // Create carries a time an hour earlier, and one from before the Create earlier still.
    let rig = rig(Script {
        clock_offset_ms: Some(-hour),
        sync: [Ok(sync_page("base", true, vec![]))].into(),
        find: [found_page(vec![
            found_at("new", asked - hour + 2000),
            found_at("old", asked - hour - 60_000),
        ])]
        .into(),
        ..Script::default()
    });
    rig.run_for(10 * SECOND).await;

    assert_eq!(*rig.creatio.posted.lock().unwrap(), ["new"]);
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_baseline_resumes_without_posting_old_mail() {
    let rig = rig(Script {
        sync: [
            Ok(sync_page("b1", false, vec![created("old1")])),
            Err(server_busy()),
            Ok(sync_page("b2", true, vec![created("old2")])),
        ]
        .into(),
        ..Script::default()
    });
    rig.run_for(60 * SECOND).await;

    assert!(
        rig.creatio.posted.lock().unwrap().is_empty(),
        "the inbox as it stood is not new mail: {:?}",
        rig.creatio.posted.lock().unwrap()
    );
    let from: Vec<Option<String>> = rig
        .exchange
        .syncs
        .lock()
        .unwrap()
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(
        from[..3],
        [None, Some("b1".into()), Some("b1".into())],
        "the baseline resumes from its last page"
    );
    assert_eq!(rig.phase().await, SyncPhase::Live);
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_gap_recovery_resumes() {
    let rejected = response_error("ErrorInvalidSyncStateData");
    let rig = rig(Script {
        sync: [Err(rejected)].into(),
        find: [
            Err(server_busy()),
            found_page(vec![found_at("in-the-gap", unix_now_ms() + 1000)]),
        ]
        .into(),
        ..Script::default()
    });
    rig.live_at("a state Exchange forgot").await;
    rig.run_for(60 * SECOND).await;

    assert_eq!(*rig.creatio.posted.lock().unwrap(), ["in-the-gap"]);
    assert_eq!(rig.phase().await, SyncPhase::Live);
}

#[tokio::test(start_paused = true)]
async fn the_cursor_is_dated_when_exchange_was_asked_not_when_it_was_saved() {
    let rig = rig(Script {
        sync_takes: Duration::from_millis(30),
        ..Script::default()
    });
    rig.live_at("s0").await;
    rig.run_for(SECOND).await;

    let asked = rig.exchange.syncs.lock().unwrap()[0].1;
    let cursor = rig.ctx.store.sync_state("mbx").await.unwrap().unwrap();
    assert!(
        cursor.at_unix_ms <= asked,
        "dated {} ms after the request was sent",
        cursor.at_unix_ms - asked
    );
}

#[tokio::test(start_paused = true)]
async fn a_replay_cut_short_is_finished_by_the_next_worker() {
    let rig = rig(Script::default());
    let fence = rig.live_at("s").await;
    let store = &rig.ctx.store;
    for item in ["d1", "d2"] {
        let letter = DeadLetter {
            item_id: item.into(),
            message_id: None,
            subject: None,
            error: "HTTP 400".into(),
            unix_ms: 0,
        };
        store
            .record("mbx", item, Outcome::DeadLettered(letter), &fence)
            .await
            .unwrap();
    }
    assert_eq!(store.replay_dead_letters("mbx").await.unwrap(), Some(2));

    // Creatio holds its answers: the first worker posts one mail and is stopped before the
    // second gets through.
    let (holding, first) = rig.worker_with_creatio_taking(1, &fence);
    tokio::time::sleep(SECOND).await;
    assert_eq!(*holding.posted.lock().unwrap(), ["d1"]);
    first.cancel();
    tokio::time::sleep(SECOND).await;

    // The next worker (here or on another replica) delivers what is left.
    let second = rig.worker_under(&fence, rig.ctx.clone());
    tokio::time::sleep(SECOND).await;
    assert_eq!(*rig.creatio.posted.lock().unwrap(), ["d2"]);
    assert!(store.replays("mbx").await.unwrap().is_empty());
    second.cancel();
}

#[tokio::test(start_paused = true)]
async fn what_the_stream_delivered_is_not_posted_again_however_long_the_cursor_lags() {
    // Exchange refuses every sync for over three hours (the mailbox stays behind its cursor),
    // then lists a mail the stream delivered before.
    let busy_for_hours = std::iter::repeat_with(|| Err(server_busy())).take(300);
    let rig = rig(Script {
        sync: busy_for_hours
            .chain([Ok(sync_page("after", true, vec![created("streamed")]))])
            .collect(),
        ..Script::default()
    });
    let fence = rig.live_at("before").await;
    let store = &rig.ctx.store;
    store
        .record("mbx", "streamed", Outcome::Delivered, &fence)
        .await
        .unwrap();
    rig.run_for(6 * 3600 * SECOND).await;

    let syncs = rig.exchange.times("sync");
    assert_eq!(syncs.len(), 301);
    assert!(syncs[300] > 3 * 3600 * SECOND, "{:?}", syncs[300]);
    assert!(
        rig.creatio.posted.lock().unwrap().is_empty(),
        "posted again: {:?}",
        rig.creatio.posted.lock().unwrap()
    );
    // Once the cursor has moved past it, it may be forgotten.
    let cursor = store.sync_state("mbx").await.unwrap().unwrap();
    assert_eq!(
        (cursor.state.as_str(), cursor.phase),
        ("folders:1\ninbox\tafter", SyncPhase::Live)
    );
}

#[tokio::test(start_paused = true)]
async fn every_watched_folder_is_synced_and_a_new_one_listed_before_its_mail_is_new() {
    // Inbox and Sent Items were watched (the cursor an earlier worker left); Projects is new.
    let rig = rig(Script {
        folders: vec!["inbox".into(), "sent".into(), "projects".into()],
        sync: [
            Ok(sync_page("in-2", true, vec![created("in-new")])),
            Ok(sync_page("sent-2", true, vec![created("sent-new")])),
            Ok(sync_page("pr-1", true, vec![created("filed-long-ago")])),
        ]
        .into(),
        ..Script::default()
    });
    rig.live_at("folders:1\ninbox\tin-1\nsent\tsent-1\nold\told-1")
        .await;
    rig.run_for(10 * SECOND).await;
    let calls: Vec<String> = rig
        .exchange
        .calls()
        .into_iter()
        .filter(|c| !c.starts_with("get_items"))
        .collect();
    assert_eq!(
        calls[..4],
        [
            "subscribe inbox,sent,projects",
            "sync",
            "sync sent",
            "sync projects"
        ],
        "{calls:?}"
    );
    let posted = rig.creatio.posted.lock().unwrap().clone();
    assert_eq!(
        posted,
        ["in-new", "sent-new"],
        "what Projects held is not new"
    );
    let syncs: Vec<Option<String>> = rig
        .exchange
        .syncs
        .lock()
        .unwrap()
        .iter()
        .map(|(state, _)| state.clone())
        .collect();
    assert_eq!(
        syncs[..3],
        [Some("in-1".into()), Some("sent-1".into()), None],
        "each folder from its own state"
    );
    let cursor = rig.ctx.store.sync_state("mbx").await.unwrap().unwrap();
    assert_eq!(
        cursor.state, "folders:1\ninbox\tin-2\nsent\tsent-2\nprojects\tpr-1",
        "the folder no longer watched is forgotten"
    );
}

#[tokio::test(start_paused = true)]
async fn a_folder_created_while_streaming_is_watched_at_once() {
    let folder_created = WatchBatch {
        folders_changed: true,
        ..WatchBatch::default()
    };
    let rig = rig(Script {
        open: [Open::Then(vec![
            Step::Batch(keep_alive()),
            Step::Batch(folder_created),
        ])]
        .into(),
        ..Script::default()
    });
    rig.live_at("s").await;
    rig.run_for(5 * SECOND).await;
    let calls = rig.exchange.calls();
    assert_eq!(
        calls[..5],
        [
            "subscribe",
            "sync",
            "open sub-1",
            "unsubscribe sub-1",
            "subscribe"
        ],
        "{calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stopped_worker_does_not_leave_its_mailbox_streaming() {
    let rig = rig(Script::default());
    let cancel = rig.spawn().await;
    tokio::time::sleep(10 * SECOND).await;
    assert_eq!(rig.status().await.state, WorkerState::Streaming);
    cancel.cancel();
    tokio::time::sleep(SECOND).await;
    let status = rig.status().await;
    assert_eq!(status.state, WorkerState::Starting, "{status:?}");
    assert!(status.unhealthy_since_unix_ms.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_history_load_runs_oldest_first_and_resumes_in_the_next_worker() {
    // 120 mails since the moment; the stream delivered one of them already.
    let history: Vec<String> = (0..120).map(|n| format!("h{n:03}")).collect();
    let rig = rig(Script {
        history: history.clone(),
        ..Script::default()
    });
    let fence = rig.live_at("s").await;
    let store = &rig.ctx.store;
    store
        .record("mbx", "h060", Outcome::Delivered, &fence)
        .await
        .unwrap();
    assert!(store.ask_history("mbx", 1_000).await.unwrap().is_some());

    // Creatio holds its answers: the first worker gets 70 mails through and is stopped.
    let (holding, first) = rig.worker_with_creatio_taking(70, &fence);
    tokio::time::sleep(SECOND).await;
    let first_posted = holding.posted.lock().unwrap().clone();
    assert_eq!(first_posted.len(), 70);
    let saved = store.history("mbx").await.unwrap().unwrap();
    assert_eq!((saved.offset, saved.total), (50, 120), "{saved:?}");
    first.cancel();
    tokio::time::sleep(SECOND).await;

    // The next worker (here or on another replica) takes it up from the last saved page.
    let second = rig.worker_under(&fence, rig.ctx.clone());
    tokio::time::sleep(SECOND).await;
    let second_posted = rig.creatio.posted.lock().unwrap().clone();
    let all: Vec<String> = first_posted.into_iter().chain(second_posted).collect();
    let expected: Vec<String> = history.into_iter().filter(|id| id != "h060").collect();
    assert_eq!(all, expected, "every mail once, oldest first");
    assert_eq!(
        store.history("mbx").await.unwrap(),
        None,
        "the load is done"
    );
    // Listed again from the last saved page, not from the start.
    let listed = rig.exchange.calls();
    let from: Vec<&String> = listed.iter().filter(|c| c.starts_with("history")).collect();
    assert!(
        from.contains(&&"history 0".to_owned()) && from.contains(&&"history 100".to_owned()),
        "{from:?}"
    );
    assert_eq!(
        from.iter().filter(|c| **c == "history 0").count(),
        2,
        "{from:?}"
    );
    second.cancel();
}
