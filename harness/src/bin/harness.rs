//! `harness`: the workspace's real binaries, composed. `harness run` plays scenario files
//! (`scenarios/`) and judges each run; `harness list` shows them; `harness demo` brings up
//! mock-ews, mock-creatio, a Redis (a `redis-server` process the harness owns) and listener
//! replicas, creates mailboxes through Creatio's API, injects a mail every few seconds and shows
//! each one arrive, prints where every part listens, and stays up until Ctrl-C, so a person can
//! poke at it with curl.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use harness::http::{full_emails_delivered, get_json, post_creatio, post_json};
use harness::process::{Binaries, Process, run_dir};
use harness::redis::{Choice, Redis};
use harness::run::{Options, collect, suite_dir, toml_files};
use serde_json::json;
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Compose and drive the workspace's real binaries")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenario files (a file, several, or a folder; the whole suite when none is named)
    /// and judge each run. Exits non-zero when any rule broke.
    Run {
        paths: Vec<PathBuf>,
        /// Where Redis runs: `auto` (a testcontainers container when a Docker engine answers,
        /// else a redis-server process), `container`, `process`, or a redis:// URL.
        #[arg(long, default_value = "auto")]
        redis: String,
        /// Reports and logs go to `<out>/<scenario>/` (default: target/harness/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seconds between progress lines.
        #[arg(long, default_value_t = 5.0)]
        progress_secs: f64,
    },
    /// List the scenarios of the suite.
    List,
    /// Bring everything up, show mail flowing, and stay up until Ctrl-C.
    Demo {
        /// Listener replicas; more than one share a Redis the harness starts.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        /// Mailboxes to create.
        #[arg(long, default_value_t = 5)]
        mailboxes: usize,
        /// Seconds between injected mails (0: none).
        #[arg(long, default_value_t = 3)]
        mail_every_secs: u64,
        /// Stop by itself after this many seconds, and fail unless every injected mail arrived
        /// once (0: run until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        for_secs: u64,
    },
}

async fn demo(
    replicas: usize,
    mailboxes: usize,
    mail_every: Duration,
    run_for: Option<Duration>,
) -> anyhow::Result<()> {
    if replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let bins = Binaries::release()?;
    let dir = run_dir("demo")?;
    let (ews, creatio) = harness::mocks::start(&bins, &dir, &[], &[]).await?;
    // A process rather than a container: the demo's Redis is for poking at with redis-cli.
    let redis = if replicas > 1 {
        Some(Redis::start(&Choice::Process, &dir).await?)
    } else {
        None
    };
    let redis_url = redis.as_ref().map(|r| format!("redis://{}/0", r.addr()));
    let mut listeners = Vec::new();
    for i in 0..replicas {
        let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
        let mut env = Vec::new();
        if let Some(url) = &redis_url {
            args.extend(["--redis-url".into(), url.clone()]);
            args.extend(["--replica-id".into(), format!("replica-{i}")]);
            env.push((
                "EXCHANGE_LISTENER_SECRET_KEY",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned(),
            ));
        }
        listeners.push(
            Process::start(
                &format!("exchange-listener-{i}"),
                &bins.listener,
                &args,
                &env,
                &dir.join(format!("exchange-listener-{i}.log")),
            )
            .await?,
        );
    }

    let http = reqwest::Client::new();
    let endpoint = format!(
        "{}/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
        creatio.base
    );
    for m in 0..mailboxes {
        let email = format!("user{m}@demo.test");
        post_json(
            &http,
            &format!("{}/_control/mailboxes", ews.base),
            &json!({ "email": email, "password": "secret" }),
        )
        .await?;
        let creds = json!([mock_creatio::calling::credentials(
            &format!("mbx-{m}"),
            &email,
            Some("secret"),
            &format!("{}/EWS/Exchange.asmx", ews.base),
            &endpoint,
        )]);
        let to = &listeners[m % listeners.len()];
        post_creatio(&http, &format!("{}/api/listeners/create", to.base), &creds).await?;
    }

    // Mail sent before a mailbox's first sync is its existing mail, not new: wait for all.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = get_json(
            &http,
            &format!("{}/api/listeners/status", listeners[0].base),
        )
        .await?;
        if status["States"]["Streaming"].as_u64() == Some(mailboxes as u64) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the mailboxes did not all stream within a minute: {status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!("\nEverything is up (logs in {}):", dir.display());
    println!(
        "  mock-ews       {}   (control API under /_control)",
        ews.base
    );
    println!(
        "  mock-creatio   {}   (calls under /_control/calls)",
        creatio.base
    );
    if let Some(url) = &redis_url {
        println!("  redis          {url}");
    }
    for l in &listeners {
        println!("  {:<14} {}/api/listeners/status", l.name, l.base);
    }
    println!("\nTry:");
    println!("  curl {}/api/listeners/status", listeners[0].base);
    println!(
        "  curl -X POST {}/_control/mailboxes/user0@demo.test/messages -H 'Content-Type: application/json' -d '{{\"from\":\"a@b.c\",\"subject\":\"hi\",\"body\":\"hello\"}}'",
        ews.base
    );
    println!(
        "  curl {}/_control/calls?operation=ProcessFullEmail",
        creatio.base
    );
    match run_for {
        Some(d) => println!("\nStopping by itself after {d:?}.\n"),
        None => println!("\nCtrl-C stops everything.\n"),
    }

    let started = Instant::now();
    let mut tick = tokio::time::interval(mail_every.max(Duration::from_secs(1)));
    let mut injected = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        if run_for.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let delivered = full_emails_delivered(&http, &creatio.base).await?;
        let status = get_json(
            &http,
            &format!("{}/api/listeners/status", listeners[0].base),
        )
        .await?;
        println!(
            "t={:>5.0}s  injected {injected:>4}  delivered {:>4}  states {}  owners {}",
            started.elapsed().as_secs_f64(),
            delivered,
            status["States"],
            status["Owners"],
        );
        if !mail_every.is_zero() && mailboxes > 0 {
            let m = injected as usize % mailboxes;
            let mail = json!({
                "from": "demo@demo.test",
                "subject": format!("demo {injected}"),
                "body": "hello",
            });
            let url = format!("{}/_control/mailboxes/user{m}@demo.test/messages", ews.base);
            post_json(&http, &url, &mail).await?;
            injected += 1;
        }
    }
    let outcome = match run_for {
        None => Ok(()),
        // Timed: every injected mail must have arrived, once.
        Some(_) => {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let delivered = full_emails_delivered(&http, &creatio.base).await?;
                if delivered == injected {
                    println!("all {injected} injected mails delivered once");
                    break Ok(());
                }
                if delivered > injected || Instant::now() > deadline {
                    break Err(anyhow::anyhow!(
                        "{injected} mails injected, {delivered} delivered"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    println!("stopping");
    for l in listeners {
        l.kill().await;
    }
    outcome
}

async fn run(
    paths: Vec<PathBuf>,
    redis: &str,
    out: Option<PathBuf>,
    progress_secs: f64,
) -> anyhow::Result<bool> {
    let paths = if paths.is_empty() {
        vec![suite_dir()]
    } else {
        paths
    };
    let scenarios = collect(&paths)?;
    if scenarios.is_empty() {
        bail!("no scenario files in {paths:?}");
    }
    let redis = match redis {
        "auto" => Choice::Auto,
        "container" => Choice::Container,
        "process" => Choice::Process,
        url if url.starts_with("redis://") => Choice::External(url.to_owned()),
        other => bail!("--redis {other:?}: say auto, container, process or a redis:// URL"),
    };
    if !(progress_secs.is_finite() && progress_secs > 0.0) {
        bail!("--progress-secs must be positive");
    }
    let bins = Binaries::release()?;
    let options = Options {
        // Whether Docker answers is asked once, not once per scenario.
        redis: redis.resolved().await,
        out: match out {
            Some(o) => o,
            None => run_dir("")?,
        },
        progress_every: Duration::from_secs_f64(progress_secs),
    };
    let mut results = Vec::new();
    for scenario in &scenarios {
        let outcome = harness::run::run(scenario, &bins, &options).await;
        match outcome {
            Ok(o) => {
                println!("{}", o.report.summary());
                println!("  report          {}", o.dir.join("report.json").display());
                results.push((
                    scenario.name.clone(),
                    o.verdict.passed(),
                    o.report.wall_secs,
                    None,
                ));
            }
            Err(e) => {
                println!("\n{} — could not run: {e:#}", scenario.name);
                results.push((scenario.name.clone(), false, 0.0, Some(format!("{e:#}"))));
            }
        }
    }
    println!("\n{:<30} {:>8}  verdict", "scenario", "wall");
    for (name, passed, secs, error) in &results {
        let verdict = match (passed, error) {
            (_, Some(_)) => "COULD NOT RUN",
            (true, None) => "passed",
            (false, None) => "FAILED",
        };
        println!("{name:<30} {secs:>7.1}s  {verdict}");
    }
    Ok(results.iter().all(|(_, passed, _, _)| *passed))
}

fn list() -> anyhow::Result<()> {
    // Every scenario, manual ones included, each file named.
    for s in collect(&toml_files(&suite_dir())?)? {
        let manual = if s.manual { " (manual)" } else { "" };
        println!("{:<28} {}{manual}", s.name, s.description);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Run {
            paths,
            redis,
            out,
            progress_secs,
        } => {
            if !run(paths, &redis, out, progress_secs).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::List => list(),
        Command::Demo {
            replicas,
            mailboxes,
            mail_every_secs,
            for_secs,
        } => {
            demo(
                replicas,
                mailboxes,
                Duration::from_secs(mail_every_secs),
                (for_secs > 0).then(|| Duration::from_secs(for_secs)),
            )
            .await
        }
    }
}
