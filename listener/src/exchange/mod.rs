//! Exchange over EWS: the per-mailbox [`client`], NTLM logins ([`ntlm`]), service accounts
//! that impersonate mailboxes ([`service_account`]) and the streams they share
//! ([`stream_groups`]).

pub mod client;
pub mod ntlm;
pub mod service_account;
pub mod stream_groups;
