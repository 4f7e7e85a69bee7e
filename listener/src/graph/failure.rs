//! Why a Graph call failed, and what the engine should do about it.

use std::time::Duration;

use crate::engine::protocol::{Disposition, Failure, ServerFailure};

/// How long a throttled app waits when Graph did not say (`Retry-After` is always sent in
/// practice).
pub(super) const THROTTLE_PAUSE: Duration = Duration::from_secs(30);

/// Why a Graph call did not succeed. Displays carry no secrets: not the client secret, not a
/// token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GraphFailure {
    #[error("Microsoft Graph unreachable: {0}")]
    Unreachable(String),
    /// Microsoft Entra refused the app's credentials or its request for a token.
    #[error("Microsoft Entra refused a token to app {client_id} of tenant {tenant}: {why}")]
    AppRefused {
        tenant: String,
        client_id: String,
        why: String,
    },
    /// The app may not read this mailbox (an application access policy, or missing
    /// permissions).
    #[error("Graph denied the app access to the mailbox: {0}")]
    AccessDenied(String),
    #[error("Graph knows no mailbox {0:?}")]
    NoMailbox(String),
    /// A folder or message that is not there (any more).
    #[error("Graph found no {what}: {message}")]
    NotFound { what: &'static str, message: String },
    #[error("Graph no longer knows the folder's delta state: {0}")]
    SyncStateGone(String),
    /// Graph removed the mailbox's subscriptions, or wants them made again.
    #[error("Graph's subscriptions for the mailbox are gone: {0}")]
    SubscriptionGone(String),
    #[error("Graph throttled the app (retry after {retry_after:?})")]
    Throttled { retry_after: Option<Duration> },
    /// Graph rejected the token it was given (expired or revoked): a new one is asked for.
    #[error("Graph rejected the access token: {0}")]
    TokenRejected(String),
    /// Any other answer that is not a success, with Graph's error code and message.
    #[error("Graph answered HTTP {status} {code}: {message}")]
    Http {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("Graph's answer could not be read: {0}")]
    Malformed(String),
    #[error("Graph answer larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Config(String),
}

impl GraphFailure {
    /// An answer that is not a success, judged by its status and Graph's error code.
    pub(super) fn from_answer(
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    ) -> GraphFailure {
        match status {
            401 => GraphFailure::TokenRejected(message),
            403 => GraphFailure::AccessDenied(message),
            404 if code.eq_ignore_ascii_case("ErrorInvalidUser")
                || code.eq_ignore_ascii_case("MailboxNotEnabledForRESTAPI")
                || code.eq_ignore_ascii_case("ResourceNotFound") && message.contains("user") =>
            {
                GraphFailure::NoMailbox(message)
            }
            404 => GraphFailure::NotFound {
                what: "such item or folder",
                message,
            },
            410 => GraphFailure::SyncStateGone(message),
            _ if code.eq_ignore_ascii_case("SyncStateNotFound")
                || code.eq_ignore_ascii_case("SyncStateInvalid")
                || code.eq_ignore_ascii_case("syncStateNotFound") =>
            {
                GraphFailure::SyncStateGone(message)
            }
            429 => GraphFailure::Throttled { retry_after },
            _ => GraphFailure::Http {
                status,
                code,
                message,
                retry_after,
            },
        }
    }
}

impl ServerFailure for GraphFailure {
    fn disposition(&self) -> Disposition {
        match self {
            GraphFailure::AppRefused { .. }
            | GraphFailure::AccessDenied(_)
            | GraphFailure::NoMailbox(_)
            | GraphFailure::TooLarge { .. }
            | GraphFailure::Config(_) => Disposition::Fatal,
            GraphFailure::NotFound { .. } | GraphFailure::SubscriptionGone(_) => {
                Disposition::Resubscribe
            }
            GraphFailure::Throttled { retry_after } => Disposition::Retry {
                after: Some(retry_after.unwrap_or(THROTTLE_PAUSE)),
            },
            GraphFailure::Http {
                status,
                retry_after,
                ..
            } if *status >= 500 || *status == 408 => Disposition::Retry {
                after: *retry_after,
            },
            // Graph refused a request this listener wrote: retrying it unchanged will not help.
            GraphFailure::Http { .. } => Disposition::Fatal,
            GraphFailure::Unreachable(_)
            | GraphFailure::SyncStateGone(_)
            | GraphFailure::TokenRejected(_)
            | GraphFailure::Malformed(_) => Disposition::Retry { after: None },
        }
    }

    fn sentence(&self) -> String {
        match self {
            GraphFailure::Unreachable(_) | GraphFailure::Malformed(_) => {
                "Microsoft Graph could not be reached".into()
            }
            GraphFailure::AppRefused {
                tenant,
                client_id,
                why,
            } => format!(
                "Microsoft Entra refused the listener's app registration {client_id} for tenant {tenant}: {why}"
            ),
            GraphFailure::AccessDenied(why) => format!(
                "The listener's app registration may not read this mailbox ({why}); grant it Mail.ReadWrite and Mail.Send, and include the mailbox in the application access policy"
            ),
            GraphFailure::NoMailbox(_) => {
                "Microsoft 365 knows no mailbox with this address (SenderEmailAddress)".into()
            }
            GraphFailure::NotFound { message, .. } => {
                format!("A folder or message was not found in the mailbox: {message}")
            }
            GraphFailure::SyncStateGone(_) => {
                "Microsoft Graph no longer knows where the listener stood in a folder".into()
            }
            GraphFailure::SubscriptionGone(_) => {
                "Microsoft Graph removed the mailbox's change notifications; they are made again"
                    .into()
            }
            GraphFailure::Throttled { .. } => {
                "Microsoft Graph is throttling the listener's app registration; it slows down"
                    .into()
            }
            GraphFailure::TokenRejected(_) => {
                "Microsoft Graph rejected the listener's access token; a new one is asked for"
                    .into()
            }
            GraphFailure::Http {
                status,
                code,
                message,
                ..
            } => format!("Microsoft Graph answered HTTP {status} {code}: {message}"),
            GraphFailure::TooLarge { limit } => {
                format!("A message is larger than the {limit}-byte limit on Graph's answers")
            }
            GraphFailure::Config(why) => why.clone(),
        }
    }

    fn class_name(&self) -> &'static str {
        match self {
            GraphFailure::Unreachable(_) => "GraphUnreachable",
            GraphFailure::AppRefused { .. } => "GraphAppRefused",
            GraphFailure::AccessDenied(_) => "GraphAccessDenied",
            GraphFailure::NoMailbox(_) => "GraphNoMailbox",
            GraphFailure::NotFound { .. } => "GraphNotFound",
            GraphFailure::SyncStateGone(_) => "GraphSyncStateNotFound",
            GraphFailure::SubscriptionGone(_) => "GraphSubscriptionRemoved",
            GraphFailure::Throttled { .. } => "GraphThrottled",
            GraphFailure::TokenRejected(_) => "GraphTokenRejected",
            GraphFailure::Http { .. } => "GraphHttpError",
            GraphFailure::Malformed(_) => "GraphMalformedAnswer",
            GraphFailure::TooLarge { .. } => "GraphAnswerTooLarge",
            GraphFailure::Config(_) => "GraphConfiguration",
        }
    }

    fn cursor_rejected(&self) -> bool {
        matches!(self, GraphFailure::SyncStateGone(_))
    }

    fn too_large(&self) -> Option<u64> {
        match self {
            GraphFailure::TooLarge { limit } => Some(*limit),
            _ => None,
        }
    }

    fn send_in_doubt(&self) -> bool {
        matches!(
            self,
            GraphFailure::Unreachable(_) | GraphFailure::Malformed(_)
        ) || matches!(self, GraphFailure::Http { status, .. } if *status >= 500)
    }

    fn send_refused(&self) -> bool {
        matches!(self, GraphFailure::Http { status, .. } if (400..500).contains(status) && *status != 408)
    }
}

impl From<GraphFailure> for Failure {
    fn from(f: GraphFailure) -> Failure {
        Failure::server(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_judged_by_status_and_code() {
        let judged = |status, code: &str| {
            GraphFailure::from_answer(status, code.into(), "m".into(), None).disposition()
        };
        assert_eq!(judged(403, "ErrorAccessDenied"), Disposition::Fatal);
        assert_eq!(judged(404, "ErrorInvalidUser"), Disposition::Fatal);
        assert_eq!(judged(404, "ErrorItemNotFound"), Disposition::Resubscribe);
        assert_eq!(
            judged(503, "ServiceUnavailable"),
            Disposition::Retry { after: None }
        );
        assert_eq!(judged(400, "BadRequest"), Disposition::Fatal);
        assert_eq!(
            judged(429, "ApplicationThrottled"),
            Disposition::Retry {
                after: Some(THROTTLE_PAUSE)
            }
        );
        let gone = GraphFailure::from_answer(410, "SyncStateNotFound".into(), "m".into(), None);
        assert!(gone.cursor_rejected());
        let gone = GraphFailure::from_answer(400, "syncStateNotFound".into(), "m".into(), None);
        assert!(gone.cursor_rejected());
    }
}
