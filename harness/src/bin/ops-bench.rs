//! `ops-bench`: measures the two heavy operations Creatio asks of one release
//! `exchange-listener` (in-memory store) between mock-ews and mock-creatio, all started as
//! processes on loopback:
//!
//! - a history load (`email/synchronize`) of N old mails in one mailbox: mails per second to
//!   their arrival at mock-creatio, and the listener's memory sampled every 250 ms throughout
//!   (it must stay flat: the load goes by pages, never the whole history in memory);
//! - sends (`apiv2/email/send`) of mails with an attachment of a given size: sends per second
//!   and the time each took, one at a time and several at once.
//!
//! It exits non-zero when a loaded mail is lost or doubled, or a send fails. It stops by itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use clap::Parser;
use futures_util::StreamExt as _;
use harness::http::{get_json, post_creatio, post_json};
use harness::mocks;
use harness::process::{Binaries, Process, Usage, run_dir};
use harness::stats::Percentiles;
use serde_json::{Value, json};
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Measure a history load and sends through one release exchange-listener")]
struct Args {
    /// Old mails in the mailbox whose history is loaded.
    #[arg(long, default_value_t = 10_000)]
    history_mails: usize,
    /// Size of each old mail's text body, in bytes.
    #[arg(long, default_value_t = 4096)]
    mail_bytes: usize,
    /// Mails to send.
    #[arg(long, default_value_t = 40)]
    sends: usize,
    /// Size of each sent mail's attachment, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    attachment_bytes: usize,
    /// Sends under way at once in the second round (the first sends one at a time).
    #[arg(long, default_value_t = 4)]
    send_concurrency: usize,
    /// Seconds allowed for the history to arrive.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

const HISTORY_MAILBOX: &str = "history@bench.test";
const SENDER: &str = "sender@bench.test";
const RECIPIENT: &str = "recipient@bench.test";

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ticks(unix_secs: i64) -> String {
    (unix_secs * 10_000_000 + 621_355_968_000_000_000).to_string()
}

struct Rig {
    listener: Process,
    ews: Process,
    creatio: Process,
    http: reqwest::Client,
}

impl Rig {
    async fn start() -> anyhow::Result<Rig> {
        let bins = Binaries::release()?;
        let dir = run_dir("ops-bench")?;
        let log = [(
            "RUST_LOG",
            "warn,mock_ews=info,mock_creatio=info".to_owned(),
        )];
        let (ews, creatio) = mocks::start(&bins, &dir, &[], &log).await?;
        let listener = mocks::start_listener(&bins, &dir, &[], (&ews, &creatio)).await?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Rig {
            listener,
            ews,
            creatio,
            http,
        })
    }

    fn creds(&self, id: &str, email: &str) -> Value {
        mock_creatio::calling::credentials(
            id,
            email,
            Some("pw"),
            &format!("{}/EWS/Exchange.asmx", self.ews.base),
            &format!(
                "{}/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
                self.creatio.base
            ),
        )
    }

    async fn mailbox(&self, email: &str) -> anyhow::Result<()> {
        post_json(
            &self.http,
            &format!("{}/_control/mailboxes", self.ews.base),
            &json!({ "email": email, "password": "pw" }),
        )
        .await?;
        Ok(())
    }

    async fn delivered(&self) -> anyhow::Result<u64> {
        harness::http::full_emails_delivered(&self.http, &self.creatio.base).await
    }

    async fn state(&self, id: &str) -> anyhow::Result<String> {
        let states = post_creatio(
            &self.http,
            &format!("{}/api/listeners/subscriptionsstate", self.listener.base),
            &json!([id]),
        )
        .await?;
        Ok(states[id]["State"].as_str().unwrap_or("").to_owned())
    }
}

#[derive(Debug, serde::Serialize)]
struct HistoryReport {
    mails: usize,
    secs: f64,
    mails_per_sec: f64,
    rss_mib_before: f64,
    rss_mib_min: f64,
    rss_mib_max: f64,
    rss_mib_after: f64,
    cpu_percent: f64,
    lost: usize,
    doubled: usize,
}

async fn history(rig: &Rig, args: &Args) -> anyhow::Result<HistoryReport> {
    rig.mailbox(HISTORY_MAILBOX).await?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let oldest = now - 3600 - args.history_mails as i64;
    let body = "x".repeat(args.mail_bytes);
    let url = format!(
        "{}/_control/mailboxes/{HISTORY_MAILBOX}/messages",
        rig.ews.base
    );
    let injected: Vec<anyhow::Result<Value>> = futures_util::stream::iter(0..args.history_mails)
        .map(|n| {
            let mail = json!({
                "from": "archive@bench.test",
                "subject": format!("old {n}"),
                "body": body,
                "received_unix": oldest + n as i64,
            });
            let (http, url) = (&rig.http, &url);
            async move { post_json(http, url, &mail).await }
        })
        .buffered(16)
        .collect()
        .await;
    let mut ids = Vec::with_capacity(injected.len());
    for answer in injected {
        ids.push(answer?["message_id"].as_str().unwrap_or("").to_owned());
    }
    println!("{} old mails in {HISTORY_MAILBOX}", ids.len());
    let creds = rig.creds("history", HISTORY_MAILBOX);
    post_creatio(
        &rig.http,
        &format!("{}/api/listeners/create", rig.listener.base),
        &json!([creds]),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rig.state("history").await? != "exists" {
        if Instant::now() > deadline {
            bail!("the history mailbox did not stream within a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = Usage::of(rig.listener.pid)?;
    let start = Instant::now();
    post_json(
        &rig.http,
        &format!("{}/api/email/synchronize", rig.listener.base),
        &json!({ "Credentials": creds, "Filters": ticks(oldest - 1) }),
    )
    .await?;
    let (mut low, mut high) = (before.rss_kib, before.rss_kib);
    let deadline = start + Duration::from_secs(args.timeout_secs);
    let mut next_line = start + Duration::from_secs(5);
    loop {
        let got = rig.delivered().await? as usize;
        let usage = Usage::of(rig.listener.pid)?;
        low = low.min(usage.rss_kib);
        high = high.max(usage.rss_kib);
        if got >= ids.len() || Instant::now() > deadline {
            break;
        }
        if Instant::now() >= next_line {
            println!(
                "  t={:>5.1}s  {got:>6} of {} posted, RSS {:.1} MiB",
                start.elapsed().as_secs_f64(),
                ids.len(),
                mib(usage.rss_kib)
            );
            next_line += Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = Usage::of(rig.listener.pid)?;
    let calls = get_json(
        &rig.http,
        &format!(
            "{}/_control/calls?operation=ProcessFullEmail",
            rig.creatio.base
        ),
    )
    .await?;
    let mut count = std::collections::HashMap::<String, usize>::new();
    for call in calls.as_array().into_iter().flatten() {
        for email in call["body"]["Emails"].as_array().into_iter().flatten() {
            *count
                .entry(email["MessageId"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
    }
    Ok(HistoryReport {
        mails: ids.len(),
        secs,
        mails_per_sec: ids.len() as f64 / secs,
        rss_mib_before: mib(before.rss_kib),
        rss_mib_min: mib(low),
        rss_mib_max: mib(high),
        rss_mib_after: mib(after.rss_kib),
        cpu_percent: after.cpu_percent_since(&before, secs),
        lost: ids.iter().filter(|id| !count.contains_key(*id)).count(),
        doubled: ids.iter().filter(|id| count.get(*id) > Some(&1)).count(),
    })
}

#[derive(Debug, serde::Serialize)]
struct SendReport {
    concurrency: usize,
    sends: usize,
    attachment_mib: f64,
    secs: f64,
    sends_per_sec: f64,
    ms_p50: f64,
    ms_p99: f64,
    rss_mib_max: f64,
    failed: usize,
}

async fn sends(
    rig: &Rig,
    args: &Args,
    concurrency: usize,
    round: usize,
) -> anyhow::Result<SendReport> {
    let attachment =
        base64::engine::general_purpose::STANDARD.encode(vec![0x5a; args.attachment_bytes]);
    let creds = rig.creds("sender", SENDER);
    let url = format!("{}/apiv2/email/send", rig.listener.base);
    let start = Instant::now();
    let (pid, http) = (rig.listener.pid, &rig.http);
    let results: Vec<anyhow::Result<(f64, u64)>> = futures_util::stream::iter(0..args.sends)
        .map(|n| {
            let command = json!({
                "Email": {
                    "Id": format!("send-{round}-{n}"),
                    "Subject": format!("report {n}"),
                    "Body": "<p>The report is attached.</p>",
                    "IsHtmlBody": true,
                    "Recepients": [RECIPIENT],
                    "CopyRecepients": [],
                    "BlindCopyRecepients": [],
                    "Headers": [],
                    "Importance": 1,
                    "Attachments": [{ "Id": "r", "Name": "report.pdf", "Base64Data": attachment, "IsInline": false }],
                    "MessageId": format!("<send-{round}-{n}@bench.test>"),
                },
                "Attachments": null,
                "Credentials": creds,
            });
            let url = &url;
            async move {
                let sent = Instant::now();
                let resp = http.post(url).json(&command).send().await?;
                let text = resp.text().await?;
                if !text.is_empty() {
                    bail!("send {n} failed: {text}");
                }
                let rss = Usage::of(pid)?.rss_kib;
                Ok((sent.elapsed().as_secs_f64() * 1000.0, rss))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let secs = start.elapsed().as_secs_f64();
    let mut ms: Vec<f64> = Vec::new();
    let mut failed = 0;
    let mut rss_max = 0;
    for r in results {
        match r {
            Ok((t, rss)) => {
                ms.push(t);
                rss_max = rss_max.max(rss);
            }
            Err(e) => {
                failed += 1;
                eprintln!("{e:#}");
            }
        }
    }
    let p = Percentiles::of(&ms);
    Ok(SendReport {
        concurrency,
        sends: args.sends,
        attachment_mib: args.attachment_bytes as f64 / 1048576.0,
        secs,
        sends_per_sec: (args.sends - failed) as f64 / secs,
        ms_p50: p.as_ref().map_or(0.0, |p| p.p50),
        ms_p99: p.as_ref().map_or(0.0, |p| p.p99),
        rss_mib_max: mib(rss_max),
        failed,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rig = Rig::start().await?;
    let history = history(&rig, &args).await.context("the history load")?;
    println!(
        "history: {} mails in {:.1} s = {:.0} mails/s; listener RSS {:.1} MiB before, {:.1}–{:.1} MiB during, {:.1} MiB after; CPU {:.0}%; lost {}, doubled {}",
        history.mails,
        history.secs,
        history.mails_per_sec,
        history.rss_mib_before,
        history.rss_mib_min,
        history.rss_mib_max,
        history.rss_mib_after,
        history.cpu_percent,
        history.lost,
        history.doubled
    );
    rig.mailbox(SENDER).await?;
    rig.mailbox(RECIPIENT).await?;
    let mut rounds = Vec::new();
    for (round, concurrency) in [1, args.send_concurrency.max(1)].into_iter().enumerate() {
        let r = sends(&rig, &args, concurrency, round).await?;
        println!(
            "sends: {} mails with a {:.1} MiB attachment, {} at a time: {:.1} sends/s, p50 {:.0} ms, p99 {:.0} ms; listener RSS up to {:.1} MiB; failed {}",
            r.sends,
            r.attachment_mib,
            r.concurrency,
            r.sends_per_sec,
            r.ms_p50,
            r.ms_p99,
            r.rss_mib_max,
            r.failed
        );
        rounds.push(r);
    }
    if let Some(path) = &args.report {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({ "history": history, "sends": rounds }))?,
        )?;
    }
    let (ews, creatio, listener) = (rig.ews, rig.creatio, rig.listener);
    listener.kill().await;
    ews.kill().await;
    creatio.kill().await;
    if history.lost + history.doubled > 0 || rounds.iter().any(|r| r.failed > 0) {
        bail!("a loaded mail was lost or doubled, or a send failed");
    }
    Ok(())
}
