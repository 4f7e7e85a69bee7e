//! App registrations: per Microsoft 365 tenant, the app that reads its mailboxes through Graph
//! with application permissions, and the mail domains it serves.
//!
//! They come from a JSON file (`--graph-apps`), typically a mounted Kubernetes Secret:
//!
//! ```json
//! [{"tenant": "contoso.onmicrosoft.com", "client_id": "…", "domains": ["contoso.com"],
//!   "certificate": "contoso.crt", "private_key": "contoso.key"}]
//! ```
//!
//! An app proves itself with a client secret (`client_secret`) or, preferred, a certificate
//! and its private key (PEM files, relative to the apps file): the listener signs a client
//! assertion with the key. Tokens come from the client-credentials flow, are kept until five
//! minutes before they expire, and never reach a log. `authority` and `graph` point a national
//! cloud (or a test's mock) elsewhere.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use sha2::Digest as _;
use tokio::time::Instant;

use super::failure::{GraphFailure, THROTTLE_PAUSE};
use crate::creatio::contract::Secret;

/// A token is renewed when less than this is left of it.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// The bytes of a clientState's MAC (144 bits, 24 characters).
const STATE_MAC_BYTES: usize = 18;

/// How long a client assertion is valid.
const ASSERTION_LIFETIME_SECS: i64 = 600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    tenant: String,
    client_id: String,
    #[serde(default)]
    client_secret: Option<String>,
    #[serde(default)]
    certificate: Option<std::path::PathBuf>,
    #[serde(default)]
    private_key: Option<std::path::PathBuf>,
    domains: Vec<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    graph: Option<String>,
}

/// How an app proves who it is.
enum Proof {
    Secret(Secret),
    /// A certificate's SHA-256 thumbprint (base64url) and the key that signs assertions.
    Certificate {
        thumbprint: String,
        key: Arc<dyn rustls::sign::SigningKey>,
    },
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proof::Secret(_) => f.write_str("Secret(***)"),
            Proof::Certificate { thumbprint, .. } => {
                write!(f, "Certificate {{ thumbprint: {thumbprint} }}")
            }
        }
    }
}

/// One app registration.
#[derive(Debug)]
pub struct GraphApp {
    pub tenant: String,
    pub client_id: String,
    proof: Proof,
    /// Mail domains it serves, in lower case.
    domains: Vec<String>,
    /// The token endpoint.
    token_url: String,
    /// Graph's base URL, without a trailing slash (`https://graph.microsoft.com`).
    pub graph_url: String,
    token: tokio::sync::Mutex<Option<(Secret, Instant)>>,
    /// Until when Graph asked this app to hold back (429 with `Retry-After`).
    throttled_until: Mutex<Option<Instant>>,
    /// The key of the `clientState` its subscriptions carry: derived from its secret or
    /// its private key, so every replica with the same apps file has it and nobody else.
    state_key: [u8; 32],
}

fn read_pem(base: &Path, file: &Path, what: &str) -> Result<Vec<u8>, String> {
    let path = base.join(file);
    std::fs::read(&path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl GraphApp {
    fn from_entry(entry: Entry, base: &Path) -> Result<GraphApp, String> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let named = format!("app {} of tenant {}", entry.client_id, entry.tenant);
        if entry.tenant.trim().is_empty() || entry.client_id.trim().is_empty() {
            return Err("every app needs a tenant and a client_id".into());
        }
        if entry.domains.is_empty() {
            return Err(format!("{named}: domains is empty"));
        }
        let proof = match (entry.client_secret, entry.certificate, entry.private_key) {
            (None, Some(cert), Some(key)) => {
                let cert = CertificateDer::from_pem_slice(&read_pem(base, &cert, "certificate")?)
                    .map_err(|e| format!("{named}: the certificate is not PEM: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(&read_pem(base, &key, "private_key")?)
                    .map_err(|e| format!("{named}: the private key is not PEM: {e}"))?;
                let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
                    .map_err(|e| format!("{named}: the private key cannot sign: {e}"))?;
                if key
                    .choose_scheme(&[rustls::SignatureScheme::RSA_PKCS1_SHA256])
                    .is_none()
                {
                    return Err(format!(
                        "{named}: the private key is not an RSA key (Microsoft Entra takes RS256 assertions)"
                    ));
                }
                Proof::Certificate {
                    thumbprint: base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(sha2::Sha256::digest(cert.as_ref())),
                    key,
                }
            }
            (Some(secret), None, None) if !secret.is_empty() => Proof::Secret(Secret::new(secret)),
            _ => {
                return Err(format!(
                    "{named}: give either client_secret, or certificate and private_key"
                ));
            }
        };
        let trimmed = |s: Option<String>, default: &str| {
            s.unwrap_or_else(|| default.to_owned())
                .trim_end_matches('/')
                .to_owned()
        };
        let authority = trimmed(entry.authority, "https://login.microsoftonline.com");
        let graph_url = trimmed(entry.graph, "https://graph.microsoft.com");
        for (name, url) in [("authority", &authority), ("graph", &graph_url)] {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(format!("{named}: {name} {url:?} is not an http(s) URL"));
            }
        }
        let state_key =
            state_key(&proof).map_err(|e| format!("{named}: deriving the clientState key: {e}"))?;
        Ok(GraphApp {
            state_key,
            token_url: format!("{authority}/{}/oauth2/v2.0/token", entry.tenant),
            tenant: entry.tenant,
            client_id: entry.client_id,
            proof,
            domains: entry
                .domains
                .iter()
                .map(|d| d.trim().trim_start_matches('@').to_ascii_lowercase())
                .collect(),
            graph_url,
            token: tokio::sync::Mutex::new(None),
            throttled_until: Mutex::new(None),
        })
    }

    /// The `clientState` of a subscription for `mailbox`: the mailbox's id and a MAC of it
    /// under the app's state key, so a notification names its mailbox and proves it came
    /// from a subscription this listener made (at most 128 characters, as Graph allows).
    pub(super) fn client_state(&self, mailbox: &str) -> String {
        format!("{mailbox}.{}", self.state_mac(mailbox))
    }

    fn state_mac(&self, mailbox: &str) -> String {
        use hmac::Mac as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(&self.state_hmac(mailbox).finalize().into_bytes()[..STATE_MAC_BYTES])
    }

    /// The MAC of a mailbox id under the state key, before it is finished.
    fn state_hmac(&self, mailbox: &str) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac as _;
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.state_key).expect("any key length");
        mac.update(mailbox.as_bytes());
        mac
    }

    /// Whether it serves mail addressed to `address`.
    fn serves(&self, address: &str) -> bool {
        let Some((_, domain)) = address.trim().rsplit_once('@') else {
            return false;
        };
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// A token for Graph: the one kept, or a new one when less than five minutes are left.
    pub(super) async fn token(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<Secret, GraphFailure> {
        let mut kept = self.token.lock().await;
        if let Some((token, expires)) = kept.as_ref()
            && Instant::now() + RENEW_BEFORE < *expires
        {
            return Ok(token.clone());
        }
        // A caller that waited for the lock may find the token endpoint throttled meanwhile.
        self.unthrottled().await;
        match self.request_token(http, timeout).await {
            Ok((token, lifetime)) => {
                *kept = Some((token.clone(), Instant::now() + lifetime));
                Ok(token)
            }
            Err(GraphFailure::Throttled { retry_after }) => {
                self.throttled(retry_after);
                Err(GraphFailure::Throttled { retry_after })
            }
            Err(e) => Err(e),
        }
    }

    /// Forgets `rejected` (Graph said it is not valid), so the next call asks for another.
    pub(super) async fn forget(&self, rejected: &Secret) {
        let mut kept = self.token.lock().await;
        if kept.as_ref().is_some_and(|(t, _)| t == rejected) {
            *kept = None;
        }
    }

    async fn request_token(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<(Secret, Duration), GraphFailure> {
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials")
                .append_pair("client_id", &self.client_id)
                .append_pair("scope", "https://graph.microsoft.com/.default");
            match &self.proof {
                Proof::Secret(secret) => {
                    form.append_pair("client_secret", secret.expose());
                }
                Proof::Certificate { thumbprint, key } => {
                    form.append_pair(
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    )
                    .append_pair(
                        "client_assertion",
                        &self.assertion(thumbprint, key.as_ref())?,
                    );
                }
            }
            form.finish()
        };
        let sent = http
            .post(&self.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| GraphFailure::Unreachable(format!("the token endpoint: {e}")))?;
        let status = sent.status().as_u16();
        let retry_after = crate::engine::backoff::retry_after(sent.headers());
        let body = sent
            .bytes()
            .await
            .map_err(|e| GraphFailure::Unreachable(format!("the token endpoint: {e}")))?;
        if status == 429 {
            return Err(GraphFailure::Throttled { retry_after });
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
            GraphFailure::Malformed(format!("the token endpoint answered HTTP {status}"))
        })?;
        match answer {
            TokenAnswer::Token {
                access_token,
                expires_in,
            } if status == 200 => Ok((Secret::new(access_token), Duration::from_secs(expires_in))),
            TokenAnswer::Error {
                error,
                error_description,
            } if (400..500).contains(&status) => Err(GraphFailure::AppRefused {
                tenant: self.tenant.clone(),
                client_id: self.client_id.clone(),
                // Entra's first line names the problem (AADSTS…); the rest is trace ids.
                why: format!(
                    "{error}: {}",
                    error_description.lines().next().unwrap_or_default()
                ),
            }),
            _ => Err(GraphFailure::Http {
                status,
                code: "TokenEndpoint".into(),
                message: "the token endpoint did not give a token".into(),
                retry_after,
            }),
        }
    }

    /// A client assertion (RFC 7523) for the token endpoint, signed RS256 with the
    /// certificate's key and naming the certificate by its SHA-256 thumbprint.
    fn assertion(
        &self,
        thumbprint: &str,
        key: &dyn rustls::sign::SigningKey,
    ) -> Result<String, GraphFailure> {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let now = crate::creatio::mail::unix_now_ms() / 1000;
        let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "x5t#S256": thumbprint });
        let claims = serde_json::json!({
            "aud": self.token_url,
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = key
            .choose_scheme(&[rustls::SignatureScheme::RSA_PKCS1_SHA256])
            .ok_or_else(|| GraphFailure::Config("the app's key cannot sign RS256".into()))?
            .sign(input.as_bytes())
            .map_err(|e| GraphFailure::Config(format!("signing the client assertion: {e}")))?;
        Ok(format!("{input}.{}", b64(&signature)))
    }

    /// Waits while Graph asked this app to hold back.
    pub(super) async fn unthrottled(&self) {
        let until = *self
            .throttled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    /// Graph throttled this app: every mailbox of it holds back for `retry_after`.
    pub(super) fn throttled(&self, retry_after: Option<Duration>) {
        let until = Instant::now() + retry_after.unwrap_or(THROTTLE_PAUSE);
        let mut kept = self
            .throttled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if kept.is_none_or(|k| k < until) {
            *kept = Some(until);
        }
    }
}

/// The clientState key of an app: a digest of its secret, or of its key's signature over a
/// fixed text (RSA PKCS#1 v1.5 signatures are deterministic, so every replica derives the
/// same key from the same private key).
fn state_key(proof: &Proof) -> Result<[u8; 32], String> {
    let material = match proof {
        Proof::Secret(secret) => secret.expose().as_bytes().to_vec(),
        Proof::Certificate { key, .. } => key
            .choose_scheme(&[rustls::SignatureScheme::RSA_PKCS1_SHA256])
            .ok_or("the key cannot sign RS256")?
            .sign(b"exchange-listener: the clientState key of Graph subscriptions")
            .map_err(|e| e.to_string())?,
    };
    let mut digest = sha2::Sha256::new();
    digest.update(b"exchange-listener clientState\n");
    digest.update(&material);
    Ok(digest.finalize().into())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenAnswer {
    Token {
        access_token: String,
        expires_in: u64,
    },
    Error {
        error: String,
        #[serde(default)]
        error_description: String,
    },
}

/// Every app registration, by the mail domains they serve.
#[derive(Debug, Default, Clone)]
pub struct GraphApps {
    apps: Vec<Arc<GraphApp>>,
}

impl GraphApps {
    /// Reads the apps file; an error says what is wrong with it (never a secret).
    pub fn load(path: &Path) -> Result<GraphApps, String> {
        let text =
            std::fs::read(path).map_err(|e| format!("--graph-apps {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        GraphApps::parse(&text, base).map_err(|e| format!("--graph-apps {}: {e}", path.display()))
    }

    /// The apps of a JSON document; certificate files are found relative to `base`.
    pub fn parse(json: &[u8], base: &Path) -> Result<GraphApps, String> {
        let entries: Vec<Entry> = serde_json::from_slice(json).map_err(|e| {
            // serde's message names the field and position, never the value.
            format!("not a JSON list of apps: {e}")
        })?;
        let apps = entries
            .into_iter()
            .map(|e| GraphApp::from_entry(e, base).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GraphApps { apps })
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    pub fn len(&self) -> usize {
        self.apps.len()
    }

    /// The mailbox a notification's `clientState` names, when an app's key proves it.
    pub fn mailbox_of(&self, client_state: &str) -> Option<String> {
        use hmac::Mac as _;
        let (mailbox, mac) = client_state.rsplit_once('.')?;
        let given = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(mac)
            .ok()?;
        if given.len() != STATE_MAC_BYTES {
            return None;
        }
        // Constant time: a forger learns nothing from how long the answer took.
        self.apps
            .iter()
            .any(|app| {
                app.state_hmac(mailbox)
                    .verify_truncated_left(&given)
                    .is_ok()
            })
            .then(|| mailbox.to_owned())
    }

    /// The app that serves mail for `address`.
    pub fn for_address(&self, address: &str) -> Option<Arc<GraphApp>> {
        self.apps.iter().find(|a| a.serves(address)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_are_matched_by_domain_and_badly_written_ones_are_named() {
        let apps = GraphApps::parse(
            br#"[{"tenant": "t1", "client_id": "c1", "client_secret": "s", "domains": ["Contoso.com", "@fabrikam.com"]}]"#,
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            apps.for_address("Alice@CONTOSO.com").unwrap().client_id,
            "c1"
        );
        assert!(apps.for_address("bob@fabrikam.com").is_some());
        assert!(apps.for_address("eve@contoso.com.evil").is_none());
        assert!(apps.for_address("no-at-sign").is_none());

        let both = GraphApps::parse(
            br#"[{"tenant": "t", "client_id": "c", "client_secret": "s", "certificate": "a", "private_key": "b", "domains": ["x.com"]}]"#,
            Path::new("."),
        )
        .unwrap_err();
        assert!(both.contains("either client_secret"), "{both}");
        let unknown = GraphApps::parse(
            br#"[{"tenant": "t", "client_id": "c", "client_secret": "hunter2", "domain": ["x.com"]}]"#,
            Path::new("."),
        )
        .unwrap_err();
        assert!(unknown.contains("domain"), "{unknown}");
        assert!(!unknown.contains("hunter2"), "{unknown}");
    }

    #[test]
    fn a_client_state_names_its_mailbox_and_only_the_apps_key_makes_one() {
        let apps = |secret: &str| {
            GraphApps::parse(
                format!(r#"[{{"tenant": "t", "client_id": "c", "client_secret": "{secret}", "domains": ["x.com"]}}]"#)
                    .as_bytes(),
                Path::new("."),
            )
            .unwrap()
        };
        let ours = apps("s1");
        let state = ours.apps[0].client_state("5b0f8fad-d9cb-469f-a165-70867728950e");
        assert!(state.len() <= 128);
        assert_eq!(
            ours.mailbox_of(&state).as_deref(),
            Some("5b0f8fad-d9cb-469f-a165-70867728950e")
        );
        // Another key, a changed mailbox, a cut MAC: none is ours.
        assert_eq!(apps("s2").mailbox_of(&state), None);
        let other = state.replacen("5b0f", "6b0f", 1);
        assert_eq!(ours.mailbox_of(&other), None);
        assert_eq!(ours.mailbox_of(&state[..state.len() - 4]), None);
        assert_eq!(ours.mailbox_of("no-dot"), None);
    }
}
