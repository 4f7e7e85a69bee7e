//! HTTP: the EWS endpoint (Basic auth, dispatch by operation, the chunked streaming writer)
//! and the JSON control API under `/_control/`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::mail::NewMail;
use crate::soap::{self, Operation};
use crate::state::{ControlError, World};

#[derive(Debug, Clone)]
pub(crate) struct App {
    pub world: Arc<World>,
    pub config: Config,
    pub shutdown: CancellationToken,
}

pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route("/EWS/Exchange.asmx", post(ews))
        .route("/ews/exchange.asmx", post(ews))
        .route("/_control/mailboxes", post(create_mailbox))
        .route("/_control/mailboxes/{email}/password", put(set_password))
        .route("/_control/mailboxes/{email}/messages", post(inject))
        .route("/_control/stats", get(stats))
        .with_state(app)
}

fn xml(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, r#"Basic realm="mock-ews""#)],
    )
        .into_response()
}

/// The user and password of a Basic `Authorization` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

async fn ews(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return xml(
            StatusCode::INTERNAL_SERVER_ERROR,
            soap::fault("ErrorSchemaValidation", "The request is not UTF-8.", None),
        );
    };
    let request = match soap::parse_request(text) {
        Ok(r) => r,
        Err(why) => {
            app.world.count_request("Invalid");
            return xml(
                StatusCode::INTERNAL_SERVER_ERROR,
                soap::fault("ErrorSchemaValidation", &why, None),
            );
        }
    };
    let op = request.operation.name().to_owned();
    app.world.count_request(&op);
    let principal =
        match basic_credentials(&headers).and_then(|(u, p)| app.world.authenticate(&u, &p)) {
            Some(p) => p,
            None => {
                app.world.count_unauthorized();
                return unauthorized();
            }
        };
    // Impersonation: act as another existing mailbox.
    let acting = match &request.impersonate {
        Some(target) if !app.world.mailbox_exists(target) => {
            return xml(
                StatusCode::INTERNAL_SERVER_ERROR,
                soap::fault(
                    "ErrorNonExistentMailbox",
                    "The SMTP address has no mailbox associated with it.",
                    None,
                ),
            );
        }
        Some(target) => target.to_ascii_lowercase(),
        None => principal,
    };
    match request.operation {
        Operation::Subscribe {
            streaming,
            mailbox,
            event_types,
        } => {
            let target = mailbox
                .map(|m| m.to_ascii_lowercase())
                .unwrap_or_else(|| acting.clone());
            if target != acting {
                let msg = soap::error(
                    "Subscribe",
                    "ErrorSubscriptionDelegateAccessNotSupported",
                    "Delegate access is not supported by this server.",
                    "",
                );
                return xml(StatusCode::OK, soap::response("Subscribe", &msg));
            }
            let id = app.world.subscribe(&target, event_types);
            let mut inner = format!("<m:SubscriptionId>{}</m:SubscriptionId>", soap::esc(&id));
            if !streaming {
                inner.push_str("<m:Watermark>AQAAAA==</m:Watermark>");
            }
            let mut response = xml(
                StatusCode::OK,
                soap::response("Subscribe", &soap::success("Subscribe", &inner)),
            );
            // The affinity cookie, without `secure` over plain http so cookie jars send it back.
            if let Ok(v) = "X-BackEndOverrideCookie=mock-ews~1; path=/; HttpOnly".parse() {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Operation::Unsubscribe { id } => {
            let msg = if app.world.unsubscribe(&acting, &id) {
                soap::success("Unsubscribe", "")
            } else {
                soap::error(
                    "Unsubscribe",
                    "ErrorSubscriptionNotFound",
                    "The specified subscription was not found.",
                    "",
                )
            };
            xml(StatusCode::OK, soap::response("Unsubscribe", &msg))
        }
        Operation::GetItem { ids, shape } => {
            let mut messages = String::new();
            for item in app.world.items(&acting, &ids) {
                messages.push_str(&match item {
                    Some(item) => soap::success(
                        "GetItem",
                        &format!(
                            "<m:Items>{}</m:Items>",
                            soap::message(&acting, &item, &shape)
                        ),
                    ),
                    None => soap::error(
                        "GetItem",
                        "ErrorItemNotFound",
                        "The specified object was not found in the store.",
                        "<m:Items/>",
                    ),
                });
            }
            xml(StatusCode::OK, soap::response("GetItem", &messages))
        }
        Operation::GetFolder { folders } => {
            let mut messages = String::new();
            for (id, mailbox) in folders {
                let mailbox = mailbox
                    .map(|m| m.to_ascii_lowercase())
                    .unwrap_or_else(|| acting.clone());
                messages.push_str(&match id.as_str() {
                    "inbox" | "root" if mailbox == acting => {
                        soap::success("GetFolder", &folder_xml(&app.world, &mailbox, &id))
                    }
                    "inbox" | "root" => {
                        soap::error("GetFolder", "ErrorAccessDenied", "Access is denied.", "")
                    }
                    _ => soap::error(
                        "GetFolder",
                        "ErrorFolderNotFound",
                        "The specified folder could not be found in the store.",
                        "",
                    ),
                });
            }
            xml(StatusCode::OK, soap::response("GetFolder", &messages))
        }
        Operation::SyncFolderItems {
            folder: (folder, mailbox),
            state,
            max_changes,
        } => {
            let mailbox = mailbox
                .map(|m| m.to_ascii_lowercase())
                .unwrap_or_else(|| acting.clone());
            let msg = if mailbox != acting {
                soap::error(
                    "SyncFolderItems",
                    "ErrorAccessDenied",
                    "Access is denied.",
                    "",
                )
            } else if folder != "inbox" && folder != crate::state::inbox_id(&mailbox) {
                soap::error(
                    "SyncFolderItems",
                    "ErrorFolderNotFound",
                    "The specified folder could not be found in the store.",
                    "",
                )
            } else {
                match app.world.sync(&mailbox, state.as_deref(), max_changes) {
                    Some(page) => soap::success("SyncFolderItems", &soap::sync_page(&page)),
                    None => soap::error(
                        "SyncFolderItems",
                        "ErrorInvalidSyncStateData",
                        "Synchronization state data is corrupt or otherwise invalid.",
                        "",
                    ),
                }
            };
            xml(StatusCode::OK, soap::response("SyncFolderItems", &msg))
        }
        Operation::GetStreamingEvents {
            ids,
            timeout_minutes,
        } => stream(app, acting, ids, timeout_minutes),
        Operation::Unsupported(name) => xml(
            StatusCode::INTERNAL_SERVER_ERROR,
            soap::fault(
                "ErrorInvalidOperation",
                &format!("The operation {name} is not supported by mock-ews."),
                None,
            ),
        ),
    }
}

fn folder_xml(world: &World, mailbox: &str, which: &str) -> String {
    let (id, parent, name) = if which == "inbox" {
        (
            crate::state::inbox_id(mailbox),
            crate::state::root_id(mailbox),
            "Inbox",
        )
    } else {
        (
            crate::state::root_id(mailbox),
            crate::state::root_id(mailbox),
            "Top of Information Store",
        )
    };
    let total = if which == "inbox" {
        world.item_count(mailbox)
    } else {
        0
    };
    format!(
        concat!(
            r#"<m:Folders><t:Folder><t:FolderId Id="{id}" ChangeKey="AQAAAA=="/><t:ParentFolderId Id="{parent}" ChangeKey="AQAAAA=="/>"#,
            "<t:FolderClass>IPF.Note</t:FolderClass><t:DisplayName>{name}</t:DisplayName><t:TotalCount>{total}</t:TotalCount>",
            "<t:ChildFolderCount>0</t:ChildFolderCount><t:UnreadCount>{total}</t:UnreadCount></t:Folder></m:Folders>"
        ),
        id = soap::esc(&id),
        parent = soap::esc(&parent),
        name = name,
        total = total
    )
}

/// Answers GetStreamingEvents with a chunked body that a writer task fills until the
/// connection times out, the client goes away, or the server shuts down.
fn stream(app: App, acting: String, ids: Vec<String>, timeout_minutes: u64) -> Response {
    let chunked = |body: Body| {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    };
    let unknown = app.world.unknown_subscriptions(&acting, &ids);
    if ids.is_empty()
        || ids.len() > 200
        || !(1..=30).contains(&timeout_minutes)
        || !unknown.is_empty()
    {
        let body = if unknown.is_empty() {
            soap::response(
                "GetStreamingEvents",
                &soap::error(
                    "GetStreamingEvents",
                    "ErrorInvalidArgument",
                    "Between 1 and 200 subscription ids and a ConnectionTimeout of 1 to 30 minutes are required.",
                    "<m:ConnectionStatus>Closed</m:ConnectionStatus>",
                ),
            )
        } else {
            soap::stream_error(
                "ErrorSubscriptionNotFound",
                "The specified subscription was not found.",
                &unknown,
            )
        };
        return chunked(Body::from(format!("{}{body}", soap::XML_DECL)));
    }
    let mut lifetime = Duration::from_secs(timeout_minutes * 60);
    if let Some(cap) = app.config.max_connection_time {
        lifetime = lifetime.min(cap);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(write_stream(app, acting, ids, lifetime, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    chunked(Body::from_stream(body))
}

/// Releases a connection's subscriptions however its writer ends.
struct Attached {
    world: Arc<World>,
    ids: Vec<String>,
    waker: Arc<Notify>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.world.detach(&self.ids, &self.waker);
    }
}

async fn write_stream(
    app: App,
    acting: String,
    ids: Vec<String>,
    lifetime: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    let waker = Arc::new(Notify::new());
    app.world.attach(&ids, &waker);
    let attached = Attached {
        world: app.world.clone(),
        ids,
        waker,
    };
    let send = |s: String| {
        let tx = tx.clone();
        async move { tx.send(Bytes::from(s)).await.is_ok() }
    };
    if !send(format!("{}{}", soap::XML_DECL, soap::stream_status(false))).await {
        return;
    }
    let deadline = tokio::time::sleep(lifetime);
    tokio::pin!(deadline);
    let period = app.config.keepalive;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = attached.waker.notified() => {
                let (batches, gone) = attached.world.drain(&attached.ids);
                if !batches.is_empty() && !send(soap::stream_notifications(&acting, &batches)).await {
                    return;
                }
                if !gone.is_empty() {
                    let _ = send(soap::stream_error("ErrorSubscriptionNotFound", "The specified subscription was not found.", &gone)).await;
                    return;
                }
            }
            _ = keepalive.tick() => {
                if !send(soap::stream_status(false)).await {
                    return;
                }
            }
            _ = &mut deadline => break,
            _ = app.shutdown.cancelled() => break,
            _ = tx.closed() => return,
        }
    }
    let _ = send(soap::stream_status(true)).await;
}

#[derive(Debug, Deserialize)]
struct NewMailbox {
    email: String,
    password: String,
}

#[derive(Debug, Deserialize)]
struct NewPassword {
    password: String,
}

fn control_error(e: ControlError) -> Response {
    let status = match e {
        ControlError::NoSuchMailbox(_) => StatusCode::NOT_FOUND,
        ControlError::MailboxExists(_) => StatusCode::CONFLICT,
        ControlError::Invalid { .. } => StatusCode::BAD_REQUEST,
    };
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

async fn create_mailbox(State(app): State<App>, Json(req): Json<NewMailbox>) -> Response {
    match app.world.create_mailbox(&req.email, &req.password) {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(e) => control_error(e),
    }
}

async fn set_password(
    State(app): State<App>,
    Path(email): Path<String>,
    Json(req): Json<NewPassword>,
) -> Response {
    match app.world.set_password(&email, &req.password) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => control_error(e),
    }
}

async fn inject(
    State(app): State<App>,
    Path(email): Path<String>,
    Json(mail): Json<NewMail>,
) -> Response {
    match app.world.inject(&email, mail) {
        Ok(injected) => (StatusCode::CREATED, Json(injected)).into_response(),
        Err(e) => control_error(e),
    }
}

async fn stats(State(app): State<App>) -> Response {
    Json(app.world.stats()).into_response()
}
