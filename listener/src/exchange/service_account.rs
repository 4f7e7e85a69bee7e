//! Service accounts: one account per Exchange server, holding the ApplicationImpersonation
//! role, that serves the server's mailboxes Creatio sends without a password.
//!
//! They come from a JSON file (`--ews-service-accounts`), typically a mounted Kubernetes
//! Secret:
//!
//! ```json
//! [{"url": "https://mail.contoso.com/EWS/Exchange.asmx", "user": "CONTOSO\\svc-creatio", "password": "…"}]
//! ```
//!
//! An account is matched to a mailbox by the server of its EWS URL (scheme, host and port).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::creatio::contract::Secret;
use crate::engine::backoff::{Backoff, BackoffPolicy};
use crate::exchange::client::{Lanes, Servers};

/// One service account. Its password never reaches a log: `Secret` prints as `***`.
#[derive(Debug)]
pub struct ServiceAccount {
    /// `DOMAIN\user` or a UPN.
    pub user: String,
    pub password: Secret,
    /// The connections its mailboxes' calls share once it logs in with NTLM.
    pub(crate) lanes: OnceLock<Arc<Lanes>>,
    /// Its calls in flight, at most [`CALLS_AT_ONCE`].
    pub(crate) calls: tokio::sync::Semaphore,
    /// How soon Exchange is asked again after it rejected the password.
    retry: BackoffPolicy,
    rejected: Mutex<Option<Rejected>>,
}

/// Exchange rejected the account's password: until `next_probe` its mailboxes' calls fail
/// without reaching Exchange.
#[derive(Debug)]
struct Rejected {
    backoff: Backoff,
    next_probe: Instant,
}

/// Calls one service account has in flight at most, below Exchange's default
/// `EWSMaxConcurrency` of 27: a burst (a shared stream's members all catching up after it
/// failed) waits its turn here instead of being refused there.
pub const CALLS_AT_ONCE: usize = 16;

/// The schedule of probes of a rejected account unless configured (`--failed-retry-*`).
fn default_retry() -> BackoffPolicy {
    BackoffPolicy::new(Duration::from_secs(60), Duration::from_secs(1_800))
        .expect("a valid default")
}

impl ServiceAccount {
    /// Whether a request may go to Exchange now. Once Exchange rejected the password, one
    /// request a while is let through as a probe and the others fail at once: thousands of
    /// mailboxes retrying one wrong password would lock the account out of the domain.
    pub(crate) fn may_try(&self) -> bool {
        let mut rejected = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        match rejected.as_mut() {
            None => true,
            Some(r) if Instant::now() >= r.next_probe => {
                // This caller probes; the next may only after another interval.
                r.next_probe = Instant::now() + r.backoff.next_delay();
                true
            }
            Some(_) => false,
        }
    }

    /// Exchange rejected the password (HTTP 401 after the login).
    pub(crate) fn rejected(&self) {
        let mut rejected = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        if rejected.is_none() {
            tracing::warn!(user = ?self.user, "Exchange rejected the service account's password; its mailboxes wait, and one call a while probes it");
            let mut backoff = self.retry.start();
            let next_probe = Instant::now() + backoff.next_delay();
            *rejected = Some(Rejected {
                backoff,
                next_probe,
            });
        }
    }

    /// Exchange took the password.
    pub(crate) fn accepted(&self) {
        let mut rejected = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        if rejected.take().is_some() {
            tracing::info!(user = ?self.user, "Exchange takes the service account's password again");
        }
    }
}

/// The configured accounts, by server.
#[derive(Debug, Clone, Default)]
pub struct ServiceAccounts {
    by_server: HashMap<String, Arc<ServiceAccount>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    url: String,
    user: String,
    password: String,
}

impl ServiceAccounts {
    /// Reads the accounts from a JSON file; errors name the entry and the field, never a
    /// password.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("--ews-service-accounts {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--ews-service-accounts {}: {e}", path.display()))
    }

    /// Parses the file's JSON: an array of `{"url", "user", "password"}`.
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        // Read as values first: serde's own messages could quote a field's text.
        let values: Vec<serde_json::Value> = serde_json::from_slice(json).map_err(|e| {
            format!(
                "not a JSON array of accounts (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let mut by_server = HashMap::new();
        for (i, value) in values.into_iter().enumerate() {
            let entry: Entry = serde_json::from_value(value).map_err(|_| {
                format!(
                    "account {i}: needs exactly the string fields \"url\", \"user\" and \"password\""
                )
            })?;
            let lower = entry.url.trim().to_ascii_lowercase();
            if !(lower.starts_with("https://") || lower.starts_with("http://")) {
                return Err(format!(
                    "account {i}: \"url\" must be the server's EWS URL (https://…)"
                ));
            }
            if entry.user.trim().is_empty() {
                return Err(format!("account {i}: \"user\" is empty"));
            }
            if entry.password.is_empty() {
                return Err(format!("account {i}: \"password\" is empty"));
            }
            let server = Servers::server(entry.url.trim());
            let account = ServiceAccount {
                user: entry.user.trim().to_owned(),
                password: Secret::new(entry.password),
                lanes: OnceLock::new(),
                calls: tokio::sync::Semaphore::new(CALLS_AT_ONCE),
                retry: default_retry(),
                rejected: Mutex::new(None),
            };
            if by_server.insert(server, Arc::new(account)).is_some() {
                return Err(format!("account {i}: a second account for the same server"));
            }
        }
        Ok(ServiceAccounts { by_server })
    }

    /// Probes a rejected account's password on this schedule.
    pub fn with_retry(mut self, retry: BackoffPolicy) -> Self {
        for account in self.by_server.values_mut() {
            if let Some(account) = Arc::get_mut(account) {
                account.retry = retry;
            }
        }
        self
    }

    /// The account serving the server of `url`, if any.
    pub fn for_url(&self, url: &str) -> Option<Arc<ServiceAccount>> {
        self.by_server.get(&Servers::server(url)).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.by_server.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_server.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_found_by_server_and_errors_keep_passwords_out() {
        let accounts = ServiceAccounts::parse(
            br#"[{"url": "https://Mail.Contoso.com/EWS/Exchange.asmx", "user": "CONTOSO\\svc", "password": "hunter2"}]"#,
        )
        .unwrap();
        let found = accounts
            .for_url("https://mail.contoso.com/ews/exchange.asmx")
            .unwrap();
        assert_eq!(found.user, "CONTOSO\\svc");
        assert_eq!(found.password.expose(), "hunter2");
        assert!(
            accounts
                .for_url("https://mail.fabrikam.com/EWS/Exchange.asmx")
                .is_none()
        );
        assert!(
            accounts
                .for_url("http://mail.contoso.com/EWS/Exchange.asmx")
                .is_none()
        );

        for (bad, says) in [
            (&br#"{"url": "x"}"#[..], "not a JSON array"),
            (br#"[{"url": "https://a", "user": "u"}]"#, "account 0: needs"),
            (
                br#"[{"url": "https://a", "user": "u", "password": "hunter2", "pw": 1}]"#,
                "account 0: needs",
            ),
            (br#"[{"url": "a.b", "user": "u", "password": "hunter2"}]"#, "\"url\""),
            (br#"[{"url": "https://a", "user": " ", "password": "hunter2"}]"#, "\"user\""),
            (br#"[{"url": "https://a", "user": "u", "password": ""}]"#, "\"password\""),
            (
                br#"[{"url": "https://a/x", "user": "u", "password": "hunter2"}, {"url": "https://A/y", "user": "v", "password": "hunter2"}]"#,
                "account 1: a second account",
            ),
            (br#"[{"url": "https://a", "user": "u", "password": 7}]"#, "account 0"),
        ] {
            let e = ServiceAccounts::parse(bad).unwrap_err();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
