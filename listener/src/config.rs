//! Configuration from flags and environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::backoff::{BackoffPolicy, InvalidBackoff};
use crate::reach::{HostList, Reach};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// exchange-listener: keeps EWS streaming subscriptions for Creatio mailboxes and posts new
/// mail to Creatio.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "EXCHANGE_LISTENER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Log filter (tracing directives, e.g. `info` or `exchange_listener=debug`).
    #[arg(long, env = "EXCHANGE_LISTENER_LOG", default_value = "info")]
    pub log: String,

    /// Log output format.
    #[arg(
        long,
        env = "EXCHANGE_LISTENER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// `RequestServerVersion` sent to Exchange (at least Exchange2010_SP1 for streaming).
    #[arg(long, env = "EXCHANGE_LISTENER_EWS_VERSION", default_value = "Exchange2013_SP1", value_parser = parse_version)]
    pub ews_version: ews::ServerVersion,

    /// Lifetime of one streaming connection asked of Exchange, in minutes (1-30).
    #[arg(long, env = "EXCHANGE_LISTENER_STREAM_MINUTES", default_value_t = 30, value_parser = clap::value_parser!(u8).range(1..=30))]
    pub stream_minutes: u8,

    /// Seconds of silence on a stream before it is reopened (Exchange sends keep-alives).
    #[arg(long, env = "EXCHANGE_LISTENER_STREAM_IDLE_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_idle_secs: u64,

    /// Timeout of each non-streaming EWS call and each Creatio call, in seconds.
    #[arg(long, env = "EXCHANGE_LISTENER_REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_secs: u64,

    /// First delay after a transient EWS failure, in milliseconds (doubles up to the max).
    #[arg(long, env = "EXCHANGE_LISTENER_RETRY_BASE_MS", default_value_t = 1_000)]
    pub retry_base_ms: u64,

    /// Longest delay between EWS retries, in milliseconds.
    #[arg(long, env = "EXCHANGE_LISTENER_RETRY_MAX_MS", default_value_t = 60_000)]
    pub retry_max_ms: u64,

    /// First delay after Exchange rejects a mailbox's credentials, in seconds.
    #[arg(
        long,
        env = "EXCHANGE_LISTENER_FAILED_RETRY_BASE_SECS",
        default_value_t = 60
    )]
    pub failed_retry_base_secs: u64,

    /// Longest delay between retries of a mailbox whose credentials are rejected, in seconds.
    #[arg(
        long,
        env = "EXCHANGE_LISTENER_FAILED_RETRY_MAX_SECS",
        default_value_t = 1_800
    )]
    pub failed_retry_max_secs: u64,

    /// How long one mail is retried against Creatio before it becomes a dead letter, in
    /// seconds. Creatio may be down this long without losing mail.
    #[arg(long, env = "EXCHANGE_LISTENER_DELIVERY_GIVE_UP_AFTER_SECS", default_value_t = 3_600, value_parser = clap::value_parser!(u64).range(1..))]
    pub delivery_give_up_after_secs: u64,

    /// First delay between attempts to post to Creatio, in milliseconds.
    #[arg(
        long,
        env = "EXCHANGE_LISTENER_DELIVERY_RETRY_BASE_MS",
        default_value_t = 1_000
    )]
    pub delivery_retry_base_ms: u64,

    /// Longest delay between attempts to post to Creatio, in milliseconds.
    #[arg(
        long,
        env = "EXCHANGE_LISTENER_DELIVERY_RETRY_MAX_MS",
        default_value_t = 60_000
    )]
    pub delivery_retry_max_ms: u64,

    /// Most mailboxes this replica serves at once; more wait, in state `Queued`.
    #[arg(long, env = "EXCHANGE_LISTENER_MAX_ACTIVE_MAILBOXES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_active_mailboxes: u64,

    /// Subscribe calls a second, at most, paced and jittered (starts and resubscriptions).
    #[arg(long, env = "EXCHANGE_LISTENER_SUBSCRIBE_RATE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub subscribe_rate: u32,

    /// Largest answer read from Exchange, in bytes (a batch of mails past it is fetched one by
    /// one; a single mail past it is dead-lettered).
    #[arg(long, env = "EXCHANGE_LISTENER_EWS_MAX_BODY_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub ews_max_body_bytes: u64,

    /// Seconds without a healthy stream after which SubscriptionsState reports a mailbox
    /// `failed` (so Creatio's diagnostics show it).
    #[arg(long, env = "EXCHANGE_LISTENER_UNHEALTHY_AFTER_SECS", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..))]
    pub unhealthy_after_secs: u64,

    /// Most API connections open at once.
    #[arg(long, env = "EXCHANGE_LISTENER_MAX_CONNECTIONS", default_value_t = 1_024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Seconds a client has to send a request's head.
    #[arg(long, env = "EXCHANGE_LISTENER_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_header_timeout_secs: u64,

    /// Seconds to receive a request's body and answer it (Validate waits for Exchange
    /// within this).
    #[arg(long, env = "EXCHANGE_LISTENER_HTTP_REQUEST_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_request_timeout_secs: u64,

    /// Allow Exchange and Creatio addresses that are link-local (169.254.0.0/16, fe80::/10),
    /// where cloud metadata services answer; refused by default.
    #[arg(long, env = "EXCHANGE_LISTENER_ALLOW_LINK_LOCAL")]
    pub allow_link_local: bool,

    /// Exchange hosts mailboxes may name in ServerAddress, comma-separated (`mail.contoso.com`,
    /// `*.contoso.com`); any host when empty.
    #[arg(long, env = "EXCHANGE_LISTENER_EXCHANGE_HOSTS", value_delimiter = ',')]
    pub exchange_hosts: Vec<String>,

    /// Creatio hosts mailboxes may name in BpmEndpoint, comma-separated; any host when empty.
    #[arg(long, env = "EXCHANGE_LISTENER_CREATIO_HOSTS", value_delimiter = ',')]
    pub creatio_hosts: Vec<String>,

    /// Seconds after SIGTERM before open requests are dropped and unfinished unsubscribes
    /// abandoned (keep below Kubernetes' termination grace period).
    #[arg(long, env = "EXCHANGE_LISTENER_SHUTDOWN_TIMEOUT_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub shutdown_timeout_secs: u64,
}

fn parse_version(s: &str) -> Result<ews::ServerVersion, String> {
    ews::ServerVersion::parse(s).ok_or_else(|| {
        format!("unknown EWS version {s:?}; one of Exchange2010_SP1, Exchange2010_SP2, Exchange2013, Exchange2013_SP1, Exchange2016")
    })
}

impl Config {
    pub fn retry(&self) -> Result<BackoffPolicy, InvalidBackoff> {
        BackoffPolicy::new(
            Duration::from_millis(self.retry_base_ms),
            Duration::from_millis(self.retry_max_ms),
        )
    }

    pub fn failed_retry(&self) -> Result<BackoffPolicy, InvalidBackoff> {
        BackoffPolicy::new(
            Duration::from_secs(self.failed_retry_base_secs),
            Duration::from_secs(self.failed_retry_max_secs),
        )
    }

    pub fn delivery_retry(&self) -> Result<BackoffPolicy, InvalidBackoff> {
        BackoffPolicy::new(
            Duration::from_millis(self.delivery_retry_base_ms),
            Duration::from_millis(self.delivery_retry_max_ms),
        )
    }

    /// Where Creatio's calls may send the listener.
    pub fn reach(&self) -> Result<Reach, String> {
        Ok(Reach {
            allow_link_local: self.allow_link_local,
            exchange_hosts: HostList::parse(&self.exchange_hosts)
                .map_err(|e| format!("--exchange-hosts: {e}"))?,
            creatio_hosts: HostList::parse(&self.creatio_hosts)
                .map_err(|e| format!("--creatio-hosts: {e}"))?,
        })
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}
