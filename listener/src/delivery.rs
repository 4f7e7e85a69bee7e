//! Posting to Creatio: one JSON POST, retried with jittered backoff on what may pass
//! (connection errors, timeouts, 408, 429, 5xx) and given up at once on what will not (other
//! 4xx). Each mail carries a stable `Idempotency-Key`.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::backoff::BackoffPolicy;

#[derive(Debug, Clone)]
pub struct Delivery {
    http: reqwest::Client,
    policy: BackoffPolicy,
    attempts: u32,
    timeout: Duration,
}

/// Why a post did not get through.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("Creatio rejected the call with HTTP {0}")]
    Rejected(u16),
    #[error("Creatio did not accept the call after {attempts} attempts; last: {last}")]
    Exhausted { attempts: u32, last: String },
    #[error("stopped before the call got through")]
    Cancelled,
}

impl Delivery {
    pub fn new(
        http: reqwest::Client,
        policy: BackoffPolicy,
        attempts: u32,
        timeout: Duration,
    ) -> Self {
        Delivery {
            http,
            policy,
            attempts: attempts.max(1),
            timeout,
        }
    }

    /// Posts `body` to `url`, retrying under the policy until accepted, rejected, out of
    /// attempts, or cancelled.
    pub async fn post(
        &self,
        url: &str,
        body: &Value,
        idempotency_key: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let mut backoff = self.policy.start();
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            match self.post_once(url, body, idempotency_key).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Rejected(status)) => return Err(DeliveryError::Rejected(status)),
                Err(Attempt::Transient(why)) => {
                    tracing::debug!(url, attempt, error = %why, "Creatio call failed, will retry");
                    last = why;
                }
            }
            if attempt < self.attempts {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(DeliveryError::Cancelled),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
        Err(DeliveryError::Exhausted {
            attempts: self.attempts,
            last,
        })
    }

    /// Posts once, without retrying: for reports whose loss is harmless.
    pub async fn post_once_quietly(&self, url: &str, body: &Value) {
        if let Err(e) = self.post_once(url, body, None).await {
            let why = match e {
                Attempt::Rejected(status) => format!("HTTP {status}"),
                Attempt::Transient(why) => why,
            };
            tracing::warn!(url, error = %why, "Creatio did not take a mailbox state report");
        }
    }

    async fn post_once(
        &self,
        url: &str,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<(), Attempt> {
        let mut req = self.http.post(url).json(body).timeout(self.timeout);
        if let Some(key) = idempotency_key {
            req = req.header("Idempotency-Key", key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Attempt::Transient(e.without_url().to_string()))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Err(Attempt::Transient(format!("HTTP {}", status.as_u16())))
        } else {
            Err(Attempt::Rejected(status.as_u16()))
        }
    }
}

enum Attempt {
    Rejected(u16),
    Transient(String),
}
