//! Creatio's side: the wire [`contract`], the HTTP [`api`] Creatio calls, the [`delivery`] of
//! callbacks to Creatio, and the one converter from a mail to Creatio's `Email` ([`mail`]).

pub mod api;
pub mod contract;
pub mod delivery;
pub mod mail;
