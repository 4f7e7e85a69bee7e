//! Faults injected through the control API: what goes wrong, for whom, and for how long.
//!
//! HTTP-level faults (`server_busy`, `unauthorized`, `unavailable`, `latency`) fire when a
//! request arrives; stream faults fire on open streaming connections: `subscription_not_found`
//! and `invalid_subscription` at once (the server forgets the subscriptions), the others when
//! the connection next has something to send.

use serde::{Deserialize, Serialize};
use tokio::time::{Duration, Instant};

/// What goes wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// HTTP 500 SOAP fault `ErrorServerBusy` with `BackOffMilliseconds`.
    ServerBusy { back_off_ms: u64 },
    /// HTTP 401, whatever the credentials.
    Unauthorized,
    /// HTTP 500 SOAP fault with this `ResponseCode` (for example `ErrorNonExistentMailbox`).
    SoapFault { code: String },
    /// HTTP 503, with `Retry-After` when given.
    Unavailable {
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// Extra delay before the request is answered.
    Latency { ms: u64 },
    /// GetItem answers every requested item with this per-item error code (for example
    /// `ErrorMailboxStoreUnavailable`) instead of the item.
    ItemError { code: String },
    /// SyncFolderItems with a `SyncState` answers `ErrorInvalidSyncStateData`, as Exchange
    /// does for a state it no longer accepts (a first sync, without a state, is not affected).
    InvalidSyncState,
    /// The server forgets the stream's subscriptions: `ErrorSubscriptionNotFound`, `Closed`.
    SubscriptionNotFound,
    /// The server forgets the stream's subscriptions: `ErrorInvalidSubscription`, `Closed`.
    InvalidSubscription,
    /// The next events are dropped and `ErrorMissedNotificationEvents` sent instead; the
    /// subscription lives on.
    MissedNotificationEvents,
    /// The next envelope is cut in half and the connection reset.
    CloseMidEnvelope,
    /// The stream sends nothing, keep-alives included, for `for_ms` (or until it ends).
    Silence,
}

impl FaultKind {
    /// True for faults that act on streaming connections rather than on requests.
    pub fn on_stream(&self) -> bool {
        matches!(
            self,
            FaultKind::SubscriptionNotFound
                | FaultKind::InvalidSubscription
                | FaultKind::MissedNotificationEvents
                | FaultKind::CloseMidEnvelope
                | FaultKind::Silence
        )
    }
}

/// A fault and its scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Only requests acting as this mailbox; every mailbox when absent.
    #[serde(default)]
    pub mailbox: Option<String>,
    /// Only this SOAP operation (for request faults); every operation when absent.
    #[serde(default)]
    pub operation: Option<String>,
    /// How many times it fires. Without `times` or `for_ms` it fires once.
    #[serde(default)]
    pub times: Option<u32>,
    /// Fires on everything it matches for this many milliseconds.
    #[serde(default)]
    pub for_ms: Option<u64>,
}

impl Fault {
    /// A fault of this kind, everywhere, once.
    pub fn once(kind: FaultKind) -> Fault {
        Fault {
            kind,
            mailbox: None,
            operation: None,
            times: None,
            for_ms: None,
        }
    }

    /// The same fault, only for requests acting as `mailbox`.
    pub fn for_mailbox(mut self, mailbox: &str) -> Fault {
        self.mailbox = Some(mailbox.to_owned());
        self
    }

    /// The same fault, only for `operation`.
    pub fn for_operation(mut self, operation: &str) -> Fault {
        self.operation = Some(operation.to_owned());
        self
    }

    /// The same fault, firing `n` times.
    pub fn times(mut self, n: u32) -> Fault {
        self.times = Some(n);
        self
    }

    /// The same fault, firing on everything it matches for `d`.
    pub fn lasting(mut self, d: Duration) -> Fault {
        self.for_ms = Some(d.as_millis() as u64);
        self
    }
}

/// A fault armed in the server.
#[derive(Debug, Clone)]
pub(crate) struct Armed {
    pub fault: Fault,
    remaining: Option<u32>,
    until: Option<Instant>,
}

impl Armed {
    pub fn new(fault: Fault) -> Result<Armed, String> {
        if fault.times == Some(0) {
            return Err("times must be at least 1".into());
        }
        let until = fault
            .for_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let remaining = match (fault.times, until) {
            (Some(n), _) => Some(n),
            (None, Some(_)) => None,
            (None, None) => Some(1),
        };
        Ok(Armed {
            fault,
            remaining,
            until,
        })
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.remaining == Some(0) || self.until.is_some_and(|u| now >= u)
    }

    pub fn matches(&self, mailbox: &str, operation: &str) -> bool {
        self.fault
            .mailbox
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(mailbox))
            && self
                .fault
                .operation
                .as_deref()
                .is_none_or(|o| o.eq_ignore_ascii_case(operation))
    }

    /// Fires once: counts down and answers the kind.
    pub fn fire(&mut self) -> FaultKind {
        if let Some(n) = self.remaining.as_mut() {
            *n = n.saturating_sub(1);
        }
        self.fault.kind.clone()
    }

    /// How long a `silence` that fires now lasts (`None`: until the connection ends).
    pub fn silence_until(&self) -> Option<Instant> {
        self.until
    }
}

/// Server behaviour that is not a one-off fault: limits and expiry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// A subscription no stream has served for this long is forgotten (idle expiry).
    pub subscription_expiry_ms: Option<u64>,
    /// More concurrent streams per user are refused with `ErrorExceededConnectionCount`.
    pub max_streams_per_user: Option<usize>,
    /// More live subscriptions per mailbox are refused with `ErrorExceededSubscriptionCount`.
    pub max_subscriptions_per_mailbox: Option<usize>,
    /// Behave as this older server (`Exchange2010_SP1`, `Exchange2010_SP2`, `Exchange2013`,
    /// `Exchange2013_SP1`): a request claiming a newer `RequestServerVersion` is refused with
    /// `ErrorInvalidServerVersion`, and answers carry this server's `ServerVersionInfo`.
    pub server_version: Option<String>,
    /// How clients log in: `basic` (the default), `ntlm` (NTLM only, as where Basic is switched
    /// off on the EWS virtual directory), `negotiate` (NTLM inside Negotiate only), or `both`.
    pub auth: Option<String>,
    /// With `auth = both`: these mailboxes log in with NTLM only.
    pub ntlm_only: Vec<String>,
    /// Accounts holding the ApplicationImpersonation role: only they may act as another
    /// mailbox (`ExchangeImpersonation`); others get `ErrorImpersonateUserDenied`.
    pub impersonators: Vec<String>,
    /// Mailbox servers behind the endpoint (one when unset). Each mailbox lives on one, chosen
    /// by its address; Subscribe sets `X-BackEndOverrideCookie` to it, and a GetStreamingEvents
    /// routed (by that cookie, else by `X-AnchorMailbox`) to another server does not find the
    /// subscriptions of mailboxes living elsewhere (`ErrorSubscriptionNotFound`).
    pub backends: Option<u32>,
    /// More calls (other than GetStreamingEvents) in flight at once for one account are
    /// refused with `ErrorExceededConnectionCount`, as Exchange's `EWSMaxConcurrency` (27).
    pub max_concurrent_calls_per_user: Option<usize>,
    /// A message to send larger than this (its MIME, in bytes) is refused with
    /// `ErrorMessageSizeExceeded`; 35 MiB when unset, Exchange Online's limit.
    pub max_message_bytes: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_form() {
        let f: Fault = serde_json::from_str(
            r#"{"kind":"server_busy","back_off_ms":2000,"mailbox":"a@b.c","times":2}"#,
        )
        .unwrap();
        assert_eq!(f.kind, FaultKind::ServerBusy { back_off_ms: 2000 });
        assert_eq!(f.mailbox.as_deref(), Some("a@b.c"));
        let f: Fault = serde_json::from_str(r#"{"kind":"unavailable"}"#).unwrap();
        assert_eq!(
            f.kind,
            FaultKind::Unavailable {
                retry_after_secs: None
            }
        );
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"nonsense"}"#).is_err());
    }

    #[test]
    fn once_by_default_counted_or_timed_otherwise() {
        let mut a = Armed::new(Fault::once(FaultKind::Unauthorized)).unwrap();
        assert!(!a.expired(Instant::now()));
        a.fire();
        assert!(a.expired(Instant::now()));
        let mut b =
            Armed::new(Fault::once(FaultKind::Unauthorized).lasting(Duration::from_secs(60)))
                .unwrap();
        for _ in 0..100 {
            b.fire();
        }
        assert!(!b.expired(Instant::now()));
        assert!(Armed::new(Fault::once(FaultKind::Silence).times(0)).is_err());
    }

    #[test]
    fn scope() {
        let a = Armed::new(
            Fault::once(FaultKind::Unauthorized)
                .for_mailbox("A@b.c")
                .for_operation("Subscribe"),
        )
        .unwrap();
        assert!(a.matches("a@b.c", "subscribe"));
        assert!(!a.matches("x@b.c", "Subscribe"));
        assert!(!a.matches("a@b.c", "GetItem"));
    }
}
