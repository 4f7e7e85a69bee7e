//! A mailbox's one connection, shared by the commands its worker runs and the watch that
//! IDLEs between them: a command waiting for it ends the IDLE, runs, and hands the connection
//! back. A mailbox so holds one socket, whatever it is doing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Mutex, Notify};

use super::failure::ImapFailure;
use super::session::{Endpoint, Login, Session};
use crate::engine::protocol::Limits;

#[derive(Debug)]
pub(super) struct Connection {
    pub endpoint: Endpoint,
    pub login: Login,
    pub tls: Arc<rustls::ClientConfig>,
    pub limits: Limits,
    /// The session, taken out while in use: one dropped half-way through a command is closed
    /// with it, never handed on in the middle of an answer.
    session: Mutex<Option<Session>>,
    /// Commands waiting for the session.
    waiting: AtomicUsize,
    /// Rung when a command starts waiting: the watch leaves IDLE for it.
    pub(super) wanted: Notify,
}

/// Counts a command as waiting until it holds the session (or is dropped first).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connection {
    pub fn new(
        endpoint: Endpoint,
        login: Login,
        tls: Arc<rustls::ClientConfig>,
        limits: Limits,
    ) -> Connection {
        Connection {
            endpoint,
            login,
            tls,
            limits,
            session: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            wanted: Notify::new(),
        }
    }

    /// Opens a session of its own, outside the shared one (a credentials check).
    pub async fn open(&self) -> Result<Session, ImapFailure> {
        Session::open(&self.endpoint, &self.login, &self.tls, self.limits).await
    }

    /// Runs `op` on the session, opening it first when needed, as soon as the watch lets go.
    pub async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut Session) -> Result<T, ImapFailure>,
    ) -> Result<T, ImapFailure> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(&self.waiting);
        self.wanted.notify_one();
        let guard = self.session.lock().await;
        drop(waiting);
        self.on(guard, op).await
    }

    /// Runs `op` for the watch: it waits its turn without asking anyone to hurry.
    pub async fn run_for_watch<T>(
        &self,
        op: impl AsyncFnOnce(&mut Session) -> Result<T, ImapFailure>,
    ) -> Result<T, ImapFailure> {
        let guard = self.session.lock().await;
        self.on(guard, op).await
    }

    /// Whether a command waits for the session.
    pub fn is_wanted(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    async fn on<T>(
        &self,
        mut guard: tokio::sync::MutexGuard<'_, Option<Session>>,
        op: impl AsyncFnOnce(&mut Session) -> Result<T, ImapFailure>,
    ) -> Result<T, ImapFailure> {
        let mut session = match guard.take() {
            Some(s) => s,
            None => self.open().await?,
        };
        let result = op(&mut session).await;
        match &result {
            // The server answered in order: the session can go on.
            Ok(_) | Err(ImapFailure::Refused { .. } | ImapFailure::ValidityChanged { .. }) => {
                *guard = Some(session)
            }
            // Anything else may have left an answer half-read: a fresh session next time.
            Err(_) => {}
        }
        result
    }
}
