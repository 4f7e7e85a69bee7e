//! Why an IMAP conversation failed, and what the engine should do about it.

use std::time::Duration;

use crate::engine::protocol::{Disposition, Failure, ServerFailure};

/// How long a server that refused a connection for its per-user limit is left alone.
const LIMIT_PAUSE: Duration = Duration::from_secs(60);

/// Why an IMAP call did not succeed. Displays carry no secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImapFailure {
    #[error("the IMAP server rejected the credentials: {0}")]
    Rejected(String),
    #[error("IMAP server unreachable: {0}")]
    Unreachable(String),
    #[error("the IMAP server closed the connection: {0}")]
    Closed(String),
    /// A command answered NO or BAD; `limit` when the server said a limit was reached.
    #[error("the IMAP server refused {command}: {text}")]
    Refused {
        command: String,
        text: String,
        limit: bool,
    },
    #[error("the IMAP server's answer could not be read: {0}")]
    Malformed(String),
    #[error("IMAP answer larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Config(String),
    /// The folder's UIDVALIDITY is not the one the cursor was taken under.
    #[error("the UIDVALIDITY of {folder:?} changed")]
    ValidityChanged { folder: String },
    /// As many connections for this login to this server as the listener allows are open.
    #[error("{open} connections to the IMAP server for this user are open already")]
    Busy { open: usize },
}

impl ServerFailure for ImapFailure {
    fn disposition(&self) -> Disposition {
        match self {
            ImapFailure::Rejected(_) | ImapFailure::Config(_) | ImapFailure::TooLarge { .. } => {
                Disposition::Fatal
            }
            ImapFailure::Refused { limit: true, .. } => Disposition::Retry {
                after: Some(LIMIT_PAUSE),
            },
            ImapFailure::Unreachable(_)
            | ImapFailure::Closed(_)
            | ImapFailure::Refused { .. }
            | ImapFailure::Malformed(_)
            | ImapFailure::ValidityChanged { .. }
            | ImapFailure::Busy { .. } => Disposition::Retry { after: None },
        }
    }

    fn sentence(&self) -> String {
        match self {
            ImapFailure::Rejected(_) => {
                "Invalid credentials: the IMAP server rejected the user name or password".into()
            }
            ImapFailure::Unreachable(why) if why.contains("certificate") => {
                "The IMAP server's TLS certificate is not trusted; give its CA to the listener with --imap-ca-file"
                    .into()
            }
            ImapFailure::Unreachable(_) | ImapFailure::Closed(_) => {
                "The IMAP server could not be reached at ServiceUrl and Port".into()
            }
            ImapFailure::Malformed(_) | ImapFailure::TooLarge { .. } => {
                "ServiceUrl and Port did not answer as an IMAP server".into()
            }
            ImapFailure::Refused { command, text, .. } => {
                format!("The IMAP server refused {command}: {text}")
            }
            ImapFailure::Config(why) => why.clone(),
            ImapFailure::ValidityChanged { folder } => {
                format!("The IMAP server renumbered the folder {folder:?}")
            }
            ImapFailure::Busy { open } => format!(
                "{open} connections to the IMAP server for this user are open already (--imap-connections-per-user); waiting for one to close"
            ),
        }
    }

    fn class_name(&self) -> &'static str {
        match self {
            ImapFailure::Rejected(_) => "ImapAuthenticationFailed",
            ImapFailure::Unreachable(_) => "ImapUnreachable",
            ImapFailure::Closed(_) => "ImapConnectionClosed",
            ImapFailure::Refused { .. } => "ImapCommandRefused",
            ImapFailure::Malformed(_) => "ImapMalformedAnswer",
            ImapFailure::TooLarge { .. } => "ImapAnswerTooLarge",
            ImapFailure::Config(_) => "ImapConfiguration",
            ImapFailure::ValidityChanged { .. } => "ImapUidValidityChanged",
            ImapFailure::Busy { .. } => "ImapConnectionLimit",
        }
    }

    fn credentials_rejected(&self) -> bool {
        matches!(self, ImapFailure::Rejected(_))
    }

    fn cursor_rejected(&self) -> bool {
        matches!(self, ImapFailure::ValidityChanged { .. })
    }

    fn too_large(&self) -> Option<u64> {
        match self {
            ImapFailure::TooLarge { limit } => Some(*limit),
            _ => None,
        }
    }
}

impl From<ImapFailure> for Failure {
    fn from(f: ImapFailure) -> Failure {
        Failure::server(f)
    }
}
