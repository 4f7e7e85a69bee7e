//! The `exchange-listener` binary: configuration, logging, signals; the rest is the library.

use clap::Parser as _;
use exchange_listener::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let mut filter = EnvFilter::try_new(&config.log)
        .map_err(|e| anyhow::anyhow!("EXCHANGE_LISTENER_LOG {:?}: {e}", config.log))?;
    // The IMAP codec warns of every lenient reading it makes of a server's answer (a status
    // without text, say): routine, unless asked for by name.
    if !config.log.contains("imap_codec") {
        filter = filter.add_directive("imap_codec=error".parse()?);
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    // Every mailbox holds a streaming connection: thousands of mailboxes, thousands of sockets.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-files limit");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    exchange_listener::serve(config, listener, shutdown_signal()).await
}

/// Completes on Ctrl-C or SIGTERM (what Kubernetes sends before killing a pod).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
