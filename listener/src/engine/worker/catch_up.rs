//! Catching up: what arrived while no stream was open, from the cursor kept in the store —
//! a baseline listed page by page, a recovery of what was received since a moment, a live
//! sync delivering what is new — in every watched folder, each step saved before the next.

use super::*;

impl Worker {
    /// Delivers what arrived while no stream was open, from the stored cursor, whose phase
    /// says what is owed: a baseline lists the watched folders without delivering what they
    /// hold (a new mailbox's existing mail is not new), a recovery delivers what was received since a moment, and
    /// a live cursor delivers every item after it. Each step is saved before the next, so an
    /// interruption resumes where it stood. Runs before every connection; events that arrive
    /// meanwhile wait on the subscription. False when cancelled.
    pub(super) async fn catch_up(&mut self) -> Result<bool, Failure> {
        self.set_state(WorkerState::CatchingUp, None).await;
        // A mailbox stored before cursors had phases, or created without one, takes a baseline.
        let mut cursor = self
            .ctx
            .store
            .sync_state(self.id())
            .await?
            .unwrap_or(SyncCursor {
                state: String::new(),
                at_unix_ms: unix_now_ms(),
                phase: SyncPhase::Baseline {
                    recover_since_unix_ms: None,
                },
            });
        'pass: loop {
            if let SyncPhase::Recovering { since_unix_ms } = cursor.phase {
                if !self.recover_since(since_unix_ms).await? {
                    return Ok(false);
                }
                cursor.phase = SyncPhase::Live;
                if !self.save_cursor(&cursor).await? {
                    return Ok(false);
                }
                continue;
            }
            let asked_at = unix_now_ms();
            let mut states = FolderStates::decode(&cursor.state);
            // A folder no longer watched is forgotten; one newly watched has no state yet.
            states.0.retain(|(f, _)| self.folders.contains(f));
            let folders = self.folders.clone();
            for folder in &folders {
                // A folder first seen while live is listed before anything in it is new: the
                // mail it holds already is not.
                let deliver = cursor.phase == SyncPhase::Live && states.get(folder).is_some();
                loop {
                    let known = states.get(folder).map(str::to_owned);
                    let page = tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => return Ok(false),
                        r = self.server.sync_folder(folder, known.as_deref(), SYNC_PAGE) => r,
                    };
                    let page = match page {
                        Ok(page) => page,
                        Err(f) if known.is_some() && f.cursor_rejected() => {
                            // The server no longer knows our state: take a new baseline, then
                            // find what arrived since the last sync by its received time.
                            tracing::warn!(
                                folder = %folder,
                                "sync state rejected by the server; taking a new baseline and recovering the gap"
                            );
                            let since = match cursor.phase {
                                SyncPhase::Baseline {
                                    recover_since_unix_ms,
                                } => recover_since_unix_ms,
                                _ => Some(cursor.at_unix_ms - GAP_MARGIN_MS),
                            };
                            cursor.state.clear();
                            cursor.phase = SyncPhase::Baseline {
                                recover_since_unix_ms: since,
                            };
                            if !self.save_cursor(&cursor).await? {
                                return Ok(false);
                            }
                            continue 'pass;
                        }
                        Err(f) => return Err(f),
                    };
                    if deliver {
                        let created = page.added;
                        if !created.is_empty() {
                            tracing::info!(
                                items = created.len(),
                                folder = %folder,
                                "catching up on mail that arrived while not streaming"
                            );
                            if !self.deliver(created).await? {
                                return Ok(false);
                            }
                        }
                    }
                    states.set(folder, page.state);
                    cursor.state = states.encode();
                    if !self.save_cursor(&cursor).await? {
                        return Ok(false);
                    }
                    if page.complete {
                        break;
                    }
                }
            }
            // Everything received before the pass began was listed, in every folder.
            cursor.at_unix_ms = asked_at;
            if let SyncPhase::Baseline {
                recover_since_unix_ms,
            } = cursor.phase
            {
                cursor.phase = match recover_since_unix_ms {
                    Some(since_unix_ms) => SyncPhase::Recovering { since_unix_ms },
                    None => SyncPhase::Live,
                };
            }
            if !self.save_cursor(&cursor).await? {
                return Ok(false);
            }
            if cursor.phase == SyncPhase::Live {
                return Ok(true);
            }
        }
    }

    /// Saves the cursor under the lease; false when the lease is gone (the worker stops).
    async fn save_cursor(&self, cursor: &SyncCursor) -> Result<bool, Failure> {
        match self
            .ctx
            .store
            .set_sync_state(self.id(), cursor, &self.fence)
            .await
        {
            Ok(()) => Ok(true),
            Err(StoreError::Fenced) => {
                self.lost_lease();
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Delivers what the inbox received since `since_unix_ms` of this process's clock, read
    /// on the server's clock, less the second its received times are rounded to.
    async fn recover_since(&mut self, since_unix_ms: i64) -> Result<bool, Failure> {
        let offset = self.server.clock_offset_ms().unwrap_or(0);
        self.recover_gap(since_unix_ms + offset - RECEIVED_ROUNDING_MS)
            .await
    }

    /// Delivers what the watched folders received since `since_unix_ms` (newest first from
    /// the server's search, handed on oldest first); what was already delivered is filtered out on the
    /// way. Runs after a new baseline, so mail arriving meanwhile is found by the next sync as
    /// well, and posted once. False when cancelled.
    async fn recover_gap(&mut self, since_unix_ms: i64) -> Result<bool, Failure> {
        // (received time, item id); an item without a readable time is kept, as the newest:
        // a duplicate is filtered, a loss is not.
        let mut found: Vec<(i64, String)> = Vec::new();
        for folder in self.folders.clone() {
            // This folder's, newest first as the search lists them.
            let mut listed_here: Vec<(i64, String)> = Vec::new();
            let mut offset = 0u32;
            loop {
                let page = tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => return Ok(false),
                    r = self.server.find_recent_items(&folder, offset, FIND_PAGE) => r?,
                };
                let listed = page.items.len();
                let mut reached_older = false;
                for item in page.items {
                    let received = item.received_unix_ms;
                    if received.is_some_and(|t| t < since_unix_ms) {
                        reached_older = true;
                        break;
                    }
                    listed_here.push((received.unwrap_or(i64::MAX), item.id));
                }
                if listed_here.len() >= MAX_GAP_ITEMS {
                    break;
                }
                if reached_older || listed == 0 || page.complete {
                    break;
                }
                offset = page
                    .next_offset
                    .filter(|&next| next > offset)
                    .unwrap_or(offset + listed as u32);
            }
            listed_here.reverse();
            found.append(&mut listed_here);
        }
        // Oldest first (in the server's order among equal times); the newest kept when there
        // are more than are recovered at once.
        found.sort_by_key(|(at, _)| *at);
        if found.len() > MAX_GAP_ITEMS {
            tracing::warn!(
                items = found.len(),
                "the gap holds more mail than is recovered at once; older mail in it is not posted"
            );
            found.drain(..found.len() - MAX_GAP_ITEMS);
        }
        tracing::info!(
            items = found.len(),
            "recovering mail received since the last sync"
        );
        self.deliver(found.into_iter().map(|(_, id)| id).collect())
            .await
    }
}

/// The sync states of the watched folders, as the stored cursor's `state` holds them: a
/// `folders:1` line, then a `<folder>\t<state>` line per folder. A state without that first
/// line is the inbox's alone (as a cursor was written while only the inbox was watched).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct FolderStates(pub(super) Vec<(String, String)>);

const FOLDER_STATES: &str = "folders:1";

impl FolderStates {
    pub(super) fn decode(state: &str) -> FolderStates {
        match state.strip_prefix(FOLDER_STATES) {
            Some(lines) => FolderStates(
                lines
                    .lines()
                    .filter_map(|l| l.split_once('\t'))
                    .map(|(f, s)| (f.to_owned(), s.to_owned()))
                    .collect(),
            ),
            None if state.is_empty() => FolderStates::default(),
            None => FolderStates(vec![("inbox".to_owned(), state.to_owned())]),
        }
    }

    pub(super) fn encode(&self) -> String {
        let mut out = FOLDER_STATES.to_owned();
        for (folder, state) in &self.0 {
            out.push('\n');
            out.push_str(folder);
            out.push('\t');
            out.push_str(state);
        }
        out
    }

    pub(super) fn get(&self, folder: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, _)| f == folder)
            .map(|(_, s)| s.as_str())
            .filter(|s| !s.is_empty())
    }

    pub(super) fn set(&mut self, folder: &str, state: String) {
        match self.0.iter_mut().find(|(f, _)| f == folder) {
            Some(entry) => entry.1 = state,
            None => self.0.push((folder.to_owned(), state)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FolderStates;

    #[test]
    fn folder_states_read_what_they_write_and_an_inbox_state_of_old() {
        let states = FolderStates(vec![
            ("inbox".into(), "H4sIAAAA+/=".into()),
            ("AAMkAGI2=".into(), "H4sIBBBB".into()),
        ]);
        assert_eq!(FolderStates::decode(&states.encode()), states);
        assert_eq!(
            FolderStates::decode("H4sIAAAA"),
            FolderStates(vec![("inbox".into(), "H4sIAAAA".into())])
        );
        assert_eq!(FolderStates::decode(""), FolderStates::default());
        assert_eq!(FolderStates::decode("folders:1").get("inbox"), None);
    }
}
