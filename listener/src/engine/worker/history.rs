//! History: a load of the mail received since a moment, asked by Creatio
//! (`email/synchronize`), run a page at a time between the stream's messages so that new mail
//! keeps flowing. Each page's progress is saved under the lease, so a load resumes where it
//! stood after a restart or on the replica the mailbox moves to; what was delivered already
//! (by the stream, or by a page listed again) is filtered out on the way.

use super::*;
use crate::engine::store::HistoryJob;

/// Mails listed, fetched and posted per step of a history load.
pub(super) const HISTORY_PAGE: u16 = 50;

/// How a step of a history load ended.
pub(super) enum HistoryStep {
    /// A page was handled; more remains (or another load replaced this one).
    More,
    /// No load runs (any more).
    Idle,
    Cancelled,
}

impl Worker {
    /// One page of the mailbox's history load, if one runs: the next mails received since its
    /// moment, oldest first, delivered unless delivered before, and the progress saved.
    pub(super) async fn history_step(&mut self) -> Result<HistoryStep, Failure> {
        let Some(job) = self.ctx.store.history(self.id()).await? else {
            self.history_resumed = None;
            return Ok(HistoryStep::Idle);
        };
        let mut offset = job.offset;
        if self.history_resumed != Some(job.since_unix_ms) {
            // Taken up here for the first time: list the last page saved again, in case mail
            // before it was deleted since and the rest slid back under the saved offset.
            offset = offset.saturating_sub(u32::from(HISTORY_PAGE));
            self.history_resumed = Some(job.since_unix_ms);
            tracing::info!(
                since = %crate::creatio::mail::xs_datetime(job.since_unix_ms),
                done = job.done,
                "loading the mailbox's history"
            );
        }
        // The watched folders one after another; a folder no longer watched ends its part.
        let Some(folder) = self.folders.get(job.folder as usize).cloned() else {
            return self.save_history(&job, None).await;
        };
        let page = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Ok(HistoryStep::Cancelled),
            r = self.server.find_received_since(&folder, job.since_unix_ms, offset, HISTORY_PAGE) => r?,
        };
        let listed = page.items.len();
        let ids: Vec<String> = page.items.into_iter().map(|i| i.id).collect();
        if !self.deliver(ids).await? {
            return Ok(HistoryStep::Cancelled);
        }
        self.ctx.metrics.history_mails.inc_by(listed as u64);
        let reached = offset + listed as u32;
        // Done with this folder: on to the next, from its start.
        let folder_done = page.complete || listed == 0;
        let in_view = page
            .total
            .map_or(u64::from(reached), u64::from)
            .max(u64::from(reached));
        let done = job.done - u64::from(job.offset.min(offset)) + u64::from(reached);
        let progress = HistoryJob {
            folder: job.folder + u32::from(folder_done),
            offset: if folder_done { 0 } else { reached },
            done,
            total: job.total.max(done - u64::from(reached) + in_view),
            ..job
        };
        self.save_history(&job, Some(&progress)).await
    }

    /// Saves a step's progress, or that the load is done when no watched folder is left.
    async fn save_history(
        &mut self,
        job: &HistoryJob,
        progress: Option<&HistoryJob>,
    ) -> Result<HistoryStep, Failure> {
        let finished = progress.is_none_or(|p| p.folder as usize >= self.folders.len());
        let saved = self
            .ctx
            .store
            .set_history(
                self.id(),
                job.since_unix_ms,
                if finished { None } else { progress },
                &self.fence,
            )
            .await;
        match saved {
            Ok(true) if finished => {
                tracing::info!(
                    mails = progress.map_or(job.done, |p| p.done),
                    "the mailbox's history is loaded"
                );
                self.history_resumed = None;
                Ok(HistoryStep::Idle)
            }
            // Saved; or replaced by a load from an earlier moment, which the next step takes up.
            Ok(_) => Ok(HistoryStep::More),
            Err(StoreError::Fenced) => {
                self.lost_lease();
                Ok(HistoryStep::Cancelled)
            }
            Err(e) => Err(e.into()),
        }
    }
}
