//! Catching up: what arrived while no stream was open, from the cursor kept in the store —
//! a baseline listed page by page, a recovery of what was received since a moment, a live
//! sync delivering what is new — each step saved before the next.

use super::*;

impl Worker {
    /// Delivers what arrived while no stream was open, from the stored cursor, whose phase
    /// says what is owed: a baseline lists the inbox without delivering it (a new mailbox's
    /// existing mail is not new), a recovery delivers what was received since a moment, and
    /// a live cursor delivers every item after it. Each step is saved before the next, so an
    /// interruption resumes where it stood. Runs before every connection; events that arrive
    /// meanwhile wait on the subscription. False when cancelled.
    pub(super) async fn catch_up(&mut self) -> Result<bool, EwsFailure> {
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
        loop {
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
            let known = (!cursor.state.is_empty()).then_some(cursor.state.as_str());
            let page = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(false),
                r = self.exchange.sync_inbox(known, SYNC_PAGE) => r,
            };
            let page = match page {
                Ok(page) => page,
                Err(f) if known.is_some() && f.code() == Some("ErrorInvalidSyncStateData") => {
                    // The server no longer knows our state: take a new baseline, then find
                    // what arrived since the last sync by its received time.
                    tracing::warn!(
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
                    continue;
                }
                Err(f) => return Err(f),
            };
            if cursor.phase == SyncPhase::Live {
                let created: Vec<String> = page
                    .changes
                    .iter()
                    .filter_map(|c| match c {
                        ews::SyncChange::Create(id) => Some(id.id.clone()),
                        _ => None,
                    })
                    .collect();
                if !created.is_empty() {
                    tracing::info!(
                        items = created.len(),
                        "catching up on mail that arrived while not streaming"
                    );
                    if !self.deliver(created).await? {
                        return Ok(false);
                    }
                }
            }
            cursor.state = page.sync_state;
            let complete = page.includes_last_item_in_range;
            if complete {
                // Everything received before the request was listed.
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
            }
            if !self.save_cursor(&cursor).await? {
                return Ok(false);
            }
            if complete && cursor.phase == SyncPhase::Live {
                return Ok(true);
            }
        }
    }

    /// Saves the cursor under the lease; false when the lease is gone (the worker stops).
    async fn save_cursor(&self, cursor: &SyncCursor) -> Result<bool, EwsFailure> {
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
    async fn recover_since(&mut self, since_unix_ms: i64) -> Result<bool, EwsFailure> {
        let offset = self.exchange.clock_offset_ms().unwrap_or(0);
        self.recover_gap(since_unix_ms + offset - RECEIVED_ROUNDING_MS)
            .await
    }

    /// Delivers what the inbox received since `since_unix_ms` (newest first from FindItem,
    /// handed on oldest first); what was already delivered is filtered out on the way. Runs
    /// after a new baseline, so mail arriving meanwhile is found by the next sync as well,
    /// and posted once. False when cancelled.
    async fn recover_gap(&mut self, since_unix_ms: i64) -> Result<bool, EwsFailure> {
        let mut found: Vec<String> = Vec::new();
        let mut offset = 0u32;
        loop {
            let page = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(false),
                r = self.exchange.find_recent_items(offset, FIND_PAGE) => r?,
            };
            let listed = page.items.len();
            let mut reached_older = false;
            for item in page.items {
                // An item without a readable time is kept: a duplicate is filtered, a loss is not.
                let received = item
                    .date_time_received
                    .as_deref()
                    .and_then(parse_xs_datetime);
                if received.is_some_and(|t| t < since_unix_ms) {
                    reached_older = true;
                    break;
                }
                found.push(item.id.id);
            }
            if found.len() >= MAX_GAP_ITEMS {
                tracing::warn!(
                    items = found.len(),
                    "the gap holds more mail than is recovered at once; older mail in it is not posted"
                );
                found.truncate(MAX_GAP_ITEMS);
                break;
            }
            if reached_older || listed == 0 || page.includes_last_item_in_range {
                break;
            }
            offset = page
                .next_offset
                .filter(|&next| next > offset)
                .unwrap_or(offset + listed as u32);
        }
        found.reverse();
        tracing::info!(
            items = found.len(),
            "recovering mail received since the last sync"
        );
        self.deliver(found).await
    }
}
