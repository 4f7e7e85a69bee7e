//! The HTTP API: Creatio's calls (`/api/listeners/*`, `/api/mailbox/*`, `/api/email/*`,
//! `/apiv2/email/send`, `/api/availability/app`), a REST view of one mailbox, and the health endpoints. Every error
//! becomes an HTTP status in one place, [`ApiError`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use crate::creatio::contract::{self, ContractError};
use crate::engine::metrics::Metrics;
use crate::engine::protocol::error_chain;
use crate::engine::protocol::{Connect, MailServer};
use crate::engine::reach::Reach;
use crate::engine::store::StoreError;
use crate::engine::supervisor::Supervisor;

/// Shared state of the API handlers.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub supervisor: Arc<Supervisor>,
    /// Reaches a mailbox's server, by its protocol.
    pub servers: Arc<dyn Connect>,
    /// The client for Creatio (as the callbacks reach it).
    pub creatio_http: reqwest::Client,
    /// Posts mail to Creatio, retried as the workers' posts are.
    pub creatio: Arc<dyn crate::creatio::delivery::Creatio>,
    /// Where Creatio's calls may send the listener.
    pub reach: Reach,
    pub metrics: Metrics,
    /// Set once the service accepts work; cleared when it shuts down.
    pub ready: Arc<AtomicBool>,
    /// Endpoints a mail server pushes to (Graph's change notifications), served beside the
    /// API under the same base path and token.
    pub push_endpoints: Vec<(&'static str, axum::routing::MethodRouter)>,
}

/// Everything a handler can fail with, mapped to a status here and only here.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    BadRequest(#[from] ContractError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Unavailable(#[from] StoreError),
    /// The mail server did not give what was asked; the sentence says why, as Validate does.
    #[error("{0}")]
    MailServer(String),
    /// Asked of a kind of mail server this listener does not serve yet.
    #[error("{0}")]
    NotImplemented(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MailServer(_) => StatusCode::BAD_GATEWAY,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// Who may call the API, and where `/metrics` is served.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The token every call but the health probes must carry: as a bearer token, or as the
    /// first path segment after the base path.
    pub token: Option<Arc<str>>,
    /// `/metrics` has an address of its own ([`metrics_router`]): not served with the API.
    pub metrics_elsewhere: bool,
}

/// The routes, at the root and, when `base_path` is set (e.g. `/exchangelistener`, the
/// original chart's `ingress.path`), under it as well: an ingress that forwards the whole path
/// reaches the same API. With a token, every route but the health probes needs it.
pub fn router(state: ApiState, base_path: &str, access: &Access) -> Router<()> {
    let base = base_path.trim_end_matches('/');
    let mut api = Router::new()
        .route("/api/listeners/status", get(status))
        .route("/api/listeners/exists", get(status))
        .route("/api/mailbox/validate", post(mailbox_validate))
        .route("/api/mailbox/folders", post(mailbox_folders))
        .route("/api/email/fetch", post(email_fetch))
        .route(
            "/apiv2/email/send",
            post(email_send).layer(DefaultBodyLimit::max(MAX_SEND_BODY)),
        )
        .route(
            "/api/email/send",
            post(email_send).layer(DefaultBodyLimit::max(MAX_SEND_BODY)),
        )
        .route("/api/email/synchronize", post(email_synchronize))
        .route("/api/availability/app", post(availability))
        .route(
            "/api/listeners/{action}",
            get(mailbox).post(action).delete(delete_mailbox),
        )
        .route("/api/listeners/{id}/dead-letters", get(dead_letters))
        .route("/api/listeners/{id}/dead-letters/replay", post(replay));
    if !access.metrics_elsewhere {
        api = api.route("/metrics", get(metrics));
    }
    for (path, endpoint) in &state.push_endpoints {
        api = api.route_service(path, endpoint.clone());
    }
    if let Some(token) = &access.token {
        // Under the token's own path segment too, for a Creatio that cannot send headers.
        let guarded = api.clone().nest(&format!("/{token}"), api);
        let (token, base) = (token.clone(), base.to_owned());
        api = guarded.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let allowed = carries_token(&req, &token, &base);
                async move {
                    if allowed {
                        next.run(req).await
                    } else {
                        (
                            StatusCode::UNAUTHORIZED,
                            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                            Json(json!({ "error": "this listener's API needs its token (--api-token-file): send it as a bearer token, or as the first path segment (.../<token>/api/...)" })),
                        )
                            .into_response()
                    }
                }
            },
        ));
    }
    let routes = api
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready));
    let routes = match base {
        "" => routes,
        base => routes.clone().nest(base, routes),
    };
    routes.with_state(state)
}

/// `/metrics` alone, for an address of its own.
pub fn metrics_router(state: ApiState) -> Router<()> {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Whether a request carries the API token: `Authorization: Bearer <token>`, or the token as
/// the first path segment (after `base`, when the path begins with it). Compared in constant
/// time.
fn carries_token(req: &axum::extract::Request, token: &str, base: &str) -> bool {
    let same = |given: &[u8]| {
        given.len() == token.len()
            && given
                .iter()
                .zip(token.as_bytes())
                .fold(0u8, |differ, (a, b)| differ | (a ^ b))
                == 0
    };
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same(given.trim().as_bytes()));
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| req.uri().path(), |o| o.0.path());
    let after_base = match path.strip_prefix(base) {
        Some(rest) if !base.is_empty() && rest.starts_with('/') => rest,
        _ => path,
    };
    let segment = after_base
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .map(|(first, _)| first);
    bearer || segment.is_some_and(|s| same(s.as_bytes()))
}

async fn status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let store = state.supervisor.store();
    let counts = store.counts().await?;
    let states = counts.states;
    Ok(Json(json!({
        "ServiceStatus": "Started",
        "Version": env!("CARGO_PKG_VERSION"),
        "Replica": state.supervisor.replica(),
        "Mailboxes": states.values().sum::<usize>(),
        "States": states,
        "Owners": counts.held,
        "Coordinator": coordinator_view(&state.metrics),
    })))
}

/// How this replica's coordinator fares, from its last pass.
fn coordinator_view(m: &crate::engine::metrics::Metrics) -> Value {
    let leases = |kind: &str| m.leases.with_label_values(&[kind]).get();
    json!({
        "LastPassMs": m.last_pass_ms.get(),
        "LastPassClaims": m.pass_claims.get(),
        "LeasesHeld": leases("held"),
        "LeasesTrusted": leases("trusted"),
        "LeasesIdle": leases("idle"),
        "LeasesLeaving": leases("leaving"),
    })
}

/// `GET /metrics`: Prometheus's text format.
async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn ready(State(state): State<ApiState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// `POST /api/listeners/{action}`: Creatio's calls, the action matched case-insensitively.
async fn action(
    State(state): State<ApiState>,
    Path(action): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    match action.to_ascii_lowercase().as_str() {
        "create" | "recreate" | "update" => {
            let list = contract::parse_credentials_list(&body)?;
            for creds in &list {
                state
                    .reach
                    .check(creds, state.servers.address(creds).as_deref())?;
            }
            let ids: Vec<String> = list.iter().map(|c| c.id.clone()).collect();
            // Recorded now, started in the background at a paced rate.
            for creds in list {
                state.supervisor.start(creds).await?;
            }
            tracing::info!(action = ?action, mailboxes = ?ids, "mailboxes recorded");
            Ok(Json(json!({})).into_response())
        }
        "close" => {
            let ids = contract::parse_ids(&body)?;
            for id in &ids {
                state.supervisor.stop(id).await?;
            }
            tracing::info!(mailboxes = ?ids, "mailboxes closed");
            Ok(Json(json!({})).into_response())
        }
        "subscriptionsstate" => {
            let ids = contract::parse_ids(&body)?;
            let answers = state.supervisor.states(&ids).await?;
            let states: Map<String, Value> = ids
                .into_iter()
                .zip(answers)
                .map(|(id, s)| (id, contract::state_entry(s)))
                .collect();
            Ok(Json(Value::Object(states)).into_response())
        }
        "validate" => mailbox_validate(State(state), body)
            .await
            .map(IntoResponse::into_response),
        _ => {
            tracing::warn!(action = ?action, body = %contract::body_shape(&body), "unknown listener call");
            Err(ApiError::NotFound(format!("unknown action {action:?}")))
        }
    }
}

/// `POST /api/mailbox/validate` (and `/api/listeners/validate`, as 7.x calls it): a real
/// login. Creatio shows `Message` on failure and the mailbox's name from `Data` on success.
async fn mailbox_validate(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let creds = contract::parse_validation(&body)?;
    state
        .reach
        .check(&creds, state.servers.address(&creds).as_deref())?;
    let (valid, message) = match state.servers.connect(&creds) {
        Ok(server) => match server.validate().await {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e.sentence()),
        },
        Err(e) => (false, e.sentence()),
    };
    tracing::info!(mailbox = %creds.sender_email, valid, "credentials validated");
    // On success `Data` carries JSON Creatio parses for the name it shows; on failure an
    // action code, which left empty is Creatio's default (troubleshooting).
    let data = if valid {
        json!({ "MailboxName": creds.sender_email }).to_string()
    } else {
        String::new()
    };
    Ok(Json(
        json!({ "IsValid": valid, "Message": message, "Data": data }),
    ))
}

/// The server of a mailbox Creatio asks something of, once its addresses are allowed and its
/// credentials name a server its protocol can reach.
fn mail_server(
    state: &ApiState,
    creds: &contract::Credentials,
) -> Result<Box<dyn MailServer>, ApiError> {
    state
        .reach
        .check(creds, state.servers.address(creds).as_deref())?;
    state
        .servers
        .connect(creds)
        .map_err(|e| ApiError::MailServer(e.to_string()))
}

/// `POST /api/mailbox/folders`: the mailbox's folders of the class asked for (every class when
/// none), for the user to choose which to synchronise: `[{Id, Name, ParentId}]`, each Id what
/// comes back in `FolderIds`, `ParentId` another listed folder's Id or empty at the top.
async fn mailbox_folders(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (creds, class) = contract::parse_folders_request(&body)?;
    let server = mail_server(&state, &creds)?;
    let found = server
        .folders()
        .await
        .map_err(|e| ApiError::MailServer(e.sentence()))?;
    let folders = contract::folder_list(found, class.as_deref());
    tracing::info!(mailbox = %creds.sender_email, class = ?class, folders = folders.len(), "folders listed");
    Ok(Json(Value::Array(folders)))
}

/// The largest send request read: a mail at Exchange Online's limit (35 MiB), its
/// attachments base64 in JSON, with room for its text.
const MAX_SEND_BODY: usize = 64 * 1024 * 1024;

/// Creatio's reading of a send's answer: an empty body is "sent", any text the error its user
/// sees.
fn send_answer(error: Option<String>) -> Response {
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        error.unwrap_or_default(),
    )
        .into_response()
}

/// `POST /apiv2/email/send` and `/api/email/send`: sends `SendCommand`'s mail through the
/// mailbox's server and keeps a copy in its Sent Items, once per Message-ID (see
/// [`crate::engine::send`]). A body that breaks the contract is a 400 naming the field; every other
/// failure is a sentence for Creatio's user.
async fn email_send(
    State(state): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Ok(send_answer(Some(format!(
                "The message is too large for the Email Listener: at most {} MiB with its attachments encoded",
                MAX_SEND_BODY >> 20
            ))));
        }
        Err(e) => return Ok(e.into_response()),
    };
    let command = contract::parse_send(&body)?;
    drop(body);
    let server = match mail_server(&state, &command.creds) {
        Ok(server) => server,
        Err(ApiError::BadRequest(e)) => return Err(e.into()),
        Err(e) => return Ok(send_answer(Some(e.to_string()))),
    };
    let store = state.supervisor.store();
    let answer =
        crate::engine::send::send_once(server.as_ref(), store.as_ref(), &state.metrics, &command)
            .await;
    Ok(send_answer(answer))
}

/// `POST /api/email/synchronize`: `SyncEmailsCommand{Credentials, Filters}` with `Filters` the
/// load-from date in .NET ticks. Asks for a history load of the open mailbox, which its worker
/// runs wherever it runs (see `worker::history`); answered at once. A load running already
/// from that moment or earlier covers the request.
async fn email_synchronize(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let (creds, load_from) = contract::parse_synchronize(&body)?;
    state
        .reach
        .check(&creds, state.servers.address(&creds).as_deref())?;
    let since = match load_from {
        contract::LoadFrom::Date(since) => since,
        contract::LoadFrom::ImapSearch(filters) => {
            return Err(ApiError::NotImplemented(format!(
                "an IMAP history filter without a date ({filters:?}) is not served yet"
            )));
        }
    };
    let Some(job) = state
        .supervisor
        .store()
        .ask_history(&creds.id, since)
        .await?
    else {
        return Err(ApiError::Conflict(format!(
            "mailbox {:?} is not open; create it before loading its history",
            creds.id
        )));
    };
    tracing::info!(
        id = ?creds.id,
        since = %crate::creatio::mail::xs_datetime(since),
        from = %crate::creatio::mail::xs_datetime(job.since_unix_ms),
        "history load asked"
    );
    Ok(Json(json!({ "History": job })))
}

/// `POST /api/email/fetch`: `SyncEmailsCommand{Credentials, Filters}` with `Filters` the
/// Message-IDs Creatio wants, joined by `;`. Answered at once; each mail found in the watched
/// folders is then posted through `ProcessFullEmail`, and one not found is logged and skipped.
async fn email_fetch(State(state): State<ApiState>, body: Bytes) -> Result<StatusCode, ApiError> {
    let (creds, message_ids) = contract::parse_fetch(&body)?;
    let server = mail_server(&state, &creds)?;
    tracing::info!(id = ?creds.id, mails = message_ids.len(), "fetching mail Creatio asked for");
    tokio::spawn(crate::engine::fetch::fetch_and_post(
        server,
        creds,
        message_ids,
        state.creatio.clone(),
    ));
    Ok(StatusCode::OK)
}

/// How long `availability/app` waits for Creatio.
const AVAILABILITY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `POST /api/availability/app`: can this listener reach the Creatio whose callback URL is
/// posted? Plain text `pong` when it can; otherwise the reason. The URL is held to the same
/// rules as every `BpmEndpoint` (never a link-local address, `--creatio-hosts`).
async fn availability(State(state): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let url = contract::parse_callback_url(&body)?;
    state.reach.check_creatio("callback URL", &url)?;
    let answer = match state
        .creatio_http
        .get(&url)
        .timeout(AVAILABILITY_TIMEOUT)
        .send()
        .await
    {
        // Any answer of Creatio's own means it is reached (a GET on a WCF operation is
        // refused, and that is Creatio refusing it); a gateway's failure means it is not.
        Ok(resp) if matches!(resp.status().as_u16(), 502..=504) => format!(
            "Creatio is not reachable from the listener: a gateway answered HTTP {}",
            resp.status().as_u16()
        ),
        Ok(_) => "pong".to_owned(),
        Err(e) if e.is_timeout() => format!(
            "Creatio is not reachable from the listener: no answer in {} s",
            AVAILABILITY_TIMEOUT.as_secs()
        ),
        Err(e) => format!(
            "Creatio is not reachable from the listener: {}",
            error_chain(&e.without_url())
        ),
    };
    if answer != "pong" {
        tracing::warn!(answer = %answer, "availability check failed");
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        answer,
    )
        .into_response())
}

/// `GET /api/listeners/{id}`: one mailbox's state, with no credentials.
async fn mailbox(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.supervisor.store();
    let (Some(status), Some(wanted)) = (store.status(&id).await?, store.wanted(&id).await?) else {
        return Err(ApiError::NotFound(format!("no mailbox {id:?}")));
    };
    Ok(Json(json!({
        "Id": id,
        "SenderEmailAddress": wanted.creds.sender_email,
        "ServerType": wanted.creds.server_type.name(),
        "BpmEndpoint": wanted.creds.bpm_endpoint,
        "SubscriptionState": state.supervisor.state(&id).await?,
        "Owner": store.owners(std::slice::from_ref(&id)).await?.pop().flatten(),
        "Status": status,
        "History": store.history(&id).await?,
    })))
}

/// `DELETE /api/listeners/{id}`: the same as Close for one mailbox.
async fn delete_mailbox(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.supervisor.stop(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no mailbox {id:?}")))
    }
}

/// `GET /api/listeners/{id}/dead-letters`: the mail Creatio never took, oldest first (kept
/// after the mailbox is closed).
async fn dead_letters(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let letters = state.supervisor.store().dead_letters(&id).await?;
    Ok(Json(json!({ "Id": id, "DeadLetters": letters })))
}

/// `POST /api/listeners/{id}/dead-letters/replay`: delivers every dead letter again.
async fn replay(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.supervisor.store().replay_dead_letters(&id).await? {
        Some(n) => {
            tracing::info!(mailbox = ?id, items = n, "dead letters handed back for delivery");
            Ok(Json(json!({ "Replaying": n })))
        }
        None => Err(ApiError::Conflict(format!(
            "mailbox {id:?} is not open; create it before replaying its dead letters"
        ))),
    }
}
