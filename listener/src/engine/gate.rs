//! Admission to the mail servers: a cap on the mailboxes one replica serves at once, and a
//! paced, jittered rate of Subscribe calls to each server, so that a Create of thousands of
//! mailboxes (or a restart, or a failover) reaches each server as a steady trickle instead of a
//! burst that trips its throttling. The pace is a server's own (its limits are its own):
//! mailboxes on ten Exchange servers start ten times as fast as on one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

#[derive(Debug)]
pub struct Gate {
    active: Arc<Semaphore>,
    /// Time between two Subscribe calls to one server.
    interval: Duration,
    /// When the next Subscribe may go out, per server.
    next: Mutex<HashMap<String, Instant>>,
}

impl Gate {
    /// At most `max_active` mailboxes served at once; `per_second` Subscribe calls a second
    /// to each server.
    pub fn new(max_active: usize, per_second: u32) -> Self {
        Gate {
            active: Arc::new(Semaphore::new(max_active.min(Semaphore::MAX_PERMITS))),
            interval: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(HashMap::new()),
        }
    }

    /// A place among the active mailboxes, held for as long as the mailbox is served.
    pub async fn admit(&self) -> OwnedSemaphorePermit {
        self.active
            .clone()
            .acquire_owned()
            .await
            .expect("the gate's semaphore is never closed")
    }

    /// True when a mailbox asking now would have to wait for a place.
    pub fn full(&self) -> bool {
        self.active.available_permits() == 0
    }

    /// Waits for this caller's turn to subscribe at `server` (its scheme, host and port):
    /// turns at one server are `interval` apart, each moved by a random part of an interval
    /// so replicas that start together do not stay in step.
    pub async fn pace(&self, server: &str) {
        let now = Instant::now();
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            // A server whose turns all lie in the past is forgotten: the map holds the servers
            // being paced, not every server ever seen.
            next.retain(|_, at| *at > now);
            let at = next.entry(server.to_owned()).or_insert(now);
            let slot = (*at).max(now);
            *at = slot + self.interval;
            slot
        };
        let at = slot + self.interval.mul_f64(fastrand::f64());
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` Subscribe turns asked at once, the `i`th to `server(i)`: when each came, from the
    /// start, earliest first.
    async fn turns(gate: Gate, n: usize, server: fn(usize) -> String) -> Vec<Duration> {
        let gate = Arc::new(gate);
        let start = Instant::now();
        let turns: Vec<_> = (0..n)
            .map(|i| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    gate.pace(&server(i)).await;
                    Instant::now()
                })
            })
            .collect();
        let mut at = Vec::new();
        for t in turns {
            at.push(t.await.unwrap() - start);
        }
        at.sort();
        at
    }

    #[tokio::test(start_paused = true)]
    async fn turns_are_spaced_by_the_rate() {
        let at = turns(Gate::new(10, 10), 20, |_| {
            "https://mail.contoso.com:443".to_owned()
        })
        .await;
        // Twenty turns at ten a second: the last one no sooner than 1.9 s, none later than 2 s.
        assert!(at[19] >= Duration::from_millis(1_900), "{at:?}");
        assert!(at[19] <= Duration::from_secs(2), "{at:?}");
        assert!(at[0] <= Duration::from_millis(100), "{at:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn each_server_has_its_own_pace() {
        let at = turns(Gate::new(100, 10), 40, |i| {
            format!("https://mail{}.contoso.com:443", i % 2)
        })
        .await;
        let last = at[39];
        // Twenty turns at each of two servers, ten a second each: two seconds, not four.
        assert!(last <= Duration::from_secs(2), "{last:?}");
        assert!(last >= Duration::from_millis(1_900), "{last:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_until_a_place_is_given_back() {
        let gate = Gate::new(2, 1000);
        let a = gate.admit().await;
        let _b = gate.admit().await;
        assert!(gate.full());
        let third = tokio::time::timeout(Duration::from_secs(60), gate.admit()).await;
        assert!(third.is_err(), "a third mailbox waits");
        drop(a);
        let _c = gate.admit().await;
    }
}
