//! The in-memory store of mailboxes: each one's credentials, its worker's observable status,
//! and the set of items already handed to Creatio (so a mail announced twice, or seen again
//! after a reconnect, is posted once). This is the embedded store; a shared one for several
//! replicas keeps the same records.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::contract::Credentials;
use crate::mail::unix_now_ms;

/// Where a mailbox's worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WorkerState {
    Starting,
    Subscribing,
    /// Reading what arrived while no stream was open (SyncFolderItems).
    CatchingUp,
    Streaming,
    /// Waiting before a retry after a transient failure.
    Backoff,
    /// Stopped trying at full speed: the credentials or configuration are wrong. Retries
    /// continue slowly, and a new Create/Update restarts at once.
    Failed,
}

/// What any caller may see of a mailbox: no credentials.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct MailboxStatus {
    pub state: WorkerState,
    pub last_error: Option<String>,
    pub delivered: u64,
    pub dead_letters: u64,
    pub reconnects: u64,
    pub updated_unix_ms: i64,
}

impl Default for MailboxStatus {
    fn default() -> Self {
        MailboxStatus {
            state: WorkerState::Starting,
            last_error: None,
            delivered: 0,
            dead_letters: 0,
            reconnects: 0,
            updated_unix_ms: unix_now_ms(),
        }
    }
}

/// Item ids already delivered, bounded: the oldest are forgotten first.
#[derive(Debug, Default)]
struct DeliveredSet {
    order: VecDeque<String>,
    set: HashSet<String>,
}

/// How many delivered ids a mailbox remembers.
const DELIVERED_MEMORY: usize = 10_000;

impl DeliveredSet {
    fn insert(&mut self, id: &str) -> bool {
        if !self.set.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > DELIVERED_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

#[derive(Debug)]
struct Entry {
    credentials: Credentials,
    status: MailboxStatus,
    delivered: DeliveredSet,
    /// Where the inbox's SyncFolderItems catch-up stands; `None` until the first sync.
    sync_state: Option<String>,
}

/// A cheap, cloneable handle to the store.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a mailbox's credentials; its status restarts, its delivered set and sync state
    /// are kept (so a recreated mailbox catches up on what arrived meanwhile).
    pub fn upsert(&self, credentials: Credentials) {
        let mut map = self.lock();
        match map.get_mut(&credentials.id) {
            Some(entry) => {
                entry.credentials = credentials;
                entry.status = MailboxStatus {
                    delivered: entry.status.delivered,
                    dead_letters: entry.status.dead_letters,
                    ..MailboxStatus::default()
                };
            }
            None => {
                map.insert(
                    credentials.id.clone(),
                    Entry {
                        credentials,
                        status: MailboxStatus::default(),
                        delivered: DeliveredSet::default(),
                        sync_state: None,
                    },
                );
            }
        }
    }

    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    pub fn status(&self, id: &str) -> Option<MailboxStatus> {
        self.lock().get(id).map(|e| e.status.clone())
    }

    pub fn credentials(&self, id: &str) -> Option<Credentials> {
        self.lock().get(id).map(|e| e.credentials.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn sync_state(&self, id: &str) -> Option<String> {
        self.lock().get(id).and_then(|e| e.sync_state.clone())
    }

    pub fn set_sync_state(&self, id: &str, state: &str) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.sync_state = Some(state.to_owned());
        }
    }

    /// Changes a mailbox's status in place (nothing happens if it was removed meanwhile).
    pub fn update_status(&self, id: &str, f: impl FnOnce(&mut MailboxStatus)) {
        if let Some(entry) = self.lock().get_mut(id) {
            f(&mut entry.status);
            entry.status.updated_unix_ms = unix_now_ms();
        }
    }

    /// True if this item was not delivered before for this mailbox.
    pub fn is_new(&self, id: &str, item_id: &str) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|e| !e.delivered.set.contains(item_id))
    }

    /// Records an item as delivered (or dead-lettered: it will not be posted again).
    pub fn mark_delivered(&self, id: &str, item_id: &str, dead_letter: bool) {
        if let Some(entry) = self.lock().get_mut(id) {
            if entry.delivered.insert(item_id) {
                if dead_letter {
                    entry.status.dead_letters += 1;
                } else {
                    entry.status.delivered += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_set_forgets_the_oldest_beyond_its_bound() {
        let mut s = DeliveredSet::default();
        for i in 0..=DELIVERED_MEMORY {
            assert!(s.insert(&i.to_string()));
        }
        assert!(!s.insert(&DELIVERED_MEMORY.to_string()));
        assert!(s.insert("0"), "the oldest id was forgotten");
        assert_eq!(s.set.len(), DELIVERED_MEMORY);
    }
}
