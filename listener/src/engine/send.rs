//! Creatio's `email/send`: one mail sent through the mailbox's server, once. The store keeps a
//! ledger of what was sent, across replicas, so that Creatio's retry of a mail (the same
//! sender and Message-ID) within a day answers "sent" without sending it again; a send whose
//! replica died midway is taken over, after a look into Sent Items for whether it went out.

use sha2::{Digest, Sha256};

use crate::creatio::contract::SendCommand;
use crate::engine::metrics::Metrics;
use crate::engine::protocol::MailServer;
use crate::engine::protocol::error_chain;
use crate::engine::store::{SendClaim, Store};

/// What Creatio shows its user when a send did not happen; `None` when it did.
pub type SendAnswer = Option<String>;

/// The ledger's key of a mail: a digest of its sender and its Message-ID (or Creatio's id).
pub fn ledger_key(command: &SendCommand) -> String {
    let mut hash = Sha256::new();
    hash.update(command.creds.sender_email.to_ascii_lowercase().as_bytes());
    hash.update(b"\n");
    hash.update(command.key.as_bytes());
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Sends the mail unless the ledger says it went out already.
pub async fn send_once(
    server: &dyn MailServer,
    store: &dyn Store,
    metrics: &Metrics,
    command: &SendCommand,
) -> SendAnswer {
    let key = ledger_key(command);
    let mailbox = command.creds.sender_email.as_str();
    let message_id = command.email.message_id.as_deref();
    let count = |outcome: &str| metrics.sends.with_label_values(&[outcome]).inc();
    match store.begin_send(&key).await {
        Err(e) => {
            tracing::warn!(mailbox, error = %e, "cannot reach the store to send a mail; not sent");
            count("failed");
            return Some("The Email Listener cannot reach its store; try again".into());
        }
        Ok(SendClaim::Sent) => {
            tracing::info!(
                mailbox,
                message_id,
                "a mail sent before was asked again; not sent twice"
            );
            count("already_sent");
            return None;
        }
        Ok(SendClaim::Busy) => {
            tracing::info!(mailbox, message_id, "a mail being sent was asked again");
            count("busy");
            return Some(
                "This message is being sent already; it will show as sent when it has gone".into(),
            );
        }
        Ok(SendClaim::Stale) => {
            if let Some(id) = message_id
                && gone_out(server, id).await
            {
                tracing::info!(
                    mailbox,
                    message_id,
                    "a send interrupted earlier had gone out; not sent twice"
                );
                end(store, &key, true).await;
                count("already_sent");
                return None;
            }
        }
        Ok(SendClaim::New) => {}
    }
    let mut result = server.send(&command.email).await;
    if let Err(e) = &result
        && e.send_in_doubt()
        && let Some(id) = message_id
        && gone_out(server, id).await
    {
        // The server took the mail but its answer was lost.
        result = Ok(());
    }
    end(store, &key, result.is_ok()).await;
    match result {
        Ok(()) => {
            tracing::info!(
                mailbox,
                message_id,
                attachments = command.email.attachments.len(),
                attachment_bytes = command.email.attachment_bytes(),
                "mail sent"
            );
            count("sent");
            None
        }
        Err(e) => {
            let refused = e.send_refused();
            tracing::warn!(mailbox, message_id, error = %error_chain(&e), "mail not sent");
            count(if refused { "refused" } else { "failed" });
            Some(e.unsent_sentence())
        }
    }
}

/// Whether Sent Items holds the mail; a failed look counts as no.
async fn gone_out(server: &dyn MailServer, message_id: &str) -> bool {
    match server.was_sent(message_id).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(message_id, error = %error_chain(&e), "cannot look into Sent Items");
            false
        }
    }
}

async fn end(store: &dyn Store, key: &str, sent: bool) {
    if let Err(e) = store.end_send(key, sent).await {
        tracing::warn!(error = %e, sent, "cannot record how a send ended");
    }
}
