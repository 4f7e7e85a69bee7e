//! Creatio's side of the listener contract, for tests: the anonymous
//! `ExchangeListenerService.svc` operations (`NewEmail`, `ProcessFullEmail`,
//! `ProcessMailboxState`, `RefreshToken`) under `/0/ServiceModel/`, each call recorded with its
//! arrival time and listed through `/_control/calls`. It can be told to fail the next calls.
//!
//! As a library it starts on any address and returns a [`MockCreatio`] handle; the binary is a
//! thin wrapper.

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
    /// Wall-clock arrival, milliseconds since the Unix epoch.
    pub received_unix_ms: u128,
    /// Monotonic arrival, for latency measured in the same process.
    #[serde(skip, default = "Instant::now")]
    pub received: Instant,
}

#[derive(Debug, Default)]
struct Recorder {
    calls: Vec<Call>,
    /// How many of the next calls to answer with 503.
    failures: u32,
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
            .route("/_control/failures", post(set_failures))
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

    /// Answers the next `n` calls with HTTP 503 (they are not recorded).
    pub fn fail_next(&self, n: u32) {
        self.shared.lock().failures = n;
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
    let mut rec = shared.lock();
    if rec.failures > 0 {
        rec.failures -= 1;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    rec.calls.push(Call {
        operation,
        body,
        received_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
        received: Instant::now(),
    });
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

async fn clear(State(shared): State<Shared>) -> StatusCode {
    shared.lock().calls.clear();
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct Failures {
    count: u32,
}

async fn set_failures(State(shared): State<Shared>, Json(f): Json<Failures>) -> StatusCode {
    shared.lock().failures = f.count;
    StatusCode::NO_CONTENT
}
