//! Sans-IO Exchange Web Services.
//!
//! This crate owns the EWS wire format and nothing else: it builds SOAP request bodies
//! ([`request`]), parses response envelopes into typed values ([`response`]), and splits the
//! body of a `GetStreamingEvents` response into complete envelopes however the bytes arrive
//! ([`stream`]). It performs no I/O, holds no clocks and knows no HTTP client; callers bring the
//! bytes. Elements are matched by namespace URI and local name, never by prefix, because real
//! servers use `soap:`, `s:`, `soap11:` and the default namespace interchangeably.

pub mod error;
pub mod ns;
pub mod request;
pub mod response;
pub mod stream;
mod xml;

pub use error::{EwsError, Fault, ResponseError};
pub use request::{
    BaseShape, EventType, FolderRef, ItemShape, OutgoingAttachment, OutgoingMessage, Recipient,
    RequestHeader, ServerVersion,
};
pub use response::{
    ConnectionStatus, Event, EventKind, EventTarget, FindPage, Folder, FolderPage, FoundFolder,
    FoundItem, ItemId, Mailbox, Message, Notification, ServerVersionInfo, StreamBatch,
    SubscriptionError, SyncChange, SyncPage,
};
pub use stream::EnvelopeSplitter;
