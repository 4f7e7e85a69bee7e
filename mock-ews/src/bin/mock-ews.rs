//! `mock-ews`: serve the mock EWS endpoint and its control API until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "An Exchange Web Services server for tests and demos")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "MOCK_EWS_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Seconds between keep-alives on an idle stream.
    #[arg(long, env = "MOCK_EWS_KEEPALIVE_SECS", default_value_t = 45)]
    keepalive_secs: u64,
    /// Close every stream after this many seconds, whatever ConnectionTimeout asked for.
    #[arg(long, env = "MOCK_EWS_MAX_CONNECTION_SECS")]
    max_connection_secs: Option<u64>,
    /// Mailboxes to create at start, as `email:password` (repeatable).
    #[arg(long = "mailbox", value_name = "EMAIL:PASSWORD")]
    mailboxes: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM); needs `--tls-key`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    // Thousands of streams are thousands of sockets.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-files limit");
    }
    let config = mock_ews::Config {
        keepalive: Duration::from_secs(args.keepalive_secs.max(1)),
        max_connection_time: args.max_connection_secs.map(Duration::from_secs),
    };
    let server = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
            };
            mock_ews::MockEws::start_tls(args.listen, config, &read(cert)?, &read(key)?).await?
        }
        _ => mock_ews::MockEws::start(args.listen, config).await?,
    };
    for spec in &args.mailboxes {
        let (email, password) = spec
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--mailbox {spec:?}: expected EMAIL:PASSWORD"))?;
        server.create_mailbox(email, password)?;
    }
    let scheme = server
        .ews_url()
        .split("://")
        .next()
        .unwrap_or("http")
        .to_owned();
    tracing::info!("mock-ews listening on {scheme}://{}", server.addr());
    tracing::info!("EWS endpoint {}", server.ews_url());
    mock_ews::stop_signal().await;
    server.shutdown().await?;
    Ok(())
}
