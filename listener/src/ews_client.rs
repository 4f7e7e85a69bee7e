//! The listener's EWS client: one mailbox's HTTP conversation with Exchange.
//!
//! It sends what the `ews` crate builds, with Basic or bearer auth, `X-AnchorMailbox` on
//! every request, and the affinity headers and `X-BackEndOverrideCookie` on subscription
//! requests; it decodes what comes back with the `ews` crate. [`EwsFailure::disposition`] is
//! the one place that decides whether a failure is retried, needs a new subscription, or is a
//! configuration problem that fast retries cannot fix.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ews::response::{self, StreamBatch};
use ews::{
    DistinguishedFolder, EnvelopeSplitter, EventType, EwsError, ItemShape, RequestHeader,
    ServerVersion,
};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE};

use crate::backoff::retry_after;
use crate::config::EwsAuth;
use crate::contract::{Credentials, Secret};
use crate::service_account::{ServiceAccount, ServiceAccounts};
use crate::store::StoreError;

const AFFINITY_COOKIE: &str = "X-BackEndOverrideCookie";

/// Why an EWS call did not succeed. Displays carry no secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EwsFailure {
    #[error("EWS rejected the credentials (HTTP 401)")]
    Unauthorized,
    #[error("EWS answered HTTP {status}")]
    Http {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("EWS unreachable: {0}")]
    Transport(String),
    #[error(transparent)]
    Ews(#[from] EwsError),
    #[error("no data on the event stream for {0:?}")]
    Idle(Duration),
    #[error("EWS answer larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Config(String),
    /// Not Exchange's fault: the listener's own store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transient: wait (at least `after`, when the server said) and try again.
    Retry { after: Option<Duration> },
    /// The subscription is gone: subscribe afresh.
    Resubscribe,
    /// Credentials or configuration are wrong: report it and retry only slowly.
    Fatal,
}

/// Response codes that mean the subscription no longer exists on the server.
const SUBSCRIPTION_GONE: [&str; 6] = [
    "ErrorSubscriptionNotFound",
    "ErrorInvalidSubscription",
    "ErrorExpiredSubscription",
    "ErrorSubscriptionUnsubsribed",
    "ErrorReadEventsFailed",
    "ErrorInvalidWatermark",
];

/// Response codes that retries at full speed cannot fix.
const CONFIGURATION: [&str; 9] = [
    "ErrorNonExistentMailbox",
    "ErrorImpersonateUserDenied",
    "ErrorImpersonationDenied",
    "ErrorAccessDenied",
    "ErrorSubscriptionAccessDenied",
    "ErrorSubscriptionDelegateAccessNotSupported",
    "ErrorInvalidServerVersion",
    "ErrorIncorrectSchemaVersion",
    "ErrorInvalidSchemaVersionForMailboxVersion",
];

/// What a per-item error in a GetItem answer means for that item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemFate {
    /// Deleted or moved: there is nothing to deliver.
    Gone,
    /// The server could not serve it now: ask again.
    Retry,
    /// The server will not serve it: keep it as a dead letter.
    Dead,
}

/// Per-item codes that say "not now" rather than "never".
const TRANSIENT_ITEM: [&str; 9] = [
    "ErrorServerBusy",
    "ErrorMailboxStoreUnavailable",
    "ErrorTimeoutExpired",
    "ErrorInternalServerTransientError",
    "ErrorMailboxMoveInProgress",
    "ErrorConnectionFailed",
    "ErrorBatchProcessingStopped",
    "ErrorInsufficientResources",
    "ErrorADUnavailable",
];

pub fn item_fate(code: &str) -> ItemFate {
    if code == "ErrorItemNotFound" {
        ItemFate::Gone
    } else if TRANSIENT_ITEM.contains(&code) {
        ItemFate::Retry
    } else {
        ItemFate::Dead
    }
}

impl EwsFailure {
    pub fn disposition(&self) -> Disposition {
        match self {
            EwsFailure::Unauthorized | EwsFailure::Config(_) | EwsFailure::TooLarge { .. } => {
                Disposition::Fatal
            }
            EwsFailure::Http { retry_after, .. } => Disposition::Retry {
                after: *retry_after,
            },
            EwsFailure::Transport(_) | EwsFailure::Idle(_) | EwsFailure::Store(_) => {
                Disposition::Retry { after: None }
            }
            EwsFailure::Ews(e) => match e.code() {
                Some(code) if SUBSCRIPTION_GONE.contains(&code) => Disposition::Resubscribe,
                Some(code) if CONFIGURATION.contains(&code) => Disposition::Fatal,
                _ => Disposition::Retry {
                    after: e.back_off(),
                },
            },
        }
    }

    /// The EWS response code behind the failure, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            EwsFailure::Ews(e) => e.code(),
            _ => None,
        }
    }

    /// A stable class name for Creatio's `ProcessMailboxState.ExceptionClassName`.
    pub fn class_name(&self) -> &'static str {
        match self {
            EwsFailure::Unauthorized => "EwsUnauthorized",
            EwsFailure::Http { .. } => "EwsHttpError",
            EwsFailure::Transport(_) => "EwsUnreachable",
            EwsFailure::Ews(_) => "EwsError",
            EwsFailure::Idle(_) => "EwsStreamIdle",
            EwsFailure::TooLarge { .. } => "EwsAnswerTooLarge",
            EwsFailure::Config(_) => "EwsConfiguration",
            EwsFailure::Store(_) => "StoreUnavailable",
        }
    }
}

fn transport(e: reqwest::Error) -> EwsFailure {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // reqwest says "error sending request"; the cause (a refused certificate, a reset) is in
    // the chain, and is what an administrator needs to read.
    let e = e.without_url();
    let mut why = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !why.contains(&text) {
            why = format!("{why}: {text}");
        }
        source = cause.source();
    }
    EwsFailure::Transport(format!("{kind}: {why}"))
}

/// The EWS endpoint for `ServerAddress`: a full URL as given (with `/EWS/Exchange.asmx` added
/// when it has no path), or a host, reached over https unless `UseSSL` is false.
pub fn ews_url(server_address: Option<&str>, use_ssl: Option<bool>) -> Result<String, EwsFailure> {
    let address = server_address
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            EwsFailure::Config("ServerAddress is not set and autodiscover is not supported".into())
        })?;
    let lower = address.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let after_scheme = &address[address.find("://").map_or(0, |i| i + 3)..];
        return Ok(match after_scheme.find('/') {
            Some(i) if !after_scheme[i..].trim_end_matches('/').is_empty() => address.to_owned(),
            _ => format!("{}/EWS/Exchange.asmx", address.trim_end_matches('/')),
        });
    }
    let scheme = if use_ssl == Some(false) {
        "http"
    } else {
        "https"
    };
    Ok(format!(
        "{scheme}://{}/EWS/Exchange.asmx",
        address.trim_end_matches('/')
    ))
}

enum Auth {
    Basic { user: String, password: Secret },
    Bearer(Secret),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Basic { user, .. } => write!(f, "Basic({user:?}, ***)"),
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

/// Limits on one mailbox's conversation with Exchange.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Timeout of every non-streaming call, and of the wait for a stream's response head.
    pub request_timeout: Duration,
    /// The largest non-streaming answer read from Exchange (the `ews` crate caps each
    /// streaming envelope).
    pub max_body_bytes: u64,
}

/// Makes an HTTP client with connections of its own, for a mailbox that logs in with NTLM.
pub type ClientFactory = Arc<dyn Fn() -> reqwest::Client + Send + Sync>;

/// What the listener learned of each Exchange server, shared by every mailbox's client so a
/// server is asked once. The request version: the configured one until a server refuses it
/// (`ErrorInvalidServerVersion`, as Exchange 2010 and 2013 do for versions newer than theirs);
/// then the one that server names in `ServerVersionInfo`, or the next older, never below
/// Exchange2010_SP1. The login: NTLM where configured, or where a server's 401 offers NTLM (or
/// Negotiate) and not Basic.
/// And the service account, if one is configured for the server, that serves its mailboxes
/// created without a password.
#[derive(Clone)]
pub struct Servers {
    preferred: ServerVersion,
    learned: Arc<Mutex<HashMap<String, ServerVersion>>>,
    auth: EwsAuth,
    ntlm: Arc<Mutex<HashSet<String>>>,
    private_client: ClientFactory,
    accounts: Arc<ServiceAccounts>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("preferred", &self.preferred)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Servers {
    pub fn new(preferred: ServerVersion, auth: EwsAuth, private_client: ClientFactory) -> Self {
        Servers {
            preferred,
            learned: Arc::default(),
            auth,
            ntlm: Arc::default(),
            private_client,
            accounts: Arc::default(),
        }
    }

    /// Serves mailboxes created without a password through these accounts.
    pub fn with_accounts(mut self, accounts: ServiceAccounts) -> Self {
        self.accounts = Arc::new(accounts);
        self
    }

    /// The service account serving the server of `url`, if one is configured.
    pub fn account_for(&self, url: &str) -> Option<Arc<ServiceAccount>> {
        self.accounts.for_url(url)
    }

    /// Whether mailboxes with a password log in to the server of `url` with NTLM.
    fn wants_ntlm(&self, url: &str) -> bool {
        match self.auth {
            EwsAuth::Ntlm => true,
            EwsAuth::Basic => false,
            EwsAuth::Auto => self
                .ntlm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&Self::server(url)),
        }
    }

    /// A 401 from the server of `url` offered these schemes to a Basic login: true (and
    /// remembered) when the server takes NTLM and not Basic.
    fn learn_ntlm(&self, url: &str, offered: &[String]) -> bool {
        let ntlm = offered.iter().any(|s| s == "ntlm" || s == "negotiate");
        let basic = offered.iter().any(|s| s == "basic");
        if self.auth != EwsAuth::Auto || !ntlm || basic {
            return false;
        }
        self.ntlm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Self::server(url));
        true
    }

    /// The server an EWS URL names: its scheme and authority.
    pub(crate) fn server(url: &str) -> String {
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let rest = &url[scheme_end..];
        let end = scheme_end + rest.find(['/', '?', '#']).unwrap_or(rest.len());
        url[..end].to_ascii_lowercase()
    }

    /// The version to speak to the server of `url`.
    pub fn for_server(&self, url: &str) -> ServerVersion {
        self.learned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&Self::server(url))
            .copied()
            .unwrap_or(self.preferred)
    }

    /// The server of `url` refused `tried`: answers the older version to try next, and
    /// remembers it; `None` when there is none (the server is older than streaming).
    pub fn refused(
        &self,
        url: &str,
        tried: ServerVersion,
        said: Option<ews::ServerVersionInfo>,
    ) -> Option<ServerVersion> {
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        let server = Self::server(url);
        let known = learned.get(&server).copied().unwrap_or(self.preferred);
        // Another mailbox learned an older one meanwhile: take it.
        let next = if known < tried {
            known
        } else {
            match said {
                Some(info) => info.request_version().filter(|v| *v < tried)?,
                None => tried.older()?,
            }
        };
        learned.insert(server, next);
        Some(next)
    }
}

/// One mailbox's EWS client.
#[derive(Debug)]
pub struct EwsClient {
    http: reqwest::Client,
    url: String,
    auth: Auth,
    anchor: String,
    servers: Servers,
    /// Connections of this mailbox's own, once it logs in with NTLM.
    ntlm_http: OnceLock<reqwest::Client>,
    limits: Limits,
    /// The affinity cookie the last Subscribe set, replayed on the subscription's requests.
    cookie: Mutex<Option<String>>,
    /// The mailbox a service account acts as (`ExchangeImpersonation`).
    impersonate: Option<String>,
    /// That service account.
    account: Option<Arc<ServiceAccount>>,
}

/// Connections a service account's NTLM calls share: its mailboxes all log in as one user,
/// so they may share authenticated connections, where one per mailbox would hold thousands
/// open. NTLM authenticates a connection in three legs that must stay on it; a lane is one
/// connection, used by one call at a time, so no other call slips between the legs.
pub struct Lanes {
    lanes: Vec<Lane>,
    next: std::sync::atomic::AtomicUsize,
}

struct Lane {
    http: reqwest::Client,
    busy: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lanes({})", self.lanes.len())
    }
}

/// Lanes per service account: below Exchange's default of 27 concurrent calls per account.
const NTLM_LANES: usize = 16;

/// A lane held for one call.
struct LaneGuard<'a> {
    _busy: tokio::sync::MutexGuard<'a, ()>,
    http: &'a reqwest::Client,
}

impl Lanes {
    fn new(count: usize, make: &ClientFactory) -> Self {
        Lanes {
            lanes: (0..count)
                .map(|_| Lane {
                    http: make(),
                    busy: tokio::sync::Mutex::new(()),
                })
                .collect(),
            next: Default::default(),
        }
    }

    /// A free lane, else the next in turn once it is free.
    async fn acquire(&self) -> LaneGuard<'_> {
        for lane in &self.lanes {
            if let Ok(busy) = lane.busy.try_lock() {
                return LaneGuard {
                    _busy: busy,
                    http: &lane.http,
                };
            }
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.lanes.len();
        let lane = &self.lanes[i];
        LaneGuard {
            _busy: lane.busy.lock().await,
            http: &lane.http,
        }
    }
}

impl EwsClient {
    pub fn new(
        http: reqwest::Client,
        creds: &Credentials,
        servers: Servers,
        limits: Limits,
    ) -> Result<Self, EwsFailure> {
        let url = ews_url(creds.server_address.as_deref(), creds.use_ssl)?;
        let mut impersonate = None;
        let mut service = None;
        let auth = match (&creds.access_token, &creds.password) {
            (Some(token), _) => Auth::Bearer(token.clone()),
            (None, Some(password)) => Auth::Basic {
                user: creds
                    .user_name
                    .clone()
                    .unwrap_or_else(|| creds.sender_email.clone()),
                password: password.clone(),
            },
            (None, None) => match servers.accounts.for_url(&url) {
                Some(account) => {
                    impersonate = Some(creds.sender_email.clone());
                    let auth = Auth::Basic {
                        user: account.user.clone(),
                        password: account.password.clone(),
                    };
                    service = Some(account);
                    auth
                }
                None => {
                    return Err(EwsFailure::Config(format!(
                        "neither UserPassword nor AccessToken is set, and no service account is configured for {}",
                        redact_url(&Servers::server(&url))
                    )));
                }
            },
        };
        Ok(EwsClient {
            http,
            url,
            auth,
            anchor: creds.sender_email.clone(),
            servers,
            ntlm_http: OnceLock::new(),
            limits,
            cookie: Mutex::new(None),
            impersonate,
            account: service,
        })
    }

    /// A service account's client for one shared stream: it acts as the group's `anchor`
    /// (so the connection counts against the anchor's budget) and carries the group's
    /// affinity `cookie`.
    pub fn for_group(
        http: reqwest::Client,
        url: &str,
        account: &Arc<ServiceAccount>,
        anchor: &str,
        cookie: Option<String>,
        servers: Servers,
        limits: Limits,
    ) -> Self {
        EwsClient {
            http,
            url: url.to_owned(),
            auth: Auth::Basic {
                user: account.user.clone(),
                password: account.password.clone(),
            },
            anchor: anchor.to_owned(),
            servers,
            ntlm_http: OnceLock::new(),
            limits,
            cookie: Mutex::new(cookie),
            impersonate: Some(anchor.to_owned()),
            account: Some(account.clone()),
        }
    }

    /// A service account's shared NTLM connection for one call; `None` for everyone else.
    async fn lane(&self) -> Option<LaneGuard<'_>> {
        let account = self.account.as_ref()?;
        if !self.servers.wants_ntlm(&self.url) {
            return None;
        }
        let lanes = account
            .lanes
            .get_or_init(|| Arc::new(Lanes::new(NTLM_LANES, &self.servers.private_client)));
        Some(lanes.acquire().await)
    }

    /// The mailbox a service account acts as, when one does.
    pub fn impersonating(&self) -> Option<&str> {
        self.impersonate.as_deref()
    }

    /// The endpoint, whole (it may carry user information: not for logs).
    pub(crate) fn endpoint(&self) -> &str {
        &self.url
    }

    /// What Exchange's last Subscribe answered in its affinity cookie: the mailbox's server.
    pub fn affinity(&self) -> Option<String> {
        self.cookie()
    }

    /// The endpoint, for logs: without any user information it may carry.
    pub fn url(&self) -> String {
        redact_url(&self.url)
    }

    /// The header of the next request: the version this server takes.
    fn header(&self) -> RequestHeader {
        RequestHeader {
            version: self.servers.for_server(&self.url),
            impersonate: self.impersonate.clone(),
        }
    }

    fn cookie(&self) -> Option<String> {
        self.cookie
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A request to the endpoint with every header but the login.
    fn request(
        &self,
        http: &reqwest::Client,
        body: String,
        affinity: bool,
        timeout: Option<Duration>,
    ) -> reqwest::RequestBuilder {
        let mut req = http
            .post(&self.url)
            .header(CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("X-AnchorMailbox", &self.anchor)
            .body(body);
        if affinity {
            req = req.header("X-PreferServerAffinity", "true");
            if let Some(cookie) = self.cookie() {
                req = req.header(COOKIE, format!("{AFFINITY_COOKIE}={cookie}"));
            }
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        req
    }

    /// Sends a request over connections NTLM authenticated. A connection that already is
    /// takes it as it is; a new one answers 401, and the handshake (NEGOTIATE, the server's
    /// CHALLENGE, AUTHENTICATE) runs on it with the same request.
    async fn send_ntlm(
        &self,
        user: &str,
        password: &Secret,
        body: String,
        affinity: bool,
        timeout: Option<Duration>,
        lane: Option<&reqwest::Client>,
    ) -> Result<reqwest::Response, EwsFailure> {
        let http = match lane {
            Some(http) => http,
            None => self
                .ntlm_http
                .get_or_init(|| (self.servers.private_client)()),
        };
        let resp = self
            .request(http, body.clone(), affinity, timeout)
            .send()
            .await
            .map_err(transport)?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(scheme) = crate::ntlm::scheme(&crate::ntlm::offered(resp.headers())) else {
            return Ok(resp);
        };
        // Read to the end, so the connection is free for the handshake's next request.
        let _ = read_capped(resp, self.limits.max_body_bytes).await;
        let (handshake, negotiate) = crate::ntlm::Handshake::start(user, password.expose())
            .map_err(|e| EwsFailure::Config(e.to_string()))?;
        let resp = self
            .request(http, body.clone(), affinity, timeout)
            .header(AUTHORIZATION, format!("{scheme} {negotiate}"))
            .send()
            .await
            .map_err(transport)?;
        let challenge = (resp.status() == StatusCode::UNAUTHORIZED)
            .then(|| crate::ntlm::challenge_in(resp.headers()))
            .flatten();
        let Some(challenge) = challenge else {
            return Ok(resp);
        };
        let _ = read_capped(resp, self.limits.max_body_bytes).await;
        let authenticate = handshake
            .answer(&challenge)
            .map_err(|e| EwsFailure::Config(e.to_string()))?;
        self.request(http, body, affinity, timeout)
            .header(AUTHORIZATION, format!("{scheme} {authenticate}"))
            .send()
            .await
            .map_err(transport)
    }

    /// Sends one request; answers with the response when its body should be decoded
    /// (200, or 500 that may carry a SOAP fault).
    async fn send(
        &self,
        body: String,
        affinity: bool,
        timeout: Option<Duration>,
        lane: Option<&reqwest::Client>,
    ) -> Result<reqwest::Response, EwsFailure> {
        if let Some(account) = &self.account
            && !account.may_try()
        {
            return Err(EwsFailure::Unauthorized);
        }
        let resp = match &self.auth {
            Auth::Basic { user, password } if self.servers.wants_ntlm(&self.url) => {
                self.send_ntlm(user, password, body, affinity, timeout, lane)
                    .await?
            }
            Auth::Basic { user, password } => {
                let resp = self
                    .request(&self.http, body.clone(), affinity, timeout)
                    .basic_auth(user, Some(password.expose()))
                    .send()
                    .await
                    .map_err(transport)?;
                if resp.status() == StatusCode::UNAUTHORIZED
                    && self
                        .servers
                        .learn_ntlm(&self.url, &crate::ntlm::offered(resp.headers()))
                {
                    tracing::info!(url = ?self.url(), "Exchange takes NTLM here, not Basic; logging in with NTLM");
                    self.send_ntlm(user, password, body, affinity, timeout, lane)
                        .await?
                } else {
                    resp
                }
            }
            Auth::Bearer(token) => self
                .request(&self.http, body, affinity, timeout)
                .bearer_auth(token.expose())
                .send()
                .await
                .map_err(transport)?,
        };
        for value in resp.headers().get_all(SET_COOKIE) {
            if let Some(v) = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix(AFFINITY_COOKIE))
                .and_then(|v| v.strip_prefix('='))
            {
                let v = v.split(';').next().unwrap_or("").trim().to_owned();
                *self.cookie.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
            }
        }
        if let Some(account) = &self.account {
            match resp.status() {
                StatusCode::UNAUTHORIZED => account.rejected(),
                // EWS answered: the login passed (a 503 may come before it).
                StatusCode::OK | StatusCode::INTERNAL_SERVER_ERROR => account.accepted(),
                _ => {}
            }
        }
        match resp.status() {
            StatusCode::OK | StatusCode::INTERNAL_SERVER_ERROR => Ok(resp),
            StatusCode::UNAUTHORIZED => Err(EwsFailure::Unauthorized),
            status if status.is_redirection() => Err(EwsFailure::Config(format!(
                "EWS answered with a redirect (HTTP {}); set ServerAddress to the EWS URL it points to",
                status.as_u16()
            ))),
            status => Err(EwsFailure::Http {
                status: status.as_u16(),
                retry_after: retry_after(resp.headers()),
            }),
        }
    }

    /// A non-streaming call: send, read the whole body, decode it. A server that refuses
    /// the request's version is asked again in the older one it takes.
    async fn call<T>(
        &self,
        build: impl Fn(&RequestHeader) -> String,
        affinity: bool,
        decode: fn(&[u8]) -> Result<T, EwsError>,
    ) -> Result<T, EwsFailure> {
        loop {
            let header = self.header();
            // Held until the answer is read, so the connection is free for the next call.
            let lane = self.lane().await;
            let resp = self
                .send(
                    build(&header),
                    affinity,
                    Some(self.limits.request_timeout),
                    lane.as_ref().map(|l| l.http),
                )
                .await?;
            let status = resp.status();
            let bytes = read_capped(resp, self.limits.max_body_bytes).await?;
            drop(lane);
            match decode_body(status, &bytes, decode) {
                Err(f) if f.code() == Some("ErrorInvalidServerVersion") => {
                    let said = response::server_version_info(&bytes);
                    let Some(next) = self.servers.refused(&self.url, header.version, said) else {
                        return Err(f);
                    };
                    tracing::info!(
                        url = ?self.url(),
                        refused = header.version.as_str(),
                        next = next.as_str(),
                        "Exchange takes an older request version; speaking it to this server"
                    );
                }
                other => return other,
            }
        }
    }

    /// Subscribes to new mail in the inbox; returns the subscription id.
    pub async fn subscribe(&self) -> Result<String, EwsFailure> {
        let build = |h: &RequestHeader| {
            ews::request::subscribe_streaming(
                h,
                &DistinguishedFolder::inbox(None),
                &[EventType::NewMail, EventType::Created],
            )
        };
        self.call(build, true, response::parse_subscribe).await
    }

    pub async fn unsubscribe(&self, subscription_id: &str) -> Result<(), EwsFailure> {
        let build = |h: &RequestHeader| ews::request::unsubscribe(h, subscription_id);
        self.call(build, true, response::parse_unsubscribe).await
    }

    /// Fetches messages with what Creatio needs; one result per id, in order.
    pub async fn get_items(
        &self,
        ids: &[&str],
    ) -> Result<Vec<Result<ews::Message, ews::ResponseError>>, EwsFailure> {
        let shape = ItemShape::full_message();
        let build = |h: &RequestHeader| ews::request::get_item(h, ids, &shape);
        let results = self.call(build, false, response::parse_get_item).await?;
        if results.len() != ids.len() {
            return Err(EwsError::Malformed(format!(
                "GetItem answered {} items for {} ids",
                results.len(),
                ids.len()
            ))
            .into());
        }
        Ok(results)
    }

    /// One page of inbox changes after `sync_state` (from the beginning when `None`).
    pub async fn sync_inbox(
        &self,
        sync_state: Option<&str>,
        max_changes: u16,
    ) -> Result<ews::SyncPage, EwsFailure> {
        let build = |h: &RequestHeader| {
            ews::request::sync_folder_items(
                h,
                &DistinguishedFolder::inbox(None),
                sync_state,
                max_changes,
            )
        };
        self.call(build, false, response::parse_sync_folder_items)
            .await
    }

    /// One page of inbox items, newest first by received time, from `offset`.
    pub async fn find_recent_items(
        &self,
        offset: u32,
        max_entries: u16,
    ) -> Result<ews::FindPage, EwsFailure> {
        let build = |h: &RequestHeader| {
            ews::request::find_recent_items(
                h,
                &DistinguishedFolder::inbox(None),
                offset,
                max_entries,
            )
        };
        self.call(build, false, response::parse_find_item).await
    }

    /// Reads the inbox folder: proves the credentials log in and reach the mailbox.
    pub async fn get_inbox(&self) -> Result<ews::Folder, EwsFailure> {
        let build =
            |h: &RequestHeader| ews::request::get_folder(h, &DistinguishedFolder::inbox(None));
        let mut folders = self.call(build, false, response::parse_get_folder).await?;
        match folders.pop() {
            Some(Ok(folder)) => Ok(folder),
            Some(Err(e)) => Err(EwsError::Response(e).into()),
            None => Err(EwsError::Malformed("GetFolder answered no folder".into()).into()),
        }
    }

    /// Opens a streaming connection for one subscription. Nothing here bounds the wait: the
    /// worker does, for the head and for each envelope.
    pub async fn open_stream(
        &self,
        subscription_id: &str,
        timeout_minutes: u8,
    ) -> Result<EventStream, EwsFailure> {
        self.open_stream_for(&[subscription_id], timeout_minutes)
            .await
    }

    /// Opens one streaming connection for several subscriptions (at most 200, all on one
    /// mailbox server).
    pub async fn open_stream_for(
        &self,
        subscription_ids: &[&str],
        timeout_minutes: u8,
    ) -> Result<EventStream, EwsFailure> {
        let body =
            ews::request::get_streaming_events(&self.header(), subscription_ids, timeout_minutes);
        let resp = self.send(body, true, None, None).await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let bytes = read_capped(resp, self.limits.max_body_bytes).await?;
            // A 500 on open is a fault; decode it for its code and back-off.
            return Err(decode_body(status, &bytes, response::parse_stream_envelope)
                .err()
                .unwrap_or(EwsFailure::Http {
                    status: status.as_u16(),
                    retry_after: None,
                }));
        }
        Ok(EventStream {
            response: resp,
            splitter: EnvelopeSplitter::new(),
            ready: VecDeque::new(),
        })
    }
}

/// The URL without user information, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Reads a whole answer, failing as soon as it passes `limit` bytes.
async fn read_capped(mut resp: reqwest::Response, limit: u64) -> Result<Bytes, EwsFailure> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(EwsFailure::TooLarge { limit });
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(EwsFailure::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Decodes a 200 or 500 body; a 500 that is not a SOAP fault is reported as HTTP 500.
fn decode_body<T>(
    status: StatusCode,
    bytes: &Bytes,
    decode: fn(&[u8]) -> Result<T, EwsError>,
) -> Result<T, EwsFailure> {
    match decode(bytes) {
        Err(EwsError::Malformed(_)) if status != StatusCode::OK => Err(EwsFailure::Http {
            status: status.as_u16(),
            retry_after: None,
        }),
        other => other.map_err(EwsFailure::from),
    }
}

/// An open `GetStreamingEvents` response, read envelope by envelope.
#[derive(Debug)]
pub struct EventStream {
    response: reqwest::Response,
    splitter: EnvelopeSplitter,
    ready: VecDeque<Vec<u8>>,
}

impl EventStream {
    /// The next message on the stream; `None` when the server ended the body cleanly. It
    /// waits as long as the server is silent.
    pub async fn next(&mut self) -> Result<Option<StreamBatch>, EwsFailure> {
        loop {
            if let Some(envelope) = self.ready.pop_front() {
                return Ok(Some(response::parse_stream_envelope(&envelope)?));
            }
            match self.response.chunk().await {
                Err(e) => return Err(transport(e)),
                Ok(None) if self.splitter.is_idle() => return Ok(None),
                Ok(None) => {
                    return Err(EwsFailure::Transport(
                        "the stream ended inside an envelope".into(),
                    ));
                }
                Ok(Some(chunk)) => self.ready.extend(self.splitter.push(&chunk)?),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_version_steps_down_per_server_and_never_below_streaming() {
        let shared = reqwest::Client::new();
        let factory: ClientFactory = Arc::new(move || shared.clone());
        let versions = Servers::new(
            ServerVersion::Exchange2013Sp1,
            EwsAuth::Auto,
            factory.clone(),
        );
        let a = "https://MAIL.contoso.local/EWS/Exchange.asmx";
        let b = "https://other.contoso.local/EWS/Exchange.asmx";
        let said = |major, minor, version: &str| {
            Some(ews::ServerVersionInfo {
                major,
                minor,
                build: 0,
                version: Some(version.into()),
            })
        };
        // The server names its version: taken, for that server only.
        assert_eq!(
            versions.refused(
                a,
                ServerVersion::Exchange2013Sp1,
                said(14, 2, "Exchange2010_SP2")
            ),
            Some(ServerVersion::Exchange2010Sp2)
        );
        assert_eq!(
            versions.for_server("https://mail.contoso.local/ews/exchange.asmx"),
            ServerVersion::Exchange2010Sp2
        );
        assert_eq!(versions.for_server(b), ServerVersion::Exchange2013Sp1);
        // A mailbox that tried the old version after another learned: the learned one.
        assert_eq!(
            versions.refused(a, ServerVersion::Exchange2013Sp1, None),
            Some(ServerVersion::Exchange2010Sp2)
        );
        // Nothing said: one step down; at the floor, nothing left to try.
        assert_eq!(
            versions.refused(b, ServerVersion::Exchange2013Sp1, None),
            Some(ServerVersion::Exchange2013)
        );
        assert_eq!(
            versions.refused(
                a,
                ServerVersion::Exchange2010Sp2,
                said(14, 0, "Exchange2010")
            ),
            None
        );
        let floor = Servers::new(ServerVersion::Exchange2010Sp1, EwsAuth::Auto, factory);
        assert_eq!(floor.refused(a, ServerVersion::Exchange2010Sp1, None), None);
        // A server naming a version no older than the one refused is not believed.
        assert_eq!(
            floor.refused(
                b,
                ServerVersion::Exchange2010Sp1,
                said(15, 1, "V2017_07_11")
            ),
            None
        );
    }

    #[test]
    fn url_from_server_address() {
        let url = |a: &str, ssl| ews_url(Some(a), ssl).unwrap();
        assert_eq!(
            url("mail.contoso.com", None),
            "https://mail.contoso.com/EWS/Exchange.asmx"
        );
        assert_eq!(
            url("mail.contoso.com:8080/", Some(false)),
            "http://mail.contoso.com:8080/EWS/Exchange.asmx"
        );
        assert_eq!(
            url("https://mail.contoso.com", None),
            "https://mail.contoso.com/EWS/Exchange.asmx"
        );
        assert_eq!(
            url("http://127.0.0.1:1/EWS/Exchange.asmx", None),
            "http://127.0.0.1:1/EWS/Exchange.asmx"
        );
        assert!(ews_url(None, None).is_err());
        assert!(ews_url(Some("  "), None).is_err());
    }

    #[test]
    fn dispositions() {
        let ews = |code: &str| {
            EwsFailure::Ews(EwsError::Response(ews::ResponseError {
                code: code.into(),
                message: String::new(),
                back_off: None,
            }))
        };
        assert_eq!(EwsFailure::Unauthorized.disposition(), Disposition::Fatal);
        assert_eq!(
            ews("ErrorInvalidSubscription").disposition(),
            Disposition::Resubscribe
        );
        assert_eq!(
            ews("ErrorNonExistentMailbox").disposition(),
            Disposition::Fatal
        );
        assert_eq!(
            ews("ErrorServerBusy").disposition(),
            Disposition::Retry { after: None }
        );
        let busy = EwsFailure::Ews(EwsError::Fault(ews::Fault {
            code: "ErrorServerBusy".into(),
            message: String::new(),
            back_off: Some(Duration::from_millis(1500)),
        }));
        assert_eq!(
            busy.disposition(),
            Disposition::Retry {
                after: Some(Duration::from_millis(1500))
            }
        );
        let unavailable = EwsFailure::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(
            unavailable.disposition(),
            Disposition::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
    }
}
