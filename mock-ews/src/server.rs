//! HTTP: the EWS endpoint (Basic auth, impersonation, dispatch by operation) and the routes
//! of the JSON control API under `/_control/`.

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::faults::FaultKind;
use crate::soap::{self, Operation};
use crate::state::World;
use crate::{control, ops, streaming};

#[derive(Debug, Clone)]
pub(crate) struct App {
    pub world: Arc<World>,
    pub config: Config,
    pub shutdown: CancellationToken,
    /// NTLM's per-connection state.
    pub ntlm: Arc<crate::ntlm::Connections>,
}

pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route("/EWS/Exchange.asmx", post(ews))
        .route("/ews/exchange.asmx", post(ews))
        .merge(control::routes())
        .with_state(app)
}

/// Applies the request faults armed for this mailbox and operation: latency first, then the
/// first failure, if any.
async fn request_faults(world: &World, mailbox: &str, op: &str) -> Option<Response> {
    if let Some((FaultKind::Latency { ms }, _)) =
        world.take_fault(mailbox, op, |k| matches!(k, FaultKind::Latency { .. }))
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let failing = |k: &FaultKind| {
        matches!(
            k,
            FaultKind::ServerBusy { .. }
                | FaultKind::Unauthorized
                | FaultKind::Unavailable { .. }
                | FaultKind::SoapFault { .. }
        )
    };
    match world.take_fault(mailbox, op, failing)?.0 {
        FaultKind::ServerBusy { back_off_ms } => Some(xml(
            StatusCode::INTERNAL_SERVER_ERROR,
            soap::fault(
                "ErrorServerBusy",
                "The server cannot service this request right now. Try again later.",
                Some(back_off_ms),
            ),
        )),
        FaultKind::Unauthorized => {
            world.count_unauthorized();
            Some(unauthorized())
        }
        FaultKind::SoapFault { code } => Some(xml(
            StatusCode::INTERNAL_SERVER_ERROR,
            soap::fault(&soap::esc(&code), "A fault injected into mock-ews.", None),
        )),
        FaultKind::Unavailable { retry_after_secs } => {
            let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
            if let Some(v) = retry_after_secs.and_then(|s| s.to_string().parse().ok()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Some(response)
        }
        _ => None,
    }
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
    challenge(Logins::Basic)
}

/// Which ways to log in a 401 offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Logins {
    Basic,
    Ntlm,
    /// NTLM inside `Negotiate` only, as where the NTLM provider is off and Negotiate on.
    Negotiate,
    Both,
}

impl Logins {
    fn of(settings: &crate::Settings) -> Logins {
        match settings.auth.as_deref() {
            Some("ntlm") => Logins::Ntlm,
            Some("negotiate") => Logins::Negotiate,
            Some("both") => Logins::Both,
            _ => Logins::Basic,
        }
    }

    /// Whether Basic may log this user in.
    fn basic_for(self, user: &str, settings: &crate::Settings) -> bool {
        let user = user.rsplit('\\').next().unwrap_or(user);
        match self {
            Logins::Basic => true,
            Logins::Ntlm | Logins::Negotiate => false,
            Logins::Both => !settings
                .ntlm_only
                .iter()
                .any(|m| m.eq_ignore_ascii_case(user)),
        }
    }
}

/// A 401 offering `logins`, as IIS sends it: NTLM (and Negotiate) first, Basic last.
fn challenge(logins: Logins) -> Response {
    let mut response = StatusCode::UNAUTHORIZED.into_response();
    let headers = response.headers_mut();
    if logins != Logins::Basic {
        headers.append(
            header::WWW_AUTHENTICATE,
            "Negotiate".parse().expect("a header value"),
        );
    }
    if matches!(logins, Logins::Ntlm | Logins::Both) {
        headers.append(
            header::WWW_AUTHENTICATE,
            "NTLM".parse().expect("a header value"),
        );
    }
    if matches!(logins, Logins::Basic | Logins::Both) {
        headers.append(
            header::WWW_AUTHENTICATE,
            r#"Basic realm="mock-ews""#.parse().expect("a header value"),
        );
    }
    response
}

/// The scheme and token of an `Authorization: NTLM …` (or `Negotiate` carrying raw NTLM)
/// header.
fn ntlm_token(headers: &HeaderMap) -> Option<(&str, &str)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let raw_ntlm = token.trim_start().starts_with("TlRMTVNTUA");
    (scheme.eq_ignore_ascii_case("ntlm") || (scheme.eq_ignore_ascii_case("negotiate") && raw_ntlm))
        .then_some((scheme, token))
}

/// Who the request acts as, by Basic or by NTLM on its connection; else the response that
/// asks it to log in (or continues the handshake).
fn principal(
    app: &App,
    connection: crate::ntlm::ConnectionId,
    headers: &HeaderMap,
) -> Result<String, Box<Response>> {
    let settings = app.world.settings();
    let logins = Logins::of(&settings);
    if let Some((scheme, token)) = ntlm_token(headers) {
        // Only the schemes a 401 offered are taken.
        let negotiate = scheme.eq_ignore_ascii_case("negotiate");
        if logins == Logins::Basic || (logins == Logins::Negotiate && !negotiate) {
            return Err(Box::new(challenge(logins)));
        }
        let world = app.world.clone();
        return match app.ntlm.step(connection, token, |user, domain| {
            world.password_of(user, domain)
        }) {
            crate::ntlm::Step::Challenge(c) => {
                let mut response = StatusCode::UNAUTHORIZED.into_response();
                let value = format!("{scheme} {c}").parse().expect("a header value");
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
                Err(Box::new(response))
            }
            crate::ntlm::Step::Authenticated(user) => Ok(user),
            crate::ntlm::Step::Refused => Err(Box::new(challenge(logins))),
        };
    }
    if let Some((user, password)) = basic_credentials(headers) {
        if !logins.basic_for(&user, &settings) {
            return Err(Box::new(challenge(logins)));
        }
        return app
            .world
            .authenticate(&user, &password)
            .ok_or_else(|| Box::new(challenge(logins)));
    }
    // No credentials: a connection NTLM authenticated acts as its user.
    app.ntlm
        .user(connection)
        .ok_or_else(|| Box::new(challenge(logins)))
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

async fn ews(
    State(app): State<App>,
    Extension(connection): Extension<crate::ntlm::ConnectionId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = tokio::time::Instant::now();
    let (operation, mailbox, response) = handle(app.clone(), connection, headers, body).await;
    app.world
        .record(&operation, &mailbox, response.status().as_u16(), at);
    response
}

/// Answers one request; also names its operation and acting mailbox for the request log.
async fn handle(
    app: App,
    connection: crate::ntlm::ConnectionId,
    headers: HeaderMap,
    body: Bytes,
) -> (String, String, Response) {
    // IIS authenticates before Exchange reads the body: bad credentials get 401 whatever the
    // envelope holds.
    let principal = principal(&app, connection, &headers);
    let (principal, refusal) = match principal {
        Ok(p) => (Some(p), None),
        Err(r) => (None, Some(*r)),
    };
    let request = match std::str::from_utf8(&body)
        .map_err(|_| "The request is not UTF-8.".to_owned())
        .and_then(soap::parse_request)
    {
        Ok(r) => r,
        Err(_) if principal.is_none() => {
            app.world.count_request("Invalid");
            app.world.count_unauthorized();
            return (
                "Invalid".into(),
                String::new(),
                refusal.unwrap_or_else(unauthorized),
            );
        }
        Err(why) => {
            app.world.count_request("Invalid");
            let fault = soap::fault("ErrorSchemaValidation", &why, None);
            return (
                "Invalid".into(),
                String::new(),
                xml(StatusCode::INTERNAL_SERVER_ERROR, fault),
            );
        }
    };
    let op = request.operation.name().to_owned();
    app.world.count_request(&op);
    let Some(principal) = principal else {
        app.world.count_unauthorized();
        return (op, String::new(), refusal.unwrap_or_else(unauthorized));
    };
    // Impersonation: act as another existing mailbox, with the ApplicationImpersonation role.
    let may_impersonate = || {
        app.world
            .settings()
            .impersonators
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&principal))
    };
    let acting = match &request.impersonate {
        Some(target) if !target.eq_ignore_ascii_case(&principal) && !may_impersonate() => {
            let fault = soap::fault(
                "ErrorImpersonateUserDenied",
                "The account does not have permission to impersonate the requested user.",
                None,
            );
            return (op, principal, xml(StatusCode::INTERNAL_SERVER_ERROR, fault));
        }
        Some(target) if !app.world.mailbox_exists(target) => {
            let fault = soap::fault(
                "ErrorNonExistentMailbox",
                "The SMTP address has no mailbox associated with it.",
                None,
            );
            return (op, principal, xml(StatusCode::INTERNAL_SERVER_ERROR, fault));
        }
        Some(target) => target.to_ascii_lowercase(),
        None => principal.clone(),
    };
    // An older server refuses a request claiming a newer version than its own.
    let older = app.world.settings().server_version;
    if let Some(server) = &older {
        let claimed = request.version.as_deref().unwrap_or("Exchange2007_SP1");
        if soap::version_rank(claimed).unwrap_or(0) > soap::version_rank(server).unwrap_or(0) {
            let fault = soap::invalid_server_version(server);
            return (op, acting, xml(StatusCode::INTERNAL_SERVER_ERROR, fault));
        }
    }
    // A stream is a hanging connection, counted apart; every other call in flight counts
    // against its account while it is answered.
    let in_flight = match op.as_str() {
        "GetStreamingEvents" => None,
        _ => match app.world.begin_call(&principal) {
            Some(call) => Some(call),
            None => {
                let fault = soap::fault(
                    "ErrorExceededConnectionCount",
                    "You have exceeded the available concurrent connections for your account.",
                    None,
                );
                return (op, acting, xml(StatusCode::INTERNAL_SERVER_ERROR, fault));
            }
        },
    };
    let response = match request_faults(&app.world, &acting, &op).await {
        Some(response) => response,
        None => dispatch(app, &principal, &acting, &headers, request.operation),
    };
    drop(in_flight);
    let response = match &older {
        Some(server) if op != "GetStreamingEvents" => as_version(response, server).await,
        _ => response,
    };
    (op, acting, response)
}

/// Rewrites a whole answer to carry an older server's `ServerVersionInfo`.
async fn as_version(response: Response, server: &str) -> Response {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => {
            let text = soap::as_version(&String::from_utf8_lossy(&bytes), server);
            Response::from_parts(parts, axum::body::Body::from(text))
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The mailbox server a request reaches: the one its affinity cookie names, else its
/// `X-AnchorMailbox`'s, else the acting mailbox's; `None` when there is only one.
fn backend(app: &App, headers: &HeaderMap, acting: &str) -> Option<String> {
    if !app.world.has_backends() {
        return None;
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("X-BackEndOverrideCookie="))
        .chain(
            headers
                .get("X-BackEndOverrideCookie")
                .and_then(|v| v.to_str().ok()),
        )
        .map(|v| v.split('~').next().unwrap_or(v).trim().to_owned())
        .find(|v| !v.is_empty());
    let anchor = headers
        .get("X-AnchorMailbox")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(acting);
    Some(cookie.unwrap_or_else(|| app.world.backend_of(anchor)))
}

fn dispatch(
    app: App,
    principal: &str,
    acting: &str,
    headers: &HeaderMap,
    operation: Operation,
) -> Response {
    match operation {
        Operation::Subscribe {
            streaming,
            mailbox,
            folders,
            event_types,
        } => ops::subscribe(
            &app.world,
            (principal, acting),
            streaming,
            (mailbox, folders),
            event_types,
        ),
        Operation::Unsubscribe { id } => ops::unsubscribe(&app.world, principal, &id),
        Operation::GetItem { ids, shape } => {
            match app.world.take_fault(acting, "GetItem", |k| {
                matches!(k, FaultKind::ItemError { .. })
            }) {
                Some((FaultKind::ItemError { code }, _)) => ops::get_item_failing(&ids, &code),
                _ => ops::get_item(&app.world, acting, &ids, &shape),
            }
        }
        Operation::GetFolder { folders } => ops::get_folder(&app.world, acting, folders),
        Operation::SyncFolderItems {
            folder: (folder, mailbox),
            state,
            max_changes,
        } => {
            let rejected = state.is_some()
                && app
                    .world
                    .take_fault(acting, "SyncFolderItems", |k| {
                        *k == FaultKind::InvalidSyncState
                    })
                    .is_some();
            if rejected {
                ops::invalid_sync_state()
            } else {
                ops::sync_folder_items(
                    &app.world,
                    acting,
                    &folder,
                    mailbox,
                    state.as_deref(),
                    max_changes,
                )
            }
        }
        Operation::FindItem {
            folder,
            shape,
            offset,
            max_entries,
            query,
        } => ops::find_item(
            &app.world,
            acting,
            folder,
            &shape,
            (offset, max_entries),
            &query,
        ),
        Operation::FindFolder {
            folder,
            deep,
            offset,
            max_entries,
        } => ops::find_folder(acting, folder, deep, offset, max_entries),
        Operation::ConvertId { ids } => ops::convert_id(ids),
        Operation::CreateItem {
            disposition,
            message,
        } => ops::create_item(&app.world, acting, &disposition, message),
        Operation::GetStreamingEvents {
            ids,
            timeout_minutes,
        } => {
            let backend = backend(&app, headers, acting);
            streaming::stream(
                app,
                principal,
                acting.to_owned(),
                backend,
                ids,
                timeout_minutes,
            )
        }
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
