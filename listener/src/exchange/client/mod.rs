//! The listener's EWS client: one mailbox's HTTP conversation with Exchange.
//!
//! It sends what the `ews` crate builds, with Basic or bearer auth, `X-AnchorMailbox` on
//! every request, and the affinity headers and `X-BackEndOverrideCookie` on subscription
//! requests; it decodes what comes back with the `ews` crate. [`EwsFailure::disposition`]
//! (in `failure`) is the one place that decides whether a failure is retried, needs a new
//! subscription, or is a configuration problem that fast retries cannot fix; `servers` keeps
//! what is learned of each Exchange server and its service account.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ews::response::{self, StreamBatch};
use ews::{EnvelopeSplitter, EventType, EwsError, FolderRef, ItemShape, RequestHeader};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, HeaderMap, SET_COOKIE};

use crate::creatio::contract::send::OutgoingEmail;
use crate::creatio::contract::{Credentials, Secret};
use crate::engine::backoff::retry_after;
pub use crate::engine::protocol::Limits;
use crate::exchange::service_account::ServiceAccount;

mod failure;
mod folders;
mod outgoing;
mod servers;
mod stream_connection;

use failure::transport;
pub use failure::{EwsFailure, ItemFate, error_chain, item_fate};
use servers::LaneGuard;
pub use servers::{ClientFactory, Lanes, Servers};
pub use stream_connection::StreamConnections;

const AFFINITY_COOKIE: &str = "X-BackEndOverrideCookie";

/// The EWS endpoint for `ServiceUrl`: a full URL as given (with `/EWS/Exchange.asmx` added
/// when it has no path), or a host, reached over https unless `UseSsl` is false.
pub fn ews_url(service_url: Option<&str>, use_ssl: Option<bool>) -> Result<String, EwsFailure> {
    let address = service_url
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            EwsFailure::Config("ServiceUrl is not set and autodiscover is not supported".into())
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

/// A service account's call under way: held until its answer is read.
struct Turn<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    lane: Option<LaneGuard<'a>>,
}

/// Folders asked for per FindFolder page.
const FOLDER_PAGE: u16 = 500;

/// The most folders listed for one mailbox.
const MAX_FOLDERS: usize = 10_000;

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
    /// The server's clock less this process's, as its last answer's `Date` said.
    clock: ServerClock,
}

/// How far a server's clock is ahead of this process's, from the `Date` header of its last
/// answer. The header is whole seconds, stamped before the answer travelled, so the reading
/// is never later than the server's clock: a moment moved by it never lands after the true one.
#[derive(Debug)]
struct ServerClock(std::sync::atomic::AtomicI64);

impl ServerClock {
    const UNKNOWN: i64 = i64::MIN;

    fn new() -> Self {
        ServerClock(std::sync::atomic::AtomicI64::new(Self::UNKNOWN))
    }

    fn read(&self, headers: &reqwest::header::HeaderMap) {
        let Some(date) = headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
        else {
            return;
        };
        let server_ms = match date.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i64,
            Err(_) => return,
        };
        self.0.store(
            server_ms - crate::creatio::mail::unix_now_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn offset_ms(&self) -> Option<i64> {
        let v = self.0.load(std::sync::atomic::Ordering::Relaxed);
        (v != Self::UNKNOWN).then_some(v)
    }
}

impl EwsClient {
    pub fn new(
        http: reqwest::Client,
        creds: &Credentials,
        servers: Servers,
        limits: Limits,
    ) -> Result<Self, EwsFailure> {
        let url = ews_url(creds.service_url.as_deref(), creds.use_ssl)?;
        let mut impersonate = None;
        let mut service = None;
        let auth = match (&creds.access_token, &creds.password) {
            (Some(token), _) => Auth::Bearer(token.clone()),
            (None, Some(password)) => {
                // With `UseImpersonation`, the login is the server's service account, acting
                // as the mailbox.
                if creds.uses_impersonation() {
                    impersonate = Some(creds.sender_email.clone());
                }
                Auth::Basic {
                    user: creds
                        .user_name
                        .clone()
                        .unwrap_or_else(|| creds.sender_email.clone()),
                    password: password.clone(),
                }
            }
            (None, None) => match servers.account_for(&url) {
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
                        "neither Password nor AccessToken is set, and no service account is configured for {}",
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
            clock: ServerClock::new(),
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
            clock: ServerClock::new(),
        }
    }

    /// How far the server's clock is ahead of this process's, at most, once it answered.
    pub fn clock_offset_ms(&self) -> Option<i64> {
        self.clock.offset_ms()
    }

    /// A service account's turn for one call: one of the calls it may have in flight, and
    /// with NTLM one of its shared connections; `None` for everyone else.
    async fn turn(&self) -> Option<Turn<'_>> {
        let account = self.account.as_ref()?;
        let permit = account.calls.acquire().await.ok()?;
        let lane = if self.servers.wants_ntlm(&self.url) {
            let lanes = account.lanes.get_or_init(|| {
                Arc::new(Lanes::new(
                    crate::exchange::service_account::CALLS_AT_ONCE,
                    &self.servers.lane_client,
                ))
            });
            Some(lanes.acquire().await)
        } else {
            None
        };
        Some(Turn {
            _permit: permit,
            lane,
        })
    }

    /// The service account acting as the mailbox, when one does.
    pub fn service_account(&self) -> Option<&Arc<ServiceAccount>> {
        self.account.as_ref()
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

    /// Every header of a request but the login; with `affinity`, those that keep a
    /// subscription's requests on its mailbox server.
    fn headers(&self, affinity: bool) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (CONTENT_TYPE.as_str(), "text/xml; charset=utf-8".to_owned()),
            ("X-AnchorMailbox", self.anchor.clone()),
        ];
        if affinity {
            headers.push(("X-PreferServerAffinity", "true".to_owned()));
            if let Some(cookie) = self.cookie() {
                headers.push((COOKIE.as_str(), format!("{AFFINITY_COOKIE}={cookie}")));
            }
        }
        headers
    }

    /// A request to the endpoint with every header but the login.
    fn request(
        &self,
        http: &reqwest::Client,
        body: String,
        affinity: bool,
        timeout: Option<Duration>,
    ) -> reqwest::RequestBuilder {
        let mut req = http.post(&self.url).body(body);
        for (name, value) in self.headers(affinity) {
            req = req.header(name, value);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        req
    }

    /// True when a Basic login's 401 says the server takes NTLM and not Basic: from now on
    /// every mailbox of the server logs in with NTLM.
    fn switches_to_ntlm(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let switched = status == StatusCode::UNAUTHORIZED
            && matches!(self.auth, Auth::Basic { .. })
            && self
                .servers
                .learn_ntlm(&self.url, &crate::exchange::ntlm::offered(headers));
        if switched {
            tracing::info!(url = ?self.url(), "Exchange takes NTLM here, not Basic; logging in with NTLM");
        }
        switched
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
        let Some(scheme) = crate::exchange::ntlm::scheme_asked(resp.status(), resp.headers())
        else {
            return Ok(resp);
        };
        // Read to the end, so the connection is free for the handshake's next request.
        let _ = read_capped(resp, self.limits.max_body_bytes).await;
        let (handshake, negotiate) =
            crate::exchange::ntlm::Handshake::start(user, password.expose())
                .map_err(|e| EwsFailure::Config(e.to_string()))?;
        let resp = self
            .request(http, body.clone(), affinity, timeout)
            .header(AUTHORIZATION, format!("{scheme} {negotiate}"))
            .send()
            .await
            .map_err(transport)?;
        let Some(challenge) = crate::exchange::ntlm::challenge_asked(resp.status(), resp.headers())
        else {
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
                if self.switches_to_ntlm(resp.status(), resp.headers()) {
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
        self.answered(resp.status(), resp.headers())?;
        Ok(resp)
    }

    /// What every answer teaches (the server's clock, the affinity cookie, whether the
    /// service account's login passed), and the failure its status means: `Ok` for 200, and
    /// for 500, whose body may carry a SOAP fault.
    fn answered(&self, status: StatusCode, headers: &HeaderMap) -> Result<(), EwsFailure> {
        self.clock.read(headers);
        for value in headers.get_all(SET_COOKIE) {
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
            match status {
                StatusCode::UNAUTHORIZED => account.rejected(),
                // EWS answered: the login passed (a 503 may come before it).
                StatusCode::OK | StatusCode::INTERNAL_SERVER_ERROR => account.accepted(),
                _ => {}
            }
        }
        match status {
            StatusCode::OK | StatusCode::INTERNAL_SERVER_ERROR => Ok(()),
            StatusCode::UNAUTHORIZED => Err(EwsFailure::Unauthorized),
            status if status.is_redirection() => Err(EwsFailure::Config(format!(
                "EWS answered with a redirect (HTTP {}); set ServiceUrl to the EWS URL it points to",
                status.as_u16()
            ))),
            status => Err(EwsFailure::Http {
                status: status.as_u16(),
                retry_after: retry_after(headers),
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
            let turn = self.turn().await;
            let resp = self
                .send(
                    build(&header),
                    affinity,
                    Some(self.limits.request_timeout),
                    turn.as_ref().and_then(|t| t.lane.as_ref()).map(|l| l.http),
                )
                .await?;
            let status = resp.status();
            let bytes = read_capped(resp, self.limits.max_body_bytes).await?;
            drop(turn);
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

    /// Subscribes to new mail in these folders (as [`FolderRef::named`] reads them); returns
    /// the subscription id.
    pub async fn subscribe(&self, folders: &[String]) -> Result<String, EwsFailure> {
        let folders: Vec<FolderRef> = folders.iter().map(|f| FolderRef::named(f)).collect();
        let build = |h: &RequestHeader| {
            ews::request::subscribe_streaming(
                h,
                &folders,
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
        let shape = ItemShape::full_message_with_mime();
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

    /// One page of a folder's changes after `sync_state` (from the beginning when `None`).
    pub async fn sync_folder(
        &self,
        folder: &str,
        sync_state: Option<&str>,
        max_changes: u16,
    ) -> Result<ews::SyncPage, EwsFailure> {
        let folder = FolderRef::named(folder);
        let build = |h: &RequestHeader| {
            ews::request::sync_folder_items(h, &folder, sync_state, max_changes)
        };
        self.call(build, false, response::parse_sync_folder_items)
            .await
    }

    /// One page of a folder's items, newest first by received time, from `offset`.
    pub async fn find_recent_items(
        &self,
        folder: &str,
        offset: u32,
        max_entries: u16,
    ) -> Result<ews::FindPage, EwsFailure> {
        let folder = FolderRef::named(folder);
        let build =
            |h: &RequestHeader| ews::request::find_recent_items(h, &folder, offset, max_entries);
        self.call(build, false, response::parse_find_item).await
    }

    /// One page of a folder's items received at or after `since_unix_ms` (to the second),
    /// oldest first, from `offset`.
    pub async fn find_received_since(
        &self,
        folder: &str,
        since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Result<ews::FindPage, EwsFailure> {
        let since = crate::creatio::mail::xs_datetime(since_unix_ms);
        let folder = FolderRef::named(folder);
        let build = |h: &RequestHeader| {
            ews::request::find_received_since(h, &folder, &since, offset, max_entries)
        };
        self.call(build, false, response::parse_find_item).await
    }

    /// Reads the inbox folder: proves the credentials log in and reach the mailbox.
    pub async fn get_inbox(&self) -> Result<ews::Folder, EwsFailure> {
        let build = |h: &RequestHeader| ews::request::get_folder(h, &FolderRef::inbox(None));
        let mut folders = self.call(build, false, response::parse_get_folder).await?;
        match folders.pop() {
            Some(Ok(folder)) => Ok(folder),
            Some(Err(e)) => Err(EwsError::Response(e).into()),
            None => Err(EwsError::Malformed("GetFolder answered no folder".into()).into()),
        }
    }

    /// The ids of a folder's items whose Message-ID is `message_id`, newest first.
    pub async fn find_by_message_id(
        &self,
        folder: &str,
        message_id: &str,
    ) -> Result<Vec<String>, EwsFailure> {
        let folder = FolderRef::named(folder);
        let build = |h: &RequestHeader| ews::request::find_by_message_id(h, &folder, message_id);
        let page = self.call(build, false, response::parse_find_item).await?;
        Ok(page.items.into_iter().map(|i| i.id.id).collect())
    }

    /// Sends a mail and keeps a copy in Sent Items.
    pub async fn send_mail(&self, email: &OutgoingEmail) -> Result<(), EwsFailure> {
        let message = outgoing::outgoing_message(email);
        let build = |h: &RequestHeader| {
            ews::request::send_message(h, &FolderRef::sent_items(None), &message)
        };
        self.call(build, false, response::parse_create_item).await
    }

    /// Whether Sent Items holds a mail with this Message-ID: a send that may have gone out.
    pub async fn was_sent(&self, message_id: &str) -> Result<bool, EwsFailure> {
        let found = self.find_by_message_id("sentitems", message_id).await?;
        Ok(!found.is_empty())
    }

    /// The folders a mailbox's mail is watched in: those Creatio names (`FolderIds`), or
    /// when it names none every mail folder below the top of the mailbox (the inbox first, as
    /// `inbox`; Sent Items and every subfolder), leaving out drafts, deleted items, junk mail
    /// and the outbox with theirs.
    pub async fn watched_folders(&self, asked: &[String]) -> Result<Vec<String>, EwsFailure> {
        if !asked.is_empty() {
            return Ok(asked.to_vec());
        }
        let found = self.find_folders().await?;
        let named: Vec<FolderRef> = ["inbox", "drafts", "deleteditems", "junkemail", "outbox"]
            .into_iter()
            .map(|id| FolderRef::distinguished(id, None))
            .collect();
        let build = |h: &RequestHeader| ews::request::get_folders(h, &named);
        let got = self.call(build, false, response::parse_get_folder).await?;
        let mut ids = got.into_iter().map(|r| r.ok().and_then(|f| f.folder_id));
        let inbox = ids.next().flatten();
        let unwatched: Vec<String> = ids.flatten().collect();
        Ok(folders::mail_folders(&found, inbox.as_deref(), &unwatched))
    }

    /// Every folder below the top of the mailbox, every level deep, in the server's order.
    pub async fn find_folders(&self) -> Result<Vec<ews::FoundFolder>, EwsFailure> {
        let mut folders = Vec::new();
        let mut offset = 0u32;
        loop {
            let build = |h: &RequestHeader| {
                ews::request::find_folders(h, &FolderRef::message_root(None), offset, FOLDER_PAGE)
            };
            let page = self.call(build, false, response::parse_find_folder).await?;
            let listed = page.folders.len();
            folders.extend(page.folders);
            if page.includes_last_item_in_range || listed == 0 || folders.len() >= MAX_FOLDERS {
                return Ok(folders);
            }
            offset = page
                .next_offset
                .filter(|&next| next > offset)
                .unwrap_or(offset + listed as u32);
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
        if let Some(opened) = self.open_stream_alone(&body).await {
            return opened;
        }
        let resp = self.send(body, true, None, None).await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let bytes = read_capped(resp, self.limits.max_body_bytes).await?;
            return Err(refused_open(status, &bytes));
        }
        Ok(EventStream {
            body: StreamBody::Client(resp),
            splitter: EnvelopeSplitter::new(),
            ready: VecDeque::new(),
        })
    }

    /// Opens the stream on a connection of its own; `None` where it goes through the HTTP
    /// client instead (a service account's streams are on its shared connections).
    async fn open_stream_alone(&self, body: &str) -> Option<Result<EventStream, EwsFailure>> {
        let streams = self.servers.streams.as_ref()?;
        if self.account.is_some() {
            return None;
        }
        let headers = self.headers(true);
        let mut opened = streams.post(&self.url, self.login(), &headers, body).await;
        if let Ok((head, _)) = &opened
            && self.switches_to_ntlm(head.status, &head.headers)
        {
            opened = streams.post(&self.url, self.login(), &headers, body).await;
        }
        Some(match opened {
            Ok((head, answer)) => self.stream_from(head, answer).await,
            Err(e) => Err(e),
        })
    }

    /// How a connection of its own logs in as this mailbox.
    fn login(&self) -> stream_connection::Login<'_> {
        match &self.auth {
            Auth::Basic { user, password } if self.servers.wants_ntlm(&self.url) => {
                stream_connection::Login::Ntlm {
                    user,
                    password: password.expose(),
                }
            }
            Auth::Basic { user, password } => stream_connection::Login::Basic {
                user,
                password: password.expose(),
            },
            Auth::Bearer(token) => stream_connection::Login::Bearer(token.expose()),
        }
    }

    /// The stream a connection of its own answered, or the failure its answer says.
    async fn stream_from(
        &self,
        head: stream_connection::Head,
        answer: stream_connection::Body,
    ) -> Result<EventStream, EwsFailure> {
        self.answered(head.status, &head.headers)?;
        if head.status != StatusCode::OK {
            let bytes = answer
                .read_capped(self.limits.max_body_bytes)
                .await?
                .ok_or(EwsFailure::TooLarge {
                    limit: self.limits.max_body_bytes,
                })?;
            return Err(refused_open(head.status, &bytes));
        }
        Ok(EventStream {
            body: StreamBody::Alone(Box::new(answer)),
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
async fn read_capped(resp: reqwest::Response, limit: u64) -> Result<Bytes, EwsFailure> {
    crate::engine::protocol::read_capped(resp, limit)
        .await
        .map_err(transport)?
        .ok_or(EwsFailure::TooLarge { limit })
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

/// Why a stream's opening answered `status` with `body`: a 500 is a fault, decoded for its
/// code and back-off.
fn refused_open(status: StatusCode, body: &Bytes) -> EwsFailure {
    decode_body(status, body, response::parse_stream_envelope)
        .err()
        .unwrap_or(EwsFailure::Http {
            status: status.as_u16(),
            retry_after: None,
        })
}

/// Where a stream's body comes from.
#[derive(Debug)]
enum StreamBody {
    /// Through the HTTP client (NTLM logins, service accounts).
    Client(reqwest::Response),
    /// On a connection of its own.
    Alone(Box<stream_connection::Body>),
}

impl StreamBody {
    async fn chunk(&mut self) -> Result<Option<Bytes>, EwsFailure> {
        match self {
            StreamBody::Client(resp) => resp.chunk().await.map_err(transport),
            StreamBody::Alone(body) => body.chunk().await,
        }
    }
}

/// An open `GetStreamingEvents` response, read envelope by envelope.
#[derive(Debug)]
pub struct EventStream {
    body: StreamBody,
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
            match self.body.chunk().await {
                Err(e) => return Err(e),
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
}
