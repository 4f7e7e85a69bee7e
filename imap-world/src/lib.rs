//! The IMAP side of the test world, shared by the listener's tests and the harness: a real
//! IMAP server ([`Dovecot`], Debian's `dovecot-imapd`, started as a child process with a
//! configuration of its own under a temporary folder) and a small SMTP server ([`SmtpSink`])
//! that hands what it accepts to Dovecot, so a sent mail can be seen arriving in a mailbox.

mod dovecot;
mod smtp;

pub use dovecot::{Dovecot, Options, mail};
pub use smtp::{Accepted, SmtpSink};

use std::time::Duration;

/// Polls `probe` every 20 ms until it yields a value, or fails after `patience`.
async fn within<T>(
    what: &str,
    patience: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {patience:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
