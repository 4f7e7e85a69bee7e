//! Posting to Creatio: one JSON POST, retried with jittered backoff on what may pass
//! (connection errors, timeouts, 408, 429, 5xx; a `Retry-After` is honoured) for as long as
//! the retry budget lasts, and given up at once on what will not (other 4xx). A 401, 403 or
//! 404 from a Creatio that took calls before is what an ingress or a firewall answers while
//! Creatio is redeployed, so it is retried within the same budget. Each mail carries a stable
//! `Idempotency-Key`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::creatio::contract::CallbackBody;
use crate::engine::backoff::{BackoffPolicy, retry_after};

#[derive(Debug, Clone)]
pub struct Delivery {
    http: reqwest::Client,
    policy: BackoffPolicy,
    /// How long one mail is retried before it becomes a dead letter.
    give_up_after: Duration,
    timeout: Duration,
    /// The Creatio origins (scheme, host, port) that took a call since this process started.
    answered: Arc<Mutex<HashSet<String>>>,
}

/// Statuses a gateway in front of Creatio answers while Creatio itself is away.
const GATEWAY_REFUSALS: [u16; 3] = [401, 403, 404];

/// The scheme, host and port of `url`.
fn origin(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    Some(url.origin().ascii_serialization())
}

/// Why a post did not get through.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("Creatio rejected the call with HTTP {0}")]
    Rejected(u16),
    #[error(
        "Creatio did not accept the call in {attempts} attempts over {elapsed:?}; last: {last}"
    )]
    Exhausted {
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("stopped before the call got through")]
    Cancelled,
}

/// The `Idempotency-Key` of one mail of one mailbox: 32 hex digits, the same on every retry,
/// replay and replica, whatever the length of the ids.
pub fn idempotency_key(mailbox_id: &str, item_id: &str) -> String {
    let mut input = Vec::with_capacity(mailbox_id.len() + item_id.len() + 1);
    input.extend_from_slice(mailbox_id.as_bytes());
    input.push(0);
    input.extend_from_slice(item_id.as_bytes());
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&input))
}

/// The longest `Retry-After` honoured; a larger one is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

impl Delivery {
    pub fn new(
        http: reqwest::Client,
        policy: BackoffPolicy,
        give_up_after: Duration,
        timeout: Duration,
    ) -> Self {
        Delivery {
            http,
            policy,
            give_up_after,
            timeout,
            answered: Arc::default(),
        }
    }

    /// Posts `body` to `url`, retrying under the policy until accepted, rejected, out of
    /// time, or cancelled. A call under way when `cancel` fires completes first.
    pub async fn post(
        &self,
        url: &str,
        body: &CallbackBody,
        idempotency_key: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let started = Instant::now();
        let mut backoff = self.policy.start();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (why, asked) = match self.post_once(url, body, idempotency_key).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Rejected(status))
                    if GATEWAY_REFUSALS.contains(&status) && self.answered_before(url) =>
                {
                    (
                        format!("HTTP {status} from a Creatio that took calls before"),
                        None,
                    )
                }
                Err(Attempt::Rejected(status)) => return Err(DeliveryError::Rejected(status)),
                Err(Attempt::Transient { why, retry_after }) => (why, retry_after),
            };
            let delay = backoff.next_delay_at_least(asked.map(|d| d.min(MAX_RETRY_AFTER)));
            let elapsed = started.elapsed();
            if elapsed + delay > self.give_up_after {
                return Err(DeliveryError::Exhausted {
                    attempts,
                    elapsed,
                    last: why,
                });
            }
            tracing::debug!(attempt = attempts, error = %why, retry_in_ms = delay.as_millis() as u64, "Creatio call failed, will retry");
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(DeliveryError::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn answered_before(&self, url: &str) -> bool {
        origin(url).is_some_and(|o| {
            self.answered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&o)
        })
    }

    /// Posts once, without retrying: for reports whose loss is harmless.
    pub async fn post_once_quietly(&self, url: &str, body: &Value) {
        if let Err(e) = self.post_once(url, &CallbackBody::json(body), None).await {
            let why = match e {
                Attempt::Rejected(status) => format!("HTTP {status}"),
                Attempt::Transient { why, .. } => why,
            };
            tracing::warn!(error = %why, "Creatio did not take a mailbox state report");
        }
    }

    async fn post_once(
        &self,
        url: &str,
        body: &CallbackBody,
        idempotency_key: Option<&str>,
    ) -> Result<(), Attempt> {
        let mut req = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.bytes().clone())
            .timeout(self.timeout);
        if let Some(key) = idempotency_key {
            req = req.header("Idempotency-Key", key);
        }
        let resp = req.send().await.map_err(|e| Attempt::Transient {
            why: e.without_url().to_string(),
            retry_after: None,
        })?;
        let status = resp.status();
        if status.is_success() {
            if let Some(o) = origin(url) {
                self.answered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(o);
            }
            Ok(())
        } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Err(Attempt::Transient {
                why: format!("HTTP {}", status.as_u16()),
                retry_after: retry_after(resp.headers()),
            })
        } else {
            Err(Attempt::Rejected(status.as_u16()))
        }
    }
}

enum Attempt {
    Rejected(u16),
    Transient {
        why: String,
        retry_after: Option<Duration>,
    },
}

/// Creatio's callbacks, as a worker posts them; the worker's unit tests script another.
pub trait Creatio: Send + Sync + std::fmt::Debug {
    /// Posts one mail's callback, retried until accepted, rejected, out of time or cancelled.
    fn post<'a>(
        &'a self,
        url: &'a str,
        body: &'a CallbackBody,
        idempotency_key: Option<&'a str>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), DeliveryError>>;
    /// Posts a report once; its loss is harmless.
    fn report<'a>(&'a self, url: &'a str, body: &'a Value) -> BoxFuture<'a, ()>;
}

impl Creatio for Delivery {
    fn post<'a>(
        &'a self,
        url: &'a str,
        body: &'a CallbackBody,
        idempotency_key: Option<&'a str>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Delivery::post(self, url, body, idempotency_key, cancel).boxed()
    }

    fn report<'a>(&'a self, url: &'a str, body: &'a Value) -> BoxFuture<'a, ()> {
        Delivery::post_once_quietly(self, url, body).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const URL_PATH: &str = "/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail";

    /// A delivery retrying 10 ms apart (doubling to 40 ms) for at most `budget`.
    fn delivery(budget: Duration) -> Delivery {
        Delivery::new(
            reqwest::Client::new(),
            BackoffPolicy::new(Duration::from_millis(10), Duration::from_millis(40)).unwrap(),
            budget,
            Duration::from_secs(5),
        )
    }

    async fn post(delivery: &Delivery, creatio: &MockServer) -> Result<(), DeliveryError> {
        let url = format!("{}{URL_PATH}", creatio.uri());
        let body = CallbackBody::json(&serde_json::json!({"Id": "m1"}));
        delivery
            .post(&url, &body, Some("k1"), &CancellationToken::new())
            .await
    }

    /// A Creatio answering each post with the script's first answer that has posts left
    /// (`None`: every post from then on).
    async fn creatio_answering(script: Vec<(ResponseTemplate, Option<u64>)>) -> MockServer {
        let creatio = MockServer::start().await;
        for (answer, times) in script {
            let mock = Mock::given(method("POST"))
                .and(path(URL_PATH))
                .and(header("Idempotency-Key", "k1"))
                .and(header("Content-Type", "application/json"))
                .and(body_json(serde_json::json!({"Id": "m1"})))
                .respond_with(answer);
            match times {
                Some(n) => mock.up_to_n_times(n),
                None => mock,
            }
            .mount(&creatio)
            .await;
        }
        creatio
    }

    /// Creatio answers `status` to the first `times` posts, then 200.
    async fn creatio_failing(status: u16, times: u64) -> MockServer {
        creatio_answering(vec![
            (ResponseTemplate::new(status), Some(times)),
            (ResponseTemplate::new(200), None),
        ])
        .await
    }

    #[tokio::test]
    async fn a_busy_creatio_is_tried_again_under_the_same_key_until_it_takes_the_mail() {
        for status in [500, 502, 503, 504, 408, 429] {
            let creatio = creatio_failing(status, 2).await;
            post(&delivery(Duration::from_secs(10)), &creatio)
                .await
                .unwrap_or_else(|e| panic!("HTTP {status}: {e}"));
            let posts = creatio.received_requests().await.unwrap();
            assert_eq!(posts.len(), 3, "HTTP {status}");
            assert!(
                posts
                    .iter()
                    .all(|p| p.headers.get("Idempotency-Key").unwrap() == "k1")
            );
        }
    }

    #[tokio::test]
    async fn a_refusal_is_final_and_not_tried_again() {
        for status in [400, 401, 403, 404, 413] {
            let creatio = creatio_failing(status, 1).await;
            let answer = post(&delivery(Duration::from_secs(10)), &creatio).await;
            assert!(
                matches!(answer, Err(DeliveryError::Rejected(s)) if s == status),
                "{answer:?}"
            );
            assert_eq!(creatio.received_requests().await.unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn a_gateway_refusal_from_a_creatio_that_took_calls_before_is_tried_again() {
        let creatio = creatio_answering(vec![
            (ResponseTemplate::new(200), Some(1)),
            (ResponseTemplate::new(404), Some(2)),
            (ResponseTemplate::new(200), None),
        ])
        .await;
        let delivery = delivery(Duration::from_secs(10));
        post(&delivery, &creatio).await.unwrap();
        // Creatio restarting behind its gateway: 404 twice, then the mail goes through.
        post(&delivery, &creatio).await.unwrap();
        assert_eq!(creatio.received_requests().await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn retry_after_is_waited_out() {
        let creatio = creatio_answering(vec![
            (
                ResponseTemplate::new(503).insert_header("Retry-After", "1"),
                Some(1),
            ),
            (ResponseTemplate::new(200), None),
        ])
        .await;
        let started = Instant::now();
        post(&delivery(Duration::from_secs(10)), &creatio)
            .await
            .unwrap();
        // The backoff alone would have tried again after 10 ms.
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(creatio.received_requests().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_time_left_gives_up_at_once() {
        let creatio = creatio_answering(vec![(
            ResponseTemplate::new(429).insert_header("Retry-After", "120"),
            None,
        )])
        .await;
        let started = Instant::now();
        let answer = post(&delivery(Duration::from_secs(30)), &creatio).await;
        assert!(
            matches!(&answer, Err(DeliveryError::Exhausted { attempts: 1, last, .. }) if last == "HTTP 429"),
            "{answer:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "it did not wait"
        );
    }

    #[tokio::test]
    async fn a_creatio_down_for_longer_than_the_budget_exhausts_it() {
        let creatio = creatio_failing(503, u64::MAX).await;
        let answer = post(&delivery(Duration::from_millis(300)), &creatio).await;
        let Err(DeliveryError::Exhausted { attempts, .. }) = answer else {
            panic!("{answer:?}");
        };
        assert!(attempts > 2, "{attempts} attempts");
        assert_eq!(
            creatio.received_requests().await.unwrap().len() as u32,
            attempts
        );
    }

    #[test]
    fn idempotency_keys_are_short_stable_and_distinct() {
        let long_id = "A".repeat(200);
        let k = idempotency_key("mbx", &long_id);
        assert_eq!(k.len(), 32);
        // Pinned: every replica and every version must give the same key for the same mail.
        assert_eq!(k, "fa37e6f2c9cb99ba78b33588f031e287");
        assert_ne!(k, idempotency_key("mbx2", &long_id));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(idempotency_key("ab", "c"), idempotency_key("a", "bc"));
    }
}
