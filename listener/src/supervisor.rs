//! Starts, replaces and stops mailbox workers. A mailbox has at most one worker: a new one is
//! started only after the old one has stopped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::contract::Credentials;
use crate::registry::{Registry, WorkerState};
use crate::worker::{self, WorkerContext};

/// How long a stopping worker may take to unsubscribe before it is abandoned.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Running {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, self.task).await.is_err() {
            abort.abort();
        }
    }
}

#[derive(Debug)]
pub struct Supervisor {
    ctx: WorkerContext,
    workers: Mutex<HashMap<String, Running>>,
}

impl Supervisor {
    pub fn new(ctx: WorkerContext) -> Self {
        Supervisor {
            ctx,
            workers: Mutex::new(HashMap::new()),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.ctx.registry
    }

    fn take(&self, id: &str) -> Option<Running> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Stores the mailbox and (re)starts its worker with these credentials.
    pub async fn start(&self, creds: Credentials) {
        if let Some(old) = self.take(&creds.id) {
            old.stop().await;
        }
        self.ctx.registry.upsert(creds.clone());
        let cancel = CancellationToken::new();
        let id = creds.id.clone();
        let task = tokio::spawn(worker::run(self.ctx.clone(), creds, cancel.clone()));
        let previous = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Running { cancel, task });
        // A concurrent start for the same mailbox won the race: stop its worker.
        if let Some(previous) = previous {
            previous.stop().await;
        }
    }

    /// Stops the mailbox's worker and forgets the mailbox; false if it was unknown.
    pub async fn stop(&self, id: &str) -> bool {
        let running = self.take(id);
        let known = self.ctx.registry.remove(id);
        if let Some(r) = running {
            r.stop().await;
        }
        known
    }

    /// What Creatio's SubscriptionsState reports: `exists` for a mailbox being served.
    pub fn state(&self, id: &str) -> &'static str {
        let running = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|r| !r.task.is_finished());
        match self.ctx.registry.status(id) {
            Some(s) if running && s.state != WorkerState::Failed => "exists",
            Some(_) => "failed",
            None => "notExists",
        }
    }

    /// Stops every worker (each unsubscribes), in parallel.
    pub async fn shutdown(&self) {
        let all: Vec<Running> = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        futures_util::future::join_all(all.into_iter().map(Running::stop)).await;
    }
}
