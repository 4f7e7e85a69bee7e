//! What every task of a run shares: the replicas running now, the scenario's mailboxes and
//! their credentials, and the listener's account of them, sampled; and, once the mail is
//! sent, what reached Creatio.

use super::*;

/// The replicas running now, for the tasks that call them.
#[derive(Debug, Clone, Default)]
pub(super) struct Roster(pub(super) Arc<Mutex<Vec<(String, String)>>>);

impl Roster {
    pub(super) fn set(&self, up: Vec<(String, String)>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = up;
    }

    /// (replica id, base URL) of each running replica.
    pub(super) fn up(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the run's tasks share.
#[derive(Debug, Clone)]
pub(super) struct Shared {
    pub(super) http: reqwest::Client,
    pub(super) roster: Roster,
    /// Mailbox index → seconds into the run it was closed.
    pub(super) closed: Arc<Mutex<BTreeMap<usize, f64>>>,
    pub(super) sent: Arc<Mutex<Vec<Sent>>>,
    pub(super) samples: Arc<Mutex<Vec<Sample>>>,
    pub(super) mailboxes: usize,
    /// Each mailbox's password, as Exchange has it now.
    pub(super) passwords: Arc<Mutex<BTreeMap<usize, String>>>,
    pub(super) started: Instant,
    /// Each mock-ews's own address (its control API); mailbox `m` lives on `ews[m % len]`.
    pub(super) ews: Vec<String>,
    /// Each mock-ews as the replicas reach it (through its link), as Creatio names it.
    pub(super) ews_links: Vec<String>,
    pub(super) creatio: String,
    pub(super) operation: &'static str,
    /// Mailboxes are created without a password, for the service account.
    pub(super) service_account: bool,
    /// The old mail put into the `[history]` mailbox: Message-IDs, oldest first, the oldest
    /// one's received time (Unix seconds), and the mailbox.
    pub(super) history: Arc<Mutex<(Vec<String>, i64, usize)>>,
    /// When the history was asked for (Unix µs): none of it may reach Creatio before.
    pub(super) history_asked_us: Arc<Mutex<Option<u64>>>,
    /// The IMAP server, in runs with IMAP mailboxes.
    pub(super) imap: Option<Arc<imap_world::Dovecot>>,
    /// Which mailboxes live on it.
    pub(super) server: crate::scenario::Server,
    /// The port the replicas reach it on: the fault proxy in front of it.
    pub(super) imap_port: u16,
    /// mock-graph's base URL (its control API), in runs with Microsoft 365 mailboxes.
    pub(super) graph: Option<String>,
}

impl Shared {
    pub(super) fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub(super) fn open(&self) -> usize {
        self.mailboxes - self.closed.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// What a mail is known by once it reaches Creatio: the mailbox it came through, and its
    /// Message-ID (or item id). One mail reaches Creatio through each scenario mailbox that
    /// holds it (the recipient's inbox, the sender's Sent Items).
    pub(super) fn sent_key(m: usize, key: &str) -> String {
        format!("mbx-{m}/{key}")
    }

    /// The IMAP server mailbox `m` lives on, if it is an IMAP one.
    pub(super) fn dovecot_of(&self, m: usize) -> Option<&imap_world::Dovecot> {
        self.imap.as_deref().filter(|_| self.server.imap_holds(m))
    }

    pub(super) fn email(m: usize) -> String {
        format!("user{m}@harness.test")
    }

    pub(super) fn password(&self, m: usize) -> String {
        self.passwords
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&m)
            .cloned()
            .unwrap_or_else(|| "secret".to_owned())
    }

    /// Mailbox `m`'s credentials as Creatio sends them: its own login, or none (the
    /// listener's service account serves it).
    /// The mock-ews mailbox `m` lives on.
    pub(super) fn ews_of(&self, m: usize) -> &str {
        &self.ews[m % self.ews.len()]
    }

    pub(super) fn creds(&self, m: usize, creatio_base: &str) -> Value {
        let ews_base = &self.ews_links[m % self.ews_links.len()];
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
        if self.graph.is_some() {
            // A Microsoft 365 mailbox as Creatio sends it: the listener's app serves it.
            creds["ServiceUrl"] = json!(mock_creatio::calling::EXCHANGE_ONLINE_URL);
            creds["Password"] = Value::Null;
            creds["AccessToken"] = json!("creatio-token-for-ews");
            creds["UseOAuth"] = json!(true);
        }
        if self.dovecot_of(m).is_some() {
            creds["ServerTypeId"] = json!(mock_creatio::calling::IMAP_SERVER_TYPE);
            creds["ServiceUrl"] = json!("127.0.0.1");
            creds["Port"] = json!(self.imap_port);
            creds["UseSsl"] = json!(false);
            creds["SecureOption"] = json!(0);
        }
        creds
    }

    /// Asks the running replicas in turn, from `first`, until one answers; a body is written
    /// as Creatio writes its `/api/listeners/*` and `/api/mailbox/*` calls (names unquoted).
    pub(super) async fn call_any(
        &self,
        first: usize,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        self.call_each(first, path, body, true).await
    }

    /// As [`Shared::call_any`], the body written as ordinary JSON, as Creatio writes its
    /// `/api/email/*` calls.
    pub(super) async fn call_any_quoted(
        &self,
        first: usize,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<Value> {
        self.call_each(first, path, Some(body), false).await
    }

    async fn call_each(
        &self,
        first: usize,
        path: &str,
        body: Option<&Value>,
        unquoted: bool,
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
                    Some(b) if unquoted => post_creatio(&self.http, &url, b).await,
                    Some(b) => post_json(&self.http, &url, b).await,
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
    pub(super) async fn sample(&self) -> Sample {
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
    pub(super) async fn workers_streaming(&self) -> Option<usize> {
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

    pub(super) fn delivered_now(stats: &Value, operation: &str) -> u64 {
        stats["calls"][operation].as_u64().unwrap_or(0)
    }
}

/// Samples the listener's account of its mailboxes until `stop`.
pub(super) async fn watch(sh: Shared, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let s = sh.sample().await;
        sh.samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// Every mail Creatio recorded for the scenario's operation.
pub(super) async fn arrivals(sh: &Shared) -> anyhow::Result<Vec<Arrival>> {
    let calls = get_json(
        &sh.http,
        &format!("{}/_control/calls?operation={}", sh.creatio, sh.operation),
    )
    .await?;
    let mut out = Vec::new();
    for call in calls.as_array().into_iter().flatten() {
        let unix_us = call["received_unix_us"].as_u64().unwrap_or(0);
        let body = &call["body"];
        let mailbox = if sh.operation == "NewEmail" {
            &body["newEvent"]["id"]
        } else {
            &body["SubscriptionInfo"]["MailboxId"]
        }
        .as_str()
        .unwrap_or("?");
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
            key: format!("{mailbox}/{k}"),
            unix_us,
        }));
    }
    Ok(out)
}

/// Mail Exchange sent twice: a Message-ID twice in a scenario mailbox's Sent Items (a send the
/// listener repeated).
pub(super) async fn sent_twice(sh: &Shared) -> anyhow::Result<Vec<Violation>> {
    let mut out = Vec::new();
    for m in 0..sh.mailboxes {
        // mock-ews lists a mailbox's Sent Items; mock-graph a user's messages in one folder.
        let (url, field) = match &sh.graph {
            Some(graph) => (
                format!(
                    "{graph}/_control/users/{}/messages?folder=Sent%20Items",
                    Shared::email(m)
                ),
                "internet_message_id",
            ),
            None => (
                format!(
                    "{}/_control/mailboxes/{}/sent-items",
                    sh.ews_of(m),
                    Shared::email(m)
                ),
                "message_id",
            ),
        };
        let items = get_json(&sh.http, &url).await?;
        let mut seen = std::collections::BTreeMap::<&str, usize>::new();
        for item in items.as_array().into_iter().flatten() {
            *seen.entry(item[field].as_str().unwrap_or("")).or_default() += 1;
        }
        out.extend(
            seen.into_iter()
                .filter(|(_, n)| *n > 1)
                .map(|(id, n)| Violation {
                    rule: "sent_twice",
                    detail: format!("{id} left mbx-{m} {n} times"),
                }),
        );
    }
    Ok(out)
}

/// Old mail that reached Creatio before its history was asked for: the Create posted what
/// was in the mailbox already.
pub(super) fn history_early(sh: &Shared, arrivals: &[Arrival]) -> Vec<Violation> {
    let (ids, mailbox) = {
        let history = sh.history.lock().unwrap_or_else(|p| p.into_inner());
        (history.0.clone(), history.2)
    };
    let ids: Vec<String> = ids.iter().map(|id| Shared::sent_key(mailbox, id)).collect();
    let asked = sh
        .history_asked_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or(u64::MAX);
    let ids: std::collections::HashSet<&String> = ids.iter().collect();
    let early = arrivals
        .iter()
        .filter(|a| ids.contains(&a.key) && a.unix_us < asked)
        .count();
    if early == 0 {
        return Vec::new();
    }
    vec![Violation {
        rule: "history_early",
        detail: format!("{early} old mails reached Creatio before their history was asked for"),
    }]
}
