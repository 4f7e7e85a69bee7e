//! Creatio's side of the listener contract, for tests: the anonymous
//! `ExchangeListenerService.svc` operations (`NewEmail`, `ProcessFullEmail`,
//! `ProcessMailboxState`, `RefreshToken`) under `/0/ServiceModel/`, each call recorded with its
//! arrival time and listed through `/_control/calls`. It can be told to fail the next calls, to
//! answer slowly, and to lie: take a mail and lose it, or record one twice, so that whoever
//! checks deliveries can be shown to notice.
//!
//! Every callback is read as Creatio's WCF service reads it ([`wcf`]): one that Creatio
//! would refuse, or that would make it throw, is answered `400` with the reason and recorded
//! as a rejection, so a test sees the moment a callback drifts from the contract. [`calling`]
//! writes the bodies of Creatio's own calls to the listener, as Creatio writes them.
//!
//! As a library it starts on any address and returns a [`MockCreatio`] handle; the binary is a
//! thin wrapper.

pub mod calling;
pub mod wcf;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The operations Creatio's `ExchangeListenerService.svc` serves.
pub const OPERATIONS: [&str; 4] = [
    "NewEmail",
    "ProcessFullEmail",
    "ProcessMailboxState",
    "RefreshToken",
];

const SERVICE_PATH: &str = "/0/ServiceModel/ExchangeListenerService.svc";

/// One recorded call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    /// `NewEmail`, `ProcessFullEmail`, ...
    pub operation: String,
    pub body: serde_json::Value,
    /// The `Idempotency-Key` header, when the call carried one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Wall-clock arrival, microseconds since the Unix epoch (for latency measured from
    /// another process on the same host).
    pub received_unix_us: u64,
    /// Monotonic arrival, for latency measured in the same process.
    #[serde(skip, default = "Instant::now")]
    pub received: Instant,
}

/// How the next calls fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// How many of the next calls fail.
    pub count: u32,
    /// Their HTTP status (503 when absent).
    #[serde(default)]
    pub status: Option<u16>,
    /// A `Retry-After` header, in seconds.
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
}

/// How mock-creatio misbehaves while answering 200.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mischief {
    /// The next this many mail calls (`NewEmail`, `ProcessFullEmail`) are answered 200 and
    /// not recorded: mail lost after Creatio took it.
    #[serde(default)]
    pub drop: u32,
    /// The next this many mail calls are recorded twice.
    #[serde(default)]
    pub duplicate: u32,
    /// Every call waits this long before it is answered: a slow Creatio.
    #[serde(default)]
    pub delay_ms: u64,
}

/// One call that arrived, answered or failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub operation: String,
    pub status: u16,
    #[serde(skip, default = "Instant::now")]
    pub received: Instant,
}

/// A callback Creatio would not have read, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rejection {
    pub operation: String,
    pub reason: String,
    pub body: serde_json::Value,
}

#[derive(Debug, Default)]
struct Recorder {
    calls: Vec<Call>,
    attempts: Vec<Attempt>,
    rejections: Vec<Rejection>,
    failure: Failure,
    mischief: Mischief,
}

#[derive(Debug, Clone, Default)]
struct Shared(Arc<Mutex<Recorder>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Recorder> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running mock Creatio. Dropping it stops the server.
#[derive(Debug)]
pub struct MockCreatio {
    addr: SocketAddr,
    shared: Shared,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl MockCreatio {
    /// Binds `addr` (port 0 for any free port) and serves until dropped or shut down.
    pub async fn start(addr: SocketAddr) -> std::io::Result<MockCreatio> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Shared::default();
        let shutdown = CancellationToken::new();
        let router = Router::new()
            .route(&format!("{SERVICE_PATH}/{{operation}}"), post(record))
            .route("/_control/calls", get(list).delete(clear))
            .route("/_control/rejections", get(rejections))
            .route("/_control/failures", post(set_failures))
            .route("/_control/mischief", post(set_mischief))
            .route("/_control/stats", get(stats))
            .with_state(shared.clone());
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        Ok(MockCreatio {
            addr,
            shared,
            shutdown,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of one operation, e.g. the `BpmEndpoint` for `ProcessFullEmail`.
    pub fn url(&self, operation: &str) -> String {
        format!("http://{}{SERVICE_PATH}/{operation}", self.addr)
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// The calls of one operation, in arrival order.
    pub fn calls_of(&self, operation: &str) -> Vec<Call> {
        self.shared
            .lock()
            .calls
            .iter()
            .filter(|c| c.operation == operation)
            .cloned()
            .collect()
    }

    /// Answers the next `n` calls with HTTP 503 (they are not recorded as calls).
    pub fn fail_next(&self, n: u32) {
        self.fail_with(Failure {
            count: n,
            ..Failure::default()
        });
    }

    /// Fails the next calls as `failure` says (they are not recorded as calls).
    pub fn fail_with(&self, failure: Failure) {
        self.shared.lock().failure = failure;
    }

    /// Misbehaves as `mischief` says, from the next call on.
    pub fn misbehave(&self, mischief: Mischief) {
        self.shared.lock().mischief = mischief;
    }

    /// How many calls were recorded per operation, and how many failed.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    /// The callbacks refused because Creatio would not have read them, in arrival order.
    pub fn rejections(&self) -> Vec<Rejection> {
        self.shared.lock().rejections.clone()
    }

    /// Every call that arrived, with the status it got, in arrival order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.shared.lock().attempts.clone()
    }

    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for MockCreatio {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn record(
    State(shared): State<Shared>,
    Path(operation): Path<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    if !OPERATIONS.contains(&operation.as_str()) {
        return (StatusCode::NOT_FOUND, format!("no operation {operation}")).into_response();
    }
    let body: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")).into_response();
        }
    };
    let delay = shared.lock().mischief.delay_ms;
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let mut rec = shared.lock();
    if rec.failure.count > 0 {
        rec.failure.count -= 1;
        let status = rec
            .failure
            .status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        rec.attempts.push(Attempt {
            operation,
            status: status.as_u16(),
            received: Instant::now(),
        });
        let mut response = status.into_response();
        if let Some(v) = rec.failure.retry_after_secs {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v.into());
        }
        return response;
    }
    if let Err(reason) = wcf::read(&operation, &body) {
        tracing::warn!(operation = %operation, reason = %reason, "a callback Creatio would not read");
        rec.attempts.push(Attempt {
            operation: operation.clone(),
            status: 400,
            received: Instant::now(),
        });
        rec.rejections.push(Rejection {
            operation,
            reason: reason.clone(),
            body,
        });
        return (StatusCode::BAD_REQUEST, reason).into_response();
    }
    rec.attempts.push(Attempt {
        operation: operation.clone(),
        status: 200,
        received: Instant::now(),
    });
    let is_mail = operation == "NewEmail" || operation == "ProcessFullEmail";
    let copies = if is_mail && rec.mischief.drop > 0 {
        rec.mischief.drop -= 1;
        0
    } else if is_mail && rec.mischief.duplicate > 0 {
        rec.mischief.duplicate -= 1;
        2
    } else {
        1
    };
    let call = Call {
        operation,
        idempotency_key: headers
            .get("Idempotency-Key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        received_unix_us: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0),
        received: Instant::now(),
    };
    for _ in 0..copies {
        rec.calls.push(call.clone());
    }
    Json(serde_json::json!({})).into_response()
}

#[derive(Debug, Deserialize)]
struct Filter {
    operation: Option<String>,
}

async fn list(State(shared): State<Shared>, Query(filter): Query<Filter>) -> Json<Vec<Call>> {
    let rec = shared.lock();
    Json(
        rec.calls
            .iter()
            .filter(|c| {
                filter
                    .operation
                    .as_ref()
                    .is_none_or(|op| &c.operation == op)
            })
            .cloned()
            .collect(),
    )
}

/// Counts without bodies, cheap enough to poll while mail flows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Recorded (answered 200) calls per operation.
    pub calls: std::collections::BTreeMap<String, u64>,
    /// Calls answered with a failure (injected, or a rejection).
    pub failed: u64,
    /// Callbacks refused because Creatio would not have read them.
    #[serde(default)]
    pub rejected: u64,
}

impl Recorder {
    fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for call in &self.calls {
            *stats.calls.entry(call.operation.clone()).or_default() += 1;
        }
        stats.failed = self.attempts.iter().filter(|a| a.status != 200).count() as u64;
        stats.rejected = self.rejections.len() as u64;
        stats
    }
}

async fn stats(State(shared): State<Shared>) -> Json<Stats> {
    Json(shared.lock().stats())
}

async fn rejections(State(shared): State<Shared>) -> Json<Vec<Rejection>> {
    Json(shared.lock().rejections.clone())
}

async fn clear(State(shared): State<Shared>) -> StatusCode {
    shared.lock().calls.clear();
    StatusCode::NO_CONTENT
}

async fn set_failures(State(shared): State<Shared>, Json(f): Json<Failure>) -> StatusCode {
    shared.lock().failure = f;
    StatusCode::NO_CONTENT
}

async fn set_mischief(State(shared): State<Shared>, Json(m): Json<Mischief>) -> StatusCode {
    shared.lock().mischief = m;
    StatusCode::NO_CONTENT
}
