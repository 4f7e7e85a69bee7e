//! The coordinator and the supervisor together, over a store that can be made slow or down,
//! under tokio's paused clock: lease timing is read exactly, without a Redis or a wall clock.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::backoff::BackoffPolicy;
use crate::contract::{self, Credentials};
use crate::delivery::DeliveryError;
use crate::ews_client::{EwsFailure, Limits};
use crate::gate::Gate;
use crate::store::memory::MemoryStore;
use crate::store::slow::SlowStore;
use crate::transport::{Connect, Creatio, Exchange};
use crate::worker::{WorkerContext, WorkerSettings};

const SECOND: Duration = Duration::from_secs(1);

/// An Exchange no mailbox can reach: each worker says so once and waits to be stopped, which
/// is all a test of who runs which mailbox needs.
#[derive(Debug)]
struct Unreachable;

impl Connect for Unreachable {
    fn connect(&self, _creds: &Credentials) -> Result<Box<dyn Exchange>, EwsFailure> {
        Err(EwsFailure::Config("no Exchange in this test".into()))
    }
}

/// A Creatio that takes every call.
#[derive(Debug)]
struct Quiet;

impl Creatio for Quiet {
    fn post<'a>(
        &'a self,
        _url: &'a str,
        _body: &'a Value,
        _idempotency_key: Option<&'a str>,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        async { Ok(()) }.boxed()
    }

    fn report<'a>(&'a self, _url: &'a str, _body: &'a Value) -> BoxFuture<'a, ()> {
        async {}.boxed()
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
    leases: Arc<Leases>,
    supervisor: Arc<Supervisor>,
    coordinator: Arc<Coordinator>,
}

impl Replica {
    fn new(name: &str, store: Arc<dyn Store>, lease: Duration) -> Replica {
        let leases = Arc::new(Leases::new(name));
        let metrics = Metrics::new();
        let ctx = WorkerContext {
            store: store.clone(),
            leases: leases.clone(),
            metrics: metrics.clone(),
            exchange: Arc::new(Unreachable),
            creatio: Arc::new(Quiet),
            settings: Arc::new(WorkerSettings {
                connection_timeout_minutes: 30,
                idle_timeout: 120 * SECOND,
                limits: Limits {
                    request_timeout: 30 * SECOND,
                    max_body_bytes: 1 << 20,
                },
                retry: BackoffPolicy::new(SECOND, 60 * SECOND).unwrap(),
                failed_retry: BackoffPolicy::new(60 * SECOND, 1800 * SECOND).unwrap(),
            }),
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
            metrics,
        );
        Replica {
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
