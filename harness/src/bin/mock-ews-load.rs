//! `mock-ews-load`: measures one mock-ews process holding many streaming connections while
//! mail flows. It starts the `mock-ews` binary, creates a mailbox per stream, subscribes each
//! and keeps its GetStreamingEvents open, injects mail at a steady rate to mailboxes picked at
//! random, counts the NewMailEvents that arrive, and samples the server's memory and CPU from
//! /proc. Loopback only; it stops by itself after the run.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::StreamExt as _;
use harness::process::{Process, release_binaries, run_dir};
use serde_json::json;
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Measure one mock-ews process holding many streaming connections")]
struct Args {
    /// Streaming connections to hold (one mailbox and subscription each).
    #[arg(long, default_value_t = 5000)]
    streams: usize,
    /// Seconds of mail flow once every stream is open.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Mails per second, each to a mailbox picked at random.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// The server's keep-alive interval on idle streams, in seconds.
    #[arg(long, default_value_t = 45)]
    keepalive_secs: u64,
    /// The mock-ews binary (default: the workspace's release build).
    #[arg(long)]
    mock_ews: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Counts occurrences of a marker in a byte stream that arrives in arbitrary pieces.
struct Counter {
    tail: Vec<u8>,
}

const MARKER: &[u8] = b"<t:NewMailEvent>";

impl Counter {
    fn feed(&mut self, chunk: &[u8]) -> u64 {
        self.tail.extend_from_slice(chunk);
        let n = self
            .tail
            .windows(MARKER.len())
            .filter(|w| *w == MARKER)
            .count() as u64;
        let keep = self.tail.len().min(MARKER.len() - 1);
        self.tail.drain(..self.tail.len() - keep);
        n
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("could not raise the open-files limit: {e}");
    }
    let binary = match &args.mock_ews {
        Some(p) => p.clone(),
        None => release_binaries(&["mock-ews"])?.remove(0),
    };
    let log = run_dir("mock-ews-load")?.join("mock-ews.log");
    let env = [(
        "RUST_LOG",
        std::env::var("MOCK_EWS_LOG").unwrap_or_else(|_| "warn,mock_ews=info".into()),
    )];
    let server = Process::start(
        "mock-ews",
        &binary,
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--keepalive-secs".into(),
            args.keepalive_secs.to_string(),
        ],
        &env,
        &log,
    )
    .await?;
    let base = server.base.clone();
    println!("mock-ews logs to {}", log.display());
    // No TCP_USER_TIMEOUT: reqwest's default (30 s) cuts streams that idle between keep-alives.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_user_timeout(None)
        .build()?;
    let ews_url = format!("{base}/EWS/Exchange.asmx");
    let rss_idle = server.usage()?.rss_kib;
    println!(
        "mock-ews pid {} at {base}, {:.1} MiB resident when idle",
        server.pid,
        rss_idle as f64 / 1024.0
    );

    let started = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let results = futures_util::stream::iter(0..args.streams)
        .map(|i| {
            let (http, base, ews_url) = (http.clone(), base.clone(), ews_url.clone());
            let (received, ended, opened) = (received.clone(), ended.clone(), opened.clone());
            async move {
                let email = format!("user{i}@load.test");
                http.post(format!("{base}/_control/mailboxes"))
                    .json(&json!({ "email": email, "password": "pw" }))
                    .send()
                    .await?
                    .error_for_status()?;
                let body = http
                    .post(&ews_url)
                    .basic_auth(&email, Some("pw"))
                    .header("Content-Type", "text/xml; charset=utf-8")
                    .body(mock_ews::request_envelope(r#"<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/></t:FolderIds><t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"#))
                    .send()
                    .await?
                    .text()
                    .await?;
                let id = body
                    .split("<m:SubscriptionId>")
                    .nth(1)
                    .and_then(|r| r.split('<').next())
                    .context("no subscription id")?
                    .to_owned();
                let mut stream = http
                    .post(&ews_url)
                    .basic_auth(&email, Some("pw"))
                    .header("Content-Type", "text/xml; charset=utf-8")
                    .body(mock_ews::request_envelope(&format!("<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{id}</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>30</m:ConnectionTimeout></m:GetStreamingEvents>")))
                    .send()
                    .await?;
                let n = opened.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 1000 == 0 {
                    println!("{n} streams open after {:.1} s", started.elapsed().as_secs_f64());
                }
                tokio::spawn(async move {
                    let mut counter = Counter { tail: Vec::new() };
                    while let Ok(Some(chunk)) = stream.chunk().await {
                        received.fetch_add(counter.feed(&chunk), Ordering::Relaxed);
                    }
                    ended.fetch_add(1, Ordering::Relaxed);
                });
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    if let Some(err) = results.into_iter().find_map(Result::err) {
        bail!("opening streams failed: {err:#}");
    }
    let setup = started.elapsed();
    let stats: serde_json::Value = http
        .get(format!("{base}/_control/stats"))
        .send()
        .await?
        .json()
        .await?;
    println!(
        "{} streams open on the server after {:.1} s",
        stats["open_streams"],
        setup.as_secs_f64()
    );

    let at_start = server.usage()?;
    let rss_open = at_start.rss_kib;
    let flow_start = Instant::now();
    let rate =
        json!({ "per_second": args.rate, "duration_ms": args.duration_secs * 1000, "seed": 1 });
    let expected = http
        .post(format!("{base}/_control/rate"))
        .json(&rate)
        .send()
        .await?
        .error_for_status()?
        .json::<serde_json::Value>()
        .await?["expected"]
        .as_u64()
        .unwrap_or(0);
    let mut peak_cpu: f64 = 0.0;
    let (mut last, mut last_at) = (at_start, Instant::now());
    let finish = flow_start + Duration::from_secs(args.duration_secs) + Duration::from_secs(2);
    while Instant::now() < finish {
        tokio::time::sleep(
            Duration::from_secs(5).min(finish.saturating_duration_since(Instant::now())),
        )
        .await;
        let now = server.usage()?;
        let cpu = now.cpu_percent_since(&last, last_at.elapsed().as_secs_f64());
        peak_cpu = peak_cpu.max(cpu);
        (last, last_at) = (now, Instant::now());
        println!(
            "t={:>3.0}s  events received {:>5}  streams ended {:>4}  mock-ews {:.1} MiB, {cpu:.1}% CPU",
            flow_start.elapsed().as_secs_f64(),
            received.load(Ordering::Relaxed),
            ended.load(Ordering::Relaxed),
            now.rss_kib as f64 / 1024.0
        );
    }
    let end = server.usage()?;
    let (rss_end, rss_peak) = (end.rss_kib, end.peak_rss_kib);
    let avg_cpu = end.cpu_percent_since(&at_start, flow_start.elapsed().as_secs_f64());
    let report = json!({
        "streams": args.streams,
        "setup_secs": setup.as_secs_f64(),
        "duration_secs": args.duration_secs,
        "rate_per_second": args.rate,
        "mails_injected": expected,
        "new_mail_events_received": received.load(Ordering::Relaxed),
        "streams_ended_early": ended.load(Ordering::Relaxed),
        "mock_rss_idle_mib": rss_idle as f64 / 1024.0,
        "mock_rss_all_open_mib": rss_open as f64 / 1024.0,
        "mock_rss_end_mib": rss_end as f64 / 1024.0,
        "mock_rss_peak_mib": rss_peak as f64 / 1024.0,
        "mock_cpu_avg_percent": avg_cpu,
        "mock_cpu_peak_5s_percent": peak_cpu,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    server.kill().await;
    let received = received.load(Ordering::Relaxed);
    if received != expected {
        bail!("{expected} mails injected but {received} NewMailEvents received");
    }
    Ok(())
}
