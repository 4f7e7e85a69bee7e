//! A Microsoft Graph mail server for tests and demos.
//!
//! It answers what a mail client of Exchange Online asks of Graph with app-only access: the
//! token endpoint (client credentials, with a client secret or a certificate's signed
//! assertion; a wrong one refused), users and their mail folders with child folders, a
//! folder's `messages/delta` with deltaLinks that expire on request, messages found by
//! received time or Message-ID, a message's MIME (`$value`), and `sendMail` with a MIME body
//! delivering to the users it holds. An application access policy, throttling (`429` with
//! `Retry-After`) and outages are faults on request. As a library it starts on any address
//! (port 0 in tests) and returns a [`MockGraph`] whose typed methods do what the JSON control
//! API under `/_control/` does; the binary is a thin wrapper.
//!
//! One address serves both the token authority and Graph: a client is pointed at it for both.

mod control;
mod server;
mod state;
mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use mock_ews::NewMail;

/// In this mock, a folder's or message's EWS id is its Graph id behind this prefix (as EWS
/// ids and Graph's REST ids differ in Exchange Online).
pub const EWS_ID_PREFIX: &str = "AQMkEws";

/// The EWS id of a folder or message with this Graph id: what Creatio kept from the days it
/// read the mailbox through EWS.
pub fn ews_id(graph_id: &str) -> String {
    format!("{EWS_ID_PREFIX}{graph_id}")
}
pub use state::{App, ControlError, Delivered, Fault, Listed, RequestRecord, Stats};
use state::{Inner, World};

/// A running mock Graph. Dropping it stops the server.
#[derive(Debug)]
pub struct MockGraph {
    addr: SocketAddr,
    world: Arc<World>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl MockGraph {
    /// Binds `addr` (port 0 for any free port) and serves until dropped or shut down.
    pub async fn start(addr: SocketAddr) -> std::io::Result<MockGraph> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let world = Arc::new(World::default());
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(std::io::Error::other)?;
        let (notifier, outgoing) = tokio::sync::mpsc::unbounded_channel();
        world.lock().notifier = Some(notifier);
        tokio::spawn(notify(world.clone(), http.clone(), outgoing));
        let router = server::router(server::App {
            world: world.clone(),
            base: format!("http://{addr}").into(),
            http,
        });
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        Ok(MockGraph {
            addr,
            world,
            shutdown,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of Graph and of the token authority alike (`http://127.0.0.1:port`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers an app in its tenant.
    pub fn add_app(&self, app: App) {
        self.world.lock().apps.push(app);
    }

    /// Creates a user (a mailbox) with the well-known folders; nothing when it exists.
    pub fn add_user(&self, upn: &str) {
        self.world.lock().create_user(upn);
    }

    /// Creates a mail folder under `parent` (a display name), or at the top.
    pub fn add_folder(
        &self,
        upn: &str,
        name: &str,
        parent: Option<&str>,
    ) -> Result<String, ControlError> {
        self.world.lock().create_folder(upn, name, parent)
    }

    /// Puts a mail into a user's mailbox (the folder `mail.folder` names, else the inbox).
    pub fn deliver(&self, upn: &str, mail: NewMail) -> Result<Delivered, ControlError> {
        self.world.lock().deliver(upn, mail)
    }

    /// A user's messages, in one folder (by display name) or all.
    pub fn messages(&self, upn: &str, folder: Option<&str>) -> Result<Vec<Listed>, ControlError> {
        list(&self.world.lock(), upn, folder)
    }

    /// Applies `fault` to the next requests (after the faults already waiting).
    pub fn fault(&self, fault: Fault) {
        self.world.lock().faults.push(fault);
    }

    /// Leaves out the notifications of the next `count` new messages (Graph loses some).
    pub fn drop_notifications(&self, count: u32) {
        self.world.lock().drop_notifications = count;
    }

    /// Sends a lifecycle event (`missed`, `subscriptionRemoved`, `reauthorizationRequired`)
    /// to every subscription; `subscriptionRemoved` removes them.
    pub fn lifecycle(&self, event: &str) {
        self.world.lock().lifecycle(event);
    }

    /// How many subscriptions are live.
    pub fn subscriptions(&self) -> usize {
        let now = mock_ews::clock::now_unix();
        self.world
            .lock()
            .subscriptions
            .iter()
            .filter(|s| s.expires_unix > now)
            .count()
    }

    /// Makes every deltaLink and skip token given so far unknown (`410 SyncStateNotFound`).
    pub fn expire_delta(&self) {
        self.world.lock().delta_generation += 1;
    }

    /// How long the tokens issued from now on live.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.world.lock().token_lifetime = lifetime.max(Duration::from_secs(1));
    }

    pub fn stats(&self) -> Stats {
        self.world.lock().stats.clone()
    }

    /// The latest requests (at most a few thousand), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.world.lock().records.iter().cloned().collect()
    }

    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for MockGraph {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Posts each notification to its subscriber, several at once, and counts how they were
/// answered: within 10 s with a 2xx, or not.
async fn notify(
    world: Arc<World>,
    http: reqwest::Client,
    mut outgoing: tokio::sync::mpsc::UnboundedReceiver<state::Outgoing>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    while let Some((url, body)) = outgoing.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (world, http) = (world.clone(), http.clone());
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let answer = http
                .post(&url)
                .json(&body)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            let ms = started.elapsed().as_millis() as u64;
            let mut w = world.lock();
            match answer {
                Ok(a) if a.status().is_success() => w.stats.notifications_delivered += 1,
                _ => w.stats.notifications_failed += 1,
            }
            w.stats.slowest_notification_ms = w.stats.slowest_notification_ms.max(ms);
            drop(slot);
        });
    }
}

/// A user's messages, in one folder (by display name) or all.
pub(crate) fn list(
    w: &Inner,
    upn: &str,
    folder: Option<&str>,
) -> Result<Vec<Listed>, ControlError> {
    let user = w.user(upn)?;
    let only = match folder {
        None => None,
        Some(name) => Some(
            user.folder_named(name)
                .ok_or_else(|| ControlError::NoSuchFolder(name.to_owned()))?
                .id
                .clone(),
        ),
    };
    Ok(user
        .messages
        .iter()
        .filter(|m| only.as_ref().is_none_or(|f| &m.folder == f))
        .map(|m| Listed {
            id: m.id.clone(),
            folder: user
                .folders
                .iter()
                .find(|f| f.id == m.folder)
                .map(|f| f.name.clone())
                .unwrap_or_default(),
            internet_message_id: m.internet_message_id.clone(),
            subject: m.subject.clone(),
            mime: base64::engine::general_purpose::STANDARD.encode(m.mime.as_slice()),
        })
        .collect())
}
