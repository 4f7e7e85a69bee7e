//! `listener-bench`: measures one release `exchange-listener` between mock-ews and mock-creatio,
//! all three started as processes on loopback (or, with `--imap`, between a Dovecot over TLS
//! and mock-creatio; with `--graph`, between mock-graph and mock-creatio, Microsoft 365
//! mailboxes served through an app registration). It creates N mailboxes through Creatio's API,
//! waits until every one streams, lets them idle, then injects mail at a steady rate to mailboxes
//! picked at random and follows each mail to its arrival at mock-creatio. It prints the time
//! until all N streamed, the listener's memory (idle and under load, per mailbox) and CPU, the
//! latency from injection to arrival, and what was lost or duplicated. It exits non-zero when a
//! mail is lost or doubled. It stops by itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::StreamExt as _;
use harness::http::{full_emails_delivered, get_json, post_creatio, post_json, put_json};
use harness::mocks;
use harness::process::{Binaries, Process, Usage, run_dir};
use harness::stats::Percentiles;
use serde_json::{Value, json};
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Measure one release exchange-listener between mock-ews and mock-creatio")]
struct Args {
    /// Mailboxes to create and keep streaming.
    #[arg(long, default_value_t = 50)]
    mailboxes: usize,
    /// Mails per second once every mailbox streams, each to a mailbox picked at random.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of mail flow.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Size of each mail's text body, in bytes.
    #[arg(long, default_value_t = 4096)]
    mail_bytes: usize,
    /// Seconds every mailbox idles before memory is read.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Seconds allowed for every mailbox to stream before the run fails.
    #[arg(long, default_value_t = 300)]
    start_timeout_secs: u64,
    /// Seconds allowed after the flow for the last mails to arrive.
    #[arg(long, default_value_t = 60)]
    drain_timeout_secs: u64,
    /// mock-ews's keep-alive interval on idle streams, in seconds.
    #[arg(long, default_value_t = 45)]
    keepalive_secs: u64,
    /// Seed for picking mailboxes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// An extra flag for the listener (repeat for several), e.g. `--listener-arg=--subscribe-rate=200`.
    #[arg(long = "listener-arg", allow_hyphen_values = true)]
    listener_args: Vec<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Serve Exchange over HTTPS, with a certificate from a CA of the run's own that the
    /// listener is given with `--ews-ca-file`, as on premises.
    #[arg(long)]
    ews_tls: bool,
    /// How mock-ews lets mailboxes log in: `basic`, or `ntlm` (Basic off, as the EWS virtual
    /// directory's default); the listener finds out from the first 401.
    #[arg(long, default_value = "basic")]
    ews_auth: String,
    /// Create the mailboxes without passwords, served by one service account with the
    /// ApplicationImpersonation role (`--ews-service-accounts`) on shared streams.
    #[arg(long)]
    service_account: bool,
    /// Mailbox servers behind mock-ews, over which the mailboxes are spread.
    #[arg(long, default_value_t = 4)]
    ews_servers: u32,
    /// Streaming connections mock-ews allows per account, as Exchange's
    /// `HangingConnectionLimit` (10 on Exchange 2016 and 2019).
    #[arg(long, default_value_t = 10)]
    ews_streams_per_account: usize,
    /// IMAP mailboxes instead: one Dovecot over TLS (a certificate from a CA of the run's own,
    /// given to the listener with `--imap-ca-file`), each mail put into its user's Maildir as
    /// a delivery agent does.
    #[arg(long, conflicts_with_all = ["ews_tls", "service_account"])]
    imap: bool,
    /// Microsoft 365 mailboxes instead, on mock-graph, sent as Creatio sends them and served
    /// through an app registration: by delta polling, or with `--graph-notifications` by
    /// change notifications (mock-graph posts to the listener through a relay).
    #[arg(long, conflicts_with_all = ["ews_tls", "service_account", "imap"])]
    graph: bool,
    /// With `--graph`: take Graph's change notifications.
    #[arg(long, requires = "graph")]
    graph_notifications: bool,
    /// Keep the mailboxes in Redis (a `redis-server` process of the run's own, credentials in
    /// plain text) instead of the in-memory store, and report Redis's commands a second by
    /// command while every mailbox idles and while mail flows.
    #[arg(long)]
    redis: bool,
}

fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The three processes of a run.
struct Rig {
    listener: Process,
    ews: Process,
    creatio: Process,
    http: reqwest::Client,
    /// Mailboxes are created without a password, for the service account.
    service_account: bool,
    /// The IMAP server, when the mailboxes are IMAP ones.
    dovecot: Option<imap_world::Dovecot>,
    /// mock-graph, when the mailboxes are Microsoft 365 ones.
    graph: Option<Process>,
    /// What carries Graph's notifications to the listener.
    _relay: Option<harness::proxy::Proxy>,
    /// The store, when it is Redis.
    redis: Option<harness::redis::Redis>,
}

impl Rig {
    async fn start(args: &Args) -> anyhow::Result<Rig> {
        let bins = Binaries::release()?;
        let dir = run_dir("listener-bench")?;
        let mut ews_args: Vec<String> =
            vec!["--keepalive-secs".into(), args.keepalive_secs.to_string()];
        let mut http = reqwest::Client::builder();
        let mut listener_tls = Vec::new();
        if args.ews_tls {
            let (ca, _, _) = mock_ews::test_certificates(&dir)?;
            let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
            ews_args.extend(["--tls-cert".into(), file("server.crt")]);
            ews_args.extend(["--tls-key".into(), file("server.key")]);
            listener_tls = vec!["--ews-ca-file".to_owned(), file("ca.crt")];
            http = http.tls_certs_merge([reqwest::Certificate::from_pem(&ca)?]);
        }
        let log = [(
            "RUST_LOG",
            "warn,mock_ews=info,mock_creatio=info".to_owned(),
        )];
        let (ews, creatio) = mocks::start(&bins, &dir, &ews_args, &log).await?;
        // No TCP_USER_TIMEOUT: reqwest's default cuts connections idle between calls.
        let http = http
            .pool_max_idle_per_host(256)
            .tcp_user_timeout(None)
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut listener_args = listener_tls;
        let dovecot = if args.imap {
            let users: Vec<(String, &str)> = (0..args.mailboxes)
                .map(|i| (Self::email(i), "pw"))
                .collect();
            let users: Vec<(&str, &str)> = users.iter().map(|(u, p)| (u.as_str(), *p)).collect();
            let sized = imap_world::Options {
                tls: true,
                connections: args.mailboxes + 64,
                ..imap_world::Options::default()
            };
            let (dovecot, ca) = imap_world::Dovecot::start_with(&users, sized).await?;
            let ca_file = dir.join("imap-ca.crt");
            std::fs::write(&ca_file, ca)?;
            listener_args.extend([
                "--imap-ca-file".to_owned(),
                ca_file.to_string_lossy().into_owned(),
            ]);
            Some(dovecot)
        } else {
            None
        };
        if args.service_account {
            let url = format!("{}/EWS/Exchange.asmx", ews.base);
            let file = mocks::service_account(&http, &ews.base, &url, &dir).await?;
            listener_args.extend([
                "--ews-service-accounts".to_owned(),
                file.to_string_lossy().into_owned(),
                "--creatio-hosts=127.0.0.1".to_owned(),
            ]);
        }
        let (graph, relay) = if args.graph {
            let users: Vec<String> = (0..args.mailboxes).map(Self::email).collect();
            let graph = mocks::start_graph(&bins, &dir, &http, &users).await?;
            let apps = mocks::graph_apps(&dir, &graph.base, "bench.test")?;
            listener_args.extend([
                "--graph-apps".to_owned(),
                apps.to_string_lossy().into_owned(),
                "--creatio-hosts=127.0.0.1".to_owned(),
            ]);
            // The listener's address is known once it runs: Graph is given the relay's.
            let relay = if args.graph_notifications {
                let relay = harness::proxy::Proxy::start(([127, 0, 0, 1], 9).into()).await?;
                listener_args.push(format!(
                    "--graph-notification-url=http://{}/graph/notifications",
                    relay.addr()
                ));
                Some(relay)
            } else {
                None
            };
            (Some(graph), relay)
        } else {
            (None, None)
        };
        let redis = if args.redis {
            let redis =
                harness::redis::Redis::start(&harness::redis::Choice::Process, &dir).await?;
            listener_args.extend([
                format!("--redis-url=redis://{}/0", redis.addr()),
                "--insecure-plaintext-credentials".to_owned(),
            ]);
            Some(redis)
        } else {
            None
        };
        listener_args.extend(args.listener_args.iter().cloned());
        let listener = mocks::start_listener(&bins, &dir, &listener_args, (&ews, &creatio)).await?;
        if let Some(relay) = &relay {
            relay.set_upstream(listener.base.trim_start_matches("http://").parse()?);
        }
        let mut settings = json!({
            "auth": args.ews_auth,
            "backends": args.ews_servers,
            "max_streams_per_user": args.ews_streams_per_account,
        });
        if args.service_account {
            settings["impersonators"] = json!([mocks::SERVICE_ACCOUNT.0]);
        }
        put_json(&http, &format!("{}/_control/settings", ews.base), &settings).await?;
        Ok(Rig {
            listener,
            ews,
            creatio,
            http,
            service_account: args.service_account,
            dovecot,
            graph,
            _relay: relay,
            redis,
        })
    }

    /// Redis's command counts now, when the store is Redis.
    async fn redis_counts(
        &self,
    ) -> anyhow::Result<Option<std::collections::BTreeMap<String, u64>>> {
        match &self.redis {
            Some(redis) => Ok(Some(harness::redis::command_counts(redis.addr()).await?)),
            None => Ok(None),
        }
    }

    async fn get(&self, url: String) -> anyhow::Result<Value> {
        get_json(&self.http, &url).await
    }

    async fn post(&self, url: String, body: Value) -> anyhow::Result<Value> {
        post_json(&self.http, &url, &body).await
    }

    fn email(i: usize) -> String {
        format!("user{i}@bench.test")
    }

    /// Creates every mailbox in mock-ews, then asks the listener to create each with one call
    /// per mailbox, as Creatio does; answers how long each Create call took, in milliseconds.
    async fn create_mailboxes(&self, n: usize) -> anyhow::Result<Vec<f64>> {
        let in_ews = if self.dovecot.is_some() || self.graph.is_some() {
            0
        } else {
            n
        };
        let results: Vec<anyhow::Result<Value>> = futures_util::stream::iter(0..in_ews)
            .map(|i| {
                self.post(
                    format!("{}/_control/mailboxes", self.ews.base),
                    json!({ "email": Self::email(i), "password": "pw" }),
                )
            })
            .buffer_unordered(64)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        let ews_url = format!("{}/EWS/Exchange.asmx", self.ews.base);
        let endpoint = format!(
            "{}/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
            self.creatio.base
        );
        let timings: Vec<anyhow::Result<f64>> = futures_util::stream::iter(0..n)
            .map(|i| {
                let password = (!self.service_account).then_some("pw");
                let mut creds = mock_creatio::calling::credentials(
                    &format!("bench-{i}"),
                    &Self::email(i),
                    password,
                    &ews_url,
                    &endpoint,
                );
                if self.service_account {
                    creds["UserName"] = serde_json::Value::Null;
                }
                if self.graph.is_some() {
                    creds = mock_creatio::calling::microsoft365_credentials(
                        &format!("bench-{i}"),
                        &Self::email(i),
                        "creatio-token-for-ews",
                        &endpoint,
                    );
                }
                if let Some(dovecot) = &self.dovecot {
                    creds["ServerTypeId"] = json!(mock_creatio::calling::IMAP_SERVER_TYPE);
                    creds["ServiceUrl"] = json!("127.0.0.1");
                    creds["Port"] = json!(dovecot.tls_port);
                    creds["UseSsl"] = json!(true);
                    creds["SecureOption"] = json!(2);
                }
                let body = json!([creds]);
                async move {
                    let sent = Instant::now();
                    post_creatio(
                        &self.http,
                        &format!("{}/api/listeners/create", self.listener.base),
                        &body,
                    )
                    .await?;
                    Ok(sent.elapsed().as_secs_f64() * 1000.0)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        timings.into_iter().collect()
    }

    async fn states(&self) -> anyhow::Result<HashMap<String, u64>> {
        let status = self
            .get(format!("{}/api/listeners/status", self.listener.base))
            .await?;
        Ok(serde_json::from_value(status["States"].clone()).unwrap_or_default())
    }

    async fn delivered_count(&self) -> anyhow::Result<u64> {
        full_emails_delivered(&self.http, &self.creatio.base).await
    }

    /// Every Message-ID that reached Creatio, with the arrival time of each delivery.
    async fn arrivals(&self) -> anyhow::Result<HashMap<String, Vec<u64>>> {
        let calls = self
            .get(format!(
                "{}/_control/calls?operation=ProcessFullEmail",
                self.creatio.base
            ))
            .await?;
        let mut arrivals: HashMap<String, Vec<u64>> = HashMap::new();
        for call in calls.as_array().into_iter().flatten() {
            let at = call["received_unix_us"].as_u64().unwrap_or(0);
            for email in call["body"]["Emails"].as_array().into_iter().flatten() {
                if let Some(id) = email["MessageId"].as_str() {
                    arrivals.entry(id.to_owned()).or_default().push(at);
                }
            }
        }
        Ok(arrivals)
    }
}

/// Waits until every mailbox streams, printing the states as they change.
async fn wait_streaming(
    rig: &Rig,
    n: usize,
    started: Instant,
    patience: Duration,
) -> anyhow::Result<Duration> {
    let mut last_print = Instant::now();
    loop {
        let states = rig.states().await?;
        let streaming = states.get("Streaming").copied().unwrap_or(0);
        if streaming as usize >= n {
            return Ok(started.elapsed());
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            let mut others: Vec<String> = states
                .iter()
                .filter(|(s, _)| s.as_str() != "Streaming")
                .map(|(s, c)| format!("{s} {c}"))
                .collect();
            others.sort();
            println!(
                "t={:>5.1}s  streaming {streaming}/{n}  {}",
                started.elapsed().as_secs_f64(),
                others.join(", ")
            );
            last_print = Instant::now();
        }
        if started.elapsed() > patience {
            bail!("only {streaming} of {n} mailboxes streamed within {patience:?}: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One injected mail: its Message-ID and when it was sent to mock-ews.
type Injected = (String, u64);

/// Injects mail at `rate` for `duration`, printing progress; answers what was injected and the
/// listener's highest resident memory seen.
/// Redis's commands a second over `secs` between two counts, in all and by command (busiest
/// first), printed; `None` without Redis.
fn redis_rates(
    before: &Option<std::collections::BTreeMap<String, u64>>,
    after: &Option<std::collections::BTreeMap<String, u64>>,
    secs: u64,
) -> Option<Value> {
    let (Some(before), Some(after)) = (before, after) else {
        return None;
    };
    let rates = harness::redis::command_rates(before, after, secs as f64);
    let total: f64 = rates.iter().map(|(_, r)| r).sum();
    let by: Vec<String> = rates
        .iter()
        .take(8)
        .map(|(c, r)| format!("{c} {r:.0}"))
        .collect();
    println!("Redis: {total:.0} commands/s ({})", by.join(", "));
    Some(json!({
        "total": total,
        "by_command": rates.into_iter().map(|(c, r)| (c, json!(r))).collect::<serde_json::Map<String, Value>>(),
    }))
}

async fn flow(rig: &Rig, args: &Args) -> anyhow::Result<(Vec<Injected>, u64, Usage, f64)> {
    let total = (args.rate * args.duration_secs as f64).round() as u64;
    let injected: Arc<Mutex<Vec<Injected>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let body = "x".repeat(args.mail_bytes);
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    let start = rig.listener.usage()?;
    let started = Instant::now();
    let mut peak_rss = start.rss_kib;
    let (mut last, mut last_at) = (start, started);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let to = Rig::email(rng.usize(0..args.mailboxes));
        if let Some(dovecot) = &rig.dovecot {
            let id = format!("<bench-{i}@bench.test>");
            let mime = format!(
                "From: sender@bench.test\r\nTo: {to}\r\nSubject: bench {i}\r\n\
                 Message-ID: {id}\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n\
                 Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
            );
            let sent = unix_now_us();
            match dovecot.deliver_offline(&to, &mime) {
                Ok(()) => injected.lock().unwrap().push((id, sent)),
                Err(e) => failures.lock().unwrap().push(format!("{e:#}")),
            }
        } else {
            let (url, id_field) = match &rig.graph {
                Some(graph) => (
                    format!("{}/_control/users/{to}/messages", graph.base),
                    "internet_message_id",
                ),
                None => (
                    format!("{}/_control/mailboxes/{}/messages", rig.ews.base, to),
                    "message_id",
                ),
            };
            let mail = json!({
                "from": "sender@bench.test",
                "subject": format!("bench {i}"),
                "body": body,
            });
            let (http, injected, failures) = (rig.http.clone(), injected.clone(), failures.clone());
            tasks.spawn(async move {
                let sent = unix_now_us();
                let answer = async {
                    let resp = http
                        .post(&url)
                        .json(&mail)
                        .send()
                        .await?
                        .error_for_status()?;
                    let v: Value = resp.json().await?;
                    v[id_field]
                        .as_str()
                        .map(str::to_owned)
                        .context("no Message-ID in the mock's answer")
                }
                .await;
                match answer {
                    Ok(id) => injected.lock().unwrap().push((id, sent)),
                    Err(e) => failures.lock().unwrap().push(format!("{e:#}")),
                }
            });
        }
        if last_at.elapsed() >= Duration::from_secs(5) {
            let now = rig.listener.usage()?;
            peak_rss = peak_rss.max(now.rss_kib);
            println!(
                "t={:>5.1}s  injected {:>6}  delivered {:>6}  listener {:.1} MiB, {:.0}% CPU",
                started.elapsed().as_secs_f64(),
                i + 1,
                rig.delivered_count().await?,
                mib(now.rss_kib),
                now.cpu_percent_since(&last, last_at.elapsed().as_secs_f64()),
            );
            (last, last_at) = (now, Instant::now());
        }
    }
    while tasks.join_next().await.is_some() {}
    let end = rig.listener.usage()?;
    let cpu = end.cpu_percent_since(&start, started.elapsed().as_secs_f64());
    peak_rss = peak_rss.max(end.rss_kib);
    if let Some(first) = failures.lock().unwrap().first() {
        bail!(
            "{} injections failed, the first: {first}",
            failures.lock().unwrap().len()
        );
    }
    let injected = std::mem::take(&mut *injected.lock().unwrap());
    Ok((injected, peak_rss, end, cpu))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.mailboxes == 0 || args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--mailboxes and --rate must be positive");
    }
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("could not raise the open-files limit: {e}");
    }
    let rig = Rig::start(&args).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let empty = rig.listener.usage()?;

    let n = args.mailboxes;
    let started = Instant::now();
    let create_ms = rig.create_mailboxes(n).await?;
    let created = started.elapsed();
    println!(
        "{n} Create calls answered in {:.1} s",
        created.as_secs_f64()
    );
    let to_streaming = wait_streaming(
        &rig,
        n,
        started,
        Duration::from_secs(args.start_timeout_secs),
    )
    .await
    .inspect_err(|_| {
        if let Some(dovecot) = &rig.dovecot {
            let log = dovecot.log();
            let errors: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("Error:") || l.contains("Fatal:") || l.contains("Panic:"))
                .take(20)
                .collect();
            eprintln!("Dovecot's first errors:\n{}", errors.join("\n"));
        }
    })?;
    println!(
        "all {n} mailboxes streaming after {:.1} s",
        to_streaming.as_secs_f64()
    );

    let graph_stats = async || match &rig.graph {
        Some(graph) => rig.get(format!("{}/_control/stats", graph.base)).await,
        None => Ok(Value::Null),
    };
    let graph_before = graph_stats().await?;
    let redis_before = rig.redis_counts().await?;
    let settle_start = rig.listener.usage()?;
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let idle = rig.listener.usage()?;
    let graph_after = graph_stats().await?;
    let redis_idle = redis_rates(&redis_before, &rig.redis_counts().await?, args.settle_secs);
    // Requests to Graph per mailbox and minute while every mailbox idles.
    let graph_idle_requests = rig.graph.as_ref().map(|_| {
        let requests = graph_after["requests"].as_u64().unwrap_or(0)
            - graph_before["requests"].as_u64().unwrap_or(0);
        requests as f64 / n as f64 / (args.settle_secs as f64 / 60.0)
    });
    if let Some(r) = graph_idle_requests {
        println!(
            "Graph: {r:.2} requests per mailbox and minute at idle; {} live subscriptions",
            graph_after["subscriptions_created"].as_u64().unwrap_or(0)
                - graph_after["subscriptions_deleted"].as_u64().unwrap_or(0)
        );
    }
    let idle_cpu = idle.cpu_percent_since(&settle_start, args.settle_secs as f64);
    let idle_per_mailbox_kib = idle.rss_kib.saturating_sub(empty.rss_kib) as f64 / n as f64;
    let sockets = rig.listener.sockets()?;
    let ews_stats = rig.get(format!("{}/_control/stats", rig.ews.base)).await?;
    let ews_streams = ews_stats["open_streams"].as_u64().unwrap_or(0);
    println!("mock-ews holds {ews_streams} streaming connections");
    let imap_connections = rig.dovecot.as_ref().map(imap_world::Dovecot::connections);
    if let Some(c) = imap_connections {
        println!("Dovecot holds {c} connections");
    }
    println!(
        "idle: {:.1} MiB resident ({:.1} MiB with no mailbox), {idle_per_mailbox_kib:.1} KiB per mailbox, {idle_cpu:.1}% CPU, {sockets} sockets open",
        mib(idle.rss_kib),
        mib(empty.rss_kib)
    );

    let redis_before = rig.redis_counts().await?;
    let (injected, load_peak_rss, _, load_cpu) = flow(&rig, &args).await?;
    let redis_load = redis_rates(
        &redis_before,
        &rig.redis_counts().await?,
        args.duration_secs,
    );
    let drain_start = Instant::now();
    loop {
        let delivered = rig.delivered_count().await?;
        if delivered >= injected.len() as u64
            || drain_start.elapsed() > Duration::from_secs(args.drain_timeout_secs)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A duplicate would come soon after the first delivery.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let arrivals = rig.arrivals().await?;
    let mut latencies_ms = Vec::with_capacity(injected.len());
    let (mut lost, mut duplicated) = (Vec::new(), 0usize);
    for (id, sent) in &injected {
        match arrivals.get(id) {
            None => lost.push(id.clone()),
            Some(at) => {
                duplicated += at.len() - 1;
                let first = at.iter().min().copied().unwrap_or(*sent);
                latencies_ms.push(first.saturating_sub(*sent) as f64 / 1000.0);
            }
        }
    }
    let latency = Percentiles::of(&latencies_ms);
    let report = json!({
        "mailboxes": n,
        "create_calls_secs": created.as_secs_f64(),
        "create_call_ms": Percentiles::of(&create_ms),
        "all_streaming_secs": to_streaming.as_secs_f64(),
        "listener_rss_empty_mib": mib(empty.rss_kib),
        "listener_rss_idle_mib": mib(idle.rss_kib),
        "listener_rss_idle_per_mailbox_kib": idle_per_mailbox_kib,
        "listener_cpu_idle_percent": idle_cpu,
        "listener_sockets_idle": sockets,
        "ews_streams_idle": ews_streams,
        "ews_tls": args.ews_tls,
        "ews_auth": args.ews_auth,
        "service_account": args.service_account,
        "imap": args.imap,
        "imap_connections_idle": imap_connections,
        "graph": args.graph,
        "graph_notifications": args.graph_notifications,
        "graph_requests_per_mailbox_minute_idle": graph_idle_requests,
        "rate_per_second": args.rate,
        "duration_secs": args.duration_secs,
        "mail_bytes": args.mail_bytes,
        "listener_rss_load_peak_mib": mib(load_peak_rss),
        "listener_rss_load_per_mailbox_kib":
            load_peak_rss.saturating_sub(empty.rss_kib) as f64 / n as f64,
        "listener_cpu_load_percent": load_cpu,
        "injected": injected.len(),
        "delivered": injected.len() - lost.len(),
        "lost": lost.len(),
        "duplicated": duplicated,
        "latency_ms": latency,
        "redis_commands_per_second_idle": redis_idle,
        "redis_commands_per_second_load": redis_load,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(l) = latency {
        println!(
            "| {n} | {:.1} s | {:.1} KiB | {:.1}% | {:.0} / s | {:.1} ms | {:.1} ms | {:.1} ms | {} / {} / {} | {:.0}% |",
            to_streaming.as_secs_f64(),
            idle_per_mailbox_kib,
            idle_cpu,
            args.rate,
            l.p50,
            l.p99,
            l.max,
            injected.len(),
            lost.len(),
            duplicated,
            load_cpu,
        );
    }
    rig.listener.kill().await;
    rig.ews.kill().await;
    rig.creatio.kill().await;
    if let Some(graph) = rig.graph {
        graph.kill().await;
    }
    if !lost.is_empty() || duplicated > 0 {
        bail!(
            "{} lost (the first: {:?}), {duplicated} duplicated",
            lost.len(),
            lost.first()
        );
    }
    Ok(())
}
