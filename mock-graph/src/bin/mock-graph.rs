//! `mock-graph`: serve the mock Microsoft Graph and its control API until Ctrl-C or SIGTERM.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "A Microsoft Graph mail server for tests and demos")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "MOCK_GRAPH_LISTEN", default_value = "127.0.0.1:7090")]
    listen: SocketAddr,
    /// An app registration to create at start, as `TENANT:CLIENT_ID:SECRET` (repeatable).
    #[arg(long = "app", value_name = "TENANT:CLIENT_ID:SECRET")]
    apps: Vec<String>,
    /// Users (mailboxes) to create at start (repeatable).
    #[arg(long = "user", value_name = "UPN")]
    users: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let server = mock_graph::MockGraph::start(args.listen).await?;
    for spec in &args.apps {
        let mut parts = spec.splitn(3, ':');
        let (Some(tenant), Some(client_id), Some(secret)) =
            (parts.next(), parts.next(), parts.next())
        else {
            anyhow::bail!("--app {spec:?}: expected TENANT:CLIENT_ID:SECRET");
        };
        server.add_app(mock_graph::App {
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            secret: Some(secret.to_owned()),
            ..mock_graph::App::default()
        });
    }
    for upn in &args.users {
        server.add_user(upn);
    }
    tracing::info!("mock-graph listening on {}", server.url());
    mock_ews::stop_signal().await;
    server.shutdown().await?;
    Ok(())
}
