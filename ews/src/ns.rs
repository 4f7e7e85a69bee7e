//! Namespace URIs of the EWS wire format. Matching is always by these URIs, never by prefix.

/// SOAP 1.1 envelope.
pub const SOAP: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// EWS types (`Types.xsd`), usual prefix `t`.
pub const TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
/// EWS messages (`Messages.xsd`), usual prefix `m`.
pub const MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
/// EWS SOAP-fault detail, usual prefix `e`.
pub const ERRORS: &str = "http://schemas.microsoft.com/exchange/services/2006/errors";
