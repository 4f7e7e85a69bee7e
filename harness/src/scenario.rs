//! A scenario file: the parts to run, the mail to send, what happens when, and what must hold.
//! `scenarios/README.md` documents the format; [`Scenario::parse`] refuses unknown keys, so a
//! misspelt setting is an error, not a default.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::proxy::Mode;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The file's name without `.toml`.
    #[serde(skip)]
    pub name: String,
    pub description: String,
    /// How long mail is sent, in seconds, after every mailbox first streams.
    pub duration_secs: f64,
    /// How long, after the last mail, every mail may take to arrive.
    #[serde(default = "default_drain")]
    pub drain_secs: f64,
    /// Left out of the default suite: long runs, or runs that must fail.
    #[serde(default)]
    pub manual: bool,
    #[serde(default)]
    pub replicas: Replicas,
    #[serde(default)]
    pub mailboxes: Mailboxes,
    #[serde(default)]
    pub mail: Mail,
    /// Creatio's own loop: every so often it asks `subscriptionsstate` for its mailboxes and
    /// creates again (Recreate) those that are not `exists`.
    #[serde(default)]
    pub creatio_loop: Option<CreatioLoop>,
    /// Old mail in one mailbox before it is created, for Creatio to load (`synchronize`).
    #[serde(default)]
    pub history: Option<History>,
    #[serde(default, rename = "at")]
    pub timeline: Vec<Step>,
    #[serde(default)]
    pub expect: Expect,
}

fn default_drain() -> f64 {
    30.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replicas {
    pub count: usize,
    /// The lease time given to every replica, in milliseconds.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// On Redis (the default with more than one replica), or on the in-memory store.
    #[serde(default)]
    pub store: Option<StoreKind>,
    /// Extra flags for every replica.
    #[serde(default)]
    pub args: Vec<String>,
}

fn default_lease_ms() -> u64 {
    1500
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas {
            count: 1,
            lease_ms: default_lease_ms(),
            store: None,
            args: Vec::new(),
        }
    }
}

impl Replicas {
    pub fn store(&self) -> StoreKind {
        self.store.unwrap_or(if self.count > 1 {
            StoreKind::Redis
        } else {
            StoreKind::Memory
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    Memory,
    Redis,
    /// A Redis master with one replica and three sentinels, as processes; the replicas of the
    /// listener follow the master Sentinel names.
    Sentinel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mailboxes {
    pub count: usize,
    /// Which replica each Create goes to.
    #[serde(default)]
    pub create_via: CreateVia,
    /// The callback the mailboxes post to.
    #[serde(default)]
    pub operation: Operation,
    /// Created without passwords and served through one service account with the
    /// ApplicationImpersonation role, on shared streams; mock-ews spreads them over two mailbox
    /// servers and allows an account 10 streams.
    #[serde(default)]
    pub service_account: bool,
    /// The kind of server the mailboxes live on: Exchange (mock-ews) or IMAP (a Dovecot).
    #[serde(default)]
    pub server: Server,
    /// With `server = "graph"`: the replicas take Graph's change notifications, through an
    /// ingress (a proxy to a live replica) whose URL they are given.
    #[serde(default)]
    pub graph_notifications: bool,
    /// Exchange servers: mock-ews processes, mailbox `m` on the `m % n`th, each a server of its
    /// own to the listener (its own Subscribe pace, its own open files).
    #[serde(default = "one")]
    pub ews_servers: usize,
    /// The replicas reach mock-ews directly instead of through the harness's links, so that
    /// tens of thousands of streams do not pass through (and hold files in) the harness
    /// process; Exchange cannot be cut then.
    #[serde(default)]
    pub ews_direct: bool,
}

fn one() -> usize {
    1
}

impl Default for Mailboxes {
    fn default() -> Self {
        Mailboxes {
            count: 3,
            create_via: CreateVia::default(),
            operation: Operation::default(),
            service_account: false,
            server: Server::default(),
            graph_notifications: false,
            ews_servers: 1,
            ews_direct: false,
        }
    }
}

/// The kind of server a run's mailboxes live on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Server {
    /// mock-ews, behind the fault proxy.
    #[default]
    Exchange,
    /// Debian's Dovecot, reached directly; mail put into its Maildirs.
    Imap,
    /// Both side by side: the even-numbered mailboxes on Exchange, the odd ones on IMAP.
    Mixed,
    /// Microsoft 365 mailboxes on mock-graph behind the fault proxy, sent as Creatio sends
    /// them (Exchange on outlook.office365.com) and served through the listener's app
    /// registration.
    Graph,
}

impl Server {
    /// Whether mailbox `m` lives on the IMAP server.
    pub fn imap_holds(self, m: usize) -> bool {
        match self {
            Server::Exchange | Server::Graph => false,
            Server::Imap => true,
            Server::Mixed => m % 2 == 1,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CreateVia {
    #[default]
    RoundRobin,
    First,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    #[default]
    ProcessFullEmail,
    NewEmail,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::ProcessFullEmail => "ProcessFullEmail",
            Operation::NewEmail => "NewEmail",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mail {
    /// Mails a second, spread over the mailboxes at random.
    pub rate: f64,
    /// Size of each mail's body.
    #[serde(default = "default_bytes")]
    pub bytes: usize,
    /// The seed of the choice of mailboxes, so a run can be repeated.
    #[serde(default)]
    pub seed: u64,
    /// How each mail is sent.
    #[serde(default)]
    pub via: MailVia,
}

/// How a run's mail reaches the mailboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MailVia {
    /// Put into the mailbox by mock-ews, as mail from outside arrives.
    #[default]
    Inject,
    /// Sent by one scenario mailbox to another through the listener's send call, as a Creatio
    /// user sends mail; a send that fails is tried again on another replica under the same
    /// Message-ID, as a user's second click.
    Send,
}

/// Old mail put into a mailbox before it is created: not new mail (it is not posted at the
/// Create), but what a `synchronize` step asks the listener to load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    pub mailbox: usize,
    pub mails: usize,
}

fn default_bytes() -> usize {
    512
}

impl Default for Mail {
    fn default() -> Self {
        Mail {
            rate: 5.0,
            bytes: default_bytes(),
            seed: 0,
            via: MailVia::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatioLoop {
    pub every_secs: f64,
}

/// One entry of the timeline. (Unknown keys are refused by [`Action`], which gets every key
/// but `secs`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// Seconds after the mail starts.
    pub secs: f64,
    #[serde(flatten)]
    pub action: Action,
}

/// What happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// `kill -9` of a replica.
    Kill { replica: usize },
    /// SIGTERM to a replica; it hands over and exits.
    Term { replica: usize },
    /// Starts a stopped replica again, under the same id.
    Start { replica: usize },
    /// Starts one more replica.
    AddReplica,
    /// Redis killed and started again without its data, after `down_secs` (none by default).
    RedisRestart {
        #[serde(default)]
        down_secs: f64,
    },
    /// Redis frozen (answers nothing, connections stay) for a while.
    RedisPause { secs: f64 },
    /// `kill -9` of the Redis master: Sentinel promotes its replica (`store = "sentinel"`).
    RedisMasterKill,
    /// The IMAP server killed, and started again after `down_secs`; mail arriving meanwhile
    /// is put into the mailboxes' Maildirs, as a delivery agent does.
    ImapRestart {
        #[serde(default)]
        down_secs: f64,
    },
    /// The link from one replica (or every replica) to Redis, Exchange or Creatio.
    Link {
        to: Link,
        #[serde(default)]
        replica: Option<usize>,
        mode: LinkMode,
        /// With `mode = "latency"`.
        #[serde(default)]
        ms: Option<u64>,
    },
    /// A mock-ews fault, as its control API takes it (`kind`, `mailbox`, `times`, `for_ms`, …).
    EwsFault { fault: toml::Table },
    /// A mock-graph fault, as its control API takes it (`kind = "throttle"` with `count` and
    /// `retry_after_secs`, or `"unavailable"` with `count`).
    GraphFault { fault: toml::Table },
    /// Graph forgets every delta link it gave (`410 SyncStateNotFound` on the next use).
    GraphExpireDelta,
    /// Graph sends a lifecycle event (`missed`, `subscriptionRemoved`,
    /// `reauthorizationRequired`) to every subscription (`graph_notifications` runs).
    GraphLifecycle { event: String },
    /// Graph loses the notifications of the next `count` new messages.
    GraphDropNotifications { count: u32 },
    /// mock-creatio answers the next `count` calls with `status` (503 by default).
    CreatioFail {
        count: u32,
        #[serde(default)]
        status: Option<u16>,
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// mock-creatio loses `drop` mails it took, records `duplicate` twice, answers after
    /// `delay_ms`.
    CreatioMischief {
        #[serde(default)]
        drop: u32,
        #[serde(default)]
        duplicate: u32,
        #[serde(default)]
        delay_ms: u64,
    },
    /// Creatio closes a mailbox (sent to a live replica).
    Close { mailbox: usize },
    /// Creatio sends a mailbox's credentials again.
    Recreate { mailbox: usize },
    /// The mailbox's password changes in Exchange, and Creatio sends an Update with it.
    Update { mailbox: usize },
    /// Creatio asks for the mailbox's history since before its oldest old mail.
    Synchronize { mailbox: usize },
    /// `kill -9` of whichever replica holds the mailbox's lease.
    KillOwner { mailbox: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Link {
    Redis,
    Ews,
    Creatio,
    /// The IMAP server, as every replica reaches it.
    Imap,
    /// Microsoft Graph and its token authority, as every replica reaches them.
    Graph,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkMode {
    Pass,
    Latency,
    Blackhole,
    Pause,
    Reset,
}

impl Action {
    /// True for what may stop mailboxes streaming for a while: recovery is timed from it.
    pub fn disrupts(&self) -> bool {
        match self {
            Action::Kill { .. }
            | Action::KillOwner { .. }
            | Action::Term { .. }
            | Action::AddReplica
            | Action::Start { .. }
            | Action::RedisRestart { .. }
            | Action::RedisPause { .. }
            | Action::RedisMasterKill
            | Action::ImapRestart { .. }
            | Action::EwsFault { .. }
            | Action::GraphFault { .. }
            | Action::GraphExpireDelta
            | Action::GraphLifecycle { .. }
            // A link mended is a change too: the replica behind it comes back and the spread
            // follows.
            | Action::Link { .. } => true,
            _ => false,
        }
    }

    /// True for what may cut the answer to a post Creatio already took, or the write of that
    /// answer to the store: a replica killed (it never learns its post got through), the
    /// connections to Creatio reset or held and then reset, or a replica's link to Redis held
    /// or reset (its post got through, but the outcome cannot be recorded before the lease
    /// passes, so the next owner posts the mail again under the same idempotency key).
    pub fn cuts_answers(&self) -> bool {
        matches!(
            self,
            Action::Kill { .. }
                | Action::KillOwner { .. }
                // Replication is asynchronous: the master's last writes (an outcome recorded
                // after Creatio took the post) may not have reached the replica it promotes.
                | Action::RedisMasterKill
                | Action::Link {
                    to: Link::Creatio,
                    mode: LinkMode::Reset | LinkMode::Blackhole,
                    ..
                }
                | Action::Link {
                    to: Link::Redis,
                    mode: LinkMode::Pause | LinkMode::Reset | LinkMode::Blackhole,
                    ..
                }
        )
    }

    /// A short label for reports and the chart.
    pub fn label(&self) -> String {
        match self {
            Action::Kill { replica } => format!("kill -9 r{replica}"),
            Action::Term { replica } => format!("SIGTERM r{replica}"),
            Action::Start { replica } => format!("start r{replica}"),
            Action::AddReplica => "add a replica".into(),
            Action::RedisRestart { down_secs } if *down_secs > 0.0 => {
                format!("Redis down {down_secs} s, back empty")
            }
            Action::RedisRestart { .. } => "Redis restarted empty".into(),
            Action::RedisPause { secs } => format!("Redis paused {secs} s"),
            Action::RedisMasterKill => "kill -9 of the Redis master".into(),
            Action::ImapRestart { down_secs } => format!("IMAP server down {down_secs} s"),
            Action::Link {
                to, replica, mode, ..
            } => {
                let who = replica.map_or("all".to_owned(), |r| format!("r{r}"));
                format!("{to:?} link of {who}: {mode:?}").to_lowercase()
            }
            Action::EwsFault { fault } => format!(
                "EWS fault {}",
                fault.get("kind").and_then(|k| k.as_str()).unwrap_or("?")
            ),
            Action::GraphFault { fault } => format!(
                "Graph fault {}",
                fault.get("kind").and_then(|k| k.as_str()).unwrap_or("?")
            ),
            Action::GraphExpireDelta => "Graph forgets its delta links".into(),
            Action::GraphLifecycle { event } => format!("Graph lifecycle event {event}"),
            Action::GraphDropNotifications { count } => {
                format!("Graph loses {count} notifications")
            }
            Action::CreatioFail { count, .. } => format!("Creatio fails {count} calls"),
            Action::CreatioMischief {
                drop, duplicate, ..
            } => {
                format!("Creatio drops {drop}, doubles {duplicate}")
            }
            Action::Close { mailbox } => format!("Close mbx-{mailbox}"),
            Action::Recreate { mailbox } => format!("Recreate mbx-{mailbox}"),
            Action::Update { mailbox } => format!("new password for mbx-{mailbox}"),
            Action::Synchronize { mailbox } => format!("history of mbx-{mailbox} asked"),
            Action::KillOwner { mailbox } => format!("kill -9 of mbx-{mailbox}'s replica"),
        }
    }
}

impl LinkMode {
    pub fn proxy_mode(self, ms: Option<u64>) -> Mode {
        match self {
            LinkMode::Pass => Mode::Pass,
            LinkMode::Latency => Mode::Latency(ms.unwrap_or(100)),
            LinkMode::Blackhole => Mode::Blackhole,
            LinkMode::Pause => Mode::Pause,
            LinkMode::Reset => Mode::Reset,
        }
    }
}

/// What must hold besides the invariants every run checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The longest a disruption may keep any mailbox from streaming under a live owner.
    #[serde(default = "default_recovery")]
    pub recovery_secs: f64,
    /// Mailboxes allowed to end `Failed`.
    #[serde(default)]
    pub failed: usize,
    /// Check at the end that no live replica serves more than one mailbox above the mean.
    #[serde(default = "yes")]
    pub balanced: bool,
    /// Mail sent while a disruption left mailboxes unserved may be missing: what the
    /// in-memory store (which forgets on restart) can promise, and no more.
    #[serde(default)]
    pub unserved_loss: bool,
}

fn default_recovery() -> f64 {
    10.0
}

fn yes() -> bool {
    true
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            recovery_secs: default_recovery(),
            failed: 0,
            balanced: true,
            unserved_loss: false,
        }
    }
}

impl Scenario {
    pub fn parse(name: &str, text: &str) -> anyhow::Result<Scenario> {
        let mut s: Scenario = toml::from_str(text).with_context(|| format!("scenario {name}"))?;
        s.name = name.to_owned();
        s.check().with_context(|| format!("scenario {name}"))?;
        Ok(s)
    }

    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .context("a scenario file needs a name")?;
        Scenario::parse(name, &text)
    }

    /// Refuses what cannot run: numbers out of range, replicas and mailboxes that do not
    /// exist, faults that need a Redis there is not.
    fn check(&self) -> anyhow::Result<()> {
        let positive = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                bail!("{what} must be a positive number of seconds")
            }
        };
        positive("duration_secs", self.duration_secs)?;
        positive("drain_secs", self.drain_secs)?;
        if !(self.mail.rate.is_finite() && self.mail.rate > 0.0) {
            bail!("mail.rate must be positive");
        }
        if self.replicas.count == 0 {
            bail!("replicas.count must be at least 1");
        }
        if self.mailboxes.count == 0 {
            bail!("mailboxes.count must be at least 1");
        }
        if self.mailboxes.ews_servers == 0
            || (self.mailboxes.ews_servers > 1
                && (self.mailboxes.server != Server::Exchange || self.mailboxes.service_account))
        {
            bail!(
                "mailboxes.ews_servers must be 1, or more for Exchange mailboxes with their own logins"
            );
        }
        if self.mailboxes.graph_notifications && self.mailboxes.server != Server::Graph {
            bail!("mailboxes.graph_notifications needs mailboxes.server = \"graph\"");
        }
        if self.mailboxes.server != Server::Exchange {
            let server = self.mailboxes.server;
            let exchange_only = [
                (self.mailboxes.service_account, "mailboxes.service_account"),
                (
                    self.mail.via == MailVia::Send && server != Server::Graph,
                    "mail.via = \"send\"",
                ),
                (self.history.is_some(), "[history]"),
                (
                    self.mailboxes.operation != Operation::ProcessFullEmail,
                    "mailboxes.operation = \"NewEmail\"",
                ),
            ];
            if let Some((_, what)) = exchange_only.iter().find(|(on, _)| *on) {
                bail!(
                    "{what} is for Exchange mailboxes only, not mailboxes.server = \"{}\"",
                    format!("{server:?}").to_lowercase()
                );
            }
        }
        let store = self.replicas.store();
        let redis = store == StoreKind::Redis;
        if store == StoreKind::Memory && self.replicas.count > 1 {
            bail!("more than one replica needs replicas.store = \"redis\" (or \"sentinel\")");
        }
        if let Some(l) = &self.creatio_loop {
            positive("creatio_loop.every_secs", l.every_secs)?;
        }
        if self.mail.via == MailVia::Send {
            if self.mailboxes.operation != Operation::ProcessFullEmail {
                bail!("mail.via = \"send\" needs mailboxes.operation = \"ProcessFullEmail\"");
            }
            if self.mailboxes.count < 2 {
                bail!("mail.via = \"send\" needs two mailboxes or more");
            }
        }
        if let Some(h) = &self.history {
            if h.mailbox >= self.mailboxes.count {
                bail!("history.mailbox: there is no mailbox {}", h.mailbox);
            }
            if !(1..=100_000).contains(&h.mails) {
                bail!("history.mails must be between 1 and 100000");
            }
        }
        let mut replicas = self.replicas.count;
        let mut closed = std::collections::BTreeSet::new();
        for step in &self.timeline {
            if !(step.secs.is_finite() && step.secs >= 0.0) {
                bail!("at.secs must be zero or more");
            }
            let replica_ok = |r: usize| {
                if r < replicas {
                    Ok(())
                } else {
                    bail!("{}: there is no replica {r} then", step.action.label())
                }
            };
            match &step.action {
                Action::Kill { replica } | Action::Term { replica } | Action::Start { replica } => {
                    replica_ok(*replica)?
                }
                Action::AddReplica if store == StoreKind::Memory => {
                    bail!("add-replica needs Redis")
                }
                Action::RedisMasterKill if store != StoreKind::Sentinel => {
                    bail!(
                        "{} needs replicas.store = \"sentinel\"",
                        step.action.label()
                    )
                }
                Action::AddReplica => replicas += 1,
                Action::Link { replica, to, .. } => {
                    if let Some(r) = replica {
                        replica_ok(*r)?;
                    }
                    if *to == Link::Redis && !redis {
                        bail!("a Redis link needs replicas.store = \"redis\"");
                    }
                    if *to == Link::Imap
                        && matches!(self.mailboxes.server, Server::Exchange | Server::Graph)
                    {
                        bail!("an imap link needs mailboxes.server = \"imap\" or \"mixed\"");
                    }
                    if *to == Link::Graph && self.mailboxes.server != Server::Graph {
                        bail!("a graph link needs mailboxes.server = \"graph\"");
                    }
                    if matches!(to, Link::Imap | Link::Graph) && replica.is_some() {
                        bail!("an {to:?} link is every replica's: it takes no replica");
                    }
                    if *to == Link::Ews
                        && matches!(self.mailboxes.server, Server::Imap | Server::Graph)
                    {
                        bail!("an ews link is for Exchange mailboxes on mock-ews");
                    }
                    if *to == Link::Ews && self.mailboxes.ews_direct {
                        bail!(
                            "an ews link needs the replicas to reach mock-ews through it (no mailboxes.ews_direct)"
                        );
                    }
                }
                Action::RedisRestart { .. } | Action::RedisPause { .. } if !redis => {
                    bail!("{} needs replicas.store = \"redis\"", step.action.label())
                }
                Action::GraphLifecycle { .. } | Action::GraphDropNotifications { .. }
                    if !self.mailboxes.graph_notifications =>
                {
                    bail!(
                        "{} needs mailboxes.graph_notifications = true",
                        step.action.label()
                    )
                }
                Action::GraphFault { .. } | Action::GraphExpireDelta
                    if self.mailboxes.server != Server::Graph =>
                {
                    bail!("{} needs mailboxes.server = \"graph\"", step.action.label())
                }
                Action::ImapRestart { .. }
                    if matches!(self.mailboxes.server, Server::Exchange | Server::Graph) =>
                {
                    bail!(
                        "{} needs mailboxes.server = \"imap\" or \"mixed\"",
                        step.action.label()
                    )
                }
                Action::Update { .. } | Action::EwsFault { .. }
                    if matches!(self.mailboxes.server, Server::Imap | Server::Graph) =>
                {
                    bail!(
                        "{} is for Exchange mailboxes on mock-ews, not mailboxes.server = \"{}\"",
                        step.action.label(),
                        format!("{:?}", self.mailboxes.server).to_lowercase()
                    )
                }
                Action::Synchronize { mailbox }
                    if self.history.as_ref().is_none_or(|h| h.mailbox != *mailbox) =>
                {
                    bail!(
                        "{}: it needs [history] for that mailbox",
                        step.action.label()
                    )
                }
                Action::Close { mailbox }
                | Action::Recreate { mailbox }
                | Action::Update { mailbox }
                | Action::KillOwner { mailbox }
                    if *mailbox >= self.mailboxes.count =>
                {
                    bail!("there is no mailbox {mailbox}")
                }
                Action::Close { mailbox } if !closed.insert(*mailbox) => {
                    bail!("mailbox {mailbox} is closed twice")
                }
                Action::Recreate { mailbox } | Action::Update { mailbox }
                    if closed.contains(mailbox) =>
                {
                    bail!("mailbox {mailbox} cannot be created again after its Close")
                }
                _ => {}
            }
        }
        if self.timeline.windows(2).any(|w| w[1].secs < w[0].secs) {
            bail!("the timeline must be in time order");
        }
        Ok(())
    }

    /// The most replicas that run at once.
    pub fn max_replicas(&self) -> usize {
        self.replicas.count
            + self
                .timeline
                .iter()
                .filter(|s| s.action == Action::AddReplica)
                .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        description = "one replica, a little mail"
        duration_secs = 5
    "#;

    #[test]
    fn what_cuts_a_posts_answer_or_its_record() {
        let link = |to, mode| Action::Link {
            to,
            replica: Some(0),
            mode,
            ms: None,
        };
        for cut in [
            Action::Kill { replica: 0 },
            Action::KillOwner { mailbox: 0 },
            link(Link::Creatio, LinkMode::Reset),
            link(Link::Creatio, LinkMode::Blackhole),
            link(Link::Redis, LinkMode::Pause),
            link(Link::Redis, LinkMode::Blackhole),
            link(Link::Redis, LinkMode::Reset),
        ] {
            assert!(cut.cuts_answers(), "{}", cut.label());
        }
        for kept in [
            link(Link::Redis, LinkMode::Pass),
            link(Link::Redis, LinkMode::Latency),
            link(Link::Creatio, LinkMode::Pause),
            link(Link::Ews, LinkMode::Reset),
            Action::Term { replica: 0 },
        ] {
            assert!(!kept.cuts_answers(), "{}", kept.label());
        }
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let s = Scenario::parse("minimal", MINIMAL).unwrap();
        assert_eq!(s.replicas.count, 1);
        assert_eq!(s.replicas.store(), StoreKind::Memory);
        assert_eq!(s.mailboxes.count, 3);
        assert_eq!(s.expect.recovery_secs, 10.0);
        assert!(s.timeline.is_empty());
    }

    #[test]
    fn a_timeline_reads_as_written() {
        let s = Scenario::parse(
            "t",
            r#"
            description = "x"
            duration_secs = 10
            [replicas]
            count = 2
            [[at]]
            secs = 2
            do = "kill"
            replica = 1
            [[at]]
            secs = 3
            do = "link"
            to = "redis"
            replica = 0
            mode = "blackhole"
            [[at]]
            secs = 4
            do = "ews-fault"
            fault = { kind = "server_busy", back_off_ms = 500, times = 3 }
            "#,
        )
        .unwrap();
        assert_eq!(s.replicas.store(), StoreKind::Redis);
        assert_eq!(s.timeline[0].action, Action::Kill { replica: 1 });
        assert!(matches!(
            s.timeline[1].action,
            Action::Link {
                to: Link::Redis,
                replica: Some(0),
                mode: LinkMode::Blackhole,
                ..
            }
        ));
        let Action::EwsFault { fault } = &s.timeline[2].action else {
            panic!("{:?}", s.timeline[2]);
        };
        assert_eq!(fault["back_off_ms"].as_integer(), Some(500));
    }

    #[test]
    fn mistakes_are_refused_by_name() {
        let refused = |extra: &str, says: &str| {
            let text = format!("{MINIMAL}\n{extra}");
            let e = format!("{:#}", Scenario::parse("bad", &text).unwrap_err());
            assert!(e.contains(says), "{e:?} should say {says:?}");
        };
        refused("durration = 3", "unknown field");
        refused(
            "[[at]]\nsecs = 1\ndo = \"kill\"\nreplica = 4",
            "no replica 4",
        );
        refused(
            "[[at]]\nsecs = 1\ndo = \"redis-restart\"",
            "needs replicas.store",
        );
        refused("[[at]]\nsecs = 1\ndo = \"explode\"", "unknown variant");
        refused(
            "[[at]]\nsecs = 1\ndo = \"kill\"\nreplica = 0\nbogus = 1",
            "unknown field",
        );
        refused(
            "[replicas]\ncount = 2\nstore = \"memory\"",
            "more than one replica",
        );
        refused(
            "[[at]]\nsecs = 2\ndo = \"close\"\nmailbox = 0\n[[at]]\nsecs = 1\ndo = \"close\"\nmailbox = 1",
            "time order",
        );
        refused(
            "[[at]]\nsecs = 1\ndo = \"imap-restart\"",
            "needs mailboxes.server",
        );
        refused(
            "[replicas]\ncount = 2\n[[at]]\nsecs = 1\ndo = \"redis-master-kill\"",
            "needs replicas.store = \"sentinel\"",
        );
        let sentinel = Scenario::parse(
            "sentinel",
            &format!(
                "{MINIMAL}\n[replicas]\ncount = 2\nstore = \"sentinel\"\n\
                 [[at]]\nsecs = 1\ndo = \"redis-master-kill\"\n[[at]]\nsecs = 2\ndo = \"add-replica\""
            ),
        )
        .unwrap();
        assert!(sentinel.timeline[0].action.cuts_answers());
        let imap = |extra: &str| format!("[mailboxes]\ncount = 3\nserver = \"imap\"\n{extra}");
        refused(&imap("service_account = true"), "is for Exchange mailboxes");
        refused(
            &imap("[[at]]\nsecs = 1\ndo = \"ews-fault\"\nfault = { kind = \"silence\" }"),
            "is for Exchange mailboxes",
        );
        // Side by side, each kind's faults apply to its own mailboxes.
        let mixed = |extra: &str| format!("[mailboxes]\ncount = 4\nserver = \"mixed\"\n{extra}");
        refused(
            &mixed("service_account = true"),
            "is for Exchange mailboxes only",
        );
        refused(
            "[[at]]\nsecs = 1\ndo = \"link\"\nto = \"imap\"\nmode = \"reset\"",
            "an imap link needs",
        );
        refused(
            &mixed("[[at]]\nsecs = 1\ndo = \"link\"\nto = \"imap\"\nmode = \"reset\"\nreplica = 0"),
            "takes no replica",
        );
        let both = mixed(
            "[[at]]\nsecs = 1\ndo = \"ews-fault\"\nfault = { kind = \"silence\" }\n\
             [[at]]\nsecs = 2\ndo = \"imap-restart\"",
        );
        let s = Scenario::parse("mixed", &format!("{MINIMAL}\n{both}")).unwrap();
        let on_imap: Vec<bool> = (0..4).map(|m| s.mailboxes.server.imap_holds(m)).collect();
        assert_eq!(on_imap, [false, true, false, true]);
        // Graph's faults need Graph's mailboxes, and Exchange's are not Graph's.
        let graph = |extra: &str| format!("[mailboxes]\ncount = 3\nserver = \"graph\"\n{extra}");
        refused(
            "[[at]]\nsecs = 1\ndo = \"graph-expire-delta\"",
            "needs mailboxes.server = \"graph\"",
        );
        refused(
            &graph("[[at]]\nsecs = 1\ndo = \"ews-fault\"\nfault = { kind = \"silence\" }"),
            "is for Exchange mailboxes on mock-ews",
        );
        refused(
            &graph("service_account = true"),
            "is for Exchange mailboxes only",
        );
        let faults = graph(
            "[[at]]\nsecs = 1\ndo = \"graph-fault\"\nfault = { kind = \"throttle\", count = 3, retry_after_secs = 2 }\n\
             [[at]]\nsecs = 2\ndo = \"link\"\nto = \"graph\"\nmode = \"reset\"",
        );
        Scenario::parse("graph", &format!("{MINIMAL}\n{faults}")).unwrap();
    }

    #[test]
    fn every_scenario_in_the_suite_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap();
                n += 1;
            }
        }
        assert!(n >= 10, "{n} scenarios in {}", dir.display());
    }
}
