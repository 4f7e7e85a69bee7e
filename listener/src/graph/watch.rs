//! A watch by delta polling: every interval each watched folder's delta link is followed to
//! its end, and what it lists is reported as new. The interval adapts to the mailbox: the
//! shortest after a poll that found mail, doubling after each that found none, up to the
//! longest (with change notifications: a notification polls at once, and the interval
//! stays the longest, the polls only catching what a lost notification would miss). The first
//! report comes at once (the engine counts the watch open from it), and the watch ends cleanly
//! after its connection time, so the engine catches up and saves the links at least that
//! often.
//!
//! The engine drops a report it is waiting for when other work comes first (a history page,
//! a replay), so a poll that is due stays due until one has finished, and a poll changes the
//! watch's links only once it has followed them all.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::time::Instant;

use super::failure::GraphFailure;
use super::notify::Hint;
use super::{Polling, Shared};
use crate::engine::protocol::{Answer, Watch, WatchBatch};

/// Ids asked per delta page while watching.
const PAGE: u16 = 100;

pub(super) struct DeltaWatch {
    shared: Arc<Shared>,
    /// (folder, delta link) for each watched folder.
    links: Vec<(String, String)>,
    /// Where the mailbox keeps the latest links, for the next watch.
    kept: Arc<Mutex<Vec<(String, String)>>>,
    polling: Polling,
    /// What wakes it when Graph sends a change notification.
    hint: Option<Arc<Hint>>,
    interval: Duration,
    ends: Instant,
    reported: bool,
    /// Its interval passed or a notification came, and no poll has finished since.
    poll_due: bool,
}

impl DeltaWatch {
    pub(super) fn new(
        shared: Arc<Shared>,
        links: Vec<(String, String)>,
        kept: Arc<Mutex<Vec<(String, String)>>>,
        polling: Polling,
        hint: Option<Arc<Hint>>,
        lifetime: Duration,
    ) -> DeltaWatch {
        DeltaWatch {
            shared,
            links,
            kept,
            interval: if hint.is_some() {
                polling.max
            } else {
                polling.min
            },
            polling,
            hint,
            ends: Instant::now() + lifetime,
            reported: false,
            poll_due: false,
        }
    }

    /// Follows every folder's link to its end; the ids it lists, in order. The first page of
    /// every folder comes in `$batch` requests (one request for twenty folders); a folder
    /// with more pages follows them alone.
    async fn poll(&mut self) -> Result<Vec<String>, crate::engine::protocol::Failure> {
        let mut found = Vec::new();
        let firsts = {
            let links: Vec<&str> = self.links.iter().map(|(_, l)| l.as_str()).collect();
            self.shared.delta_pages(&links, PAGE).await?
        };
        let mut links = self.links.clone();
        for ((folder, link), first) in links.iter_mut().zip(firsts) {
            let mut page = first?;
            loop {
                found.extend(std::mem::take(&mut page.added));
                *link = std::mem::take(&mut page.state);
                if page.complete {
                    break;
                }
                page = self.shared.delta_page(folder, Some(link), PAGE).await?;
            }
        }
        self.links = links;
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        for (folder, link) in &self.links {
            if let Some((_, k)) = kept.iter_mut().find(|(f, _)| f == folder) {
                k.clone_from(link);
            }
        }
        Ok(found)
    }
}

impl Watch for DeltaWatch {
    fn next(&mut self) -> Answer<'_, Option<WatchBatch>> {
        async move {
            if !self.reported {
                self.reported = true;
                return Ok(Some(WatchBatch::default()));
            }
            if !self.poll_due {
                let now = Instant::now();
                if now >= self.ends {
                    return Ok(None);
                }
                let due = (now + self.interval).min(self.ends);
                match &self.hint {
                    Some(hint) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(due) => {}
                            () = hint.notify.notified() => {}
                        }
                        if hint.resubscribe.load(std::sync::atomic::Ordering::Relaxed) {
                            return Err(GraphFailure::SubscriptionGone(
                                "Graph removed the subscriptions or asked for them again".into(),
                            )
                            .into());
                        }
                    }
                    None => tokio::time::sleep_until(due).await,
                }
                self.poll_due = true;
            }
            let new_items = self.poll().await?;
            self.poll_due = false;
            self.interval = match (&self.hint, new_items.is_empty()) {
                // Notifications say when there is mail; polling is the safety net.
                (Some(_), _) => self.polling.max,
                (None, true) => (self.interval * 2).min(self.polling.max),
                (None, false) => self.polling.min,
            };
            Ok(Some(WatchBatch {
                new_items,
                ..WatchBatch::default()
            }))
        }
        .boxed()
    }
}
