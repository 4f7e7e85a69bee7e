//! Errors decoded from EWS responses.

use std::fmt;
use std::time::Duration;

/// Anything that keeps a response from yielding the value asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EwsError {
    /// The bytes are not well-formed XML, or not the SOAP shape expected.
    #[error("malformed EWS response: {0}")]
    Malformed(String),
    /// The server answered with a SOAP fault (usually HTTP 500).
    #[error("SOAP fault {0}")]
    Fault(Fault),
    /// The server answered with a response message whose class is `Error`.
    #[error("EWS error {0}")]
    Response(ResponseError),
}

impl EwsError {
    /// The EWS `ResponseCode` behind this error, when the server gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            EwsError::Malformed(_) => None,
            EwsError::Fault(f) => Some(&f.code),
            EwsError::Response(r) => Some(&r.code),
        }
    }

    /// How long the server asked the client to wait before retrying, if it said.
    pub fn back_off(&self) -> Option<Duration> {
        match self {
            EwsError::Fault(f) => f.back_off,
            EwsError::Response(r) => r.back_off,
            EwsError::Malformed(_) => None,
        }
    }
}

/// A SOAP fault: `faultcode`/`faultstring` plus EWS's `detail` (`ResponseCode`, `Message`,
/// and `BackOffMilliseconds` when throttled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The EWS response code from `detail/e:ResponseCode`, or the local part of `faultcode`.
    pub code: String,
    pub message: String,
    pub back_off: Option<Duration>,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(b) = self.back_off {
            write!(f, " (back off {} ms)", b.as_millis())?;
        }
        Ok(())
    }
}

/// A response message with `ResponseClass="Error"` (or `Warning`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
    pub back_off: Option<Duration>,
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}
