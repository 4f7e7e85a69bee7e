//! The JSON control API under `/_control/`: what the library handle does, over HTTP.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::server::App;
use crate::state::{self, ControlError, Fault};

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/_control/apps", post(add_app))
        .route("/_control/users", post(add_user))
        .route("/_control/users/{upn}/folders", post(add_folder))
        .route(
            "/_control/users/{upn}/messages",
            post(deliver).get(list_messages),
        )
        .route("/_control/faults", post(add_fault).delete(clear_faults))
        .route("/_control/expire-delta", post(expire_delta))
        .route("/_control/lifecycle", post(lifecycle))
        .route("/_control/drop-notifications", post(drop_notifications))
        .route("/_control/token-lifetime", put(token_lifetime))
        .route("/_control/stats", get(stats))
        .route("/_control/requests", get(requests))
}

fn control_error(e: ControlError) -> Response {
    let status = match e {
        ControlError::NoSuchUser(_) | ControlError::NoSuchFolder(_) => StatusCode::NOT_FOUND,
        ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
    };
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

async fn add_app(State(app): State<App>, Json(new): Json<state::App>) -> Response {
    app.world.lock().apps.push(new);
    StatusCode::CREATED.into_response()
}

#[derive(Debug, Deserialize)]
struct NewUser {
    upn: String,
}

async fn add_user(State(app): State<App>, Json(new): Json<NewUser>) -> Response {
    app.world.lock().create_user(&new.upn);
    StatusCode::CREATED.into_response()
}

#[derive(Debug, Deserialize)]
struct NewFolder {
    name: String,
    parent: Option<String>,
}

async fn add_folder(
    State(app): State<App>,
    Path(upn): Path<String>,
    Json(new): Json<NewFolder>,
) -> Response {
    match app
        .world
        .lock()
        .create_folder(&upn, &new.name, new.parent.as_deref())
    {
        Ok(id) => (StatusCode::CREATED, Json(serde_json::json!({ "id": id }))).into_response(),
        Err(e) => control_error(e),
    }
}

async fn deliver(
    State(app): State<App>,
    Path(upn): Path<String>,
    Json(mail): Json<mock_ews::NewMail>,
) -> Response {
    match app.world.lock().deliver(&upn, mail) {
        Ok(d) => (StatusCode::CREATED, Json(d)).into_response(),
        Err(e) => control_error(e),
    }
}

#[derive(Debug, Deserialize)]
struct InFolder {
    folder: Option<String>,
}

async fn list_messages(
    State(app): State<App>,
    Path(upn): Path<String>,
    Query(q): Query<InFolder>,
) -> Response {
    match crate::list(&app.world.lock(), &upn, q.folder.as_deref()) {
        Ok(listed) => Json(listed).into_response(),
        Err(e) => control_error(e),
    }
}

async fn add_fault(State(app): State<App>, Json(fault): Json<Fault>) -> Response {
    app.world.lock().faults.push(fault);
    StatusCode::CREATED.into_response()
}

async fn clear_faults(State(app): State<App>) -> Response {
    app.world.lock().faults.clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn expire_delta(State(app): State<App>) -> Response {
    app.world.lock().delta_generation += 1;
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Debug, Deserialize)]
struct Lifetime {
    secs: u64,
}

async fn token_lifetime(State(app): State<App>, Json(l): Json<Lifetime>) -> Response {
    app.world.lock().token_lifetime = std::time::Duration::from_secs(l.secs.max(1));
    StatusCode::NO_CONTENT.into_response()
}

async fn stats(State(app): State<App>) -> Response {
    Json(app.world.lock().stats.clone()).into_response()
}

async fn requests(State(app): State<App>) -> Response {
    Json(app.world.lock().records.clone()).into_response()
}

#[derive(Debug, Deserialize)]
struct Lifecycle {
    event: String,
}

async fn lifecycle(State(app): State<App>, Json(l): Json<Lifecycle>) -> Response {
    app.world.lock().lifecycle(&l.event);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Debug, Deserialize)]
struct Drop {
    count: u32,
}

async fn drop_notifications(State(app): State<App>, Json(d): Json<Drop>) -> Response {
    app.world.lock().drop_notifications = d.count;
    StatusCode::NO_CONTENT.into_response()
}
