//! Why an EWS call failed, and the one place that decides what to do about it: retry,
//! subscribe again, or stop as a configuration problem that fast retries cannot fix; and what
//! a per-item error in a GetItem answer means for that item.

use std::time::Duration;

use ews::EwsError;

pub use crate::engine::protocol::error_chain;
use crate::engine::protocol::{Disposition, Failure, ServerFailure};

/// Why an EWS call did not succeed. Displays carry no secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EwsFailure {
    #[error("EWS rejected the credentials (HTTP 401)")]
    Unauthorized,
    #[error("EWS answered HTTP {status}")]
    Http {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("EWS unreachable: {0}")]
    Transport(String),
    #[error(transparent)]
    Ews(#[from] EwsError),
    #[error("no data on the event stream for {0:?}")]
    Idle(Duration),
    #[error("EWS answer larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Config(String),
}

/// Response codes that mean the subscription no longer exists on the server.
const SUBSCRIPTION_GONE: [&str; 6] = [
    "ErrorSubscriptionNotFound",
    "ErrorInvalidSubscription",
    "ErrorExpiredSubscription",
    "ErrorSubscriptionUnsubsribed",
    "ErrorReadEventsFailed",
    "ErrorInvalidWatermark",
];

/// The longest wait Exchange may ask for (`BackOffMilliseconds`, `Retry-After`): a larger one,
/// a server's mistake or a hostile answer, would park the mailbox for hours.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(600);

fn capped(asked: Duration) -> Duration {
    asked.min(MAX_SERVER_WAIT)
}

/// Response codes that retries at full speed cannot fix.
const CONFIGURATION: [&str; 9] = [
    "ErrorNonExistentMailbox",
    "ErrorImpersonateUserDenied",
    "ErrorImpersonationDenied",
    "ErrorAccessDenied",
    "ErrorSubscriptionAccessDenied",
    "ErrorSubscriptionDelegateAccessNotSupported",
    "ErrorInvalidServerVersion",
    "ErrorIncorrectSchemaVersion",
    "ErrorInvalidSchemaVersionForMailboxVersion",
];

/// What a per-item error in a GetItem answer means for that item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemFate {
    /// Deleted or moved: there is nothing to deliver.
    Gone,
    /// The server could not serve it now: ask again.
    Retry,
    /// The server will not serve it: keep it as a dead letter.
    Dead,
}

/// Per-item codes that say "not now" rather than "never".
const TRANSIENT_ITEM: [&str; 9] = [
    "ErrorServerBusy",
    "ErrorMailboxStoreUnavailable",
    "ErrorTimeoutExpired",
    "ErrorInternalServerTransientError",
    "ErrorMailboxMoveInProgress",
    "ErrorConnectionFailed",
    "ErrorBatchProcessingStopped",
    "ErrorInsufficientResources",
    "ErrorADUnavailable",
];

pub fn item_fate(code: &str) -> ItemFate {
    if code == "ErrorItemNotFound" {
        ItemFate::Gone
    } else if TRANSIENT_ITEM.contains(&code) {
        ItemFate::Retry
    } else {
        ItemFate::Dead
    }
}

impl EwsFailure {
    pub fn disposition(&self) -> Disposition {
        match self {
            EwsFailure::Unauthorized | EwsFailure::Config(_) | EwsFailure::TooLarge { .. } => {
                Disposition::Fatal
            }
            EwsFailure::Http { retry_after, .. } => Disposition::Retry {
                after: retry_after.map(capped),
            },
            EwsFailure::Transport(_) | EwsFailure::Idle(_) => Disposition::Retry { after: None },
            EwsFailure::Ews(e) => match e.code() {
                Some(code) if SUBSCRIPTION_GONE.contains(&code) => Disposition::Resubscribe,
                Some(code) if CONFIGURATION.contains(&code) => Disposition::Fatal,
                _ => Disposition::Retry {
                    after: e.back_off().map(capped),
                },
            },
        }
    }

    /// One sentence per class of failure: enough for an administrator to fix the settings, too
    /// little to map a network through the API (a closed port, a reset and a silent host read
    /// the same).
    pub fn sentence(&self) -> String {
        match self {
            EwsFailure::Unauthorized => {
                "Invalid credentials: Exchange rejected the user name or password".into()
            }
            EwsFailure::Transport(why) if why.contains("certificate") => {
                "Exchange's TLS certificate is not trusted; give its CA to the listener with --ews-ca-file"
                    .into()
            }
            EwsFailure::Transport(_) | EwsFailure::Idle(_) => {
                "Exchange could not be reached at ServiceUrl".into()
            }
            EwsFailure::Http { .. } | EwsFailure::TooLarge { .. } => {
                "ServiceUrl did not answer as an Exchange EWS endpoint".into()
            }
            EwsFailure::Ews(ews::EwsError::Malformed(_)) => {
                "ServiceUrl did not answer as an Exchange EWS endpoint".into()
            }
            EwsFailure::Ews(err) => format!(
                "Exchange refused the mailbox: {}",
                err.code().unwrap_or("unknown error")
            ),
            EwsFailure::Config(why) => why.clone(),
        }
    }

    /// The EWS response code behind the failure, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            EwsFailure::Ews(e) => e.code(),
            _ => None,
        }
    }

    /// A stable class name for Creatio's `ProcessMailboxState.ExceptionClassName`.
    pub fn class_name(&self) -> &'static str {
        match self {
            EwsFailure::Unauthorized => "EwsUnauthorized",
            EwsFailure::Http { .. } => "EwsHttpError",
            EwsFailure::Transport(_) => "EwsUnreachable",
            EwsFailure::Ews(_) => "EwsError",
            EwsFailure::Idle(_) => "EwsStreamIdle",
            EwsFailure::TooLarge { .. } => "EwsAnswerTooLarge",
            EwsFailure::Config(_) => "EwsConfiguration",
        }
    }

    /// Why a mail was not sent, in words Creatio shows its user; never a secret.
    pub fn unsent_sentence(&self) -> String {
        match self {
            EwsFailure::Ews(EwsError::Response(r)) if r.code == "ErrorMessageSizeExceeded" => {
                "Exchange refused the message: ErrorMessageSizeExceeded (the message with its attachments is larger than the server accepts)".into()
            }
            EwsFailure::Ews(err) => format!(
                "Exchange refused the message: {}",
                err.code().unwrap_or("unknown error")
            ),
            EwsFailure::Unauthorized => {
                "Exchange rejected the user name or password of the sending mailbox".into()
            }
            EwsFailure::Transport(_) | EwsFailure::Idle(_) => {
                "Exchange could not be reached at ServiceUrl; the message was not sent".into()
            }
            EwsFailure::Http { status, .. } => {
                format!("Exchange answered HTTP {status}; the message was not sent")
            }
            // Not about this message: as Validate says it.
            other => other.sentence(),
        }
    }
}

impl ServerFailure for EwsFailure {
    fn disposition(&self) -> Disposition {
        EwsFailure::disposition(self)
    }

    fn sentence(&self) -> String {
        EwsFailure::sentence(self)
    }

    fn class_name(&self) -> &'static str {
        EwsFailure::class_name(self)
    }

    fn credentials_rejected(&self) -> bool {
        matches!(self, EwsFailure::Unauthorized)
    }

    fn cursor_rejected(&self) -> bool {
        self.code() == Some("ErrorInvalidSyncStateData")
    }

    fn too_large(&self) -> Option<u64> {
        match self {
            EwsFailure::TooLarge { limit } => Some(*limit),
            _ => None,
        }
    }

    fn send_in_doubt(&self) -> bool {
        matches!(
            self,
            EwsFailure::Transport(_) | EwsFailure::Idle(_) | EwsFailure::Http { .. }
        )
    }

    fn send_refused(&self) -> bool {
        matches!(self, EwsFailure::Ews(EwsError::Response(_)))
    }

    fn unsent_sentence(&self) -> String {
        EwsFailure::unsent_sentence(self)
    }
}

impl From<EwsFailure> for Failure {
    fn from(f: EwsFailure) -> Failure {
        Failure::server(f)
    }
}

pub(super) fn transport(e: reqwest::Error) -> EwsFailure {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // reqwest says "error sending request"; the cause (a refused certificate, a reset) is in
    // the chain, and is what an administrator needs to read.
    EwsFailure::Transport(format!("{kind}: {}", error_chain(&e.without_url())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions() {
        let ews = |code: &str| {
            EwsFailure::Ews(EwsError::Response(ews::ResponseError {
                code: code.into(),
                message: String::new(),
                back_off: None,
            }))
        };
        assert_eq!(EwsFailure::Unauthorized.disposition(), Disposition::Fatal);
        assert_eq!(
            ews("ErrorInvalidSubscription").disposition(),
            Disposition::Resubscribe
        );
        assert_eq!(
            ews("ErrorNonExistentMailbox").disposition(),
            Disposition::Fatal
        );
        assert_eq!(
            ews("ErrorServerBusy").disposition(),
            Disposition::Retry { after: None }
        );
        let busy = EwsFailure::Ews(EwsError::Fault(ews::Fault {
            code: "ErrorServerBusy".into(),
            message: String::new(),
            back_off: Some(Duration::from_millis(1500)),
        }));
        assert_eq!(
            busy.disposition(),
            Disposition::Retry {
                after: Some(Duration::from_millis(1500))
            }
        );
        let unavailable = EwsFailure::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(
            unavailable.disposition(),
            Disposition::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        // Asked for a day, or for ever: ten minutes.
        for asked in [Duration::from_secs(86_400), Duration::MAX] {
            let busy = EwsFailure::Ews(EwsError::Fault(ews::Fault {
                code: "ErrorServerBusy".into(),
                message: String::new(),
                back_off: Some(asked),
            }));
            let unavailable = EwsFailure::Http {
                status: 503,
                retry_after: Some(asked),
            };
            for f in [busy, unavailable] {
                assert_eq!(
                    f.disposition(),
                    Disposition::Retry {
                        after: Some(MAX_SERVER_WAIT)
                    }
                );
            }
        }
    }
}
