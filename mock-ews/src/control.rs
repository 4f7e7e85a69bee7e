//! The JSON control API under `/_control/`: what the library handle does, over HTTP.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::mail::NewMail;
use crate::server::App;
use crate::state::ControlError;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/_control/mailboxes", post(create_mailbox))
        .route("/_control/mailboxes/{email}/password", put(set_password))
        .route("/_control/mailboxes/{email}/messages", post(inject))
        .route("/_control/stats", get(stats))
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
