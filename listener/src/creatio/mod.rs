//! Creatio's side: the wire [`contract`], the HTTP [`api`] Creatio calls, the [`delivery`] of
//! callbacks to Creatio, the one converter from a mail to Creatio's `Email` ([`mail`]), and the
//! MIME text of a mail Creatio sends ([`outgoing`]).

pub mod api;
pub mod contract;
pub mod delivery;
pub mod mail;
pub mod outgoing;
