//! exchange-listener: Creatio's Exchange Listener service.
//!
//! Creatio calls the HTTP API ([`api`]) to start, stop and check mailbox subscriptions. The
//! [`supervisor`] runs one [`worker`] per mailbox, which keeps an EWS streaming subscription
//! open through the [`ews_client`], fetches each new mail and posts it to the mailbox's Creatio
//! callback through [`delivery`]. Mailboxes, their status and what was delivered live in the
//! [`registry`]. Creatio's wire contract is in [`contract`].

pub mod api;
pub mod backoff;
pub mod config;
pub mod contract;
pub mod delivery;
pub mod ews_client;
pub mod mail;
pub mod registry;
pub mod supervisor;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;

pub use config::Config;

/// Serves the API on `listener` until `shutdown` completes, then stops every mailbox (each
/// unsubscribes) and returns.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        // reqwest's default TCP_USER_TIMEOUT (30 s) drops a connection when a keep-alive probe
        // is outstanding and no data has arrived for 30 s: a stream between two 45 s server
        // heartbeats. The stream's idle watchdog and every request's timeout bound time instead.
        .tcp_user_timeout(None)
        .user_agent(concat!("exchange-listener/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")?;
    let settings = worker::WorkerSettings {
        server_version: config.ews_version,
        connection_timeout_minutes: config.stream_minutes,
        idle_timeout: std::time::Duration::from_secs(config.stream_idle_secs),
        request_timeout: config.request_timeout(),
        retry: config.retry().context("EWS retry settings")?,
        failed_retry: config
            .failed_retry()
            .context("failed-mailbox retry settings")?,
    };
    let delivery = delivery::Delivery::new(
        http.clone(),
        config.delivery_retry().context("delivery retry settings")?,
        config.delivery_attempts,
        config.request_timeout(),
    );
    let supervisor = Arc::new(supervisor::Supervisor::new(worker::WorkerContext {
        registry: registry::Registry::default(),
        http: http.clone(),
        delivery,
        settings: Arc::new(settings),
    }));
    let ready = Arc::new(AtomicBool::new(true));
    let state = api::ApiState {
        supervisor: supervisor.clone(),
        http,
        server_version: config.ews_version,
        validate_timeout: config.request_timeout(),
        ready: ready.clone(),
    };
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(store = "memory", "listening on http://{addr}");
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            ready.store(false, Ordering::Relaxed);
            tracing::info!("shutting down");
        })
        .await
        .context("serving the API")?;
    supervisor.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
