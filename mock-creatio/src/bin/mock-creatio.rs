//! `mock-creatio`: serve Creatio's listener callbacks and record them until Ctrl-C.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Creatio's ExchangeListenerService callbacks, recorded, for tests"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "MOCK_CREATIO_LISTEN", default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let server = mock_creatio::MockCreatio::start(args.listen).await?;
    tracing::info!("mock-creatio listening on http://{}", server.addr());
    tracing::info!(
        "BpmEndpoint for full emails: {}",
        server.url("ProcessFullEmail")
    );
    tokio::signal::ctrl_c().await?;
    server.shutdown().await?;
    Ok(())
}
