//! The protocol-neutral core: mailboxes, their cursors, leases and mails, never a mail
//! protocol. The [`store`] keeps what replicas share; the [`coordinator`] holds leases and
//! spreads mailboxes over replicas ([`balance`]); the [`supervisor`] runs one [`worker`] per
//! mailbox it owns, admitted through the [`gate`]. A worker drives its mailbox's server
//! through the seam in [`protocol`]; [`send`] and [`fetch`] are Creatio's operations on a
//! mailbox; [`reach`] guards which addresses a call may lead to.

pub mod backoff;
pub mod balance;
pub mod coordinator;
pub mod fetch;
pub mod gate;
pub mod metrics;
pub mod protocol;
pub mod reach;
pub mod send;
pub mod store;
pub mod supervisor;
pub mod worker;
