//! Delivery: new items fetched from the mail server and posted to Creatio, each outcome recorded
//! (delivered, skipped as gone, dead-lettered), and the outbox gauge that counts what waits.

use super::*;

impl Worker {
    /// Delivers the dead letters handed back for another try; false when cancelled.
    pub(super) async fn replay(&mut self) -> Result<bool, Failure> {
        let items = self.ctx.store.replays(self.id()).await?;
        if items.is_empty() {
            return Ok(true);
        }
        tracing::info!(items = items.len(), "replaying dead letters");
        self.deliver(items).await
    }

    /// Hands new items to Creatio, each recorded as delivered, skipped or dead-lettered;
    /// false when cancelled on the way (what was not recorded is found again by catch-up).
    pub(super) async fn deliver(&mut self, item_ids: Vec<String>) -> Result<bool, Failure> {
        let mut fresh: Vec<String> = Vec::with_capacity(item_ids.len());
        for id in item_ids {
            if self.ctx.store.is_new(self.id(), &id).await? {
                fresh.push(id);
            }
        }
        let mut pending = Pending::new(self.ctx.metrics.pending.clone(), fresh.len());
        match self.mode {
            CallbackMode::NewEmail => {
                // Creatio fetches the items itself; one call per item, so each carries its
                // own idempotency key.
                for id in &fresh {
                    let body = contract::new_email_payload(
                        &self.creds,
                        std::slice::from_ref(id),
                        contract::ticks_now(),
                    );
                    if !self.post(&body, id, None).await {
                        return Ok(false);
                    }
                    pending.settle(1);
                }
                Ok(true)
            }
            CallbackMode::ProcessFullEmail => {
                for batch in fresh.chunks(FETCH_BATCH) {
                    let Some(fetched) = self.fetch(batch).await? else {
                        return Ok(false);
                    };
                    for (id, item) in batch.iter().zip(fetched) {
                        match item {
                            Item::Mail(email) => {
                                self.fetched("mail");
                                let body = contract::full_email_payload(
                                    &self.creds,
                                    std::slice::from_ref(&email),
                                    contract::ticks_now(),
                                );
                                if !self.post(&body, id, Some(&email)).await {
                                    return Ok(false);
                                }
                            }
                            Item::Gone => {
                                self.fetched("gone");
                                tracing::info!(item = ?id, "new item gone before it could be read; skipped");
                                self.record(id, Outcome::Skipped).await;
                            }
                            Item::Dead(why) => {
                                self.fetched("dead");
                                self.dead_letter(id, None, why).await;
                            }
                        }
                        pending.settle(1);
                    }
                }
                Ok(true)
            }
        }
    }

    /// Fetches a batch of items, one result per id in order. Transient failures, of the call
    /// or of single items, are retried in place: the notification is already consumed. A
    /// batch too large to read is fetched one by one; one mail too large is a dead letter.
    /// `None` when cancelled.
    async fn fetch(&mut self, ids: &[String]) -> Result<Option<Vec<Item>>, Failure> {
        let mut results: Vec<Option<Item>> = ids.iter().map(|_| None).collect();
        // Indices into `ids` still to fetch, and how many go in one call.
        let mut pending: Vec<usize> = (0..ids.len()).collect();
        let mut per_call = ids.len();
        let mut backoff = self.ctx.settings.retry.start();
        while !pending.is_empty() {
            let call: Vec<usize> = pending.iter().copied().take(per_call).collect();
            let refs: Vec<&str> = call.iter().map(|&i| ids[i].as_str()).collect();
            let result = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(None),
                r = self.server.get_items(&refs) => r,
            };
            let failure = match result {
                Ok(items) => {
                    let mut transient = None;
                    for (&i, item) in call.iter().zip(items) {
                        match item {
                            Ok(item) => results[i] = Some(item),
                            Err(f) => transient = Some(f),
                        }
                    }
                    pending.retain(|&i| results[i].is_none());
                    match transient {
                        None => {
                            backoff.reset();
                            continue;
                        }
                        Some(f) => f,
                    }
                }
                Err(f) if f.too_large().is_some() => {
                    if call.len() == 1 {
                        let i = call[0];
                        results[i] = Some(Item::Dead(format!(
                            "the mail is larger than the {}-byte limit on the server's answers",
                            f.too_large().unwrap_or_default()
                        )));
                        pending.retain(|&p| p != i);
                    }
                    per_call = 1;
                    continue;
                }
                Err(f) => f,
            };
            match failure.disposition() {
                Disposition::Retry { after } if backoff.attempts() + 1 < FETCH_ATTEMPTS => {
                    let delay = backoff.next_delay_at_least(after);
                    tracing::info!(error = %failure, retry_in_ms = delay.as_millis() as u64, "fetching new items failed");
                    if !self.sleep(delay).await {
                        return Ok(None);
                    }
                }
                _ => return Err(failure),
            }
        }
        Ok(Some(results.into_iter().flatten().collect()))
    }

    /// Posts one mail's callback and records the outcome; false when cancelled before it
    /// got through.
    async fn post(
        &self,
        body: &contract::CallbackBody,
        item_id: &str,
        email: Option<&contract::Email>,
    ) -> bool {
        // Nothing is posted once the lease may have passed to another replica.
        if self.cancel.is_cancelled() || !self.ctx.leases.holds(self.id(), &self.fence) {
            self.lost_lease();
            return false;
        }
        let key = idempotency_key(self.id(), item_id);
        let started = Instant::now();
        let outcome = self
            .ctx
            .creatio
            .post(&self.creds.bpm_endpoint, body, Some(&key), &self.cancel)
            .await;
        let delivered = match &outcome {
            Ok(()) => Some("delivered"),
            Err(DeliveryError::Cancelled) => None,
            Err(_) => Some("dead_letter"),
        };
        if let Some(result) = delivered {
            let m = &self.ctx.metrics;
            m.deliveries
                .with_label_values(&[result, self.operation()])
                .inc();
            if outcome.is_ok() {
                m.delivery_seconds
                    .with_label_values(&[self.operation()])
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        match outcome {
            Ok(()) => {
                self.record(item_id, Outcome::Delivered).await;
                tracing::debug!(item = ?item_id, "delivered to Creatio");
            }
            Err(DeliveryError::Cancelled) => return false,
            Err(e) => self.dead_letter(item_id, email, e.to_string()).await,
        }
        true
    }

    async fn dead_letter(&self, item_id: &str, email: Option<&contract::Email>, error: String) {
        let message_id = email.map(|e| e.message_id.clone());
        tracing::error!(item = ?item_id, message_id = ?message_id, error = %error, "mail dead-lettered");
        let letter = DeadLetter {
            item_id: item_id.to_owned(),
            message_id,
            subject: email.map(|e| e.subject.clone()),
            error,
            unix_ms: unix_now_ms(),
        };
        self.record(item_id, Outcome::DeadLettered(letter)).await;
    }

    /// Records what became of an item. Should the store fail here, the item may be posted
    /// again later, under the same idempotency key: a duplicate Creatio can recognise, never
    /// a loss.
    async fn record(&self, item_id: &str, outcome: Outcome) {
        match self
            .ctx
            .store
            .record(self.id(), item_id, outcome, &self.fence)
            .await
        {
            Ok(()) => {}
            Err(StoreError::Fenced) => self.lost_lease(),
            Err(e) => {
                self.store_failed("record");
                tracing::warn!(item = ?item_id, error = %e, "could not record a delivered item")
            }
        }
    }

    fn fetched(&self, outcome: &str) {
        self.ctx.metrics.fetches.with_label_values(&[outcome]).inc();
    }
}

/// Items of one delivery counted in the outbox gauge until each is settled; what is left
/// when the delivery ends early (cancelled, fetch failed) leaves the gauge with it, since
/// catch-up finds it again.
struct Pending {
    gauge: prometheus::IntGauge,
    left: usize,
}

impl Pending {
    fn new(gauge: prometheus::IntGauge, items: usize) -> Self {
        gauge.add(items as i64);
        Pending { gauge, left: items }
    }

    fn settle(&mut self, items: usize) {
        let n = items.min(self.left);
        self.left -= n;
        self.gauge.sub(n as i64);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.gauge.sub(self.left as i64);
    }
}
