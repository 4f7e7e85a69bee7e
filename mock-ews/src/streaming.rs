//! GetStreamingEvents: one chunked HTTP body per connection, filled by a writer task until
//! the connection times out, the client goes away, or the server shuts down.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{Notify, mpsc};

use crate::server::App;
use crate::soap;
use crate::state::World;

/// Answers GetStreamingEvents with a chunked body that a writer task fills until the
/// connection times out, the client goes away, or the server shuts down.
pub(crate) fn stream(app: App, acting: String, ids: Vec<String>, timeout_minutes: u64) -> Response {
    let chunked = |body: Body| {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    };
    let unknown = app.world.unknown_subscriptions(&acting, &ids);
    if ids.is_empty()
        || ids.len() > 200
        || !(1..=30).contains(&timeout_minutes)
        || !unknown.is_empty()
    {
        let body = if unknown.is_empty() {
            soap::response(
                "GetStreamingEvents",
                &soap::error(
                    "GetStreamingEvents",
                    "ErrorInvalidArgument",
                    "Between 1 and 200 subscription ids and a ConnectionTimeout of 1 to 30 minutes are required.",
                    "<m:ConnectionStatus>Closed</m:ConnectionStatus>",
                ),
            )
        } else {
            soap::stream_error(
                "ErrorSubscriptionNotFound",
                "The specified subscription was not found.",
                &unknown,
            )
        };
        return chunked(Body::from(format!("{}{body}", soap::XML_DECL)));
    }
    let mut lifetime = Duration::from_secs(timeout_minutes * 60);
    if let Some(cap) = app.config.max_connection_time {
        lifetime = lifetime.min(cap);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(write_stream(app, acting, ids, lifetime, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    chunked(Body::from_stream(body))
}

/// Releases a connection's subscriptions however its writer ends.
struct Attached {
    world: Arc<World>,
    ids: Vec<String>,
    waker: Arc<Notify>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.world.detach(&self.ids, &self.waker);
    }
}

async fn write_stream(
    app: App,
    acting: String,
    ids: Vec<String>,
    lifetime: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    let waker = Arc::new(Notify::new());
    app.world.attach(&ids, &waker);
    let attached = Attached {
        world: app.world.clone(),
        ids,
        waker,
    };
    let send = |s: String| {
        let tx = tx.clone();
        async move { tx.send(Bytes::from(s)).await.is_ok() }
    };
    if !send(format!("{}{}", soap::XML_DECL, soap::stream_status(false))).await {
        return;
    }
    let deadline = tokio::time::sleep(lifetime);
    tokio::pin!(deadline);
    let period = app.config.keepalive;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = attached.waker.notified() => {
                let (batches, gone) = attached.world.drain(&attached.ids);
                if !batches.is_empty() && !send(soap::stream_notifications(&acting, &batches)).await {
                    return;
                }
                if !gone.is_empty() {
                    let _ = send(soap::stream_error("ErrorSubscriptionNotFound", "The specified subscription was not found.", &gone)).await;
                    return;
                }
            }
            _ = keepalive.tick() => {
                if !send(soap::stream_status(false)).await {
                    return;
                }
            }
            _ = &mut deadline => break,
            _ = app.shutdown.cancelled() => break,
            _ = tx.closed() => return,
        }
    }
    let _ = send(soap::stream_status(true)).await;
}
