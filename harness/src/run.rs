//! One scenario, run for real: mock-ews, mock-creatio, a Redis and the listener replicas as
//! processes, a fault proxy in front of Exchange and Creatio and between each replica and
//! Redis; mailboxes created through Creatio's API; mail sent at the scenario's rate while its
//! timeline plays; the listener's account of its mailboxes sampled throughout; then every
//! mail that reached Creatio matched against what was sent, and the run judged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::http::{get_json, post_creatio, post_json, put_json};
use crate::mocks;
use crate::process::{Binaries, Process};
use crate::proxy::{ForwardProxy, Proxy};
use crate::redis::{Choice, Redis};
use crate::scenario::{Action, CreateVia, Link, Scenario, StoreKind};
use crate::verdict::{self, Arrival, Bounds, Event, Sample, Sent, Verdict, Violation};

mod shared;
mod traffic;
mod world;

use shared::{Roster, Shared, arrivals, watch};
use traffic::{creatio_loop, send_mail};
use world::World;

/// How scenarios are run.
#[derive(Debug, Clone)]
pub struct Options {
    pub redis: Choice,
    /// Reports and logs go to `<out>/<scenario>/`.
    pub out: PathBuf,
    /// How often the progress line is printed.
    pub progress_every: Duration,
}

/// A run's result.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    pub report: crate::report::Report,
    pub dir: PathBuf,
}

/// How long after a Close a mail may still be delivered (the owner stops within 2 s).
const CLOSE_GRACE_SECS: f64 = 2.0;
/// How often the listener is asked how its mailboxes stand.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How long the mailboxes may take to stream at the start.
const START_PATIENCE: Duration = Duration::from_secs(90);
/// A fixed sealing key for the run's replicas (test credentials only).
const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs one scenario to its verdict. An error means the run could not be made (a part did
/// not start), not that a rule broke.
pub async fn run(
    scenario: &Scenario,
    bins: &Binaries,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let wall = Instant::now();
    let mut world = World::start(scenario, bins, options).await?;
    let backend = match (&world.redis, &world.sentinel) {
        (Some(r), _) => r.backend.clone(),
        (None, Some(s)) => s.backend.clone(),
        (None, None) => "in-memory store (no Redis)".to_owned(),
    };
    eprintln!(
        "[{}] {} — on {backend}",
        scenario.name, scenario.description
    );
    world.create_mailboxes().await?;

    // The clock of the report starts with the mail.
    world.shared.started = Instant::now();
    let sh = world.shared.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let recreated = Arc::new(AtomicUsize::new(0));
    let mail_until = sh.started + Duration::from_secs_f64(scenario.duration_secs);
    let sender = tokio::spawn(send_mail(
        sh.clone(),
        scenario.mail.clone(),
        traffic::Bases {
            creatio: world.creatio_base(),
        },
        mail_until,
    ));
    let watcher = tokio::spawn(watch(sh.clone(), stop.clone()));
    let looper = scenario.creatio_loop.as_ref().map(|l| {
        tokio::spawn(creatio_loop(
            sh.clone(),
            Duration::from_secs_f64(l.every_secs),
            world.creatio_base(),
            recreated.clone(),
            stop.clone(),
        ))
    });

    let mut events = Vec::new();
    let mut next_progress = Instant::now() + options.progress_every;
    let mut steps = scenario.timeline.iter().peekable();
    let progress = |world: &World, phase: &str| {
        let sh = world.shared.clone();
        let up = world.up_count();
        let total = world.slots.len();
        let phase = phase.to_owned();
        let name = scenario.name.clone();
        async move {
            let sent = sh.sent.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
            let delivered = get_json(&sh.http, &format!("{}/_control/stats", sh.creatio))
                .await
                .map(|s| Shared::delivered_now(&s, sh.operation))
                .unwrap_or(0);
            let last = sh
                .samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .last()
                .cloned();
            let streaming = last.map_or("?".to_owned(), |s| format!("{}/{}", s.streaming, s.open));
            eprintln!(
                "[{name}] {phase:<5} t={:>6.1}s  sent {sent:>5}  delivered {delivered:>5}  pending {:>4}  replicas up {up}/{total}  streaming {streaming}",
                sh.secs(),
                sent.saturating_sub(delivered),
            );
        }
    };
    // Redis's command counts at the start of the mail, before each step and at its end.
    let redis_addr = world.redis.as_ref().map(crate::redis::Redis::addr);
    let count_redis = async || match redis_addr {
        Some(addr) => crate::redis::command_counts(addr).await.ok(),
        None => None,
    };
    let mut redis_marks: Vec<(f64, String, std::collections::BTreeMap<String, u64>)> = Vec::new();
    if let Some(counts) = count_redis().await {
        redis_marks.push((sh.secs(), "start".into(), counts));
    }
    // The timeline, while the mail flows (a step later than the mail is still taken).
    loop {
        let now = Instant::now();
        if now >= next_progress {
            progress(&world, "mail").await;
            next_progress = now + options.progress_every;
        }
        match steps.peek() {
            Some(step) if sh.started + Duration::from_secs_f64(step.secs) <= now => {
                if let Some(counts) = count_redis().await {
                    redis_marks.push((sh.secs(), step.action.label(), counts));
                }
                let secs = sh.secs();
                eprintln!(
                    "[{}] t={secs:>6.1}s  {}",
                    scenario.name,
                    step.action.label()
                );
                world
                    .act(&step.action)
                    .await
                    .with_context(|| format!("at {} s: {}", step.secs, step.action.label()))?;
                events.push(Event {
                    secs,
                    label: step.action.label(),
                    disrupts: step.action.disrupts(),
                    cuts_answers: step.action.cuts_answers(),
                });
                steps.next();
            }
            None if now >= mail_until => break,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    sender.await.context("the mail sender panicked")??;
    if let Some(counts) = count_redis().await {
        redis_marks.push((sh.secs(), "the end of the mail".into(), counts));
    }
    // After a Redis restarted empty its counts start again: such a window is left out.
    let redis_commands = redis_marks
        .windows(2)
        .filter_map(|w| {
            let ((from, _, before), (to, until, after)) = (&w[0], &w[1]);
            let secs = to - from;
            let total = |c: &std::collections::BTreeMap<String, u64>| c.values().sum::<u64>();
            (secs > 0.5 && total(after) >= total(before)).then(|| {
                let rates = crate::redis::command_rates(before, after, secs);
                crate::report::RedisWindow {
                    from_secs: *from,
                    to_secs: *to,
                    until: until.clone(),
                    per_second: rates.iter().map(|(_, r)| r).sum(),
                    by_command: rates.into_iter().take(10).collect(),
                }
            })
        })
        .collect();

    // Drain: every expected mail in, or the time is up; then the mailboxes must settle.
    let expected = |sent: &[Sent]| {
        sent.iter()
            .filter(|s| !s.after_close && !s.optional)
            .count() as u64
    };
    let drain_until = Instant::now() + Duration::from_secs_f64(scenario.drain_secs);
    loop {
        let stats = get_json(&sh.http, &format!("{}/_control/stats", sh.creatio)).await?;
        let delivered = Shared::delivered_now(&stats, sh.operation);
        let want = expected(&sh.sent.lock().unwrap_or_else(|p| p.into_inner()));
        if delivered >= want || Instant::now() >= drain_until {
            break;
        }
        if Instant::now() >= next_progress {
            progress(&world, "drain").await;
            next_progress = Instant::now() + options.progress_every;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle_until = Instant::now() + Duration::from_secs_f64(scenario.expect.recovery_secs);
    while !sh.sample().await.settled() && Instant::now() < settle_until {
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    // A moment for a late duplicate to show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    if let Some(l) = looper {
        l.abort();
    }
    let last = sh.sample().await;
    sh.samples
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(last);

    let arrivals = arrivals(&sh).await?;
    let sent = sh.sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let samples = sh.samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut verdict = verdict::judge(
        &sent,
        &arrivals,
        &samples,
        &events,
        Bounds {
            recovery_secs: scenario.expect.recovery_secs,
            failed: scenario.expect.failed,
            balanced: scenario.expect.balanced,
            unserved_loss: scenario.expect.unserved_loss,
        },
    );
    verdict.violations.append(&mut world.problems);
    verdict.violations.extend(shared::sent_twice(&sh).await?);
    verdict
        .violations
        .extend(shared::history_early(&sh, &arrivals));
    // Every callback must read as Creatio reads it: mock-creatio refuses, and lists, any other.
    let rejections = get_json(&sh.http, &format!("{}/_control/rejections", sh.creatio)).await?;
    if let Some(first) = rejections.as_array().and_then(|r| r.first()) {
        verdict.violations.push(Violation {
            rule: "contract",
            detail: format!(
                "{} callbacks Creatio would not read; the first, {}: {}",
                rejections.as_array().map_or(0, Vec::len),
                first["operation"].as_str().unwrap_or("?"),
                first["reason"].as_str().unwrap_or("?")
            ),
        });
    }
    let usage = world
        .slots
        .iter()
        .filter_map(|slot| {
            let now = slot.process.as_ref()?.usage().ok()?;
            let start = crate::process::Usage {
                cpu_ticks: 0,
                ..now
            };
            let served = samples
                .last()
                .and_then(|s| s.owners.get(&slot.id).copied())
                .filter(|n| *n > 0);
            Some((
                slot.id.clone(),
                crate::report::ReplicaUsage {
                    rss_mib: now.rss_kib as f64 / 1024.0,
                    kib_per_mailbox: served.map(|n| now.rss_kib as f64 / n as f64),
                    cpu_percent: now.cpu_percent_since(&start, slot.since.elapsed().as_secs_f64()),
                },
            ))
        })
        .collect();
    let report = crate::report::Report::new(
        scenario,
        &backend,
        &verdict,
        &samples,
        recreated.load(Ordering::Relaxed),
        crate::report::Measured {
            replica_usage: usage,
            redis_commands,
        },
        wall.elapsed().as_secs_f64(),
    );
    report.write(&world.dir, &verdict, &events)?;
    let dir = world.dir.clone();
    // Replicas first, so none logs the others' disappearance as a failure.
    for slot in &mut world.slots {
        if let Some(p) = slot.process.take() {
            p.kill().await;
        }
    }
    drop(world);
    Ok(Outcome {
        verdict,
        report,
        dir,
    })
}

/// The scenario files a path names: the file itself, or every `.toml` in a folder (sorted),
/// leaving out `manual` ones unless the file is named directly.
pub fn collect(paths: &[PathBuf]) -> anyhow::Result<Vec<Scenario>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            for f in toml_files(path)? {
                let s = Scenario::load(&f)?;
                if !s.manual {
                    out.push(s);
                }
            }
        } else {
            out.push(Scenario::load(path)?);
        }
    }
    Ok(out)
}

/// The `.toml` files in a folder, sorted by name.
pub fn toml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Where the suite lives: `scenarios/` here, or in the workspace the harness was built from.
pub fn suite_dir() -> PathBuf {
    let here = Path::new("scenarios");
    if here.is_dir() {
        here.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
    }
}
