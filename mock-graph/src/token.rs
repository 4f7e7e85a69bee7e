//! The token endpoint (`POST /{tenant}/oauth2/v2.0/token`): the client-credentials grant with a
//! client secret or a client assertion (a JWT signed by the key of the app's certificate),
//! refused the way Microsoft Entra refuses it.

use std::collections::HashMap;
use tokio::time::Instant;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::state::{App, Inner, Token};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn refuse(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// Answers a token request for `tenant`; `audience` is this endpoint's URL, which a client
/// assertion must name.
pub(crate) fn issue(
    world: &mut Inner,
    tenant: &str,
    audience: &str,
    form: &HashMap<String, String>,
) -> Response {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    if field("grant_type") != "client_credentials" {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.",
        );
    }
    if field("scope") != "https://graph.microsoft.com/.default" {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "AADSTS1002012: The provided value for scope is not valid.",
        );
    }
    let client_id = field("client_id");
    if !world
        .apps
        .iter()
        .any(|a| a.tenant.eq_ignore_ascii_case(tenant))
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("AADSTS90002: Tenant '{tenant}' not found."),
        );
    }
    let Some(app) = world
        .apps
        .iter()
        .find(|a| a.tenant.eq_ignore_ascii_case(tenant) && a.client_id == client_id)
        .cloned()
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            &format!(
                "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'."
            ),
        );
    };
    let proof = if let Some(secret) = form.get("client_secret") {
        if app.secret.as_deref() == Some(secret.as_str()) {
            Ok(())
        } else {
            Err("AADSTS7000215: Invalid client secret provided.".to_owned())
        }
    } else if field("client_assertion_type") == ASSERTION_TYPE {
        check_assertion(&app, audience, field("client_assertion")).map_err(|why| {
            format!("AADSTS700027: Client assertion failed signature validation: {why}")
        })
    } else {
        Err(
            "AADSTS7000218: The request body must contain client_assertion or client_secret."
                .to_owned(),
        )
    };
    if let Err(why) = proof {
        world.stats.tokens_refused += 1;
        return refuse(StatusCode::UNAUTHORIZED, "invalid_client", &why);
    }
    let token = format!(
        "eyJ0eXAiOiJKV1QifQ.mock.{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    );
    let lifetime = world.token_lifetime;
    world.tokens.insert(
        token.clone(),
        Token {
            client_id: app.client_id.clone(),
            expires: Instant::now() + lifetime,
        },
    );
    world.stats.tokens_issued += 1;
    Json(json!({
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "ext_expires_in": lifetime.as_secs(),
        "access_token": token,
    }))
    .into_response()
}

fn b64url(part: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| "a part is not base64url".to_owned())
}

/// Checks a client assertion as Entra does: signed (RS256) by the key of the app's
/// certificate, which its `x5t#S256` names; for this endpoint; issued by and about the app;
/// not expired.
fn check_assertion(app: &App, audience: &str, jwt: &str) -> Result<(), String> {
    let pem = app
        .certificate_pem
        .as_deref()
        .ok_or("the app has no certificate")?;
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a signed JWT".into());
    };
    let header: Value = serde_json::from_slice(&b64url(h)?).map_err(|e| e.to_string())?;
    let claims: Value = serde_json::from_slice(&b64url(c)?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {} is not RS256", header["alg"]));
    }
    let thumbprint = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(cert.as_ref()));
    if header["x5t#S256"] != thumbprint.as_str() {
        return Err("x5t#S256 names no certificate of the app".into());
    }
    let end_entity = webpki::EndEntityCert::try_from(&cert).map_err(|e| e.to_string())?;
    end_entity
        .verify_signature(
            webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
            format!("{h}.{c}").as_bytes(),
            &b64url(s)?,
        )
        .map_err(|_| "the signature does not verify with the certificate's key".to_owned())?;
    if claims["aud"] != audience {
        return Err(format!("aud {} is not {audience}", claims["aud"]));
    }
    if claims["iss"] != app.client_id.as_str() || claims["sub"] != app.client_id.as_str() {
        return Err("iss and sub must be the client id".into());
    }
    let now = mock_ews::clock::now_unix();
    let exp = claims["exp"].as_i64().ok_or("no exp")?;
    if exp <= now {
        return Err("the assertion expired".into());
    }
    if claims["nbf"].as_i64().is_some_and(|nbf| nbf > now + 300) {
        return Err("the assertion is not valid yet".into());
    }
    if claims["jti"].as_str().is_none_or(str::is_empty) {
        return Err("no jti".into());
    }
    Ok(())
}
