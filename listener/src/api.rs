//! The HTTP API: Creatio's calls under `/api/listeners/`, a REST view of one mailbox, and the
//! health endpoints. Every error becomes an HTTP status in one place, [`ApiError`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use crate::contract::{self, ContractError};
use crate::ews_client::{EwsClient, EwsFailure};
use crate::supervisor::Supervisor;

/// Shared state of the API handlers.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub supervisor: Arc<Supervisor>,
    pub http: reqwest::Client,
    pub server_version: ews::ServerVersion,
    /// How long Validate may spend logging in to EWS.
    pub validate_timeout: Duration,
    /// Set once the service accepts work; cleared when it shuts down.
    pub ready: Arc<AtomicBool>,
}

/// Everything a handler can fail with, mapped to a status here and only here.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    BadRequest(#[from] ContractError),
    #[error("{0}")]
    NotFound(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/listeners/status", get(status))
        .route(
            "/api/listeners/{action}",
            get(mailbox).post(action).delete(delete_mailbox),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

async fn status(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({
        "ServiceStatus": "Started",
        "Version": env!("CARGO_PKG_VERSION"),
        "Mailboxes": state.supervisor.registry().len(),
    }))
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
            let ids: Vec<String> = list.iter().map(|c| c.id.clone()).collect();
            for creds in list {
                state.supervisor.start(creds).await;
            }
            tracing::info!(action = %action, mailboxes = ?ids, "mailboxes started");
            Ok(Json(json!({})).into_response())
        }
        "close" => {
            let ids = contract::parse_ids(&body)?;
            for id in &ids {
                state.supervisor.stop(id).await;
            }
            tracing::info!(mailboxes = ?ids, "mailboxes closed");
            Ok(Json(json!({})).into_response())
        }
        "subscriptionsstate" => {
            let ids = contract::parse_ids(&body)?;
            let states: Map<String, Value> = ids
                .into_iter()
                .map(|id| {
                    let s = state.supervisor.state(&id);
                    (id, contract::state_entry(s))
                })
                .collect();
            Ok(Json(Value::Object(states)).into_response())
        }
        "validate" => {
            let creds = contract::parse_validation(&body)?;
            let (valid, message) = validate(&state, &creds).await;
            tracing::info!(mailbox = %creds.sender_email, valid, "credentials validated");
            Ok(Json(json!({ "IsValid": valid, "Message": message })).into_response())
        }
        _ => {
            tracing::warn!(action = %action, body = %contract::body_shape(&body), "unknown listener call");
            Err(ApiError::NotFound(format!("unknown action {action:?}")))
        }
    }
}

/// Logs in to EWS with the credentials and reads the inbox.
async fn validate(state: &ApiState, creds: &contract::Credentials) -> (bool, String) {
    let client = match EwsClient::new(
        state.http.clone(),
        creds,
        state.server_version,
        state.validate_timeout,
    ) {
        Ok(c) => c,
        Err(e) => return (false, e.to_string()),
    };
    match client.get_inbox().await {
        Ok(_) => (true, String::new()),
        Err(EwsFailure::Unauthorized) => (
            false,
            "Invalid credentials: Exchange rejected the user name or password".into(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// `GET /api/listeners/{id}`: one mailbox's state, with no credentials.
async fn mailbox(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let registry = state.supervisor.registry();
    let (Some(status), Some(creds)) = (registry.status(&id), registry.credentials(&id)) else {
        return Err(ApiError::NotFound(format!("no mailbox {id:?}")));
    };
    Ok(Json(json!({
        "Id": id,
        "SenderEmailAddress": creds.sender_email,
        "BpmEndpoint": creds.bpm_endpoint,
        "SubscriptionState": state.supervisor.state(&id),
        "Status": status,
    })))
}

/// `DELETE /api/listeners/{id}`: the same as Close for one mailbox.
async fn delete_mailbox(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.supervisor.stop(&id).await {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no mailbox {id:?}")))
    }
}
