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
    let local = ["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    let ews_args: Vec<String> = local.iter().chain(ews_args).cloned().collect();
    let ews = Process::start(
        "mock-ews",
        &bins.ews,
        &ews_args,
        env,
        &dir.join("mock-ews.log"),
    )
    .await?;
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
