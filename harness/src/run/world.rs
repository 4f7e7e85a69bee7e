//! The run's processes and their lifecycle: mock-ews, mock-creatio, Redis, the replicas
//! and the fault proxies between them; the mailboxes created; and each step of the timeline
//! acted out on them.

use super::*;

/// One replica's place: its id, its process while it runs, its own links to Redis and (as
/// its HTTP proxy) to Exchange and Creatio.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) id: String,
    pub(super) process: Option<Process>,
    /// When the process was started.
    pub(super) since: Instant,
    pub(super) redis_link: Option<Proxy>,
    pub(super) web_link: ForwardProxy,
}

/// Everything a run started; dropped, it all stops.
pub(super) struct World {
    pub(super) scenario: Scenario,
    pub(super) bins: Binaries,
    pub(super) dir: PathBuf,
    pub(super) shared: Shared,
    /// mock-ews, one process per Exchange server, and the way every replica reaches each.
    pub(super) _ews: Vec<Process>,
    pub(super) _creatio: Process,
    pub(super) ews_links: Vec<Proxy>,
    pub(super) creatio_link: Proxy,
    /// The way every replica reaches the IMAP server, in runs with IMAP mailboxes.
    pub(super) imap_link: Option<Proxy>,
    /// mock-graph and the way every replica reaches it, in runs with Microsoft 365 mailboxes.
    pub(super) _graph: Option<Process>,
    pub(super) graph_link: Option<Proxy>,
    /// The `--graph-apps` file every replica is given, in those runs.
    pub(super) graph_apps: Option<PathBuf>,
    /// Where Graph posts its notifications, in `graph_notifications` runs: a proxy to a live
    /// replica, as an ingress is.
    pub(super) ingress: Option<Proxy>,
    pub(super) redis: Option<Redis>,
    /// Redis behind Sentinel, in `store = "sentinel"` runs.
    pub(super) sentinel: Option<crate::sentinel::SentinelSet>,
    /// The service accounts file every replica is given, in `service_account` runs.
    pub(super) accounts: Option<PathBuf>,
    pub(super) slots: Vec<Slot>,
    /// Problems found while acting (a replica that would not stop on SIGTERM).
    pub(super) problems: Vec<Violation>,
}

impl World {
    pub(super) async fn start(
        scenario: &Scenario,
        bins: &Binaries,
        options: &Options,
    ) -> anyhow::Result<World> {
        let dir = options.out.join(&scenario.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ews, creatio) = mocks::start(bins, &dir, &[], &[]).await?;
        let mut ews = vec![ews];
        for n in 1..scenario.mailboxes.ews_servers.max(1) {
            let more = dir.join(format!("ews-{n}"));
            std::fs::create_dir_all(&more)?;
            ews.push(mocks::start_ews(bins, &more, &[], &[]).await?);
        }
        let addr_of = |base: &str| -> anyhow::Result<std::net::SocketAddr> {
            base.trim_start_matches("http://")
                .parse()
                .with_context(|| format!("{base} is not an address"))
        };
        let mut ews_links = Vec::with_capacity(ews.len());
        for server in &ews {
            ews_links.push(Proxy::start(addr_of(&server.base)?).await?);
        }
        let creatio_link = Proxy::start(addr_of(&creatio.base)?).await?;
        let redis = match scenario.replicas.store() {
            StoreKind::Redis => Some(Redis::start(&options.redis, &dir).await?),
            StoreKind::Memory | StoreKind::Sentinel => None,
        };
        let sentinel = match scenario.replicas.store() {
            StoreKind::Sentinel => Some(crate::sentinel::SentinelSet::start(&dir).await?),
            StoreKind::Memory | StoreKind::Redis => None,
        };
        let imap = match scenario.mailboxes.server {
            crate::scenario::Server::Exchange | crate::scenario::Server::Graph => None,
            crate::scenario::Server::Imap | crate::scenario::Server::Mixed => {
                let users: Vec<(String, &str)> = (0..scenario.mailboxes.count)
                    .map(|m| (Shared::email(m), "secret"))
                    .collect();
                let logins: Vec<(&str, &str)> =
                    users.iter().map(|(u, p)| (u.as_str(), *p)).collect();
                Some(Arc::new(imap_world::Dovecot::start(&logins).await?))
            }
        };
        let imap_link = match &imap {
            Some(dovecot) => Some(Proxy::start(([127, 0, 0, 1], dovecot.port).into()).await?),
            None => None,
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let (graph, graph_link, graph_apps) = match scenario.mailboxes.server {
            crate::scenario::Server::Graph => {
                let users: Vec<String> = (0..scenario.mailboxes.count).map(Shared::email).collect();
                let graph = mocks::start_graph(bins, &dir, &http, &users).await?;
                let link = Proxy::start(addr_of(&graph.base)?).await?;
                let apps =
                    mocks::graph_apps(&dir, &format!("http://{}", link.addr()), "harness.test")?;
                (Some(graph), Some(link), Some(apps))
            }
            _ => (None, None, None),
        };
        let shared = Shared {
            http,
            roster: Roster::default(),
            closed: Arc::default(),
            sent: Arc::default(),
            samples: Arc::default(),
            mailboxes: scenario.mailboxes.count,
            passwords: Arc::default(),
            started: Instant::now(),
            ews: ews.iter().map(|e| e.base.clone()).collect(),
            ews_links: if scenario.mailboxes.ews_direct {
                ews.iter().map(|e| e.base.clone()).collect()
            } else {
                ews_links
                    .iter()
                    .map(|l| format!("http://{}", l.addr()))
                    .collect()
            },
            creatio: creatio.base.clone(),
            operation: scenario.mailboxes.operation.name(),
            service_account: scenario.mailboxes.service_account,
            history: Arc::default(),
            history_asked_us: Arc::default(),
            server: scenario.mailboxes.server,
            imap,
            imap_port: imap_link.as_ref().map_or(0, |link| link.addr().port()),
            graph: graph.as_ref().map(|g| g.base.clone()),
        };
        let accounts = if scenario.mailboxes.service_account {
            let url = format!("http://{}/EWS/Exchange.asmx", ews_links[0].addr());
            let file = mocks::service_account(&shared.http, &shared.ews[0], &url, &dir).await?;
            let settings = json!({
                "impersonators": [mocks::SERVICE_ACCOUNT.0],
                "backends": 2,
                "max_streams_per_user": 10,
            });
            put_json(
                &shared.http,
                &format!("{}/_control/settings", shared.ews[0]),
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
            ews_links,
            creatio_link,
            imap_link,
            _graph: graph,
            graph_link,
            graph_apps,
            ingress: if scenario.mailboxes.graph_notifications {
                // Nothing answers until the first replica starts.
                Some(Proxy::start(([127, 0, 0, 1], 9).into()).await?)
            } else {
                None
            },
            redis,
            sentinel,
            accounts,
            slots: Vec::new(),
            problems: Vec::new(),
        };
        for _ in 0..scenario.replicas.count {
            world.add_replica().await?;
        }
        Ok(world)
    }

    pub(super) async fn add_replica(&mut self) -> anyhow::Result<()> {
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

    pub(super) async fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
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
        // With `ews_direct`, nothing on loopback goes through it: mock-ews is reached directly,
        // Creatio still through its link.
        let no_proxy = if self.scenario.mailboxes.ews_direct {
            "127.0.0.1"
        } else {
            ""
        };
        let mut env = vec![
            ("HTTPS_PROXY", slot.web_link.url()),
            ("HTTP_PROXY", slot.web_link.url()),
            ("NO_PROXY", no_proxy.to_owned()),
        ];
        if let Some(link) = &slot.redis_link {
            args.push(format!("--redis-url=redis://{}/0", link.addr()));
            env.push(("EXCHANGE_LISTENER_SECRET_KEY", SECRET.to_owned()));
        }
        if let Some(sentinel) = &self.sentinel {
            args.push(format!("--redis-url={}", sentinel.url));
            env.push(("EXCHANGE_LISTENER_SECRET_KEY", SECRET.to_owned()));
        }
        if let Some(file) = &self.accounts {
            args.push("--ews-service-accounts".to_owned());
            args.push(file.to_string_lossy().into_owned());
            // A service account serves only a Creatio named: mock-creatio's.
            args.push("--creatio-hosts=127.0.0.1".to_owned());
        }
        if let Some(ingress) = &self.ingress {
            args.push(format!(
                "--graph-notification-url=http://{}/graph/notifications",
                ingress.addr()
            ));
        }
        if let Some(file) = &self.graph_apps {
            args.push("--graph-apps".to_owned());
            args.push(file.to_string_lossy().into_owned());
            // An app registration serves only a Creatio named: mock-creatio's.
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

    pub(super) fn publish_roster(&self) {
        let up: Vec<(String, String)> = self
            .slots
            .iter()
            .filter_map(|s| s.process.as_ref().map(|p| (s.id.clone(), p.base.clone())))
            .collect();
        // The ingress sends to the first live replica, as a load balancer drops a dead one.
        if let Some(ingress) = &self.ingress
            && let Some(addr) = up
                .first()
                .and_then(|(_, base)| base.trim_start_matches("http://").parse().ok())
        {
            ingress.set_upstream(addr);
        }
        self.shared.roster.set(up);
    }

    pub(super) fn creatio_base(&self) -> String {
        format!("http://{}", self.creatio_link.addr())
    }

    /// Creates the mailboxes in mock-ews and through the listener's API; waits until all stream.
    pub(super) async fn create_mailboxes(&self) -> anyhow::Result<()> {
        use futures_util::{StreamExt as _, TryStreamExt as _};
        let sh = &self.shared;
        // One at a time, in order, as the suite's timings expect; many at once for a sizing
        // run's thousands.
        let at_once = if sh.mailboxes > 1000 { 32 } else { 1 };
        futures_util::stream::iter(0..sh.mailboxes)
            .map(|m| async move {
                if sh.graph.is_none() {
                    post_json(
                        &sh.http,
                        &format!("{}/_control/mailboxes", sh.ews_of(m)),
                        &json!({ "email": Shared::email(m), "password": "secret" }),
                    )
                    .await?;
                }
                if let Some(h) = self.scenario.history.as_ref().filter(|h| h.mailbox == m) {
                    self.put_history(m, h.mails).await?;
                }
                let creds = sh.creds(m, &self.creatio_base());
                let via = match self.scenario.mailboxes.create_via {
                    CreateVia::RoundRobin => m,
                    CreateVia::First => 0,
                };
                sh.call_any(via, "/api/listeners/create", Some(&json!([creds])))
                    .await?;
                anyhow::Ok(())
            })
            .buffered(at_once)
            .try_collect::<()>()
            .await?;
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

    /// Puts `mails` old mails into mailbox `m` (received a second apart, the newest an hour
    /// ago), before it is created.
    async fn put_history(&self, m: usize, mails: usize) -> anyhow::Result<()> {
        let sh = &self.shared;
        let oldest = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
            - 3600
            - mails as i64;
        let url = format!(
            "{}/_control/mailboxes/{}/messages",
            sh.ews_of(m),
            Shared::email(m)
        );
        let mut ids = Vec::with_capacity(mails);
        for n in 0..mails {
            let answer = post_json(
                &sh.http,
                &url,
                &json!({
                    "from": "archive@harness.test",
                    "subject": format!("history {n}"),
                    "body": "an old mail",
                    "received_unix": oldest + n as i64,
                }),
            )
            .await?;
            ids.push(
                answer["message_id"]
                    .as_str()
                    .with_context(|| format!("no message_id in mock-ews's answer {answer}"))?
                    .to_owned(),
            );
        }
        *sh.history.lock().unwrap_or_else(|p| p.into_inner()) = (ids, oldest, m);
        eprintln!(
            "[{}] {mails} old mails put into mbx-{m}",
            self.scenario.name
        );
        Ok(())
    }

    pub(super) async fn act(&mut self, action: &Action) -> anyhow::Result<()> {
        let sh = self.shared.clone();
        match action {
            Action::Kill { replica } => {
                if let Some(p) = self.slots[*replica].process.take() {
                    self.publish_roster();
                    p.kill().await;
                }
            }
            Action::KillOwner { mailbox } => {
                let view = sh
                    .call_any(0, &format!("/api/listeners/mbx-{mailbox}"), None)
                    .await?;
                let owner = view["Owner"]
                    .as_str()
                    .with_context(|| format!("mbx-{mailbox} has no owner: {view}"))?;
                let slot = self
                    .slots
                    .iter_mut()
                    .find(|s| s.id == owner)
                    .with_context(|| format!("no replica {owner}"))?;
                if let Some(p) = slot.process.take() {
                    eprintln!("[{}] mbx-{mailbox} runs on {owner}", self.scenario.name);
                    self.publish_roster();
                    p.kill().await;
                }
            }
            Action::Synchronize { mailbox } => {
                let (ids, oldest, _) = sh.history.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let ticks = (oldest - 1) * 10_000_000 + 621_355_968_000_000_000;
                let body = json!({
                    "Credentials": sh.creds(*mailbox, &self.creatio_base()),
                    "Filters": ticks.to_string(),
                });
                let (secs, unix_us) = (sh.secs(), unix_now_us());
                *sh.history_asked_us
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(unix_us);
                sh.call_any_quoted(0, "/api/email/synchronize", &body)
                    .await?;
                sh.sent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(ids.into_iter().map(|key| Sent {
                        key: Shared::sent_key(*mailbox, &key),
                        mailbox: *mailbox,
                        secs,
                        unix_us,
                        after_close: false,
                        optional: false,
                    }));
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
            Action::RedisMasterKill => {
                self.sentinel
                    .as_mut()
                    .context("no Redis Sentinel in this run")?
                    .kill_master()
                    .await?;
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
                    (Link::Ews, None) => {
                        for link in &self.ews_links {
                            link.set_mode(mode);
                        }
                    }
                    (Link::Creatio, None) => self.creatio_link.set_mode(mode),
                    (Link::Ews, Some(r)) => {
                        for link in &self.ews_links {
                            self.slots[*r].web_link.set_mode(link.addr(), mode);
                        }
                    }
                    (Link::Creatio, Some(r)) => {
                        self.slots[*r]
                            .web_link
                            .set_mode(self.creatio_link.addr(), mode);
                    }
                    (Link::Imap, _) => {
                        if let Some(link) = &self.imap_link {
                            link.set_mode(mode);
                        }
                    }
                    (Link::Graph, _) => {
                        if let Some(link) = &self.graph_link {
                            link.set_mode(mode);
                        }
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
            Action::ImapRestart { down_secs } => {
                let dovecot = sh.imap.as_ref().context("no IMAP server in this run")?;
                dovecot.kill().await?;
                tokio::time::sleep(Duration::from_secs_f64(*down_secs)).await;
                dovecot.start_again().await?;
            }
            Action::EwsFault { fault } => {
                for ews in &sh.ews {
                    post_json(
                        &sh.http,
                        &format!("{ews}/_control/faults"),
                        &serde_json::to_value(fault)?,
                    )
                    .await?;
                }
            }
            Action::GraphFault { fault } => {
                let graph = sh.graph.as_ref().context("no Graph in this run")?;
                post_json(
                    &sh.http,
                    &format!("{graph}/_control/faults"),
                    &serde_json::to_value(fault)?,
                )
                .await?;
            }
            Action::GraphLifecycle { event } => {
                let graph = sh.graph.as_ref().context("no Graph in this run")?;
                post_json(
                    &sh.http,
                    &format!("{graph}/_control/lifecycle"),
                    &json!({ "event": event }),
                )
                .await?;
            }
            Action::GraphDropNotifications { count } => {
                let graph = sh.graph.as_ref().context("no Graph in this run")?;
                post_json(
                    &sh.http,
                    &format!("{graph}/_control/drop-notifications"),
                    &json!({ "count": count }),
                )
                .await?;
            }
            Action::GraphExpireDelta => {
                let graph = sh.graph.as_ref().context("no Graph in this run")?;
                let url = format!("{graph}/_control/expire-delta");
                sh.http
                    .post(&url)
                    .send()
                    .await?
                    .error_for_status()
                    .with_context(|| format!("POST {url}"))?;
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
                    sh.ews_of(*mailbox),
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
                let creds = sh.creds(*mailbox, &self.creatio_base());
                sh.call_any(0, "/api/listeners/update", Some(&json!([creds])))
                    .await?;
            }
            Action::Recreate { mailbox } => {
                let creds = sh.creds(*mailbox, &self.creatio_base());
                sh.call_any(0, "/api/listeners/recreate", Some(&json!([creds])))
                    .await?;
            }
        }
        Ok(())
    }

    pub(super) fn up_count(&self) -> usize {
        self.slots.iter().filter(|s| s.process.is_some()).count()
    }
}
