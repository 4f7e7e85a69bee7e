//! HTTP: the EWS endpoint (Basic auth, impersonation, dispatch by operation) and the routes
//! of the JSON control API under `/_control/`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::soap::{self, Operation};
use crate::state::World;
use crate::{control, ops, streaming};

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
        .merge(control::routes())
        .with_state(app)
}

pub(crate) fn xml(status: StatusCode, body: String) -> Response {
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
        } => ops::subscribe(&app.world, &acting, streaming, mailbox, event_types),
        Operation::Unsubscribe { id } => ops::unsubscribe(&app.world, &acting, &id),
        Operation::GetItem { ids, shape } => ops::get_item(&app.world, &acting, &ids, &shape),
        Operation::GetFolder { folders } => ops::get_folder(&app.world, &acting, folders),
        Operation::SyncFolderItems {
            folder: (folder, mailbox),
            state,
            max_changes,
        } => ops::sync_folder_items(
            &app.world,
            &acting,
            &folder,
            mailbox,
            state.as_deref(),
            max_changes,
        ),
        Operation::GetStreamingEvents {
            ids,
            timeout_minutes,
        } => streaming::stream(app, acting, ids, timeout_minutes),
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
