//! The coordinator and the supervisor together, over a store that can be made slow or down,
//! under tokio's paused clock: lease timing is read exactly, without a Redis or a wall clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::creatio::contract::{self, Credentials};
use crate::creatio::delivery::Creatio;
use crate::creatio::delivery::DeliveryError;
use crate::engine::gate::Gate;
use crate::engine::protocol::{Connect, Failure, MailServer};
use crate::engine::store::memory::MemoryStore;
use crate::engine::store::slow::SlowStore;
use crate::engine::worker::{WorkerContext, WorkerSettings};
use crate::exchange::client::EwsFailure;

const SECOND: Duration = Duration::from_secs(1);

/// A mail server no mailbox can reach: each worker says so once and waits to be stopped, which
/// is all a test of who runs which mailbox needs.
#[derive(Debug)]
struct Unreachable;

impl Connect for Unreachable {
    fn connect(&self, _creds: &Credentials) -> Result<Box<dyn MailServer>, Failure> {
        Err(EwsFailure::Config("no mail server in this test".into()).into())
    }
}

/// A Creatio that takes every call; a report takes `report_takes`, and cannot be cut short
/// (as a post already sent waits for its answer).
#[derive(Debug, Default)]
struct Quiet {
    report_takes: Duration,
}

impl Creatio for Quiet {
    fn post<'a>(
        &'a self,
        _url: &'a str,
        _body: &'a crate::creatio::contract::CallbackBody,
        _idempotency_key: Option<&'a str>,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        async { Ok(()) }.boxed()
    }

    fn report<'a>(&'a self, _url: &'a str, _body: &'a Value) -> BoxFuture<'a, ()> {
        tokio::time::sleep(self.report_takes).boxed()
    }
}

fn creds(id: &str) -> Credentials {
    let body = json!([{
        "Id": id, "SenderEmailAddress": format!("{id}@contoso.test"), "Password": "secret",
        "ServiceUrl": "http://exchange.test",
        "BpmEndpoint": "http://creatio.test/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
    }]);
    contract::parse_credentials_list(body.to_string().as_bytes())
        .unwrap()
        .remove(0)
}

/// One replica: its coordinator, supervisor and leases over a shared store.
struct Replica {
    metrics: Metrics,
    leases: Arc<Leases>,
    supervisor: Arc<Supervisor>,
    coordinator: Arc<Coordinator>,
}

impl Replica {
    fn new(name: &str, store: Arc<dyn Store>, lease: Duration) -> Replica {
        Replica::with_creatio(name, store, lease, Quiet::default())
    }

    fn with_creatio(name: &str, store: Arc<dyn Store>, lease: Duration, creatio: Quiet) -> Replica {
        let leases = Arc::new(Leases::new(name));
        let metrics = Metrics::new();
        let ctx = WorkerContext {
            store: store.clone(),
            leases: leases.clone(),
            metrics: metrics.clone(),
            servers: Arc::new(Unreachable),
            creatio: Arc::new(creatio),
            settings: Arc::new(WorkerSettings::for_tests()),
            gate: Arc::new(Gate::new(100_000, 100_000)),
        };
        let supervisor = Supervisor::new(ctx, 600 * SECOND, 2 * lease);
        let coordinator = Coordinator::new(
            CoordinatorSettings {
                replica: name.into(),
                lease,
                cap: 100_000,
            },
            store,
            leases.clone(),
            supervisor.clone(),
            metrics.clone(),
        );
        Replica {
            metrics,
            leases,
            supervisor,
            coordinator,
        }
    }

    fn start(&self, stop: &CancellationToken) {
        tokio::spawn(
            self.coordinator
                .clone()
                .run_when_ready(Arc::new(AtomicBool::new(false)), stop.clone()),
        );
    }

    /// Mailboxes whose lease this replica trusts, and of those, how many have no worker.
    fn served(&self, ids: &[String]) -> (usize, usize) {
        let trusted: Vec<&String> = ids
            .iter()
            .filter(|id| self.leases.fence(id).is_some())
            .collect();
        let idle = trusted
            .iter()
            .filter(|id| !self.supervisor.has_worker(id))
            .count();
        (trusted.len(), idle)
    }
}

async fn open(store: &SlowStore, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("m{i:04}")).collect();
    for id in &ids {
        store.put_mailbox(creds(id)).await.unwrap();
    }
    ids
}

#[tokio::test(start_paused = true)]
async fn a_pass_longer_than_the_trust_window_leaves_no_lease_without_a_worker() {
    let store = SlowStore::new(MemoryStore::default());
    let ids = open(&store, 1000).await;
    // Each round trip takes 10 ms: a thousand claims one at a time would take ten seconds,
    // five times the two seconds a three-second lease is trusted for.
    store.set_delay(Duration::from_millis(10));
    let replica = Replica::new("a", Arc::new(store.clone()), 3 * SECOND);
    let stop = CancellationToken::new();
    replica.start(&stop);
    tokio::time::sleep(30 * SECOND).await;

    assert_eq!(
        replica.served(&ids),
        (1000, 0),
        "(trusted, without a worker)"
    );
    assert_eq!(replica.supervisor.running().len(), 1000);
    // What /metrics and the status view show of it.
    let leases = |kind: &str| replica.metrics.leases.with_label_values(&[kind]).get();
    assert_eq!(
        (
            leases("held"),
            leases("trusted"),
            leases("idle"),
            leases("leaving")
        ),
        (1000, 1000, 0, 0)
    );
    assert!(replica.metrics.pass_seconds.get_sample_count() > 10);
    assert_eq!(
        replica.metrics.pass_claims.get(),
        0,
        "nothing left to claim"
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_update_whose_announcement_was_lost_still_restarts_the_worker() {
    let store = SlowStore::new(MemoryStore::default());
    let ids = open(&store, 3).await;
    // Pub/sub delivers at most once: here, never.
    store.set_deaf(true);
    let replica = Replica::new("a", Arc::new(store.clone()), 3 * SECOND);
    let stop = CancellationToken::new();
    replica.start(&stop);
    tokio::time::sleep(5 * SECOND).await;
    let before = replica.supervisor.generations(&ids);
    assert!(before.iter().all(Option::is_some), "{before:?}");

    // Creatio sends new credentials through another replica.
    let mut changed = creds(&ids[1]);
    changed.password = Some(contract::Secret::new("a new password".into()));
    store.put_mailbox(changed.clone()).await.unwrap();
    tokio::time::sleep(5 * SECOND).await;

    let after = replica.supervisor.generations(&ids);
    assert_eq!((after[0], after[2]), (before[0], before[2]));
    assert_ne!(
        after[1], before[1],
        "the worker still runs the old credentials"
    );
    assert!(replica.supervisor.running().contains(&changed));
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_worker_slow_to_stop_holds_neither_the_pass_nor_its_lease_hostage() {
    let store = SlowStore::new(MemoryStore::default());
    let ids = open(&store, 6).await;
    let lease = 3 * SECOND;
    // Every worker first tells Creatio the mailbox is unavailable, which takes 20 s and
    // cannot be cut short: a worker asked to stop meanwhile takes that long.
    let slow = Quiet {
        report_takes: 20 * SECOND,
    };
    let a = Replica::with_creatio("a", Arc::new(store.clone()), lease, slow);
    let stop = CancellationToken::new();
    a.start(&stop);
    tokio::time::sleep(SECOND).await;
    assert_eq!(a.supervisor.running().len(), 6);

    // A second replica joins: part of a's share moves to it.
    let b = Replica::new("b", Arc::new(store.clone()), lease);
    b.start(&stop);
    let to_b: Vec<String> =
        crate::engine::balance::assign(&["a".into(), "b".into()], &ids, 100_000, &HashMap::new())
            .into_iter()
            .filter(|(_, r)| r == "b")
            .map(|(m, _)| m)
            .collect();
    assert!(!to_b.is_empty() && to_b.len() < ids.len(), "{to_b:?}");

    // While a's moving workers are still stopping, a keeps its own share (its passes go on)
    // and the moving leases (b must not overlap a worker still posting).
    tokio::time::sleep(2 * SECOND).await;
    for _ in 0..8 {
        tokio::time::sleep(SECOND).await;
        let (kept, _) = a.served(&ids);
        assert_eq!(kept, ids.len() - to_b.len(), "a's share, trusted");
        for id in &to_b {
            assert!(
                !b.supervisor.has_worker(id),
                "{id} served by b while a's worker stops"
            );
        }
    }
    // Once they have stopped, the leases are given back and b serves its share.
    tokio::time::sleep(20 * SECOND).await;
    assert_eq!(b.served(&ids), (to_b.len(), 0));
    assert_eq!(a.served(&ids), (ids.len() - to_b.len(), 0));
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_write_back_that_failed_is_tried_again() {
    let store = SlowStore::new(MemoryStore::default());
    open(&store, 3).await;
    let replica = Replica::new("a", Arc::new(store.clone()), 3 * SECOND);
    let stop = CancellationToken::new();
    replica.start(&stop);
    tokio::time::sleep(5 * SECOND).await;
    assert_eq!(store.write_backs(), 0);

    // The store comes back empty, and the first write-back fails.
    store.lose_data("after the restart", 1);
    tokio::time::sleep(10 * SECOND).await;
    assert_eq!(store.write_backs(), 2, "failed once, then done");
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_idle_cluster_reads_no_mailbox_from_the_store_between_the_nets() {
    let store = SlowStore::new(MemoryStore::default());
    let ids = open(&store, 1000).await;
    let stop = CancellationToken::new();
    let (a, b) = (
        Replica::new("a", Arc::new(store.clone()), 3 * SECOND),
        Replica::new("b", Arc::new(store.clone()), 3 * SECOND),
    );
    a.start(&stop);
    b.start(&stop);
    tokio::time::sleep(10 * SECOND).await;
    assert_eq!(a.served(&ids).0 + b.served(&ids).0, ids.len());

    // A minute of nothing: a heartbeat per replica per second, and the spread read again
    // (every open mailbox, every holder) at most every 30 s by each replica.
    let before = store.named();
    tokio::time::sleep(60 * SECOND).await;
    let named = store.named() - before;
    assert!(
        named <= 2 * 3 * 2 * ids.len(),
        "{named} mailbox ids named in a minute"
    );
    assert_eq!(a.served(&ids).0 + b.served(&ids).0, ids.len());

    // A new mailbox is served within a pass or two, by one replica.
    store.put_mailbox(creds("late")).await.unwrap();
    tokio::time::sleep(3 * SECOND).await;
    let late = ["late".to_owned()];
    assert_eq!(a.served(&late).0 + b.served(&late).0, 1);
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_dead_replica_s_mailboxes_are_claimed_most_recently_active_first() {
    let store = SlowStore::new(MemoryStore::default());
    let ids = open(&store, 40).await;
    let a = Replica::new("a", Arc::new(store.clone()), 3 * SECOND);
    let a_stop = CancellationToken::new();
    a.start(&a_stop);
    tokio::time::sleep(5 * SECOND).await;
    assert_eq!(a.served(&ids).0, ids.len());
    // Mail came lately to some, at different times; none to the rest.
    let active: Vec<String> = ids.iter().step_by(5).cloned().collect();
    for id in active.iter().rev() {
        store.note_event(id).await.unwrap();
        // Mail times are wall-clock milliseconds, which the paused clock does not move: the
        // next one waits for the next millisecond.
        let at = crate::creatio::mail::unix_now_ms();
        while crate::creatio::mail::unix_now_ms() == at {
            std::hint::spin_loop();
        }
    }

    // a dies (no leave: its heartbeat lapses); b takes everything over.
    a_stop.cancel();
    let b = Replica::new("b", Arc::new(store.clone()), 3 * SECOND);
    let stop = CancellationToken::new();
    b.start(&stop);
    tokio::time::sleep(10 * SECOND).await;
    assert_eq!(b.served(&ids).0, ids.len());
    let order = store.claims_by("b");
    assert_eq!(order.len(), ids.len(), "each claimed once");
    assert_eq!(
        order[..active.len()],
        active[..],
        "the most recently active first"
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_lease_taken_without_the_claimer_knowing_is_not_kept_from_its_new_owner() {
    let store = SlowStore::new(MemoryStore::default());
    let ids = open(&store, 6).await;
    let stop = CancellationToken::new();
    // a claims every mailbox alone, but the answers never reach it: the store says a holds
    // them all, a knows of none.
    store.lose_claim_answers(usize::MAX);
    let a = Replica::new("a", Arc::new(store.clone()), 3 * SECOND);
    a.start(&stop);
    tokio::time::sleep(SECOND / 2).await;
    assert!(store.claims_by("a").len() >= ids.len());
    assert_eq!(a.served(&ids).0, 0);

    // b joins before a's next pass: half of them are b's share now.
    store.lose_claim_answers(0);
    let b = Replica::new("b", Arc::new(store.clone()), 3 * SECOND);
    b.start(&stop);
    tokio::time::sleep(10 * SECOND).await;
    let (on_a, on_b) = (a.served(&ids).0, b.served(&ids).0);
    assert_eq!(
        (on_a + on_b, on_b),
        (ids.len(), ids.len() / 2),
        "(served, by b)"
    );
    for id in &ids {
        assert!(
            a.leases.fence(id).is_none() || b.leases.fence(id).is_none(),
            "{id} served twice"
        );
    }
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_create_while_the_spread_rests_is_served_once_it_has_rested() {
    let store = SlowStore::new(MemoryStore::default());
    // Alone on its store, a replica passes on news of a change, or every twenty minutes.
    let lone = Duration::from_secs(3600);
    let replica = Replica::new("a", Arc::new(store.clone()), lone);
    let stop = CancellationToken::new();
    replica.start(&stop);
    tokio::time::sleep(SECOND).await;

    // A spread of many mailboxes over a slow store takes long enough that the next one
    // waits a second.
    store.set_delay(Duration::from_millis(20));
    let ids = open(&store, 1500).await;
    tokio::time::sleep(SECOND / 2).await;
    assert_eq!(replica.served(&ids).0, ids.len());
    // A Create comes while it rests.
    store.put_mailbox(creds("late")).await.unwrap();
    tokio::time::sleep(3 * SECOND).await;
    let late = ["late".to_owned()];
    assert_eq!(replica.served(&late), (1, 0), "(served, without a worker)");
    stop.cancel();
}

/// A pass can defer the spread while the last one rests and run on past the rest's end (a
/// busy machine holds its thread for longer than a short rest): the run loop must still wake
/// for it at once, not at the next tick (twenty minutes for a replica alone). listener-bench
/// once left 526 of 2,000 mailboxes unserved so. A spread that only left work undone waits
/// for the tick: under paused time a rest is zero, and waking for it would spin.
#[tokio::test]
async fn a_deferred_spread_is_due_even_when_its_rest_ended_before_the_loop_looked() {
    let mut spread = Spread {
        at: Some(Instant::now()),
        took: Duration::from_millis(1),
        ..Spread::default()
    };
    assert!(!spread.due(1), "resting");
    assert!(spread.deferred_to().is_some_and(|at| at > Instant::now()));

    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(spread.resting_until().is_none(), "the rest is over");
    assert!(
        spread.deferred_to().is_some_and(|at| at <= Instant::now()),
        "due at once"
    );

    let unsettled = Spread {
        at: Some(Instant::now()),
        redo: true,
        ..Spread::default()
    };
    assert_eq!(unsettled.deferred_to(), None);
}
