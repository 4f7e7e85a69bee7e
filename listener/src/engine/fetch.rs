//! Creatio's `email/fetch`: mails it knows by Message-ID, found in the mailbox's watched
//! folders (the first that holds each) and posted through `ProcessFullEmail`, whether or not the mailbox is subscribed here. A mail
//! not found is logged and skipped; one that cannot be read or posted is logged with why.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::creatio::contract::{self, Credentials};
use crate::creatio::delivery::{Creatio, idempotency_key};
use crate::engine::protocol::error_chain;
use crate::engine::protocol::{Item, MailServer};
use crate::engine::worker::FETCH_BATCH;

/// Finds each Message-ID in the watched folders and posts what it finds; answers how many
/// were posted.
pub async fn fetch_and_post(
    server: Box<dyn MailServer>,
    creds: Credentials,
    message_ids: Vec<String>,
    creatio: Arc<dyn Creatio>,
) -> usize {
    let folders = match server.watched_folders(&creds.folder_ids).await {
        Ok(folders) => folders,
        Err(e) => {
            tracing::warn!(id = ?creds.id, error = %error_chain(&e), "could not list the mailbox's folders; looking in the inbox alone");
            vec!["inbox".to_owned()]
        }
    };
    let mut items: Vec<String> = Vec::new();
    'wanted: for message_id in &message_ids {
        for folder in &folders {
            match server.find_by_message_id(folder, message_id).await {
                Ok(found) if found.is_empty() => {}
                Ok(found) => {
                    items.extend(found);
                    continue 'wanted;
                }
                Err(e) => {
                    tracing::warn!(id = ?creds.id, message_id = ?message_id, error = %error_chain(&e), "could not look for a mail Creatio asked for");
                }
            }
        }
        tracing::info!(id = ?creds.id, message_id = ?message_id, "a mail Creatio asked for is in none of the watched folders; skipped");
    }
    let url = contract::sibling_url(&creds.bpm_endpoint, "ProcessFullEmail");
    let never = CancellationToken::new();
    let mut posted = 0;
    for batch in items.chunks(FETCH_BATCH) {
        let ids: Vec<&str> = batch.iter().map(String::as_str).collect();
        let fetched = match server.get_items(&ids).await {
            Ok(fetched) => fetched,
            Err(e) => {
                tracing::warn!(id = ?creds.id, items = ids.len(), error = %error_chain(&e), "could not read mails Creatio asked for");
                continue;
            }
        };
        for (item_id, item) in batch.iter().zip(fetched) {
            let email = match item {
                Ok(Item::Mail(email)) => *email,
                Ok(Item::Gone) => {
                    tracing::info!(id = ?creds.id, item = ?item_id, "a mail Creatio asked for was gone before it could be read");
                    continue;
                }
                Ok(Item::Dead(why)) => {
                    tracing::warn!(id = ?creds.id, item = ?item_id, why = %why, "the server would not give a mail Creatio asked for");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(id = ?creds.id, item = ?item_id, error = %error_chain(&e), "could not read a mail Creatio asked for");
                    continue;
                }
            };
            let body = contract::full_email_payload(
                &creds,
                std::slice::from_ref(&email),
                contract::ticks_now(),
            );
            let key = idempotency_key(&creds.id, item_id);
            match creatio.post(&url, &body, Some(&key), &never).await {
                Ok(()) => posted += 1,
                Err(e) => {
                    tracing::warn!(id = ?creds.id, message_id = ?email.message_id, error = %e, "Creatio did not take a mail it asked for")
                }
            }
        }
    }
    tracing::info!(id = ?creds.id, asked = message_ids.len(), posted, "fetch done");
    posted
}
