//! The mock servers every run starts, the service account a run may set up in them, and the
//! listener a benchmark measures between them.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::http::post_json;
use crate::process::{Binaries, Process};

/// The service account of runs whose mailboxes have no password; mock-ews must list it in
/// its `impersonators` setting.
pub const SERVICE_ACCOUNT: (&str, &str) = ("svc-creatio@harness.test", "svc-secret");

/// Starts mock-ews (on loopback, with `ews_args` besides) and mock-creatio on loopback, both
/// under `env`, each logging into `dir`.
pub async fn start(
    bins: &Binaries,
    dir: &Path,
    ews_args: &[String],
    env: &[(&str, String)],
) -> anyhow::Result<(Process, Process)> {
    let ews = start_ews(bins, dir, ews_args, env).await?;
    let local = ["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    let creatio = Process::start(
        "mock-creatio",
        &bins.creatio,
        &local,
        env,
        &dir.join("mock-creatio.log"),
    )
    .await?;
    Ok((ews, creatio))
}

/// Starts one mock-ews (an Exchange server of its own) on loopback, with `ews_args` besides,
/// under `env`, logging into `dir`.
pub async fn start_ews(
    bins: &Binaries,
    dir: &Path,
    ews_args: &[String],
    env: &[(&str, String)],
) -> anyhow::Result<Process> {
    let local = ["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    let ews_args: Vec<String> = local.iter().chain(ews_args).cloned().collect();
    Process::start(
        "mock-ews",
        &bins.ews,
        &ews_args,
        env,
        &dir.join("mock-ews.log"),
    )
    .await
}

/// Creates [`SERVICE_ACCOUNT`]'s mailbox in mock-ews at `ews_base`, and writes the listener's
/// `--ews-service-accounts` file naming it for the EWS endpoint `ews_url` into `dir`;
/// answers the file.
pub async fn service_account(
    http: &reqwest::Client,
    ews_base: &str,
    ews_url: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let (user, password) = SERVICE_ACCOUNT;
    post_json(
        http,
        &format!("{ews_base}/_control/mailboxes"),
        &json!({ "email": user, "password": password }),
    )
    .await?;
    let file = dir.join("service-accounts.json");
    let accounts = json!([{ "url": ews_url, "user": user, "password": password }]);
    std::fs::write(&file, accounts.to_string())?;
    Ok(file)
}

/// The app registration through which a run's Microsoft 365 mailboxes are served: tenant,
/// client id, secret; it serves the scenario mailboxes' domain.
pub const GRAPH_APP: (&str, &str, &str) = (
    "harness.onmicrosoft.com",
    "5e7d9c1b-harness-app",
    "harness-app-secret",
);

/// Starts mock-graph on loopback, logging into `dir`, with [`GRAPH_APP`] registered and a
/// user for each of `users`.
pub async fn start_graph(
    bins: &Binaries,
    dir: &Path,
    http: &reqwest::Client,
    users: &[String],
) -> anyhow::Result<Process> {
    let (tenant, client_id, secret) = GRAPH_APP;
    let graph = Process::start(
        "mock-graph",
        &bins.graph,
        &["--listen".to_owned(), "127.0.0.1:0".to_owned()],
        &[],
        &dir.join("mock-graph.log"),
    )
    .await?;
    post_json(
        http,
        &format!("{}/_control/apps", graph.base),
        &json!({ "tenant": tenant, "client_id": client_id, "secret": secret }),
    )
    .await?;
    for upn in users {
        post_json(
            http,
            &format!("{}/_control/users", graph.base),
            &json!({ "upn": upn }),
        )
        .await?;
    }
    Ok(graph)
}

/// Writes the listener's `--graph-apps` file into `dir`: [`GRAPH_APP`] for `domain`, its
/// authority and Graph at `base` (where the listener reaches mock-graph); answers the file.
pub fn graph_apps(dir: &Path, base: &str, domain: &str) -> anyhow::Result<PathBuf> {
    let (tenant, client_id, secret) = GRAPH_APP;
    let file = dir.join("graph-apps.json");
    let apps = json!([{
        "tenant": tenant, "client_id": client_id, "client_secret": secret,
        "domains": [domain], "authority": base, "graph": base,
    }]);
    std::fs::write(&file, apps.to_string())?;
    Ok(file)
}

/// Starts the release listener on loopback for a benchmark, logging at info into `dir`, with
/// `extra` flags besides; says where each part listens.
pub async fn start_listener(
    bins: &Binaries,
    dir: &Path,
    extra: &[String],
    (ews, creatio): (&Process, &Process),
) -> anyhow::Result<Process> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--log",
        "warn,exchange_listener=info",
    ]
    .map(String::from)
    .into();
    args.extend(extra.iter().cloned());
    let listener = Process::start(
        "exchange-listener",
        &bins.listener,
        &args,
        &[],
        &dir.join("exchange-listener.log"),
    )
    .await?;
    println!(
        "listener pid {} at {}, mock-ews at {}, mock-creatio at {}; logs in {}",
        listener.pid,
        listener.base,
        ews.base,
        creatio.base,
        dir.display()
    );
    Ok(listener)
}
