//! Streaming: one subscription kept streamed across reconnects, and one connection from its
//! open to its end, each new item handed to delivery.

use super::*;

impl Worker {
    /// Keeps one subscription streamed until it is lost, fails for good, or is cancelled.
    pub(super) async fn stream_subscription(&mut self, sub_id: &str) -> Flow {
        loop {
            self.streaming_since = None;
            // Boxed, like the other brief states below: see [`run`].
            let end = match Box::pin(self.catch_up()).await {
                Ok(true) => self.stream_once(sub_id).await,
                Ok(false) => Ok(StreamEnd::Cancelled),
                Err(f) => Err(f),
            };
            // How long the server asked us to wait before reconnecting, if it said.
            let server_asked = match end {
                Ok(StreamEnd::Cancelled) => return Flow::Cancelled,
                Ok(StreamEnd::SubscriptionLost(f)) => {
                    tracing::info!(error = %f, "subscription lost, subscribing again");
                    self.set_state(WorkerState::Subscribing, Some(f.to_string()))
                        .await;
                    return Flow::Resubscribe;
                }
                Ok(StreamEnd::FoldersChanged) => {
                    // The old subscription lives on: give it back before the next one.
                    tracing::info!("the mailbox's folders changed; watching them anew");
                    self.unsubscribe(sub_id).await;
                    return Flow::Resubscribe;
                }
                Ok(StreamEnd::Ended) => None,
                Err(f) => match f.disposition() {
                    Disposition::Resubscribe => {
                        self.set_state(WorkerState::Subscribing, Some(f.to_string()))
                            .await;
                        return Flow::Resubscribe;
                    }
                    Disposition::Fatal => return Flow::Failed(f),
                    Disposition::Retry { after } => {
                        tracing::info!(error = %f, "event stream interrupted");
                        self.set_state(WorkerState::Backoff, Some(f.to_string()))
                            .await;
                        after
                    }
                },
            };
            if let Err(e) = self.ctx.store.bump(self.id(), Counter::Reconnects).await {
                tracing::warn!(error = %e, "could not count a reconnect");
            }
            let healthy = self
                .streaming_since
                .is_some_and(|since| since.elapsed() >= HEALTHY_CONNECTION);
            match server_asked {
                None if healthy => self.retry.reset(),
                after => {
                    let d = self.retry.next_delay_at_least(after);
                    self.set_state(WorkerState::Backoff, None).await;
                    if !self.sleep(d).await {
                        return Flow::Cancelled;
                    }
                }
            }
        }
    }

    /// One watch connection, from open to end. Its opening and first report (Exchange sends
    /// one at once) must come within the request timeout, and each later one within the idle
    /// timeout.
    async fn stream_once(&mut self, sub_id: &str) -> Result<StreamEnd, Failure> {
        let settings = self.ctx.settings.clone();
        let head_timeout = settings.limits.request_timeout;
        let open_timeout = head_timeout + self.server.open_allowance();
        let open = within(
            open_timeout,
            self.server
                .open_watch(sub_id, settings.connection_timeout_minutes),
            || {
                Failure::NoAnswer(format!(
                    "no answer to opening the stream within {open_timeout:?}"
                ))
            },
        );
        let mut stream = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Ok(StreamEnd::Cancelled),
            s = open => s?,
        };
        // The server accepted the stream: it is open and healthy until it says otherwise.
        self.set_state(WorkerState::Streaming, None).await;
        let replay = self.ctx.store.replay_signal(self.id());
        // Dead letters handed back before this worker started (or left by one that stopped
        // half-way) go first.
        if !Box::pin(self.replay()).await? {
            return Ok(StreamEnd::Cancelled);
        }
        let mut silence_allowed = head_timeout.min(settings.idle_timeout);
        // A history load may be waiting (asked before this connection, or left by a worker
        // that stopped): look once, then whenever work is handed over.
        let mut history_pending = true;
        loop {
            let batch = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(StreamEnd::Cancelled),
                _ = async { match &replay { Some(r) => r.notified().await, None => std::future::pending().await } } => {
                    if !Box::pin(self.replay()).await? {
                        return Ok(StreamEnd::Cancelled);
                    }
                    history_pending = true;
                    continue;
                }
                b = next_within(stream.as_mut(), silence_allowed) => b?,
                // The stream is quiet: a page of history, then back to the stream.
                () = std::future::ready(()), if history_pending => {
                    match Box::pin(self.history_step()).await? {
                        history::HistoryStep::More => {}
                        history::HistoryStep::Idle => history_pending = false,
                        history::HistoryStep::Cancelled => return Ok(StreamEnd::Cancelled),
                    }
                    continue;
                }
            };
            if self.streaming_since.is_none() {
                self.streaming_since = Some(Instant::now());
                silence_allowed = settings.idle_timeout;
            }
            let Some(batch) = batch else {
                return Ok(StreamEnd::Ended);
            };
            let new_items = batch.new_items;
            self.ctx.metrics.events.inc_by(new_items.len() as u64);
            if !new_items.is_empty()
                && let Err(e) = self.ctx.store.note_event(self.id()).await
            {
                self.store_failed("note_event");
                tracing::warn!(error = %e, "could not note an event");
            }
            if !new_items.is_empty() && !Box::pin(self.deliver(new_items)).await? {
                return Ok(StreamEnd::Cancelled);
            }
            if let Some(failure) = batch.failure {
                return match failure.disposition() {
                    Disposition::Resubscribe => Ok(StreamEnd::SubscriptionLost(failure)),
                    _ => Err(failure),
                };
            }
            // Watching every mail folder: one created, moved or deleted changes which.
            if batch.folders_changed && self.creds.folder_ids.is_empty() {
                return Ok(StreamEnd::FoldersChanged);
            }
            if batch.closed {
                return Ok(StreamEnd::Ended);
            }
        }
    }
}

/// The stream's next report, or [`Failure::Idle`] after `silence` without one.
async fn next_within(
    stream: &mut dyn Watch,
    silence: Duration,
) -> Result<Option<crate::engine::protocol::WatchBatch>, Failure> {
    within(silence, stream.next(), || Failure::Idle(silence)).await
}
