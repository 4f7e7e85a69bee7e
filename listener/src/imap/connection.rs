//! A mailbox's one connection, shared by the commands its worker runs and the watch that
//! IDLEs between them: a command waiting for it ends the IDLE, runs, and hands the connection
//! back. A mailbox so holds one socket, whatever it is doing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use tokio::sync::{Mutex, Notify, Semaphore};

use super::failure::ImapFailure;
use super::session::{Endpoint, Login, Session};
use crate::engine::protocol::Limits;

/// The connections each login may hold to each server: servers cap them (Dovecot at 10 a
/// user and address, Exchange's IMAP at 16, Gmail at 15), and mailboxes that share a login
/// (one shared mailbox added by several Creatio users) share its places. A connection over
/// the cap waits for one to close instead of being refused by the server.
#[derive(Debug)]
pub struct Slots {
    per_login: usize,
    by_login: std::sync::Mutex<HashMap<String, Weak<Semaphore>>>,
}

impl Slots {
    pub fn new(per_login: usize) -> Slots {
        Slots {
            per_login: per_login.max(1),
            by_login: std::sync::Mutex::default(),
        }
    }

    /// The places of `user` on the server at `endpoint`.
    pub(super) fn of(&self, endpoint: &Endpoint, user: &str) -> Arc<Semaphore> {
        let key = format!(
            "{}:{}/{}",
            endpoint.host.to_ascii_lowercase(),
            endpoint.port,
            user.to_ascii_lowercase()
        );
        let mut by_login = self.by_login.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slots) = by_login.get(&key).and_then(Weak::upgrade) {
            return slots;
        }
        // Logins no mailbox uses any more go when a new one comes.
        by_login.retain(|_, slots| slots.strong_count() > 0);
        let slots = Arc::new(Semaphore::new(self.per_login));
        by_login.insert(key, Arc::downgrade(&slots));
        slots
    }
}

#[derive(Debug)]
pub(super) struct Connection {
    pub endpoint: Endpoint,
    pub login: Login,
    pub tls: Arc<rustls::ClientConfig>,
    pub limits: Limits,
    /// The places this login has on the server.
    slots: Arc<Semaphore>,
    per_login: usize,
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
        slots: &Slots,
    ) -> Connection {
        Connection {
            slots: slots.of(&endpoint, login.user()),
            per_login: slots.per_login,
            endpoint,
            login,
            tls,
            limits,
            session: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            wanted: Notify::new(),
        }
    }

    /// Opens a session of its own, outside the shared one (a credentials check), once the
    /// login has a place for it.
    pub async fn open(&self) -> Result<Session, ImapFailure> {
        let slot = tokio::time::timeout(
            self.limits.request_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await
        .map_err(|_| ImapFailure::Busy {
            open: self.per_login,
        })?
        .expect("the semaphore is never closed");
        let mut session =
            Session::open(&self.endpoint, &self.login, &self.tls, self.limits).await?;
        session.hold(slot);
        Ok(session)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::Security;

    #[test]
    fn a_login_on_a_server_has_its_places_shared_by_its_mailboxes() {
        let slots = Slots::new(2);
        let on = |host: &str, port| Endpoint {
            host: host.into(),
            port,
            security: Security::Tls,
        };
        let a = slots.of(&on("imap.contoso.com", 993), "Alice@contoso.com");
        let same = slots.of(&on("IMAP.contoso.com", 993), "alice@contoso.com");
        assert!(Arc::ptr_eq(&a, &same));
        let other_user = slots.of(&on("imap.contoso.com", 993), "bob@contoso.com");
        let other_port = slots.of(&on("imap.contoso.com", 143), "alice@contoso.com");
        assert!(!Arc::ptr_eq(&a, &other_user) && !Arc::ptr_eq(&a, &other_port));
        assert_eq!(a.available_permits(), 2);
        // A login no mailbox holds any more starts afresh.
        let _held = a.clone().try_acquire_owned().unwrap();
        drop((a, same, _held));
        let again = slots.of(&on("imap.contoso.com", 993), "alice@contoso.com");
        assert_eq!(again.available_permits(), 2);
    }
}
