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

/// The replicas running now, for the tasks that call them.
#[derive(Debug, Clone, Default)]
struct Roster(Arc<Mutex<Vec<(String, String)>>>);

impl Roster {
    fn set(&self, up: Vec<(String, String)>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = up;
    }

    /// (replica id, base URL) of each running replica.
    fn up(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the run's tasks share.
#[derive(Debug, Clone)]
struct Shared {
    http: reqwest::Client,
    roster: Roster,
    /// Mailbox index → seconds into the run it was closed.
    closed: Arc<Mutex<BTreeMap<usize, f64>>>,
    sent: Arc<Mutex<Vec<Sent>>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    mailboxes: usize,
    /// Each mailbox's password, as Exchange has it now.
    passwords: Arc<Mutex<BTreeMap<usize, String>>>,
    started: Instant,
    ews: String,
    creatio: String,
    operation: &'static str,
    /// Mailboxes are created without a password, for the service account.
    service_account: bool,
}

impl Shared {
    fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn open(&self) -> usize {
        self.mailboxes - self.closed.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn email(m: usize) -> String {
        format!("user{m}@harness.test")
    }

    fn password(&self, m: usize) -> String {
        self.passwords
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&m)
            .cloned()
            .unwrap_or_else(|| "secret".to_owned())
    }

    /// Mailbox `m`'s credentials as Creatio sends them: its own login, or none (the
    /// listener's service account serves it).
    fn creds(&self, m: usize, ews_base: &str, creatio_base: &str) -> Value {
        let password = (!self.service_account).then(|| self.password(m));
        let mut creds = mock_creatio::calling::credentials(
            &format!("mbx-{m}"),
            &Self::email(m),
            password.as_deref(),
            &format!("{ews_base}/EWS/Exchange.asmx"),
            &format!(
                "{creatio_base}/0/ServiceModel/ExchangeListenerService.svc/{}",
                self.operation
            ),
        );
        if self.service_account {
            creds["UserName"] = Value::Null;
        }
        creds
    }

    /// Asks the running replicas in turn, from `first`, until one answers.
    async fn call_any(
        &self,
        first: usize,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let up = self.roster.up();
        if up.is_empty() {
            bail!("no replica is running");
        }
        let mut last = None;
        for i in 0..up.len() {
            let (_, base) = &up[(first + i) % up.len()];
            let url = format!("{base}{path}");
            let answer = tokio::time::timeout(Duration::from_secs(2), async {
                match body {
                    Some(b) => post_creatio(&self.http, &url, b).await,
                    None => get_json(&self.http, &url).await,
                }
            })
            .await;
            match answer {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(anyhow::anyhow!("{url}: no answer within 2 s")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no replica answered")))
    }

    /// One sample of how the mailboxes stand.
    async fn sample(&self) -> Sample {
        let up: Vec<String> = self.roster.up().into_iter().map(|(id, _)| id).collect();
        let secs = self.secs();
        let open = self.open();
        match self.call_any(0, "/api/listeners/status", None).await {
            Ok(status) => {
                let count = |state: &str| status["States"][state].as_u64().unwrap_or(0) as usize;
                Sample {
                    secs,
                    answered: true,
                    streaming: count("Streaming"),
                    workers_streaming: self.workers_streaming().await,
                    failed: count("Failed"),
                    owners: serde_json::from_value(status["Owners"].clone()).unwrap_or_default(),
                    up,
                    open,
                }
            }
            Err(_) => Sample {
                secs,
                up,
                open,
                ..Sample::default()
            },
        }
    }

    /// The workers streaming, as each running replica counts its own (`/metrics`), not as
    /// the store last heard: a mailbox leased by a replica that runs no worker for it shows
    /// here. `None` when a replica did not answer.
    async fn workers_streaming(&self) -> Option<usize> {
        const LINE: &str = "exchange_listener_mailboxes{state=\"Streaming\"} ";
        let mut total = 0;
        for (_, base) in self.roster.up() {
            let text = tokio::time::timeout(Duration::from_secs(2), async {
                self.http
                    .get(format!("{base}/metrics"))
                    .send()
                    .await?
                    .text()
                    .await
            })
            .await
            .ok()?
            .ok()?;
            total += text
                .lines()
                .find_map(|l| l.strip_prefix(LINE))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as usize;
        }
        Some(total)
    }

    fn delivered_now(stats: &Value, operation: &str) -> u64 {
        stats["calls"][operation].as_u64().unwrap_or(0)
    }
}

/// One replica's place: its id, its process while it runs, its own links to Redis and (as
/// its HTTP proxy) to Exchange and Creatio.
#[derive(Debug)]
struct Slot {
    id: String,
    process: Option<Process>,
    /// When the process was started.
    since: Instant,
    redis_link: Option<Proxy>,
    web_link: ForwardProxy,
}

/// Everything a run started; dropped, it all stops.
struct World {
    scenario: Scenario,
    bins: Binaries,
    dir: PathBuf,
    shared: Shared,
    _ews: Process,
    _creatio: Process,
    ews_link: Proxy,
    creatio_link: Proxy,
    redis: Option<Redis>,
    /// The service accounts file every replica is given, in `service_account` runs.
    accounts: Option<PathBuf>,
    slots: Vec<Slot>,
    /// Problems found while acting (a replica that would not stop on SIGTERM).
    problems: Vec<Violation>,
}

impl World {
    async fn start(
        scenario: &Scenario,
        bins: &Binaries,
        options: &Options,
    ) -> anyhow::Result<World> {
        let dir = options.out.join(&scenario.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ews, creatio) = mocks::start(bins, &dir, &[], &[]).await?;
        let addr_of = |base: &str| -> anyhow::Result<std::net::SocketAddr> {
            base.trim_start_matches("http://")
                .parse()
                .with_context(|| format!("{base} is not an address"))
        };
        let ews_link = Proxy::start(addr_of(&ews.base)?).await?;
        let creatio_link = Proxy::start(addr_of(&creatio.base)?).await?;
        let redis = match scenario.replicas.store() {
            StoreKind::Redis => Some(Redis::start(&options.redis, &dir).await?),
            StoreKind::Memory => None,
        };
        let shared = Shared {
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()?,
            roster: Roster::default(),
            closed: Arc::default(),
            sent: Arc::default(),
            samples: Arc::default(),
            mailboxes: scenario.mailboxes.count,
            passwords: Arc::default(),
            started: Instant::now(),
            ews: ews.base.clone(),
            creatio: creatio.base.clone(),
            operation: scenario.mailboxes.operation.name(),
            service_account: scenario.mailboxes.service_account,
        };
        let accounts = if scenario.mailboxes.service_account {
            let url = format!("http://{}/EWS/Exchange.asmx", ews_link.addr());
            let file = mocks::service_account(&shared.http, &shared.ews, &url, &dir).await?;
            let settings = json!({
                "impersonators": [mocks::SERVICE_ACCOUNT.0],
                "backends": 2,
                "max_streams_per_user": 10,
            });
            put_json(
                &shared.http,
                &format!("{}/_control/settings", shared.ews),
                &settings,
            )
            .await?;
            Some(file)
        } else {
            None
        };
        let mut world = World {
            scenario: scenario.clone(),
            bins: bins.clone(),
            dir,
            shared,
            _ews: ews,
            _creatio: creatio,
            ews_link,
            creatio_link,
            redis,
            accounts,
            slots: Vec::new(),
            problems: Vec::new(),
        };
        for _ in 0..scenario.replicas.count {
            world.add_replica().await?;
        }
        Ok(world)
    }

    async fn add_replica(&mut self) -> anyhow::Result<()> {
        let i = self.slots.len();
        let redis_link = match &self.redis {
            Some(r) => Some(Proxy::start(r.addr()).await?),
            None => None,
        };
        self.slots.push(Slot {
            id: format!("r{i}"),
            process: None,
            since: Instant::now(),
            redis_link,
            web_link: ForwardProxy::start().await?,
        });
        self.start_replica(i).await
    }

    async fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = &self.slots[i];
        if slot.process.is_some() {
            return Ok(());
        }
        let mut args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--replica-id".to_owned(),
            slot.id.clone(),
            format!("--lease-ms={}", self.scenario.replicas.lease_ms),
        ];
        // Exchange and Creatio through this replica's own proxy, so one replica can lose them.
        let mut env = vec![
            ("HTTPS_PROXY", slot.web_link.url()),
            ("HTTP_PROXY", slot.web_link.url()),
            ("NO_PROXY", String::new()),
        ];
        if let Some(link) = &slot.redis_link {
            args.push(format!("--redis-url=redis://{}/0", link.addr()));
            env.push(("EXCHANGE_LISTENER_SECRET_KEY", SECRET.to_owned()));
        }
        if let Some(file) = &self.accounts {
            args.push("--ews-service-accounts".to_owned());
            args.push(file.to_string_lossy().into_owned());
            // A service account serves only a Creatio named: mock-creatio's.
            args.push("--creatio-hosts=127.0.0.1".to_owned());
        }
        args.extend(self.scenario.replicas.args.iter().cloned());
        // Each start gets its own log, so a restarted replica's first life is kept.
        let log = (0..)
            .map(|n| self.dir.join(format!("{}.{n}.log", slot.id)))
            .find(|p| !p.exists())
            .expect("a free log name");
        let process = Process::start(&slot.id, &self.bins.listener, &args, &env, &log).await?;
        self.slots[i].process = Some(process);
        self.slots[i].since = Instant::now();
        self.publish_roster();
        Ok(())
    }

    fn publish_roster(&self) {
        self.shared.roster.set(
            self.slots
                .iter()
                .filter_map(|s| s.process.as_ref().map(|p| (s.id.clone(), p.base.clone())))
                .collect(),
        );
    }

    fn ews_base(&self) -> String {
        format!("http://{}", self.ews_link.addr())
    }

    fn creatio_base(&self) -> String {
        format!("http://{}", self.creatio_link.addr())
    }

    /// Creates the mailboxes in mock-ews and through the listener's API; waits until all stream.
    async fn create_mailboxes(&self) -> anyhow::Result<()> {
        let sh = &self.shared;
        for m in 0..sh.mailboxes {
            post_json(
                &sh.http,
                &format!("{}/_control/mailboxes", sh.ews),
                &json!({ "email": Shared::email(m), "password": "secret" }),
            )
            .await?;
            let creds = sh.creds(m, &self.ews_base(), &self.creatio_base());
            let via = match self.scenario.mailboxes.create_via {
                CreateVia::RoundRobin => m,
                CreateVia::First => 0,
            };
            sh.call_any(via, "/api/listeners/create", Some(&json!([creds])))
                .await?;
        }
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            let s = sh.sample().await;
            if s.settled() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the mailboxes did not all stream within {START_PATIENCE:?}: {} of {} streaming, owners {:?}",
                    s.streaming,
                    s.open,
                    s.owners
                );
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    async fn act(&mut self, action: &Action) -> anyhow::Result<()> {
        let sh = self.shared.clone();
        match action {
            Action::Kill { replica } => {
                if let Some(p) = self.slots[*replica].process.take() {
                    self.publish_roster();
                    p.kill().await;
                }
            }
            Action::Term { replica } => {
                if let Some(p) = self.slots[*replica].process.take() {
                    self.publish_roster();
                    if !p.terminate(Duration::from_secs(20)).await {
                        self.problems.push(Violation {
                            rule: "shutdown",
                            detail: format!(
                                "replica r{replica} did not exit with status 0 within 20 s of SIGTERM"
                            ),
                        });
                    }
                }
            }
            Action::Start { replica } => self.start_replica(*replica).await?,
            Action::AddReplica => self.add_replica().await?,
            Action::RedisRestart { down_secs } => {
                let redis = self.redis.as_mut().context("no Redis in this run")?;
                redis
                    .restart_empty(Duration::from_secs_f64(down_secs.max(0.0)))
                    .await?;
                let addr = redis.addr();
                for slot in &self.slots {
                    if let Some(link) = &slot.redis_link {
                        link.set_upstream(addr);
                    }
                }
            }
            Action::RedisPause { secs } => {
                let redis = self.redis.as_ref().context("no Redis in this run")?;
                redis.freeze(true).await?;
                tokio::time::sleep(Duration::from_secs_f64(*secs)).await;
                redis.freeze(false).await?;
            }
            Action::Link {
                to,
                replica,
                mode,
                ms,
            } => {
                let mode = mode.proxy_mode(*ms);
                match (to, replica) {
                    (Link::Ews, None) => self.ews_link.set_mode(mode),
                    (Link::Creatio, None) => self.creatio_link.set_mode(mode),
                    (Link::Ews, Some(r)) => {
                        self.slots[*r].web_link.set_mode(self.ews_link.addr(), mode);
                    }
                    (Link::Creatio, Some(r)) => {
                        self.slots[*r]
                            .web_link
                            .set_mode(self.creatio_link.addr(), mode);
                    }
                    (Link::Redis, _) => {
                        for (i, slot) in self.slots.iter().enumerate() {
                            if replica.is_none_or(|r| r == i)
                                && let Some(link) = &slot.redis_link
                            {
                                link.set_mode(mode);
                            }
                        }
                    }
                }
            }
            Action::EwsFault { fault } => {
                post_json(
                    &sh.http,
                    &format!("{}/_control/faults", sh.ews),
                    &serde_json::to_value(fault)?,
                )
                .await?;
            }
            Action::CreatioFail {
                count,
                status,
                retry_after_secs,
            } => {
                post_json(
                    &sh.http,
                    &format!("{}/_control/failures", sh.creatio),
                    &json!({ "count": count, "status": status, "retry_after_secs": retry_after_secs }),
                )
                .await?;
            }
            Action::CreatioMischief {
                drop,
                duplicate,
                delay_ms,
            } => {
                post_json(
                    &sh.http,
                    &format!("{}/_control/mischief", sh.creatio),
                    &json!({ "drop": drop, "duplicate": duplicate, "delay_ms": delay_ms }),
                )
                .await?;
            }
            Action::Close { mailbox } => {
                sh.closed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(*mailbox, sh.secs());
                sh.call_any(
                    0,
                    "/api/listeners/close",
                    Some(&json!([format!("mbx-{mailbox}")])),
                )
                .await?;
            }
            Action::Update { mailbox } => {
                let password = format!("secret-{}", sh.secs().to_bits());
                let url = format!(
                    "{}/_control/mailboxes/{}/password",
                    sh.ews,
                    Shared::email(*mailbox)
                );
                sh.http
                    .put(&url)
                    .json(&json!({ "password": password }))
                    .send()
                    .await?
                    .error_for_status()
                    .with_context(|| format!("PUT {url}"))?;
                sh.passwords
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(*mailbox, password);
                let creds = sh.creds(*mailbox, &self.ews_base(), &self.creatio_base());
                sh.call_any(0, "/api/listeners/update", Some(&json!([creds])))
                    .await?;
            }
            Action::Recreate { mailbox } => {
                let creds = sh.creds(*mailbox, &self.ews_base(), &self.creatio_base());
                sh.call_any(0, "/api/listeners/recreate", Some(&json!([creds])))
                    .await?;
            }
        }
        Ok(())
    }

    fn up_count(&self) -> usize {
        self.slots.iter().filter(|s| s.process.is_some()).count()
    }
}

/// Sends mail at the scenario's rate until `stop`, to mailboxes chosen at random (closed ones
/// too: what they get must not reach Creatio).
async fn send_mail(
    sh: Shared,
    rate: f64,
    bytes: usize,
    seed: u64,
    until: Instant,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let body = "x".repeat(bytes);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            return Ok(());
        }
        let m = rng.usize(0..sh.mailboxes);
        let secs = sh.secs();
        let unix_us = unix_now_us();
        let answer = post_json(
            &sh.http,
            &format!("{}/_control/mailboxes/{}/messages", sh.ews, Shared::email(m)),
            &json!({ "from": "sender@harness.test", "subject": format!("harness {n}"), "body": body }),
        )
        .await?;
        n += 1;
        let key_field = if sh.operation == "NewEmail" {
            "item_id"
        } else {
            "message_id"
        };
        let key = answer[key_field]
            .as_str()
            .with_context(|| format!("no {key_field} in mock-ews's answer {answer}"))?
            .to_owned();
        let closed_at = sh
            .closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&m)
            .copied();
        sh.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Sent {
                key,
                mailbox: m,
                secs,
                unix_us,
                after_close: closed_at.is_some_and(|c| secs >= c + CLOSE_GRACE_SECS),
                optional: closed_at.is_some(),
            });
    }
}

/// Samples the listener's account of its mailboxes until `stop`.
async fn watch(sh: Shared, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let s = sh.sample().await;
        sh.samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// Creatio's failover loop: asks `subscriptionsstate` for the open mailboxes and creates
/// again (Recreate) those that are not `exists`.
async fn creatio_loop(
    sh: Shared,
    every: Duration,
    ews_base: String,
    creatio_base: String,
    recreated: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        turn += 1;
        let open: Vec<usize> = {
            let closed = sh.closed.lock().unwrap_or_else(|p| p.into_inner());
            (0..sh.mailboxes)
                .filter(|m| !closed.contains_key(m))
                .collect()
        };
        let ids: Vec<String> = open.iter().map(|m| format!("mbx-{m}")).collect();
        let Ok(states) = sh
            .call_any(turn, "/api/listeners/subscriptionsstate", Some(&json!(ids)))
            .await
        else {
            continue;
        };
        let missing: Vec<Value> = open
            .iter()
            .filter(|m| states[format!("mbx-{m}")]["State"] != "exists")
            .map(|&m| sh.creds(m, &ews_base, &creatio_base))
            .collect();
        if !missing.is_empty()
            && sh
                .call_any(turn, "/api/listeners/recreate", Some(&json!(missing)))
                .await
                .is_ok()
        {
            recreated.fetch_add(missing.len(), Ordering::Relaxed);
        }
    }
}

/// Every mail Creatio recorded for the scenario's operation.
async fn arrivals(sh: &Shared) -> anyhow::Result<Vec<Arrival>> {
    let calls = get_json(
        &sh.http,
        &format!("{}/_control/calls?operation={}", sh.creatio, sh.operation),
    )
    .await?;
    let mut out = Vec::new();
    for call in calls.as_array().into_iter().flatten() {
        let unix_us = call["received_unix_us"].as_u64().unwrap_or(0);
        let body = &call["body"];
        let keys: Vec<&str> = if sh.operation == "NewEmail" {
            body["newEvent"]["uniqueIds"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect()
        } else {
            body["Emails"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["MessageId"].as_str())
                .collect()
        };
        out.extend(keys.into_iter().map(|k| Arrival {
            key: k.to_owned(),
            unix_us,
        }));
    }
    Ok(out)
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
    let backend = world
        .redis
        .as_ref()
        .map_or("in-memory store (no Redis)".to_owned(), |r| {
            r.backend.clone()
        });
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
        scenario.mail.rate,
        scenario.mail.bytes,
        scenario.mail.seed,
        mail_until,
    ));
    let watcher = tokio::spawn(watch(sh.clone(), stop.clone()));
    let looper = scenario.creatio_loop.as_ref().map(|l| {
        tokio::spawn(creatio_loop(
            sh.clone(),
            Duration::from_secs_f64(l.every_secs),
            world.ews_base(),
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
    // The timeline, while the mail flows (a step later than the mail is still taken).
    loop {
        let now = Instant::now();
        if now >= next_progress {
            progress(&world, "mail").await;
            next_progress = now + options.progress_every;
        }
        match steps.peek() {
            Some(step) if sh.started + Duration::from_secs_f64(step.secs) <= now => {
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
            Some((
                slot.id.clone(),
                crate::report::ReplicaUsage {
                    rss_mib: now.rss_kib as f64 / 1024.0,
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
        usage,
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
