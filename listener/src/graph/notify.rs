//! Change notifications: Graph posts to `--graph-notification-url` (the listener's
//! `/graph/notifications`, through the ingress) when a watched folder gets a message, and when
//! a subscription needs attention (`lifecycleEvent`).
//!
//! The endpoint answers at once and does no work in the request: Graph holds back, then
//! drops, notifications for an endpoint slower than 10 seconds. A validation request
//! (`?validationToken=`) is echoed as text. A notification's `clientState` must carry a
//! mailbox id under an app's MAC ([`super::apps::GraphApps::mailbox_of`]), or it is
//! ignored. What remains is queued and passed to every replica through the store (the
//! notification reaches any replica; the mailbox runs on one), where it wakes the
//! mailbox's watch: a notification is a hint, and the watch's delta poll finds what is new.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::Notify;

use super::apps::GraphApps;
use crate::engine::store::Store;

/// The path Graph posts to, under the API's base path (and its token, when it has one).
pub const PATH: &str = "/graph/notifications";

/// Notes waiting to be passed to the store at most; beyond them a burst is dropped (each
/// mailbox's own polling finds its mail a little later).
const QUEUE: usize = 10_000;

/// What a note tells a mailbox's watch.
const RESUBSCRIBE: &str = "\tresubscribe";

/// The wake-up of one mailbox's watch.
#[derive(Debug, Default)]
pub struct Hint {
    pub(super) notify: Notify,
    /// Graph removed the subscriptions or wants them authorized again: subscribe afresh.
    pub(super) resubscribe: std::sync::atomic::AtomicBool,
}

/// The hints of the mailboxes this replica serves through Graph.
#[derive(Debug, Default)]
pub struct Hints(Mutex<HashMap<String, Weak<Hint>>>);

impl Hints {
    /// The hint a mailbox's watch waits on; it lives as long as the mailbox's server.
    pub(super) fn register(&self, mailbox: &str) -> Arc<Hint> {
        let mut hints = self.0.lock().unwrap_or_else(|p| p.into_inner());
        hints.retain(|_, h| h.strong_count() > 0);
        if let Some(hint) = hints.get(mailbox).and_then(Weak::upgrade) {
            return hint;
        }
        let hint = Arc::new(Hint::default());
        hints.insert(mailbox.to_owned(), Arc::downgrade(&hint));
        hint
    }

    /// A note from any replica: wakes the mailbox's watch, when it runs here.
    pub fn nudged(&self, note: &str) {
        let (mailbox, resubscribe) = match note.strip_suffix(RESUBSCRIBE) {
            Some(mailbox) => (mailbox, true),
            None => (note, false),
        };
        let hint = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(mailbox)
            .and_then(Weak::upgrade);
        if let Some(hint) = hint {
            if resubscribe {
                hint.resubscribe
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            hint.notify.notify_one();
        }
    }
}

/// What the endpoint needs: the apps (to check a `clientState`) and the queue to the store.
#[derive(Debug, Clone)]
pub struct Webhook {
    apps: GraphApps,
    queue: tokio::sync::mpsc::Sender<String>,
}

impl Webhook {
    /// The endpoint, and a task passing its notes to every replica through `store`.
    pub fn start(apps: GraphApps, store: Arc<dyn Store>) -> Webhook {
        let (queue, mut notes) = tokio::sync::mpsc::channel::<String>(QUEUE);
        tokio::spawn(async move {
            while let Some(note) = notes.recv().await {
                if let Err(e) = store.nudge(&note).await {
                    tracing::warn!(error = %e, "could not pass a Graph notification on; the mailbox's polling will find its mail");
                }
            }
        });
        Webhook { apps, queue }
    }

    /// `POST` on [`PATH`].
    pub fn route(self) -> axum::routing::MethodRouter {
        axum::routing::post(receive).with_state(self)
    }
}

#[derive(Deserialize)]
struct Validation {
    #[serde(rename = "validationToken")]
    validation_token: Option<String>,
}

#[derive(Deserialize)]
struct Notifications {
    #[serde(default)]
    value: Vec<Notification>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    client_state: Option<String>,
    lifecycle_event: Option<String>,
}

async fn receive(
    State(hook): State<Webhook>,
    Query(validation): Query<Validation>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(token) = validation.validation_token {
        // Graph checks that this endpoint is ours to call: the token back, as text.
        return (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            token,
        )
            .into_response();
    }
    let Ok(Json(notifications)) = Json::<Notifications>::from_bytes(&body) else {
        return (StatusCode::BAD_REQUEST, "not a Graph notification").into_response();
    };
    for n in notifications.value {
        let Some(mailbox) = n
            .client_state
            .as_deref()
            .and_then(|s| hook.apps.mailbox_of(s))
        else {
            tracing::debug!("a Graph notification without a valid clientState; ignored");
            continue;
        };
        let note = match n.lifecycle_event.as_deref() {
            Some("subscriptionRemoved" | "reauthorizationRequired") => {
                format!("{mailbox}{RESUBSCRIBE}")
            }
            // New mail, or `missed`: either way the delta poll finds what is new.
            _ => mailbox,
        };
        if hook.queue.try_send(note).is_err() {
            tracing::debug!("the Graph notification queue is full; a hint dropped");
        }
    }
    StatusCode::ACCEPTED.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_wakes_the_mailbox_it_names_and_says_when_to_subscribe_again() {
        let hints = Hints::default();
        let hint = hints.register("m1");
        assert!(Arc::ptr_eq(&hint, &hints.register("m1")));
        hints.nudged("m2");
        hints.nudged(&format!("m1{RESUBSCRIBE}"));
        assert!(hint.resubscribe.load(std::sync::atomic::Ordering::Relaxed));
        // The permit waits for the watch.
        assert!(hint.notify.notified().now_or_never().is_some());
        drop(hint);
        hints.nudged("m1");
    }

    use futures_util::FutureExt as _;
}
