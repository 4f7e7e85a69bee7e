//! Exchange Online mailboxes through Microsoft Graph: the engine's [`MailServer`] for a
//! mailbox Creatio sends as an Exchange one (`ServiceUrl` on `outlook.office365.com`) whose
//! mail domain has an app registration (`--graph-apps`, [`apps`]). Creatio changes nothing: it
//! keeps sending the mailbox as it always has, and the listener reads it through Graph with
//! the app's application permissions instead of EWS, which Exchange Online no longer serves.
//!
//! Folders are Graph folder ids (`inbox` for the inbox); an item is a Graph message id, asked
//! for as an immutable id so that it survives moves; a folder's sync state is the path of its
//! `messages/delta` link (`changeType=created`), so catching up is following that link, and
//! a link Graph no longer knows (`410`, `SyncStateNotFound`) is a rejected cursor. Mail is
//! read as MIME (`$value`) and converted by the one MIME converter; mail is sent as MIME
//! (`sendMail`), so Creatio's Message-ID is kept.
//!
//! Watching polls each watched folder's delta link ([`watch`]): after a poll that found mail
//! the next comes after the shortest interval, and each empty one doubles it up to the
//! longest, so a busy mailbox is polled every few seconds and an idle one about once a
//! minute. With `--graph-notification-url` (the listener reachable from Microsoft), each
//! watched folder also has a change-notification subscription ([`notify`]): a notification
//! wakes the watch, which polls at once, and the polling itself slows to the longest
//! interval, a safety net for notifications Graph loses. Subscriptions live three hours and
//! are renewed whenever a watch opens with less than two left.
//!
//! Graph's limits: at most four requests of a mailbox at once; a `429` holds back every
//! mailbox of the app for its `Retry-After`.

pub mod apps;
pub mod failure;
pub mod notify;
mod watch;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::FutureExt as _;
use serde::Deserialize;

use crate::creatio::contract::send::OutgoingEmail;
use crate::creatio::contract::{Credentials, ServerType};
use crate::creatio::mail::{email_from_mime, parse_xs_datetime, xs_datetime};
use crate::engine::protocol::{
    Answer, Connect, Failure, FindPage, Folder, Found, Item, Limits, MailServer, SyncPage, Watch,
};
pub use apps::{GraphApp, GraphApps};
use failure::GraphFailure;

/// The hosts of Exchange Online's EWS, in every cloud: a mailbox Creatio sends with one of
/// these as `ServiceUrl` lives in Microsoft 365.
const EXCHANGE_ONLINE_HOSTS: [&str; 5] = [
    "outlook.office365.com",
    "outlook.office.com",
    "outlook.office365.us",
    "outlook.office365.de",
    "partner.outlook.cn",
];

/// Requests of one mailbox in flight at once, as Graph allows.
const REQUESTS_AT_ONCE: usize = 4;

/// Requests in one `$batch`, as Graph allows.
const BATCH: usize = 20;

/// Well-known folders that hold no mail to watch.
const UNWATCHED: [&str; 4] = ["drafts", "deleteditems", "junkemail", "outbox"];

/// Folders listed per page.
const FOLDER_PAGE: u16 = 100;

/// How often a watch polls: from `min` after mail came, doubling to `max` while none does.
#[derive(Debug, Clone, Copy)]
pub struct Polling {
    pub min: Duration,
    pub max: Duration,
}

/// Change notifications: where Graph reaches this listener, and the watches they wake.
#[derive(Debug, Clone)]
pub struct Push {
    /// `--graph-notification-url`.
    pub url: String,
    pub hints: Arc<notify::Hints>,
}

/// Reaches Graph for the mailboxes whose domain has an app registration.
#[derive(Debug, Clone)]
pub struct GraphConnect {
    pub http: reqwest::Client,
    pub apps: GraphApps,
    pub limits: Limits,
    pub polling: Polling,
    /// Change notifications, when Microsoft can reach the listener; polling alone otherwise.
    pub push: Option<Push>,
}

/// How long a subscription is asked to live, and when it is renewed.
const SUBSCRIPTION_LIFE_MS: i64 = 3 * 3600 * 1000;
const RENEW_WITHIN_MS: i64 = 2 * 3600 * 1000;

/// The id the worker keeps for a mailbox's subscriptions: `push:` and Graph's ids.
const PUSH_PREFIX: &str = "push:";

impl GraphConnect {
    /// The mailbox's address: `SenderEmailAddress`, else `UserName` when it is one.
    fn address(creds: &Credentials) -> &str {
        if creds.sender_email.contains('@') {
            &creds.sender_email
        } else {
            creds.user_name.as_deref().unwrap_or(&creds.sender_email)
        }
    }

    /// Whether `ServiceUrl` names Exchange Online (or nothing: autodiscovered).
    fn exchange_online(creds: &Credentials) -> bool {
        let Some(url) = creds
            .service_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        else {
            return true;
        };
        let host = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .split(['/', ':'])
            .next()
            .unwrap_or_default();
        EXCHANGE_ONLINE_HOSTS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }
}

impl Connect for GraphConnect {
    fn serves(&self, creds: &Credentials) -> bool {
        creds.server_type == ServerType::Exchange
            && Self::exchange_online(creds)
            && self.apps.for_address(Self::address(creds)).is_some()
    }

    fn connect(&self, creds: &Credentials) -> Result<Box<dyn MailServer>, Failure> {
        let user = Self::address(creds).trim().to_owned();
        let app = self.apps.for_address(&user).ok_or_else(|| {
            GraphFailure::Config(format!(
                "no app registration in --graph-apps serves the domain of {user:?}"
            ))
        })?;
        Ok(Box::new(GraphMailbox {
            shared: Arc::new(Shared {
                http: self.http.clone(),
                user_path: format!("/v1.0/users/{}", path_segment(&user)),
                user,
                app,
                limits: self.limits,
                calls: tokio::sync::Semaphore::new(REQUESTS_AT_ONCE),
            }),
            polling: self.polling,
            links: Arc::default(),
            special: tokio::sync::OnceCell::new(),
            push: self.push.as_ref().map(|p| MailboxPush {
                url: p.url.clone(),
                hint: p.hints.register(&creds.id),
                mailbox: creds.id.clone(),
                subscriptions: Mutex::default(),
            }),
        }))
    }

    /// None: `ServiceUrl` is never reached for these mailboxes, and Graph's address is the
    /// administrator's, not the call's, so `--exchange-hosts` has nothing to check.
    fn address(&self, _creds: &Credentials) -> Option<String> {
        None
    }
}

/// What a path segment escapes: all but letters, digits and `@ . - _` (an address stays
/// readable).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'@')
    .remove(b'.')
    .remove(b'-')
    .remove(b'_');

/// A path segment with what a URL path may not hold escaped.
fn path_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// A query value escaped.
fn query_value(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// An OData string literal: `it's` is `'it''s'`.
fn odata_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What one mailbox's calls share with its watch.
#[derive(Debug)]
pub(crate) struct Shared {
    http: reqwest::Client,
    /// The mailbox's address, as Graph names the user.
    user: String,
    /// `/v1.0/users/{user}`, escaped.
    user_path: String,
    app: Arc<GraphApp>,
    limits: Limits,
    /// At most [`REQUESTS_AT_ONCE`] requests in flight.
    calls: tokio::sync::Semaphore,
}

/// A request to Graph, before it is sent.
struct Request<'a> {
    method: reqwest::Method,
    /// A path (`/v1.0/…`) or a link Graph gave (absolute).
    target: &'a str,
    body: Option<(&'static str, Vec<u8>)>,
    /// `Prefer: odata.maxpagesize`.
    page_size: Option<u16>,
}

impl<'a> Request<'a> {
    fn get(target: &'a str) -> Self {
        Request {
            method: reqwest::Method::GET,
            target,
            body: None,
            page_size: None,
        }
    }

    /// A request carrying a JSON body.
    fn json(method: reqwest::Method, target: &'a str, body: &serde_json::Value) -> Self {
        Request {
            method,
            body: Some(("application/json", body.to_string().into_bytes())),
            ..Request::get(target)
        }
    }
}

/// The `Prefer` header of every request: immutable ids, and a page size where one is asked.
fn prefer(page_size: Option<u16>) -> String {
    match page_size {
        Some(n) => format!("IdType=\"ImmutableId\", odata.maxpagesize={n}"),
        None => "IdType=\"ImmutableId\"".to_owned(),
    }
}

/// Graph's error body.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl Shared {
    /// The absolute URL of a path or link.
    fn url(&self, target: &str) -> String {
        if target.starts_with("http://") || target.starts_with("https://") {
            target.to_owned()
        } else {
            format!("{}{target}", self.app.graph_url)
        }
    }

    /// A link Graph gave, as a state kept in the store: its path when it is on this app's
    /// Graph, so a changed base URL does not strand it.
    fn relative(&self, link: &str) -> String {
        link.strip_prefix(&self.app.graph_url)
            .filter(|rest| rest.starts_with('/'))
            .unwrap_or(link)
            .to_owned()
    }

    /// Sends a request and reads its answer whole; a rejected token is replaced and the
    /// request sent once more.
    async fn call(&self, request: &Request<'_>) -> Result<bytes::Bytes, GraphFailure> {
        let _permit = self
            .calls
            .acquire()
            .await
            .map_err(|_| GraphFailure::Config("the mailbox is closing".into()))?;
        let timeout = self.limits.request_timeout;
        for attempt in 0..2 {
            self.app.unthrottled().await;
            let token = self.app.token(&self.http, timeout).await?;
            let mut builder = self
                .http
                .request(request.method.clone(), self.url(request.target))
                .bearer_auth(token.expose())
                .timeout(timeout);
            builder = builder.header("prefer", prefer(request.page_size));
            if let Some((content_type, body)) = &request.body {
                builder = builder
                    .header("content-type", *content_type)
                    .body(body.clone());
            }
            let answer = builder
                .send()
                .await
                .map_err(|e| GraphFailure::Unreachable(crate::engine::protocol::error_chain(&e)))?;
            let status = answer.status().as_u16();
            let retry_after = crate::engine::backoff::retry_after(answer.headers());
            let body = read_capped(answer, self.limits.max_body_bytes).await?;
            if (200..300).contains(&status) {
                return Ok(body);
            }
            let failure = self.judge(status, serde_json::from_slice(&body).ok(), retry_after);
            if matches!(failure, GraphFailure::TokenRejected(_)) && attempt == 0 {
                self.app.forget(&token).await;
                continue;
            }
            return Err(failure);
        }
        unreachable!("the loop returns on its second pass")
    }

    /// An answer that is not a success, as a failure: a throttled one holds back every
    /// mailbox of the app.
    fn judge(
        &self,
        status: u16,
        error: Option<ErrorBody>,
        retry_after: Option<Duration>,
    ) -> GraphFailure {
        let (code, message) = match error {
            Some(e) => (e.error.code, e.error.message),
            None => (String::new(), format!("HTTP {status}")),
        };
        let failure = GraphFailure::from_answer(status, code, message, retry_after);
        if let GraphFailure::Throttled { retry_after } = &failure {
            self.app.throttled(*retry_after);
        }
        failure
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request<'_>,
    ) -> Result<T, GraphFailure> {
        let body = self.call(request).await?;
        serde_json::from_slice(&body).map_err(|e| GraphFailure::Malformed(e.to_string()))
    }

    /// One page of a folder's delta, from its link (or from the beginning).
    pub(crate) async fn delta_page(
        &self,
        folder: &str,
        link: Option<&str>,
        page_size: u16,
    ) -> Result<SyncPage, GraphFailure> {
        let first = format!(
            "{}/mailFolders/{}/messages/delta?changeType=created&$select=id,receivedDateTime",
            self.user_path,
            path_segment(folder)
        );
        let page: DeltaPage = self
            .get_json(&Request {
                page_size: Some(page_size),
                ..Request::get(link.unwrap_or(&first))
            })
            .await?;
        self.sync_page(page)
    }

    /// The next page of several folders' delta links at once, twenty to a `$batch` request:
    /// one result per link, in order. Links not on this app's Graph go alone.
    pub(crate) async fn delta_pages(
        &self,
        links: &[&str],
        page_size: u16,
    ) -> Result<Vec<Result<SyncPage, GraphFailure>>, GraphFailure> {
        let mut out = Vec::with_capacity(links.len());
        for chunk in links.chunks(BATCH) {
            let batchable = chunk.len() > 1 && chunk.iter().all(|l| l.starts_with("/v1.0/"));
            if !batchable {
                for link in chunk {
                    out.push(self.delta_page("", Some(link), page_size).await);
                }
                continue;
            }
            let prefer = prefer(Some(page_size));
            let requests: Vec<serde_json::Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, link)| {
                    serde_json::json!({
                        "id": i.to_string(),
                        "method": "GET",
                        "url": link.trim_start_matches("/v1.0"),
                        "headers": { "Prefer": prefer },
                    })
                })
                .collect();
            let answer: BatchAnswer = self
                .get_json(&Request::json(
                    reqwest::Method::POST,
                    "/v1.0/$batch",
                    &serde_json::json!({ "requests": requests }),
                ))
                .await?;
            let mut results: Vec<Option<Result<SyncPage, GraphFailure>>> =
                chunk.iter().map(|_| None).collect();
            for r in answer.responses {
                let Some(slot) = r.id.parse::<usize>().ok().and_then(|i| results.get_mut(i)) else {
                    continue;
                };
                *slot = Some(if (200..300).contains(&r.status) {
                    serde_json::from_value::<DeltaPage>(r.body)
                        .map_err(|e| GraphFailure::Malformed(e.to_string()))
                        .and_then(|page| self.sync_page(page))
                } else {
                    let retry_after = r
                        .headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                        .and_then(|(_, v)| v.as_str())
                        .and_then(|v| {
                            crate::engine::backoff::parse_retry_after(
                                v,
                                std::time::SystemTime::now(),
                            )
                        });
                    Err(self.judge(r.status, serde_json::from_value(r.body).ok(), retry_after))
                });
            }
            out.extend(results.into_iter().map(|r| {
                r.unwrap_or_else(|| {
                    Err(GraphFailure::Malformed(
                        "a $batch answer left a request out".into(),
                    ))
                })
            }));
        }
        Ok(out)
    }

    /// A delta page as the engine takes it.
    fn sync_page(&self, page: DeltaPage) -> Result<SyncPage, GraphFailure> {
        let (state, complete) = match (page.next_link, page.delta_link) {
            (Some(next), _) => (self.relative(&next), false),
            (None, Some(delta)) => (self.relative(&delta), true),
            (None, None) => {
                return Err(GraphFailure::Malformed(
                    "a delta page with neither nextLink nor deltaLink".into(),
                ));
            }
        };
        Ok(SyncPage {
            state,
            complete,
            added: page
                .value
                .into_iter()
                .filter(|m| m.removed.is_none())
                .map(|m| m.id)
                .collect(),
        })
    }
}

/// Reads a whole answer, failing as soon as it passes `limit` bytes.
async fn read_capped(answer: reqwest::Response, limit: u64) -> Result<bytes::Bytes, GraphFailure> {
    crate::engine::protocol::read_capped(answer, limit)
        .await
        .map_err(|e| GraphFailure::Unreachable(crate::engine::protocol::error_chain(&e)))?
        .ok_or(GraphFailure::TooLarge { limit })
}

#[derive(Deserialize)]
struct Translated {
    #[serde(default)]
    value: Vec<TranslatedId>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TranslatedId {
    source_id: String,
    target_id: String,
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    responses: Vec<BatchResponse>,
}

#[derive(Deserialize)]
struct BatchResponse {
    id: String,
    status: u16,
    #[serde(default)]
    headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    body: serde_json::Value,
}

#[derive(Deserialize)]
struct DeltaPage {
    #[serde(default)]
    value: Vec<DeltaEntry>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink")]
    delta_link: Option<String>,
}

#[derive(Deserialize)]
struct DeltaEntry {
    id: String,
    #[serde(rename = "@removed")]
    removed: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct FolderPage {
    #[serde(default)]
    value: Vec<GraphFolder>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GraphFolder {
    id: String,
    #[serde(default)]
    display_name: String,
    parent_folder_id: Option<String>,
    #[serde(default)]
    child_folder_count: u32,
}

#[derive(Deserialize)]
struct MessagePage {
    #[serde(default)]
    value: Vec<ListedMessage>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
    #[serde(rename = "@odata.count")]
    count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedMessage {
    id: String,
    received_date_time: Option<String>,
}

/// One Exchange Online mailbox.
#[derive(Debug)]
pub struct GraphMailbox {
    shared: Arc<Shared>,
    polling: Polling,
    /// Each watched folder's delta link, as the last sync left it: where a watch starts.
    links: Arc<Mutex<Vec<(String, String)>>>,
    /// Its change notifications, when the listener takes them.
    push: Option<MailboxPush>,
    /// The ids of its inbox and of the folders never watched, once looked up: they do not
    /// change, and every subscription would otherwise ask for them again.
    special: tokio::sync::OnceCell<SpecialFolders>,
}

/// The well-known folders that decide what is watched.
#[derive(Debug)]
struct SpecialFolders {
    inbox: Option<String>,
    unwatched: Vec<String>,
}

/// A mailbox's change notifications.
#[derive(Debug)]
struct MailboxPush {
    url: String,
    hint: Arc<notify::Hint>,
    /// The Creatio id, which the subscriptions' clientState carries.
    mailbox: String,
    /// Graph's subscription ids and when each expires (Unix ms).
    subscriptions: Mutex<Vec<(String, i64)>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionAnswer {
    id: String,
    expiration_date_time: Option<String>,
}

impl GraphMailbox {
    /// Every folder of the mailbox, the tree walked from the top.
    async fn all_folders(&self) -> Result<Vec<GraphFolder>, GraphFailure> {
        let s = &self.shared;
        let mut out: Vec<GraphFolder> = Vec::new();
        let mut pending = vec![format!(
            "{}/mailFolders?$top={FOLDER_PAGE}&$select=id,displayName,parentFolderId,childFolderCount",
            s.user_path
        )];
        // A tree is finite; the bound only guards against a server that links in a circle.
        let mut pages = 0;
        while let Some(target) = pending.pop() {
            pages += 1;
            if pages > 10_000 {
                return Err(GraphFailure::Malformed(
                    "the folder tree does not end".into(),
                ));
            }
            let page: FolderPage = s.get_json(&Request::get(&target)).await?;
            if let Some(next) = page.next_link {
                pending.push(next);
            }
            for f in page.value {
                if f.child_folder_count > 0 {
                    pending.push(format!(
                        "{}/mailFolders/{}/childFolders?$top={FOLDER_PAGE}&$select=id,displayName,parentFolderId,childFolderCount",
                        s.user_path,
                        path_segment(&f.id)
                    ));
                }
                out.push(f);
            }
        }
        Ok(out)
    }

    /// The folders Creatio names in `FolderIds`, as Graph names them. Ids Graph does not
    /// take are EWS ids Creatio kept from the days it read the mailbox through EWS: they are
    /// translated (`translateExchangeIds`); one that is neither is a configuration error.
    async fn graph_folder_ids(&self, asked: &[String]) -> Result<Vec<String>, GraphFailure> {
        let s = &self.shared;
        let mut out: Vec<Option<String>> = Vec::with_capacity(asked.len());
        let mut foreign = Vec::new();
        for id in asked {
            let target = format!(
                "{}/mailFolders/{}?$select=id",
                s.user_path,
                path_segment(id)
            );
            match s.get_json::<GraphFolder>(&Request::get(&target)).await {
                Ok(_) => out.push(Some(id.clone())),
                Err(GraphFailure::NotFound { .. })
                | Err(GraphFailure::Http { status: 400, .. }) => {
                    foreign.push(id.clone());
                    out.push(None);
                }
                Err(e) => return Err(e),
            }
        }
        if foreign.is_empty() {
            return Ok(out.into_iter().flatten().collect());
        }
        let body = serde_json::json!({
            "inputIds": foreign,
            "sourceIdType": "ewsId",
            "targetIdType": "restId",
        });
        let target = format!("{}/translateExchangeIds", s.user_path);
        let translated: Translated = match s
            .get_json(&Request::json(reqwest::Method::POST, &target, &body))
            .await
        {
            Ok(t) => t,
            Err(GraphFailure::Http { status: 400, .. }) => Translated { value: Vec::new() },
            Err(e) => return Err(e),
        };
        let mut folders = Vec::with_capacity(asked.len());
        for (id, known) in asked.iter().zip(out) {
            match known.or_else(|| {
                translated
                    .value
                    .iter()
                    .find(|t| t.source_id == *id)
                    .map(|t| t.target_id.clone())
            }) {
                Some(folder) => folders.push(folder),
                None => {
                    return Err(GraphFailure::Config(format!(
                        "FolderIds names a folder Microsoft 365 does not know ({id:?}); choose the mailbox's folders again in Creatio"
                    )));
                }
            }
        }
        tracing::info!(
            translated = foreign.len(),
            "FolderIds held EWS ids; watching the folders by their Graph ids"
        );
        Ok(folders)
    }

    /// The id of a well-known folder (`inbox`, `drafts`, …).
    async fn well_known(&self, name: &str) -> Result<Option<String>, GraphFailure> {
        let s = &self.shared;
        let target = format!("{}/mailFolders/{name}?$select=id", s.user_path);
        match s.get_json::<GraphFolder>(&Request::get(&target)).await {
            Ok(f) => Ok(Some(f.id)),
            Err(GraphFailure::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn messages(&self, target: &str) -> Result<MessagePage, GraphFailure> {
        self.shared.get_json(&Request::get(target)).await
    }

    /// A page of a folder's messages: `filter` and `order` as OData writes them.
    fn messages_target(
        &self,
        folder: &str,
        filter: Option<&str>,
        order: &str,
        offset: u32,
        top: u16,
    ) -> String {
        let mut target = format!(
            "{}/mailFolders/{}/messages?$select=id,receivedDateTime&$orderby={}&$top={top}&$skip={offset}&$count=true",
            self.shared.user_path,
            path_segment(folder),
            query_value(order)
        );
        if let Some(filter) = filter {
            target.push_str("&$filter=");
            target.push_str(&query_value(filter));
        }
        target
    }

    fn find_page(page: MessagePage, offset: u32) -> FindPage {
        let listed = page.value.len() as u32;
        FindPage {
            items: page
                .value
                .into_iter()
                .map(|m| Found {
                    received_unix_ms: m.received_date_time.as_deref().and_then(parse_xs_datetime),
                    id: m.id,
                })
                .collect(),
            next_offset: Some(offset + listed),
            complete: page.next_link.is_none(),
            total: page.count,
        }
    }

    /// A subscription for new messages in `folder`, expiring in three hours.
    async fn create_subscription(
        &self,
        push: &MailboxPush,
        folder: &str,
    ) -> Result<(String, i64), GraphFailure> {
        let s = &self.shared;
        let expires = crate::creatio::mail::unix_now_ms() + SUBSCRIPTION_LIFE_MS;
        let body = serde_json::json!({
            "changeType": "created",
            "notificationUrl": push.url,
            "lifecycleNotificationUrl": push.url,
            "resource": format!("users/{}/mailFolders('{}')/messages", s.user, folder.replace('\'', "''")),
            "expirationDateTime": xs_datetime(expires),
            "clientState": s.app.client_state(&push.mailbox),
        });
        let answer: SubscriptionAnswer = s
            .get_json(&Request::json(
                reqwest::Method::POST,
                "/v1.0/subscriptions",
                &body,
            ))
            .await?;
        let expires = answer
            .expiration_date_time
            .as_deref()
            .and_then(parse_xs_datetime)
            .unwrap_or(expires);
        Ok((answer.id, expires))
    }

    async fn delete_subscription(&self, id: &str) {
        let target = format!("/v1.0/subscriptions/{}", path_segment(id));
        match self
            .shared
            .call(&Request {
                method: reqwest::Method::DELETE,
                ..Request::get(&target)
            })
            .await
        {
            Ok(_) | Err(GraphFailure::NotFound { .. }) => {}
            Err(e) => {
                tracing::info!(error = %e, "a Graph subscription could not be deleted; it expires by itself")
            }
        }
    }

    /// Renews the subscriptions with less than two hours left.
    async fn renew_subscriptions(&self, push: &MailboxPush) -> Result<(), GraphFailure> {
        let now = crate::creatio::mail::unix_now_ms();
        let due: Vec<String> = push
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, expires)| *expires - now < RENEW_WITHIN_MS)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let expires = now + SUBSCRIPTION_LIFE_MS;
            let target = format!("/v1.0/subscriptions/{}", path_segment(&id));
            let body = serde_json::json!({ "expirationDateTime": xs_datetime(expires) });
            match self
                .shared
                .call(&Request::json(reqwest::Method::PATCH, &target, &body))
                .await
            {
                Ok(_) => {
                    let mut subs = push.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(sub) = subs.iter_mut().find(|(s, _)| *s == id) {
                        sub.1 = expires;
                    }
                }
                Err(GraphFailure::NotFound { message, .. }) => {
                    return Err(GraphFailure::SubscriptionGone(message));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn get_one(&self, id: &str) -> Result<Item, Failure> {
        let target = format!(
            "{}/messages/{}/$value",
            self.shared.user_path,
            path_segment(id)
        );
        match self.shared.call(&Request::get(&target)).await {
            Ok(mime) => Ok(Item::Mail(Box::new(email_from_mime(id, &mime)))),
            Err(GraphFailure::NotFound { .. }) => Ok(Item::Gone),
            Err(f) => Err(f.into()),
        }
    }
}

impl MailServer for GraphMailbox {
    fn url(&self) -> String {
        format!("{}{}", self.shared.app.graph_url, self.shared.user_path)
    }

    fn validate(&self) -> Answer<'_, ()> {
        async move {
            let s = &self.shared;
            let target = format!("{}/mailFolders/inbox?$select=id", s.user_path);
            s.get_json::<GraphFolder>(&Request::get(&target)).await?;
            Ok(())
        }
        .boxed()
    }

    fn folders(&self) -> Answer<'_, Vec<Folder>> {
        async move {
            let all = self.all_folders().await?;
            let ids: std::collections::HashSet<&str> = all.iter().map(|f| f.id.as_str()).collect();
            Ok(all
                .iter()
                .map(|f| Folder {
                    id: f.id.clone(),
                    name: f.display_name.clone(),
                    // A folder at the top names the (unlisted) root as its parent.
                    parent_id: f
                        .parent_folder_id
                        .clone()
                        .filter(|p| ids.contains(p.as_str())),
                    class: Some("IPF.Note".into()),
                })
                .collect())
        }
        .boxed()
    }

    fn watched_folders<'a>(&'a self, asked: &'a [String]) -> Answer<'a, Vec<String>> {
        async move {
            if !asked.is_empty() {
                return Ok(self.graph_folder_ids(asked).await?);
            }
            let all = self.all_folders().await?;
            let special = self
                .special
                .get_or_try_init(async || {
                    let mut unwatched = Vec::new();
                    for name in UNWATCHED {
                        if let Some(id) = self.well_known(name).await? {
                            unwatched.push(id);
                        }
                    }
                    Ok::<_, GraphFailure>(SpecialFolders {
                        inbox: self.well_known("inbox").await?,
                        unwatched,
                    })
                })
                .await?;
            let (inbox, unwatched) = (&special.inbox, &special.unwatched);
            let parent_of = |id: &str| {
                all.iter()
                    .find(|f| f.id == id)
                    .and_then(|f| f.parent_folder_id.as_deref())
            };
            let left_out = |id: &str| crate::engine::protocol::inside_any(id, unwatched, parent_of);
            let mut out = vec!["inbox".to_owned()];
            out.extend(
                all.iter()
                    .filter(|f| Some(&f.id) != inbox.as_ref() && !left_out(&f.id))
                    .map(|f| f.id.clone()),
            );
            Ok(out)
        }
        .boxed()
    }

    fn subscribe<'a>(&'a self, folders: &'a [String]) -> Answer<'a, String> {
        async move {
            // The folders' links come from the catch-up that follows.
            self.links
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(f, _)| folders.contains(f));
            let Some(push) = &self.push else {
                return Ok("delta".to_owned());
            };
            push.hint
                .resubscribe
                .store(false, std::sync::atomic::Ordering::Relaxed);
            let mut made: Vec<(String, i64)> = Vec::new();
            for folder in folders {
                match self.create_subscription(push, folder).await {
                    Ok(sub) => made.push(sub),
                    Err(e) => {
                        // None half-made: what was made goes back.
                        for (id, _) in &made {
                            self.delete_subscription(id).await;
                        }
                        return Err(e.into());
                    }
                }
            }
            let id = format!(
                "{PUSH_PREFIX}{}",
                made.iter()
                    .map(|(id, _)| id.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            *push.subscriptions.lock().unwrap_or_else(|p| p.into_inner()) = made;
            Ok(id)
        }
        .boxed()
    }

    fn unsubscribe<'a>(&'a self, subscription_id: &'a str) -> Answer<'a, ()> {
        async move {
            if let Some(ids) = subscription_id.strip_prefix(PUSH_PREFIX) {
                for id in ids.split(',').filter(|id| !id.is_empty()) {
                    self.delete_subscription(id).await;
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn open_watch<'a>(
        &'a self,
        _subscription_id: &'a str,
        timeout_minutes: u8,
    ) -> Answer<'a, Box<dyn Watch>> {
        async move {
            if let Some(push) = &self.push {
                self.renew_subscriptions(push).await?;
            }
            let links = self.links.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Ok(Box::new(watch::DeltaWatch::new(
                self.shared.clone(),
                links,
                self.links.clone(),
                self.polling,
                self.push.as_ref().map(|p| p.hint.clone()),
                Duration::from_secs(u64::from(timeout_minutes.max(1)) * 60),
            )) as Box<dyn Watch>)
        }
        .boxed()
    }

    fn sync_folder<'a>(
        &'a self,
        folder: &'a str,
        state: Option<&'a str>,
        max_changes: u16,
    ) -> Answer<'a, SyncPage> {
        async move {
            let page = self
                .shared
                .delta_page(folder, state.filter(|s| !s.is_empty()), max_changes)
                .await?;
            if page.complete {
                let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
                match links.iter_mut().find(|(f, _)| f == folder) {
                    Some((_, link)) => link.clone_from(&page.state),
                    None => links.push((folder.to_owned(), page.state.clone())),
                }
            }
            Ok(page)
        }
        .boxed()
    }

    fn find_recent_items<'a>(
        &'a self,
        folder: &'a str,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage> {
        async move {
            let target =
                self.messages_target(folder, None, "receivedDateTime desc", offset, max_entries);
            Ok(Self::find_page(self.messages(&target).await?, offset))
        }
        .boxed()
    }

    fn find_received_since<'a>(
        &'a self,
        folder: &'a str,
        since_unix_ms: i64,
        offset: u32,
        max_entries: u16,
    ) -> Answer<'a, FindPage> {
        async move {
            let filter = format!("receivedDateTime ge {}", xs_datetime(since_unix_ms));
            let target = self.messages_target(
                folder,
                Some(&filter),
                "receivedDateTime asc",
                offset,
                max_entries,
            );
            Ok(Self::find_page(self.messages(&target).await?, offset))
        }
        .boxed()
    }

    fn find_by_message_id<'a>(
        &'a self,
        folder: &'a str,
        message_id: &'a str,
    ) -> Answer<'a, Vec<String>> {
        async move {
            let filter = format!("internetMessageId eq {}", odata_string(message_id));
            let target =
                self.messages_target(folder, Some(&filter), "receivedDateTime desc", 0, 50);
            Ok(self
                .messages(&target)
                .await?
                .value
                .into_iter()
                .map(|m| m.id)
                .collect())
        }
        .boxed()
    }

    fn get_items<'a>(&'a self, ids: &'a [&'a str]) -> Answer<'a, Vec<Result<Item, Failure>>> {
        async move {
            // As many at once as the mailbox may have in flight; in the order asked.
            Ok(futures_util::future::join_all(ids.iter().map(|id| self.get_one(id))).await)
        }
        .boxed()
    }

    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> Answer<'a, ()> {
        async move {
            let s = &self.shared;
            let submission =
                crate::creatio::outgoing::submission(&s.user, email).map_err(|why| {
                    GraphFailure::Http {
                        status: 400,
                        code: "InvalidMail".into(),
                        message: why,
                        retry_after: None,
                    }
                })?;
            let body = base64::engine::general_purpose::STANDARD
                .encode(&submission.message)
                .into_bytes();
            let target = format!("{}/sendMail", s.user_path);
            s.call(&Request {
                method: reqwest::Method::POST,
                body: Some(("text/plain", body)),
                ..Request::get(&target)
            })
            .await?;
            Ok(())
        }
        .boxed()
    }

    fn was_sent<'a>(&'a self, message_id: &'a str) -> Answer<'a, bool> {
        async move {
            Ok(!self
                .find_by_message_id("sentitems", message_id)
                .await?
                .is_empty())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(service_url: Option<&str>, sender: &str) -> Credentials {
        let body = serde_json::json!([{
            "Id": "m1", "SenderEmailAddress": sender, "AccessToken": "t",
            "ServiceUrl": service_url, "BpmEndpoint": "http://crm/0/x/ProcessFullEmail",
        }]);
        crate::creatio::contract::parse_credentials_list(body.to_string().as_bytes())
            .unwrap()
            .remove(0)
    }

    #[test]
    fn exchange_online_mailboxes_of_a_served_domain_go_through_graph() {
        let connect = GraphConnect {
            http: reqwest::Client::new(),
            apps: GraphApps::parse(
                br#"[{"tenant": "t", "client_id": "c", "client_secret": "s", "domains": ["contoso.com"]}]"#,
                std::path::Path::new("."),
            )
            .unwrap(),
            limits: Limits {
                request_timeout: Duration::from_secs(1),
                max_body_bytes: 1 << 20,
            },
            polling: Polling {
                min: Duration::from_secs(1),
                max: Duration::from_secs(2),
            },
            push: None,
        };
        let online = "https://outlook.office365.com/EWS/Exchange.asmx";
        assert!(connect.serves(&creds(Some(online), "alice@contoso.com")));
        assert!(connect.serves(&creds(Some("outlook.office365.com"), "alice@contoso.com")));
        assert!(connect.serves(&creds(None, "alice@contoso.com")));
        // On-premises Exchange keeps EWS; another domain has no app.
        assert!(!connect.serves(&creds(
            Some("https://mail.contoso.com/EWS/Exchange.asmx"),
            "alice@contoso.com"
        )));
        assert!(!connect.serves(&creds(Some(online), "bob@fabrikam.com")));
    }

    #[test]
    fn odata_literals_and_path_segments_are_escaped() {
        assert_eq!(odata_string("<a'b@x>"), "'<a''b@x>'");
        assert_eq!(path_segment("alice@contoso.com"), "alice@contoso.com");
        assert_eq!(path_segment("AAMk/x+y="), "AAMk%2Fx%2By%3D");
    }
}
