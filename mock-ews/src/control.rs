//! The JSON control API under `/_control/`: what the library handle does, over HTTP.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::faults::{Fault, Settings};
use crate::mail::{NewMail, Rate};
use crate::server::App;
use crate::state::ControlError;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/_control/mailboxes", post(create_mailbox))
        .route("/_control/mailboxes/{email}/password", put(set_password))
        .route(
            "/_control/mailboxes/{email}/messages",
            post(inject).get(list_sent),
        )
        .route("/_control/mailboxes/{email}", delete(delete_mailbox))
        .route("/_control/mailboxes/{email}/sent-items", get(list_outgoing))
        .route(
            "/_control/mailboxes/{email}/messages/batch",
            post(inject_batch),
        )
        .route("/_control/rate", post(start_rate))
        .route("/_control/stats", get(stats))
        .route("/_control/requests", get(requests))
        .route(
            "/_control/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/_control/settings", get(get_settings).put(put_settings))
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

async fn delete_mailbox(State(app): State<App>, Path(email): Path<String>) -> Response {
    match app.world.delete_mailbox(&email) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => control_error(e),
    }
}

async fn list_faults(State(app): State<App>) -> Response {
    Json(app.world.faults()).into_response()
}

async fn add_fault(State(app): State<App>, Json(fault): Json<Fault>) -> Response {
    match app.world.add_fault(fault) {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(e) => control_error(e),
    }
}

async fn clear_faults(State(app): State<App>) -> Response {
    app.world.clear_faults();
    StatusCode::NO_CONTENT.into_response()
}

async fn get_settings(State(app): State<App>) -> Response {
    Json(app.world.settings()).into_response()
}

async fn put_settings(State(app): State<App>, Json(settings): Json<Settings>) -> Response {
    if let Some(v) = &settings.server_version
        && crate::soap::version_rank(v).is_none()
    {
        let error = format!(
            "server_version {v:?} is not one of {}",
            crate::soap::VERSIONS.map(|(name, ..)| name).join(", ")
        );
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": error })),
        )
            .into_response();
    }
    app.world.set_settings(settings);
    StatusCode::NO_CONTENT.into_response()
}

async fn requests(State(app): State<App>) -> Response {
    Json(app.world.request_log()).into_response()
}

async fn list_sent(State(app): State<App>, Path(email): Path<String>) -> Response {
    match app.world.sent(&email) {
        Ok(sent) => Json(sent).into_response(),
        Err(e) => control_error(e),
    }
}

async fn list_outgoing(State(app): State<App>, Path(email): Path<String>) -> Response {
    match app.world.outgoing(&email) {
        Ok(sent) => Json(sent).into_response(),
        Err(e) => control_error(e),
    }
}

#[derive(Debug, Deserialize)]
struct Batch {
    count: u64,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    first: u64,
}

async fn inject_batch(
    State(app): State<App>,
    Path(email): Path<String>,
    Json(batch): Json<Batch>,
) -> Response {
    match crate::traffic::batch(&app.world, &email, batch.seed, batch.first, batch.count) {
        Ok(injected) => (StatusCode::CREATED, Json(injected)).into_response(),
        Err(e) => control_error(e),
    }
}

async fn start_rate(State(app): State<App>, Json(rate): Json<Rate>) -> Response {
    if let Err(reason) = rate.validate() {
        return control_error(ControlError::Invalid {
            field: "rate",
            reason,
        });
    }
    let expected = rate.expected();
    tokio::spawn(crate::traffic::at_rate(
        app.world.clone(),
        rate,
        app.shutdown.clone(),
    ));
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "expected": expected })),
    )
        .into_response()
}
