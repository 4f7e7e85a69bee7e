//! The Graph endpoints a mail client of Exchange Online uses, answered as Graph answers them:
//! `application/json` with `value` arrays and `@odata.nextLink` / `@odata.deltaLink`, errors as
//! `{"error": {"code", "message"}}`, mail as MIME from `$value`.

use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::state::{Fault, Folder, Inner, Message, Token, User, World};

#[derive(Debug, Clone)]
pub(crate) struct App {
    pub world: Arc<World>,
    /// `http://127.0.0.1:port`, for the links it hands out.
    pub base: Arc<str>,
    /// Posts validation requests to a subscriber.
    pub http: reqwest::Client,
}

pub(crate) fn router(app: App) -> axum::Router {
    let graph = axum::Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route("/v1.0/users/{user}/mailFolders", get(top_folders))
        .route("/v1.0/users/{user}/mailFolders/{folder}", get(one_folder))
        .route(
            "/v1.0/users/{user}/mailFolders/{folder}/childFolders",
            get(child_folders),
        )
        .route(
            "/v1.0/users/{user}/mailFolders/{folder}/messages/delta",
            get(delta),
        )
        .route(
            "/v1.0/users/{user}/mailFolders/{folder}/messages",
            get(list_messages),
        )
        .route("/v1.0/users/{user}/messages/{id}/$value", get(mime))
        .route("/v1.0/users/{user}/sendMail", post(send_mail))
        .route(
            "/v1.0/users/{user}/translateExchangeIds",
            post(translate_exchange_ids),
        )
        .route("/v1.0/subscriptions", post(create_subscription))
        .route("/v1.0/$batch", post(batch))
        .route(
            "/v1.0/subscriptions/{id}",
            axum::routing::patch(renew_subscription).delete(delete_subscription),
        )
        .layer(axum::middleware::from_fn_with_state(app.clone(), traffic));
    graph.merge(crate::control::routes()).with_state(app)
}

/// A Graph error answer.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// The user a Graph path is about (`/v1.0/users/{user}/…`).
fn path_user(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1.0/users/")?;
    Some(rest.split('/').next()?.to_ascii_lowercase())
}

/// Around every Graph request: counts it, applies a pending fault, tracks how many are in
/// flight per user, and records its answer.
async fn traffic(State(app): State<App>, request: Request, next: Next) -> Response {
    let arrived = mock_ews::clock::now_unix_ms() as u64;
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let user = path_user(&path);
    let fault = {
        let mut w = app.world.lock();
        w.stats.requests += 1;
        let fault = w.take_fault();
        if fault.is_none()
            && let Some(u) = &user
        {
            let n = w.in_flight.entry(u.clone()).or_default();
            *n += 1;
            let n = *n;
            w.stats.max_in_flight_per_user = w.stats.max_in_flight_per_user.max(n);
        }
        fault
    };
    let response = match fault {
        Some(Fault::Throttle {
            retry_after_secs, ..
        }) => {
            app.world.lock().stats.throttled += 1;
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            r
        }
        Some(Fault::Unavailable { .. }) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "The service is temporarily unavailable.",
        ),
        None => {
            let r = next.run(request).await;
            if let Some(u) = &user
                && let Some(n) = app.world.lock().in_flight.get_mut(u)
            {
                *n = n.saturating_sub(1);
            }
            r
        }
    };
    app.world
        .lock()
        .record(&method, &path, response.status().as_u16(), arrived);
    response
}

async fn token(State(app): State<App>, Path(tenant): Path<String>, body: Bytes) -> Response {
    let form: HashMap<String, String> = url_form(&body);
    let audience = format!("{}/{tenant}/oauth2/v2.0/token", app.base);
    crate::token::issue(&mut app.world.lock(), &tenant, &audience, &form)
}

/// `application/x-www-form-urlencoded` fields.
fn url_form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

/// The token a request carries, when it is one this server issued and it has not expired;
/// else Graph's refusal.
fn bearer<'a>(w: &'a Inner, headers: &HeaderMap) -> Result<&'a Token, Box<Response>> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token.and_then(|t| w.tokens.get(t)) else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Access token is empty or invalid.",
        )));
    };
    if token.expires <= Instant::now() {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "Lifetime validation failed, the token is expired.",
        )));
    }
    Ok(token)
}

/// The request's bearer token checked, and the user it may read: the user, or the error
/// Graph answers.
fn authorize<'a>(w: &'a Inner, headers: &HeaderMap, upn: &str) -> Result<&'a User, Box<Response>> {
    let token = bearer(w, headers)?;
    let Ok(user) = w.user(upn) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "ErrorInvalidUser",
            &format!("The requested user '{upn}' is invalid."),
        )));
    };
    let app = w.apps.iter().find(|a| a.client_id == token.client_id);
    let allowed = app
        .and_then(|a| a.users.as_ref())
        .is_none_or(|users| users.iter().any(|u| u.eq_ignore_ascii_case(&user.upn)));
    if !allowed {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "ErrorAccessDenied",
            "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
        )));
    }
    Ok(user)
}

fn folder_json(user: &User, f: &Folder) -> Value {
    json!({
        "id": f.id,
        "displayName": f.name,
        "parentFolderId": f.parent.clone().unwrap_or_else(|| "msgfolderroot".into()),
        "childFolderCount": user.folders.iter().filter(|c| c.parent.as_deref() == Some(&f.id)).count(),
        "totalItemCount": user.messages.iter().filter(|m| m.folder == f.id).count(),
        "isHidden": false,
    })
}

fn folders_under(user: &User, parent: Option<&str>) -> Value {
    let value: Vec<Value> = user
        .folders
        .iter()
        .filter(|f| f.parent.as_deref() == parent)
        .map(|f| folder_json(user, f))
        .collect();
    json!({ "value": value })
}

fn no_folder(folder: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ErrorItemNotFound",
        &format!("The specified folder '{folder}' could not be found in the store."),
    )
}

async fn top_folders(
    State(app): State<App>,
    Path(upn): Path<String>,
    headers: HeaderMap,
) -> Response {
    let w = app.world.lock();
    match authorize(&w, &headers, &upn) {
        Ok(user) => Json(folders_under(user, None)).into_response(),
        Err(r) => *r,
    }
}

async fn one_folder(
    State(app): State<App>,
    Path((upn, folder)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let w = app.world.lock();
    let user = match authorize(&w, &headers, &upn) {
        Ok(user) => user,
        Err(r) => return *r,
    };
    match user.folder(&folder) {
        Some(f) => Json(folder_json(user, f)).into_response(),
        None => no_folder(&folder),
    }
}

async fn child_folders(
    State(app): State<App>,
    Path((upn, folder)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let w = app.world.lock();
    let user = match authorize(&w, &headers, &upn) {
        Ok(user) => user,
        Err(r) => return *r,
    };
    match user.folder(&folder) {
        Some(f) => Json(folders_under(user, Some(&f.id))).into_response(),
        None => no_folder(&folder),
    }
}

/// `Prefer: odata.maxpagesize=N`, else Graph's default for messages.
fn page_size(headers: &HeaderMap) -> usize {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix("odata.maxpagesize="))
        .find_map(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(10)
        .clamp(1, 1000)
}

fn sync_state_gone() -> Response {
    error(
        StatusCode::GONE,
        "SyncStateNotFound",
        "The sync state generation is not found, it may be expired.",
    )
}

/// `messages/delta`: a first call lists the folder's messages page by page and ends with a
/// deltaLink; a deltaLink lists the messages created since it was given.
async fn delta(
    State(app): State<App>,
    Path((upn, folder)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    delta_answer(&app, &upn, &folder, &query, &headers)
}

/// One page of a folder's delta, as [`delta`] answers it (also inside a `$batch`).
fn delta_answer(
    app: &App,
    upn: &str,
    folder: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let mut w = app.world.lock();
    w.stats.delta_requests += 1;
    let generation = w.delta_generation;
    let watermark = w.next_seq - 1;
    let user = match authorize(&w, headers, upn) {
        Ok(user) => user,
        Err(r) => return *r,
    };
    let Some(f) = user.folder(folder) else {
        return no_folder(folder);
    };
    // What this page covers: creations numbered in (from, to], from `offset` on.
    let parse = |token: &str| -> Option<Vec<u64>> {
        token
            .strip_prefix('g')?
            .split('.')
            .map(|n| n.parse().ok())
            .collect()
    };
    let (from, to, offset) = if let Some(skip) = query.get("$skiptoken") {
        match parse(skip).as_deref() {
            Some(&[g, from, to, offset]) if g == generation => (from, to, offset as usize),
            Some(&[_, _, _, _]) => return sync_state_gone(),
            _ => return error(StatusCode::BAD_REQUEST, "BadRequest", "Invalid skip token."),
        }
    } else if let Some(token) = query.get("$deltatoken") {
        match parse(token).as_deref() {
            Some(&[g, from]) if g == generation => (from, watermark, 0),
            Some(&[_, _]) => return sync_state_gone(),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "Invalid delta token.",
                );
            }
        }
    } else {
        (0, watermark, 0)
    };
    let size = page_size(headers);
    let mut listed: Vec<&Message> = user
        .messages
        .iter()
        .filter(|m| m.folder == f.id && m.seq > from && m.seq <= to)
        .collect();
    listed.sort_by_key(|m| m.seq);
    let page: Vec<Value> = listed
        .iter()
        .skip(offset)
        .take(size)
        .map(|m| {
            json!({
                "@odata.type": "#microsoft.graph.message",
                "id": m.id,
                "receivedDateTime": mock_ews::clock::xs_datetime(m.received_unix),
            })
        })
        .collect();
    let path = format!(
        "{}/v1.0/users/{upn}/mailFolders/{folder}/messages/delta",
        app.base
    );
    let mut answer = json!({ "value": page });
    if offset + size < listed.len() {
        answer["@odata.nextLink"] = json!(format!(
            "{path}?$skiptoken=g{generation}.{from}.{to}.{}",
            offset + size
        ));
    } else {
        answer["@odata.deltaLink"] = json!(format!("{path}?$deltatoken=g{generation}.{to}"));
    }
    Json(answer).into_response()
}

/// An OData string literal's value: `'it''s'` is `it's`.
fn odata_string(s: &str) -> Option<String> {
    let inner = s.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    Some(inner.replace("''", "'"))
}

/// A folder's messages, filtered (`receivedDateTime ge …`, `internetMessageId eq '…'`), ordered
/// by received time, paged by `$top` and `$skip`.
async fn list_messages(
    State(app): State<App>,
    Path((upn, folder)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let w = app.world.lock();
    let user = match authorize(&w, &headers, &upn) {
        Ok(user) => user,
        Err(r) => return *r,
    };
    let Some(f) = user.folder(&folder) else {
        return no_folder(&folder);
    };
    let filter = query.get("$filter").map(String::as_str).unwrap_or("");
    let mut since = None;
    let mut message_id = None;
    if !filter.is_empty() {
        if let Some(at) = filter.strip_prefix("receivedDateTime ge ") {
            match mock_ews::clock::parse_xs_datetime(at.trim()) {
                Some(at) => since = Some(at),
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("Invalid filter clause: {filter}"),
                    );
                }
            }
        } else if let Some(literal) = filter
            .strip_prefix("internetMessageId eq ")
            .and_then(odata_string)
        {
            message_id = Some(literal);
        } else {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("Invalid filter clause: {filter}"),
            );
        }
    }
    let mut found: Vec<&Message> = user
        .messages
        .iter()
        .filter(|m| m.folder == f.id)
        .filter(|m| since.is_none_or(|s| m.received_unix >= s))
        .filter(|m| {
            message_id
                .as_deref()
                .is_none_or(|id| m.internet_message_id == id)
        })
        .collect();
    let ascending = query
        .get("$orderby")
        .is_some_and(|o| o.trim().eq_ignore_ascii_case("receivedDateTime asc"));
    found.sort_by_key(|m| (m.received_unix, m.seq));
    if !ascending {
        found.reverse();
    }
    let top: usize = query
        .get("$top")
        .and_then(|t| t.parse().ok())
        .unwrap_or(10)
        .clamp(1, 1000);
    let skip: usize = query.get("$skip").and_then(|s| s.parse().ok()).unwrap_or(0);
    let value: Vec<Value> = found
        .iter()
        .skip(skip)
        .take(top)
        .map(|m| {
            json!({
                "id": m.id,
                "receivedDateTime": mock_ews::clock::xs_datetime(m.received_unix),
                "internetMessageId": m.internet_message_id,
                "subject": m.subject,
            })
        })
        .collect();
    let mut answer = json!({ "value": value });
    if query.get("$count").is_some_and(|c| c == "true") {
        answer["@odata.count"] = json!(found.len());
    }
    if skip + top < found.len() {
        let mut next: Vec<(String, String)> = query
            .iter()
            .filter(|(k, _)| *k != "$skip")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        next.push(("$skip".into(), (skip + top).to_string()));
        next.sort();
        let encoded: Vec<String> = next
            .iter()
            .map(|(k, v)| format!("{k}={}", percent(v)))
            .collect();
        answer["@odata.nextLink"] = json!(format!(
            "{}/v1.0/users/{upn}/mailFolders/{folder}/messages?{}",
            app.base,
            encoded.join("&")
        ));
    }
    Json(answer).into_response()
}

/// Percent-encodes what a query value may not hold as is.
fn percent(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

async fn mime(
    State(app): State<App>,
    Path((upn, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mime = {
        let mut w = app.world.lock();
        w.stats.mime_reads += 1;
        let user = match authorize(&w, &headers, &upn) {
            Ok(user) => user,
            Err(r) => return *r,
        };
        match user.messages.iter().find(|m| m.id == id) {
            Some(m) => m.mime.clone(),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                );
            }
        }
    };
    (
        [(header::CONTENT_TYPE, "text/plain")],
        Bytes::from(mime.as_ref().clone()),
    )
        .into_response()
}

/// The value of a header of a MIME text (unfolded), by name.
fn mime_header(mime: &str, name: &str) -> Option<String> {
    let head = mime.split("\r\n\r\n").next().unwrap_or(mime);
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// The addresses of an address header: what is between angle brackets, or the words with an
/// `@`.
fn addresses(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|a| {
            let a = a.trim();
            match (a.rfind('<'), a.rfind('>')) {
                (Some(l), Some(r)) if l < r => Some(a[l + 1..r].to_owned()),
                _ => a.contains('@').then(|| a.to_owned()),
            }
        })
        .collect()
}

/// `sendMail` with a MIME body (`text/plain`, base64): kept in Sent Items, delivered to the
/// recipients this server holds.
async fn send_mail(
    State(app): State<App>,
    Path(upn): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut w = app.world.lock();
    w.stats.sends += 1;
    let sender = match authorize(&w, &headers, &upn) {
        Ok(user) => user.upn.clone(),
        Err(r) => return *r,
    };
    let is_text = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !is_text {
        return error(
            StatusCode::BAD_REQUEST,
            "ErrorMimeContentInvalid",
            "This mock takes sendMail as MIME (text/plain, base64) only.",
        );
    }
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let Ok(mime) = base64::engine::general_purpose::STANDARD.decode(&compact) else {
        return error(
            StatusCode::BAD_REQUEST,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        );
    };
    let text = String::from_utf8_lossy(&mime).into_owned();
    let internet_message_id = mime_header(&text, "Message-ID")
        .unwrap_or_else(|| format!("<{:016x}@mock-graph.invalid>", fastrand::u64(..)));
    let subject = mime_header(&text, "Subject").unwrap_or_default();
    let mut recipients = Vec::new();
    for field in ["To", "Cc", "Bcc"] {
        if let Some(v) = mime_header(&text, field) {
            recipients.extend(addresses(&v));
        }
    }
    if recipients.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "ErrorInvalidRecipients",
            "At least one recipient is not valid.",
        );
    }
    let mime = Arc::new(mime);
    let now = mock_ews::clock::now_unix();
    let mut copies = vec![(sender.clone(), "sentitems")];
    copies.extend(
        recipients
            .iter()
            .filter(|r| w.user(r).is_ok())
            .map(|r| (r.clone(), "inbox")),
    );
    for (owner, folder) in copies {
        let id = w.id("M");
        let folder = w
            .user(&owner)
            .ok()
            .and_then(|u| u.folder(folder))
            .map(|f| f.id.clone())
            .unwrap_or_default();
        let _ = w.store(
            &owner,
            Message {
                id,
                folder,
                seq: 0,
                received_unix: now,
                internet_message_id: internet_message_id.clone(),
                subject: subject.clone(),
                mime: mime.clone(),
            },
        );
    }
    StatusCode::ACCEPTED.into_response()
}

/// The longest a message subscription may live: 10,080 minutes.
const MAX_SUBSCRIPTION_SECS: i64 = 10_080 * 60;

/// `users/{user}/mailFolders('{folder}')/messages` (or with `/` and an id): the user and
/// folder of a subscription's resource.
fn subscribed_folder(resource: &str) -> Option<(String, String)> {
    let rest = resource.trim_start_matches('/');
    let rest = rest
        .strip_prefix("users/")
        .or_else(|| rest.strip_prefix("Users/"))?;
    let (user, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("mailFolders")?;
    let (folder, tail) = if let Some(quoted) = rest.strip_prefix("('") {
        quoted.split_once("')")?
    } else {
        rest.strip_prefix('/')?.split_once('/')?
    };
    (tail.trim_start_matches('/') == "messages").then(|| (user.to_owned(), folder.to_owned()))
}

/// Asks a subscriber's URL to echo a validation token within 10 s, as Graph does before it
/// creates a subscription; the error says what went wrong.
async fn validate_endpoint(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let token = format!(
        "Validation: Testing client application reachability {:08x}",
        fastrand::u32(..)
    );
    let separator = if url.contains('?') { '&' } else { '?' };
    let answer = http
        .post(format!(
            "{url}{separator}validationToken={}",
            percent(&token)
        ))
        .header(header::CONTENT_TYPE, "text/plain")
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("no answer from {url}: {e}"))?;
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    if status != StatusCode::OK || body != token {
        return Err(format!(
            "{url} answered {status} without echoing the validation token"
        ));
    }
    Ok(())
}

/// `POST /subscriptions`: after the notification URL (and the lifecycle URL) echoed a
/// validation token, a subscription for new messages in one folder.
async fn create_subscription(
    State(app): State<App>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let text = |name: &str| body[name].as_str().unwrap_or_default().to_owned();
    let resource = text("resource");
    let Some((upn, folder)) = subscribed_folder(&resource) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            &format!("This mock subscribes to a folder's messages only, not {resource:?}."),
        );
    };
    let notification_url = text("notificationUrl");
    let lifecycle_url = body["lifecycleNotificationUrl"].as_str().map(str::to_owned);
    let client_state = body["clientState"].as_str().map(str::to_owned);
    let now = mock_ews::clock::now_unix();
    let expires = mock_ews::clock::parse_xs_datetime(&text("expirationDateTime"));
    let (client_id, user, folder) = {
        let w = app.world.lock();
        let user = match authorize(&w, &headers, &upn) {
            Ok(user) => user,
            Err(r) => return *r,
        };
        let Some(f) = user.folder(&folder) else {
            return no_folder(&folder);
        };
        let client_id = match bearer(&w, &headers) {
            Ok(token) => token.client_id.clone(),
            Err(r) => return *r,
        };
        (client_id, user.upn.to_ascii_lowercase(), f.id.clone())
    };
    if !text("changeType").split(',').any(|c| c.trim() == "created") {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "changeType must include created.",
        );
    }
    if client_state.as_ref().is_some_and(|c| c.len() > 128) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "clientState is longer than 128 characters.",
        );
    }
    let Some(expires) = expires.filter(|&e| e > now && e <= now + MAX_SUBSCRIPTION_SECS) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "expirationDateTime must be in the future and at most 10080 minutes away.",
        );
    };
    let mut urls = vec![notification_url.clone()];
    urls.extend(lifecycle_url.clone().filter(|u| *u != notification_url));
    for url in &urls {
        if let Err(why) = validate_endpoint(&app.http, url).await {
            app.world.lock().stats.subscriptions_refused += 1;
            return error(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                &format!("Subscription validation request failed: {why}"),
            );
        }
    }
    let mut w = app.world.lock();
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        fastrand::u16(..0x1000),
        fastrand::u64(..1 << 48)
    );
    w.subscriptions.push(crate::state::Subscription {
        id: id.clone(),
        client_id,
        user,
        folder,
        resource: resource.clone(),
        client_state: client_state.clone(),
        notification_url: notification_url.clone(),
        lifecycle_url,
        expires_unix: expires,
    });
    w.stats.subscriptions_created += 1;
    (
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "resource": resource,
            "changeType": "created",
            "clientState": client_state,
            "notificationUrl": notification_url,
            "expirationDateTime": mock_ews::clock::xs_datetime(expires),
        })),
    )
        .into_response()
}

fn no_subscription(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        &format!("The object was not found: subscription {id}."),
    )
}

async fn renew_subscription(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut w = app.world.lock();
    let client = match bearer(&w, &headers) {
        Ok(token) => token.client_id.clone(),
        Err(r) => return *r,
    };
    let now = mock_ews::clock::now_unix();
    let Some(expires) = body["expirationDateTime"]
        .as_str()
        .and_then(mock_ews::clock::parse_xs_datetime)
        .filter(|&e| e > now && e <= now + MAX_SUBSCRIPTION_SECS)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "expirationDateTime must be in the future and at most 10080 minutes away.",
        );
    };
    let Some(sub) = w
        .subscriptions
        .iter_mut()
        .find(|s| s.id == id && s.client_id == client && s.expires_unix > now)
    else {
        return no_subscription(&id);
    };
    sub.expires_unix = expires;
    let answer = json!({
        "id": sub.id,
        "resource": sub.resource,
        "expirationDateTime": mock_ews::clock::xs_datetime(expires),
    });
    w.stats.subscriptions_renewed += 1;
    Json(answer).into_response()
}

async fn delete_subscription(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut w = app.world.lock();
    let client = match bearer(&w, &headers) {
        Ok(token) => token.client_id.clone(),
        Err(r) => return *r,
    };
    let before = w.subscriptions.len();
    w.subscriptions
        .retain(|s| !(s.id == id && s.client_id == client));
    if w.subscriptions.len() == before {
        return no_subscription(&id);
    }
    w.stats.subscriptions_deleted += 1;
    StatusCode::NO_CONTENT.into_response()
}

/// The most requests one `$batch` may hold.
const BATCH_LIMIT: usize = 20;

/// `POST /$batch`: up to 20 requests in one; this mock answers GETs of a folder's delta in
/// it (each with the batch's token and its own headers), and refuses the others per request.
async fn batch(State(app): State<App>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let Some(requests) = body["requests"].as_array() else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "A $batch needs requests.",
        );
    };
    if requests.len() > BATCH_LIMIT {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "The number of batch requests exceeds the limit of 20.",
        );
    }
    let mut responses = Vec::with_capacity(requests.len());
    for r in requests {
        let id = r["id"].clone();
        let url = r["url"].as_str().unwrap_or_default();
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let query: HashMap<String, String> = url_form(query.as_bytes());
        let mut inner = HeaderMap::new();
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            inner.insert(header::AUTHORIZATION, auth.clone());
        }
        for (k, v) in r["headers"].as_object().into_iter().flatten() {
            if let (Ok(k), Some(Ok(v))) = (
                k.parse::<axum::http::HeaderName>(),
                v.as_str().map(HeaderValue::from_str),
            ) {
                inner.insert(k, v);
            }
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let answer = match (r["method"].as_str(), parts.as_slice()) {
            (Some("GET"), ["users", upn, "mailFolders", folder, "messages", "delta"]) => {
                delta_answer(&app, &url_decode(upn), &url_decode(folder), &query, &inner)
            }
            _ => error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("This mock batches a folder's delta only, not {url}."),
            ),
        };
        let status = answer.status().as_u16();
        let retry_after = answer
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        let mut response = json!({
            "id": id,
            "status": status,
            "headers": { "Content-Type": "application/json" },
            "body": serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
        });
        if let Some(after) = retry_after {
            response["headers"]["Retry-After"] = json!(after);
        }
        responses.push(response);
    }
    Json(json!({ "responses": responses })).into_response()
}

/// A path segment's percent-escapes undone.
fn url_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// `translateExchangeIds` from EWS ids to REST ids, for the user's folders and messages. In
/// this mock a thing's EWS id is its REST id behind [`crate::EWS_ID_PREFIX`].
async fn translate_exchange_ids(
    State(app): State<App>,
    Path(upn): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let w = app.world.lock();
    let user = match authorize(&w, &headers, &upn) {
        Ok(user) => user,
        Err(r) => return *r,
    };
    if body["sourceIdType"] != "ewsId"
        || !matches!(
            body["targetIdType"].as_str(),
            Some("restId" | "restImmutableEntryId")
        )
    {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "This mock translates from ewsId to restId only.",
        );
    }
    let mut value = Vec::new();
    for id in body["inputIds"].as_array().into_iter().flatten() {
        let id = id.as_str().unwrap_or_default();
        let Some(rest) = id.strip_prefix(crate::EWS_ID_PREFIX) else {
            return error(
                StatusCode::BAD_REQUEST,
                "ErrorInvalidIdMalformed",
                "Id is malformed.",
            );
        };
        let known =
            user.folders.iter().any(|f| f.id == rest) || user.messages.iter().any(|m| m.id == rest);
        if known {
            value.push(json!({ "sourceId": id, "targetId": rest }));
        }
    }
    Json(json!({ "value": value })).into_response()
}
