//! GetStreamingEvents: one chunked HTTP body per connection, filled by a writer task until
//! the connection times out, the client goes away, a fault ends it, or the server shuts down.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::faults::FaultKind;
use crate::server::App;
use crate::soap;
use crate::state::{Refused, World};

const OPERATION: &str = "GetStreamingEvents";

fn chunked(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A whole stream that is one closing error message.
fn refuse(code: &str, text: &str) -> Response {
    let body = soap::response(
        OPERATION,
        &soap::error(
            OPERATION,
            code,
            text,
            "<m:ConnectionStatus>Closed</m:ConnectionStatus>",
        ),
    );
    chunked(Body::from(format!("{}{body}", soap::XML_DECL)))
}

/// Answers GetStreamingEvents: a closing error for bad arguments, unknown subscriptions
/// (or ones living on another mailbox server than `backend`, the one the request reached) and
/// subscriptions another account made; else a body that a writer task fills. The connection
/// counts against the acting mailbox's limit: the anchor's, when a service account
/// impersonates one.
pub(crate) fn stream(
    app: App,
    principal: &str,
    acting: String,
    backend: Option<String>,
    ids: Vec<String>,
    timeout_minutes: u64,
) -> Response {
    if ids.is_empty() || ids.len() > 200 || !(1..=30).contains(&timeout_minutes) {
        return refuse(
            "ErrorInvalidArgument",
            "Between 1 and 200 subscription ids and a ConnectionTimeout of 1 to 30 minutes are required.",
        );
    }
    let unfit = app
        .world
        .check_subscriptions(principal, backend.as_deref(), &ids);
    let refusal = if !unfit.unknown.is_empty() {
        Some((
            "ErrorSubscriptionNotFound",
            "The specified subscription was not found.",
            unfit.unknown,
        ))
    } else if !unfit.denied.is_empty() {
        Some((
            "ErrorSubscriptionAccessDenied",
            "A subscription can only be used by the account that created it.",
            unfit.denied,
        ))
    } else {
        None
    };
    if let Some((code, text, named)) = refusal {
        let body = soap::stream_error(code, text, &named);
        return chunked(Body::from(format!("{}{body}", soap::XML_DECL)));
    }
    let waker = Arc::new(Notify::new());
    if let Err(Refused::TooManyStreams) = app.world.attach(&acting, &ids, &waker) {
        return refuse(
            "ErrorExceededConnectionCount",
            "You have exceeded the available concurrent connections for your account.",
        );
    }
    let attached = Attached {
        world: app.world.clone(),
        mailbox: acting,
        ids,
        waker,
    };
    let mut lifetime = Duration::from_secs(timeout_minutes * 60);
    if let Some(cap) = app.config.max_connection_time {
        lifetime = lifetime.min(cap);
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(
        Writer {
            app,
            attached,
            tx,
            silent: None,
        }
        .run(lifetime),
    );
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    chunked(Body::from_stream(body))
}

/// A connection's hold on its subscriptions, released however the writer ends.
struct Attached {
    world: Arc<World>,
    mailbox: String,
    ids: Vec<String>,
    waker: Arc<Notify>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.world.detach(&self.mailbox, &self.ids, &self.waker);
    }
}

/// Whether the connection goes on after a step.
enum Next {
    Continue,
    /// Send `Closed` and end.
    Close,
    /// End now (the client is gone, or the connection was cut).
    Stop,
}

struct Writer {
    app: App,
    attached: Attached,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    /// While silenced: until when (`Some(None)`: until the connection ends).
    silent: Option<Option<Instant>>,
}

impl Writer {
    async fn run(mut self, lifetime: Duration) {
        if !self
            .send_raw(format!("{}{}", soap::XML_DECL, soap::stream_status(false)))
            .await
        {
            return;
        }
        let deadline = tokio::time::sleep(lifetime);
        tokio::pin!(deadline);
        let period = self.app.config.keepalive;
        let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
        let shutdown = self.app.shutdown.clone();
        let waker = self.attached.waker.clone();
        loop {
            let next = tokio::select! {
                _ = waker.notified() => self.step(false).await,
                _ = keepalive.tick() => self.step(true).await,
                // A silenced server says nothing at the end either.
                _ = &mut deadline => if self.still_silent() { Next::Stop } else { Next::Close },
                _ = shutdown.cancelled() => Next::Close,
                _ = self.tx.closed() => Next::Stop,
            };
            match next {
                Next::Continue => {}
                Next::Close => break,
                Next::Stop => return,
            }
        }
        let _ = self.send_raw(soap::stream_status(true)).await;
    }

    fn fault(&self, wanted: impl Fn(&FaultKind) -> bool) -> Option<(FaultKind, Option<Instant>)> {
        self.app
            .world
            .take_fault(&self.attached.mailbox, OPERATION, wanted)
    }

    /// True while a silence that already fired lasts.
    fn still_silent(&self) -> bool {
        match self.silent {
            Some(Some(until)) => Instant::now() < until,
            Some(None) => true,
            None => false,
        }
    }

    /// Takes a `silence` fault if one is armed; true while the connection must say nothing.
    fn silenced(&mut self) -> bool {
        if let Some((_, until)) = self.fault(|k| *k == FaultKind::Silence) {
            self.silent = Some(until);
        }
        if !self.still_silent() {
            self.silent = None;
        }
        self.silent.is_some()
    }

    /// One turn of the connection: after a wake-up, or at a keep-alive tick.
    async fn step(&mut self, tick: bool) -> Next {
        let lost = self.fault(|k| {
            matches!(
                k,
                FaultKind::SubscriptionNotFound | FaultKind::InvalidSubscription
            )
        });
        if let Some((kind, _)) = lost {
            let (code, text) = match kind {
                FaultKind::InvalidSubscription => {
                    ("ErrorInvalidSubscription", "Subscription is invalid.")
                }
                _ => (
                    "ErrorSubscriptionNotFound",
                    "The specified subscription was not found.",
                ),
            };
            self.attached.world.forget(&self.attached.ids);
            let _ = self
                .send(soap::stream_error(code, text, &self.attached.ids))
                .await;
            return Next::Stop;
        }
        if self.silenced() {
            return Next::Continue;
        }
        let (batches, gone) = self.attached.world.drain(&self.attached.ids);
        if !batches.is_empty() {
            let n = batches.iter().map(|(_, _, e)| e.len() as u64).sum();
            if self
                .fault(|k| *k == FaultKind::MissedNotificationEvents)
                .is_some()
            {
                self.app.world.count_events(n, true);
                let ids: Vec<String> = batches.into_iter().map(|(id, _, _)| id).collect();
                let body = soap::response(
                    OPERATION,
                    &soap::error(
                        OPERATION,
                        "ErrorMissedNotificationEvents",
                        "Events were missed for the subscription.",
                        &soap::error_subscription_ids(&ids),
                    ),
                );
                return self.outcome(self.send(body).await);
            }
            let sent = self.send(soap::stream_notifications(&batches)).await;
            self.app.world.count_events(n, !sent);
            return self.outcome(sent);
        }
        if !gone.is_empty() {
            let _ = self
                .send(soap::stream_error(
                    "ErrorSubscriptionNotFound",
                    "The specified subscription was not found.",
                    &gone,
                ))
                .await;
            return Next::Stop;
        }
        if tick {
            return self.outcome(self.send(soap::stream_status(false)).await);
        }
        Next::Continue
    }

    fn outcome(&self, sent: bool) -> Next {
        if sent { Next::Continue } else { Next::Stop }
    }

    /// Sends one envelope, unless a `close_mid_envelope` fault cuts it and resets the
    /// connection; false when the connection is gone.
    async fn send(&self, envelope: String) -> bool {
        if self.fault(|k| *k == FaultKind::CloseMidEnvelope).is_some() {
            let half = envelope.len() / 2;
            let _ = self
                .tx
                .send(Ok(Bytes::from(envelope[..half].to_owned())))
                .await;
            let _ = self
                .tx
                .send(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fault: close mid-envelope",
                )))
                .await;
            return false;
        }
        self.send_raw(envelope).await
    }

    async fn send_raw(&self, envelope: String) -> bool {
        self.tx.send(Ok(Bytes::from(envelope))).await.is_ok()
    }
}
