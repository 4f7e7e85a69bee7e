//! Configuration from flags and environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::creatio::contract::Secret;
use crate::engine::backoff::{BackoffPolicy, InvalidBackoff};
use crate::engine::reach::{HostList, Reach};
use crate::engine::store::seal::Sealer;

/// How mailboxes with a password log in to Exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EwsAuth {
    /// Basic, until a server's 401 offers NTLM (or Negotiate) and not Basic: then NTLM for
    /// every mailbox on that server.
    Auto,
    Basic,
    Ntlm,
}

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

    /// A path prefix the API also answers under, for an ingress that forwards the whole
    /// path (the original chart's `ingress.path`, e.g. `/exchangelistener`).
    #[arg(long, env = "EXCHANGE_LISTENER_BASE_PATH", default_value = "", value_parser = base_path)]
    pub base_path: String,

    /// A file holding the token every API call must carry (health probes aside): as a bearer
    /// token (`Authorization: Bearer …`), or as the first path segment after the base path
    /// (`/exchangelistener/<token>/api/listeners/…`), for a Creatio that cannot send headers
    /// (put it in `ExchangeListenerServiceUri`). At least 16 characters of letters, digits,
    /// `-`, `_`, `.` and `~`. None: the API takes calls from whoever reaches it.
    #[arg(long, env = "EXCHANGE_LISTENER_API_TOKEN_FILE")]
    pub api_token_file: Option<std::path::PathBuf>,

    /// Serve `/metrics` on this address alone (e.g. `0.0.0.0:9090`), not on the API's, so an
    /// ingress routing the API never exposes it.
    #[arg(long, env = "EXCHANGE_LISTENER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

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

    /// How mailboxes with a password log in to Exchange: `auto` (Basic, or NTLM where the
    /// server offers only NTLM or Negotiate), `basic` or `ntlm`. An `AccessToken` is always sent
    /// as a bearer token.
    #[arg(
        long,
        env = "EXCHANGE_LISTENER_EWS_AUTH",
        value_enum,
        default_value = "auto"
    )]
    pub ews_auth: EwsAuth,

    /// Seconds an NTLM mailbox keeps its call connection once idle. A mailbox's calls come in
    /// bursts (a catch-up's, a batch of mail's) milliseconds apart; a connection kept longer
    /// mostly waits minutes for the next mail while holding its TLS session and buffers, and
    /// the next call after it closed logs in again (a new TLS connection and NTLM handshake).
    #[arg(long, env = "EXCHANGE_LISTENER_EWS_NTLM_KEEP_ALIVE_SECS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ews_ntlm_keep_alive_secs: u64,

    /// A JSON file of service accounts, one per Exchange server, holding the
    /// ApplicationImpersonation role: `[{"url": "https://mail.contoso.com/EWS/Exchange.asmx",
    /// "user": "CONTOSO\\svc", "password": "…"}]`. Mailboxes Creatio sends without a password
    /// are served through the account of their server, their streams shared.
    #[arg(long, env = "EXCHANGE_LISTENER_EWS_SERVICE_ACCOUNTS")]
    pub ews_service_accounts: Option<std::path::PathBuf>,

    /// Lifetime of one streaming connection asked of Exchange, in minutes (1-30).
    #[arg(long, env = "EXCHANGE_LISTENER_STREAM_MINUTES", default_value_t = 30, value_parser = clap::value_parser!(u8).range(1..=30))]
    pub stream_minutes: u8,

    /// Seconds of silence on a stream before it is reopened (Exchange sends keep-alives).
    #[arg(long, env = "EXCHANGE_LISTENER_STREAM_IDLE_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_idle_secs: u64,

    /// A PEM bundle of CAs Exchange's certificates may come from, besides the system's (an
    /// on-premises server's internal CA).
    #[arg(long, env = "EXCHANGE_LISTENER_EWS_CA_FILE")]
    pub ews_ca_file: Option<std::path::PathBuf>,

    /// Seconds between looks at an IMAP mailbox's watched folders besides IDLE's news: every
    /// folder on a server without IDLE, the folders after the first on one with it (at most
    /// half of `--stream-idle-secs`).
    #[arg(long, env = "EXCHANGE_LISTENER_IMAP_POLL_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub imap_poll_secs: u64,

    /// A JSON file of Microsoft 365 app registrations, one per tenant, each with the mail
    /// domains it serves: `[{"tenant": "contoso.onmicrosoft.com", "client_id": "…",
    /// "certificate": "app.crt", "private_key": "app.key", "domains": ["contoso.com"]}]` (or
    /// `"client_secret"` instead of the certificate). An Exchange mailbox in Exchange Online
    /// whose domain one serves is read through Microsoft Graph instead of EWS.
    #[arg(long, env = "EXCHANGE_LISTENER_GRAPH_APPS")]
    pub graph_apps: Option<std::path::PathBuf>,

    /// The HTTPS URL at which Microsoft Graph reaches this listener's
    /// `/graph/notifications` (through the ingress; with `--api-token-file`, the token as the
    /// first path segment after the base path). Given, each watched folder of a Graph mailbox
    /// gets a change-notification subscription and new mail arrives at once; polling goes on
    /// at `--graph-poll-max-secs` as a safety net.
    #[arg(
        long,
        env = "EXCHANGE_LISTENER_GRAPH_NOTIFICATION_URL",
        requires = "graph_apps"
    )]
    pub graph_notification_url: Option<String>,

    /// Shortest seconds between two polls of a Graph mailbox's folders: after a poll that found
    /// mail. Each poll that finds none doubles the wait, up to `--graph-poll-max-secs`.
    #[arg(long, env = "EXCHANGE_LISTENER_GRAPH_POLL_MIN_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub graph_poll_min_secs: u64,

    /// Longest seconds between two polls of a Graph mailbox's folders (an idle mailbox's;
    /// at most half of `--stream-idle-secs`).
    #[arg(long, env = "EXCHANGE_LISTENER_GRAPH_POLL_MAX_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub graph_poll_max_secs: u64,

    /// Connections the listener holds at most for one login on one IMAP server (each watched
    /// mailbox holds one; a check or a fetch for Creatio may open another). Servers cap them
    /// per user: Dovecot at 10 from one address, Exchange at 16, Gmail at 15.
    #[arg(long, env = "EXCHANGE_LISTENER_IMAP_CONNECTIONS_PER_USER", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub imap_connections_per_user: u64,

    /// A PEM bundle of CAs IMAP and SMTP servers' certificates may come from, besides the
    /// system's.
    #[arg(long, env = "EXCHANGE_LISTENER_IMAP_CA_FILE")]
    pub imap_ca_file: Option<std::path::PathBuf>,

    /// Accept any certificate from Exchange. For a lab only: logged as a warning at start and
    /// on every mailbox's connect.
    #[arg(long, env = "EXCHANGE_LISTENER_EWS_TLS_INSECURE")]
    pub ews_tls_insecure: bool,

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

    /// Subscribe calls a second to each mail server (scheme, host and port), at most, paced and
    /// jittered (starts and resubscriptions).
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

    /// Exchange hosts mailboxes may name in ServiceUrl, comma-separated (`mail.contoso.com`,
    /// `*.contoso.com`); any host when empty.
    #[arg(long, env = "EXCHANGE_LISTENER_EXCHANGE_HOSTS", value_delimiter = ',')]
    pub exchange_hosts: Vec<String>,

    /// Creatio hosts mailboxes may name in BpmEndpoint, comma-separated; any host when empty.
    #[arg(long, env = "EXCHANGE_LISTENER_CREATIO_HOSTS", value_delimiter = ',')]
    pub creatio_hosts: Vec<String>,

    /// The shared store: `redis://[:password@]host:port/db`, or `rediss://` for TLS, or
    /// `redis+sentinel://[:password@]host:port[,host:port…]/<master name>[/db]` for the master
    /// Redis Sentinel names (followed through failovers). Without it (and without
    /// `ExchangeListenerRedisHost`) the listener runs alone on its in-memory store.
    #[arg(long, env = "EXCHANGE_LISTENER_REDIS_URL")]
    pub redis_url: Option<String>,

    /// A PEM file of the CA that signed Redis's certificate, for `rediss://` with an internal
    /// CA (the system's roots otherwise).
    #[arg(long, env = "EXCHANGE_LISTENER_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// The original service's Redis setting, `host:port`; used when `--redis-url` is absent.
    /// With `--redis-sentinel-master`, the sentinels (`host:port`, several separated by
    /// commas).
    #[arg(long, env = "ExchangeListenerRedisHost")]
    pub redis_host: Option<String>,

    /// The name of the master that the sentinels `ExchangeListenerRedisHost` names watch
    /// (Redis Sentinel): the listener follows it through failovers.
    #[arg(long, env = "EXCHANGE_LISTENER_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// Speak TLS to the Redis named by `ExchangeListenerRedisHost` (`rediss://`).
    #[arg(long, env = "EXCHANGE_LISTENER_REDIS_TLS")]
    pub redis_tls: bool,

    /// The original service's Redis database number, with `ExchangeListenerRedisHost`.
    #[arg(long, env = "ExchangeListenerRedisDatabase")]
    pub redis_database: Option<u32>,

    /// The original service's Redis password, with `ExchangeListenerRedisHost`.
    #[arg(long, env = "ExchangeListenerRedisPassword", hide_env_values = true, value_parser = secret)]
    pub redis_password: Option<Secret>,

    /// Prefix of every key, so several deployments can share one Redis.
    #[arg(long, env = "EXCHANGE_LISTENER_REDIS_PREFIX", default_value = "el:")]
    pub redis_prefix: String,

    /// The key that seals credentials in Redis: 32 bytes, base64-encoded.
    #[arg(long, env = "EXCHANGE_LISTENER_SECRET_KEY", hide_env_values = true, value_parser = secret)]
    pub secret_key: Option<Secret>,

    /// A file holding the secret key (base64), e.g. a mounted Kubernetes Secret.
    #[arg(long, env = "EXCHANGE_LISTENER_SECRET_KEY_FILE")]
    pub secret_key_file: Option<std::path::PathBuf>,

    /// Keep credentials in Redis in plain text when no secret key is given (refused otherwise).
    #[arg(long, env = "EXCHANGE_LISTENER_INSECURE_PLAINTEXT_CREDENTIALS")]
    pub insecure_plaintext_credentials: bool,

    /// This replica's name among the others (default: `PodName`, then the host name).
    #[arg(long, env = "EXCHANGE_LISTENER_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Milliseconds a mailbox's lease lasts unless renewed: a dead replica's mailboxes move
    /// after about this long.
    #[arg(long, env = "EXCHANGE_LISTENER_LEASE_MS", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(300..=600_000))]
    pub lease_ms: u64,

    /// Seconds after SIGTERM before open requests are dropped and unfinished unsubscribes
    /// abandoned (keep below Kubernetes' termination grace period).
    #[arg(long, env = "EXCHANGE_LISTENER_SHUTDOWN_TIMEOUT_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub shutdown_timeout_secs: u64,

    /// Seconds after SIGTERM during which the API still answers while `/readyz` says 503, so
    /// that a load balancer or Kubernetes forgets this replica before its socket closes (the
    /// mailboxes start handing over at once). The shutdown timeout runs after it.
    #[arg(long, env = "EXCHANGE_LISTENER_DRAIN_SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub drain_secs: u64,
}

/// A token as a file holds it: one line, usable as a path segment, long enough not to guess.
fn api_token(text: &str) -> Result<String, String> {
    let token = text.trim();
    if token.len() < 16 {
        return Err("the token must be 16 characters or more".into());
    }
    if !token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c))
    {
        return Err(
            "the token may hold only letters, digits, '-', '_', '.' and '~' (it can be a path segment)"
                .into(),
        );
    }
    Ok(token.to_owned())
}

fn base_path(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    if s.is_empty() {
        return Ok(String::new());
    }
    let valid = s.starts_with('/')
        && s[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c))
        });
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a path such as /exchangelistener"))
    }
}

fn secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s.to_owned()))
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

    /// The API token `--api-token-file` holds, if one is given.
    pub fn api_token(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.api_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--api-token-file {}: {e}", path.display()))?;
        api_token(&text)
            .map(Some)
            .map_err(|e| format!("--api-token-file {}: {e}", path.display()))
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

    /// The Redis to use, if any: `--redis-url`, else one built from the original's
    /// `ExchangeListenerRedisHost`, `...Database` and `...Password`.
    pub fn redis(&self) -> Result<Option<String>, String> {
        if let Some(url) = &self.redis_url {
            return Ok(Some(url.clone()));
        }
        let Some(host) = &self.redis_host else {
            return Ok(None);
        };
        if let Some(master) = &self.redis_sentinel_master {
            if self.redis_tls {
                return Err(
                    "Redis Sentinel over TLS is not supported: unset EXCHANGE_LISTENER_REDIS_TLS, or name one Redis without --redis-sentinel-master"
                        .into(),
                );
            }
            let auth = match &self.redis_password {
                Some(password) => format!(
                    ":{}@",
                    percent_encoding::utf8_percent_encode(
                        password.expose(),
                        percent_encoding::NON_ALPHANUMERIC
                    )
                ),
                None => String::new(),
            };
            return Ok(Some(format!(
                "redis+sentinel://{auth}{}/{}/{}",
                host.trim(),
                master.trim(),
                self.redis_database.unwrap_or(0)
            )));
        }
        let scheme = if self.redis_tls { "rediss" } else { "redis" };
        let mut url = url::Url::parse(&format!("{scheme}://{}", host.trim()))
            .map_err(|e| format!("ExchangeListenerRedisHost {host:?}: {e}"))?;
        if let Some(password) = &self.redis_password {
            url.set_password(Some(password.expose()))
                .map_err(|()| "ExchangeListenerRedisPassword cannot be used with this host")?;
        }
        url.set_path(&self.redis_database.unwrap_or(0).to_string());
        Ok(Some(url.to_string()))
    }

    /// How credentials are kept in a shared store: sealed with the secret key, or in plain
    /// text only when asked for by name.
    pub fn sealer(&self) -> Result<Sealer, String> {
        let key = match (&self.secret_key, &self.secret_key_file) {
            (Some(key), _) => Some(key.expose().to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--secret-key-file {}: {e}", path.display()))?,
            ),
            (None, None) => None,
        };
        match key {
            Some(key) => Sealer::from_base64(&key).map_err(|e| e.to_string()),
            None if self.insecure_plaintext_credentials => Ok(Sealer::plaintext()),
            None => Err(
                "with Redis, credentials are sealed: set EXCHANGE_LISTENER_SECRET_KEY \
                 (base64 of 32 random bytes, e.g. `head -c32 /dev/urandom | base64`) or \
                 --secret-key-file, or accept plain text with --insecure-plaintext-credentials"
                    .into(),
            ),
        }
    }

    /// This replica's name: `--replica-id`, else `PodName` (as the original's pods set),
    /// else the host name, else a random one.
    pub fn replica(&self) -> String {
        let named = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        named(self.replica_id.clone())
            .or_else(|| named(std::env::var("PodName").ok()))
            .or_else(|| named(std::fs::read_to_string("/proc/sys/kernel/hostname").ok()))
            .unwrap_or_else(|| format!("replica-{:016x}", fastrand::u64(..)))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("exchange-listener").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn the_original_redis_settings_make_a_url() {
        assert_eq!(config(&[]).redis().unwrap(), None);
        let c = config(&[
            "--redis-host",
            "redis.crm:6380",
            "--redis-database",
            "3",
            "--redis-password",
            "p@ss word",
        ]);
        assert_eq!(
            c.redis().unwrap().unwrap(),
            "redis://:p%40ss%20word@redis.crm:6380/3"
        );
        let tls = config(&["--redis-host", "redis.crm:6380", "--redis-tls"]);
        assert_eq!(tls.redis().unwrap().unwrap(), "rediss://redis.crm:6380/0");
        let sentinel = config(&[
            "--redis-host",
            "s0:26379,s1:26379",
            "--redis-sentinel-master",
            "mymaster",
            "--redis-database",
            "2",
            "--redis-password",
            "p@ss word",
        ]);
        assert_eq!(
            sentinel.redis().unwrap().unwrap(),
            "redis+sentinel://:p%40ss%20word@s0:26379,s1:26379/mymaster/2"
        );
        let url = config(&["--redis-url", "redis://x:1/2", "--redis-host", "y:3"]);
        assert_eq!(
            url.redis().unwrap().unwrap(),
            "redis://x:1/2",
            "the URL wins"
        );
    }

    #[test]
    fn api_tokens_are_one_line_of_path_safe_characters_and_long_enough() {
        assert_eq!(
            api_token("  s3cr3t-token_0123456789\n").unwrap(),
            "s3cr3t-token_0123456789"
        );
        assert!(api_token("short").unwrap_err().contains("16 characters"));
        assert!(
            api_token("abcdefghijklmnop/q")
                .unwrap_err()
                .contains("path segment")
        );
        assert!(api_token("abcdefgh ijklmnopq").is_err());
    }

    #[test]
    fn base_paths() {
        assert_eq!(
            base_path("/exchangelistener/").unwrap(),
            "/exchangelistener"
        );
        assert_eq!(base_path("").unwrap(), "");
        assert_eq!(base_path("/").unwrap(), "");
        assert!(base_path("exchangelistener").is_err());
        assert!(base_path("/a//b").is_err());
        assert!(base_path("/a b").is_err());
    }
}
