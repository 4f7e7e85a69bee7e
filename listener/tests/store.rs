//! One contract for every store: the same checks run against the in-memory store and against
//! the Redis store on a real `redis-server`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{PATIENCE, Redis, eventually};
use exchange_listener::creatio::contract::{Credentials, parse_credentials_list};
use exchange_listener::engine::store::memory::MemoryStore;
use exchange_listener::engine::store::redis::RedisStore;
use exchange_listener::engine::store::seal::Sealer;
use exchange_listener::engine::store::{
    Counter, DeadLetter, Fence, HistoryJob, Outcome, SeenLimits, SendClaim, Store, StoreError,
    SyncCursor, SyncPhase, WorkerState,
};
use serde_json::json;

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn creds(id: &str, password: &str) -> Credentials {
    let body = json!([{
        "Id": id, "SenderEmailAddress": format!("{id}@contoso.com"), "Password": password,
        "ServiceUrl": "mail.contoso.com",
        "BpmEndpoint": "https://creatio.contoso.com/0/ServiceModel/ExchangeListenerService.svc/NewEmail",
    }]);
    parse_credentials_list(body.to_string().as_bytes())
        .unwrap()
        .remove(0)
}

fn letter(item: &str, error: &str) -> DeadLetter {
    DeadLetter {
        item_id: item.into(),
        message_id: Some(format!("<{item}@contoso.com>")),
        subject: Some("Hello".into()),
        error: error.into(),
        unix_ms: 1_700_000_000_000,
    }
}

const LONG: Duration = Duration::from_secs(3600);

fn cursor(state: &str, at_unix_ms: i64, phase: SyncPhase) -> SyncCursor {
    SyncCursor {
        state: state.into(),
        at_unix_ms,
        phase,
    }
}

/// Everything the worker, the supervisor and the API rely on.
async fn contract(store: &dyn Store) {
    let here = |token| Fence {
        replica: "here".into(),
        token,
    };
    // Generations: the same credentials keep theirs; changed or recreated ones get a new one.
    assert!(store.wanted("m1").await.unwrap().is_none());
    let asked = exchange_listener::creatio::mail::unix_now_ms();
    store.put_mailbox(creds("m1", "pw")).await.unwrap();
    let fence = here(claim(store, "m1", "here").await);
    let first = store.wanted("m1").await.unwrap().unwrap();
    assert_eq!(*first.creds, creds("m1", "pw"));
    store.put_mailbox(creds("m1", "pw")).await.unwrap();
    assert_eq!(store.wanted("m1").await.unwrap().unwrap(), first);
    store.put_mailbox(creds("m1", "pw2")).await.unwrap();
    let changed = store.wanted("m1").await.unwrap().unwrap();
    assert_ne!(changed.generation, first.generation);
    assert_eq!(
        store
            .generations(&["m1".into(), "never-opened".into()])
            .await
            .unwrap(),
        [Some(changed.generation), None]
    );
    assert_eq!(*changed.creds, creds("m1", "pw2"));

    // Status: the current error goes when streaming, the last one stays.
    let status = store.status("m1").await.unwrap().unwrap();
    assert_eq!(status.state, WorkerState::Starting);
    assert!(status.unhealthy_since_unix_ms.is_some());
    store
        .transition("m1", WorkerState::Backoff, Some("refused".into()), None)
        .await
        .unwrap();
    let status = store.status("m1").await.unwrap().unwrap();
    assert_eq!(
        (status.state, status.error.as_deref()),
        (WorkerState::Backoff, Some("refused"))
    );
    store
        .transition("m1", WorkerState::Streaming, None, Some(&fence))
        .await
        .unwrap();
    // A worker under another replica's lease, or an older one, does not overwrite it.
    let elsewhere = Fence {
        replica: "there".into(),
        token: fence.token,
    };
    for stale in [&elsewhere, &here(fence.token - 1)] {
        store
            .transition("m1", WorkerState::Backoff, None, Some(stale))
            .await
            .unwrap();
    }
    store.bump("m1", Counter::Reconnects).await.unwrap();
    store.bump("m1", Counter::Restarts).await.unwrap();
    let status = store.status("m1").await.unwrap().unwrap();
    assert_eq!(status.state, WorkerState::Streaming);
    assert_eq!(status.error, None);
    assert_eq!(status.unhealthy_since_unix_ms, None);
    assert_eq!(status.last_error.as_deref(), Some("refused"));
    assert!(status.last_error_unix_ms.is_some());
    assert_eq!((status.reconnects, status.restarts), (1, 1));
    store.put_mailbox(creds("m2", "pw")).await.unwrap();
    assert_eq!(counts(store).await, "Starting 1, Streaming 1 | here 1");

    // The last event, as announced.
    assert_eq!(
        store
            .status("m1")
            .await
            .unwrap()
            .unwrap()
            .last_event_unix_ms,
        None
    );
    store.note_event("m1").await.unwrap();
    assert!(
        store
            .status("m1")
            .await
            .unwrap()
            .unwrap()
            .last_event_unix_ms
            .is_some_and(|t| t > 1_700_000_000_000)
    );

    // A new mailbox's cursor: a baseline, then what arrived since it was asked for (an
    // Update kept it).
    let new = store.sync_state("m1").await.unwrap().unwrap();
    let SyncPhase::Baseline {
        recover_since_unix_ms: Some(since),
    } = new.phase
    else {
        panic!("{new:?}");
    };
    assert!(new.state.is_empty());
    assert!(since >= asked && since <= exchange_listener::creatio::mail::unix_now_ms());
    // Each phase, and when the state was given, read back as written.
    for written in [
        cursor(
            "B1",
            1_700_000_000_001,
            SyncPhase::Baseline {
                recover_since_unix_ms: None,
            },
        ),
        cursor(
            "B2",
            1_700_000_000_002,
            SyncPhase::Baseline {
                recover_since_unix_ms: Some(7),
            },
        ),
        cursor(
            "R",
            1_700_000_000_003,
            SyncPhase::Recovering { since_unix_ms: 9 },
        ),
        cursor("H4sIAAA", 1_700_000_000_004, SyncPhase::Live),
    ] {
        store.set_sync_state("m1", &written, &fence).await.unwrap();
        assert_eq!(store.sync_state("m1").await.unwrap().unwrap(), written);
    }

    // Delivered, skipped and dead-lettered items are not new any more, and are counted once.
    assert!(store.is_new("m1", "a").await.unwrap());
    store
        .record("m1", "a", Outcome::Delivered, &fence)
        .await
        .unwrap();
    store
        .record("m1", "a", Outcome::Delivered, &fence)
        .await
        .unwrap();
    store
        .record("m1", "b", Outcome::Skipped, &fence)
        .await
        .unwrap();
    store
        .record(
            "m1",
            "c",
            Outcome::DeadLettered(letter("c", "HTTP 400")),
            &fence,
        )
        .await
        .unwrap();
    for item in ["a", "b", "c"] {
        assert!(!store.is_new("m1", item).await.unwrap(), "{item}");
    }
    assert!(store.is_new("m1", "d").await.unwrap());
    assert!(
        !store.is_new("nobody", "a").await.unwrap(),
        "nothing is new for an unknown mailbox"
    );
    let status = store.status("m1").await.unwrap().unwrap();
    assert_eq!(
        (status.delivered, status.skipped, status.dead_letters),
        (1, 1, 1)
    );
    assert_eq!(status.last_error.as_deref(), Some("HTTP 400"));
    assert_eq!(
        store.dead_letters("m1").await.unwrap(),
        [letter("c", "HTTP 400")]
    );

    // Changed credentials keep the counters, the cursor and the delivered set.
    store.put_mailbox(creds("m1", "pw3")).await.unwrap();
    let status = store.status("m1").await.unwrap().unwrap();
    assert_eq!(status.state, WorkerState::Starting);
    assert_eq!((status.delivered, status.restarts), (1, 1));
    assert_eq!(status.reconnects, 0);
    assert!(store.sync_state("m1").await.unwrap().is_some());
    assert!(!store.is_new("m1", "a").await.unwrap());

    // Replaying dead letters hands them back once and wakes the worker.
    let signal = store.replay_signal("m1").unwrap();
    assert_eq!(store.replay_dead_letters("m1").await.unwrap(), Some(1));
    tokio::time::timeout(Duration::from_secs(1), signal.notified())
        .await
        .expect("the worker is woken");
    assert!(
        store.is_new("m1", "c").await.unwrap(),
        "c may be posted again"
    );
    assert_eq!(store.replays("m1").await.unwrap(), ["c"]);
    assert!(store.dead_letters("m1").await.unwrap().is_empty());
    // Listed until its outcome is recorded: a delivery cut short leaves it to the next worker.
    assert_eq!(store.replays("m1").await.unwrap(), ["c"]);
    store
        .record("m1", "c", Outcome::Delivered, &fence)
        .await
        .unwrap();
    assert!(store.replays("m1").await.unwrap().is_empty());

    // A cursor under another replica's fence, or an older token, is refused; an outcome is
    // kept (the post happened) and the writer told it no longer holds the lease.
    for stale in [
        Fence {
            replica: "there".into(),
            token: fence.token,
        },
        here(fence.token + 1),
    ] {
        assert_eq!(
            store
                .set_sync_state("m1", &cursor("forged", 0, SyncPhase::Live), &stale)
                .await,
            Err(StoreError::Fenced)
        );
        assert_eq!(
            store.record("m1", "x", Outcome::Delivered, &stale).await,
            Err(StoreError::Fenced)
        );
    }
    assert_eq!(
        store.sync_state("m1").await.unwrap().unwrap().state,
        "H4sIAAA"
    );
    assert!(
        !store.is_new("m1", "x").await.unwrap(),
        "posted, whoever posted it"
    );
    // Statuses come in one call, in order, none for a mailbox never opened.
    let both = store
        .statuses(&["m1".into(), "never-opened".into()])
        .await
        .unwrap();
    assert_eq!(
        both.iter()
            .map(|s| s.as_ref().map(|s| s.delivered))
            .collect::<Vec<_>>(),
        [
            Some(store.status("m1").await.unwrap().unwrap().delivered),
            None
        ]
    );
    assert!(both[0].as_ref().unwrap().updated_unix_ms > 1_700_000_000_000);

    // Close: gone, except its dead letters; created again, it starts afresh.
    store
        .record(
            "m1",
            "e",
            Outcome::DeadLettered(letter("e", "HTTP 404")),
            &fence,
        )
        .await
        .unwrap();
    assert!(store.remove_mailbox("m1").await.unwrap());
    assert!(!store.remove_mailbox("m1").await.unwrap());
    assert!(store.status("m1").await.unwrap().is_none());
    assert_eq!(store.dead_letters("m1").await.unwrap().len(), 1);
    assert_eq!(store.replay_dead_letters("m1").await.unwrap(), None);
    assert_eq!(store.dead_letters("m1").await.unwrap().len(), 1, "kept");
    store.put_mailbox(creds("m1", "pw3")).await.unwrap();
    let recreated = store.wanted("m1").await.unwrap().unwrap();
    assert_ne!(recreated.generation, changed.generation);
    assert!(
        store
            .sync_state("m1")
            .await
            .unwrap()
            .is_some_and(|c| c.state.is_empty())
    );
    assert!(store.is_new("m1", "a").await.unwrap());
    assert_eq!(
        store.status("m1").await.unwrap().unwrap().delivered,
        0,
        "a new mailbox counts afresh"
    );

    // Delivered items are remembered until a live cursor passes them, however long that
    // takes; a baseline or a recovery under way passes nothing.
    store.put_mailbox(creds("m2", "pw")).await.unwrap();
    let fence = here(claim(store, "m2", "here").await);
    store
        .record("m2", "streamed", Outcome::Delivered, &fence)
        .await
        .unwrap();
    let hour_on = exchange_listener::creatio::mail::unix_now_ms() + 3_600_000;
    for phase in [
        SyncPhase::Baseline {
            recover_since_unix_ms: Some(0),
        },
        SyncPhase::Recovering { since_unix_ms: 0 },
    ] {
        let passing = cursor("S", hour_on, phase);
        store.set_sync_state("m2", &passing, &fence).await.unwrap();
        assert!(!store.is_new("m2", "streamed").await.unwrap(), "{phase:?}");
    }
    store
        .set_sync_state("m2", &cursor("S", hour_on, SyncPhase::Live), &fence)
        .await
        .unwrap();
    assert!(store.is_new("m2", "streamed").await.unwrap(), "passed");
}

/// History loads: one per mailbox, extended by an earlier ask, progress saved under the lease
/// and only for the load it belongs to.
async fn history(store: &dyn Store) {
    assert_eq!(
        store.ask_history("h", 1_000).await.unwrap(),
        None,
        "not open"
    );
    store.put_mailbox(creds("h", "pw")).await.unwrap();
    let fence = Fence {
        replica: "here".into(),
        token: claim(store, "h", "here").await,
    };
    let signal = store.replay_signal("h").unwrap();
    assert_eq!(
        store.ask_history("h", 1_000).await.unwrap(),
        Some(HistoryJob::new(1_000))
    );
    // The worker is woken, wherever it runs.
    tokio::time::timeout(PATIENCE, signal.notified())
        .await
        .expect("the worker woken");
    let progress = HistoryJob {
        offset: 50,
        done: 48,
        total: 200,
        ..HistoryJob::new(1_000)
    };
    assert!(
        store
            .set_history("h", 1_000, Some(&progress), &fence)
            .await
            .unwrap()
    );
    // A later moment is covered by the running load, which goes on.
    assert_eq!(store.ask_history("h", 2_000).await.unwrap(), Some(progress));
    assert_eq!(store.history("h").await.unwrap(), Some(progress));
    // An earlier one replaces it; the old load's progress is not written over the new one.
    assert_eq!(
        store.ask_history("h", 500).await.unwrap(),
        Some(HistoryJob::new(500))
    );
    assert!(
        !store
            .set_history("h", 1_000, Some(&progress), &fence)
            .await
            .unwrap()
    );
    assert_eq!(
        store.history("h").await.unwrap(),
        Some(HistoryJob::new(500))
    );
    let stranger = Fence {
        replica: "there".into(),
        token: fence.token,
    };
    assert!(matches!(
        store.set_history("h", 500, None, &stranger).await,
        Err(StoreError::Fenced)
    ));
    assert!(store.set_history("h", 500, None, &fence).await.unwrap());
    assert_eq!(store.history("h").await.unwrap(), None);
}

#[tokio::test]
async fn the_memory_store_keeps_history_loads() {
    history(&MemoryStore::new(SeenLimits::default())).await;
}

#[tokio::test]
async fn the_redis_store_keeps_history_loads() {
    let redis = Redis::start().await;
    let store = redis_store(&redis).await;
    // The replays channel is listened to in the background; give it a moment to subscribe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    history(&store).await;
}

/// The send ledger: one send of a mail at a time, none again once sent, another try after
/// one failed.
async fn sends(store: &dyn Store) {
    assert_eq!(store.begin_send("s1").await.unwrap(), SendClaim::New);
    assert_eq!(store.begin_send("s1").await.unwrap(), SendClaim::Busy);
    assert_eq!(store.begin_send("s2").await.unwrap(), SendClaim::New);
    store.end_send("s1", true).await.unwrap();
    assert_eq!(store.begin_send("s1").await.unwrap(), SendClaim::Sent);
    store.end_send("s2", false).await.unwrap();
    assert_eq!(store.begin_send("s2").await.unwrap(), SendClaim::New);
}

#[tokio::test]
async fn the_memory_store_keeps_the_send_ledger() {
    sends(&MemoryStore::new(SeenLimits::default())).await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_send_ledger_and_takes_over_a_dead_send() {
    let redis = Redis::start().await;
    let store = redis_store(&redis).await;
    sends(&store).await;
    // A send its replica began an hour ago and never ended is taken over, once.
    let mut conn = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let long_ago = exchange_listener::creatio::mail::unix_now_ms() - 3_600_000;
    let _: () = redis::cmd("SET")
        .arg("el:send:{s3}")
        .arg(format!("sending:{long_ago}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.begin_send("s3").await.unwrap(), SendClaim::Stale);
    assert_eq!(store.begin_send("s3").await.unwrap(), SendClaim::Busy);
    // Remembered for a day, not for ever.
    let ttl: i64 = redis::cmd("PTTL")
        .arg("el:send:{s1}")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 23 * 3_600_000 && ttl <= 24 * 3_600_000, "{ttl}");
}

/// Takes the mailbox's lease for `replica`, which says first that it is alive (a claim by a
/// replica that is not takes nothing).
async fn claim(store: &dyn Store, id: &str, replica: &str) -> u64 {
    store
        .heartbeat(replica, &format!("{replica}-process"), LONG)
        .await
        .unwrap();
    store
        .claim(id, replica)
        .await
        .unwrap()
        .expect("the lease is free")
}

/// The store's counts in a line: mailboxes by state | leases by replica.
async fn counts(store: &dyn Store) -> String {
    let counts = store.counts().await.unwrap();
    let line = |pairs: Vec<(String, usize)>| {
        pairs
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let states = counts
        .states
        .into_iter()
        .map(|(s, n)| (s.name().to_owned(), n))
        .collect();
    format!(
        "{} | {}",
        line(states),
        line(counts.held.into_iter().collect())
    )
}

/// Leases: one live holder at a time, tokens that only grow, every lease kept by its holder's
/// heartbeat alone, and a version that moves with what the spread is computed from.
async fn leases(store: &dyn Store) {
    let short = Duration::from_millis(300);
    let b0 = store.heartbeat("b", "pb", LONG).await.unwrap();
    assert_eq!(b0.live, ["b"]);
    assert!(!b0.unbroken, "a first heartbeat");
    let a0 = store.heartbeat("a", "pa", short).await.unwrap();
    assert_eq!(a0.live, ["a", "b"]);
    assert!(a0.version > b0.version, "a joined");
    let t1 = store.claim("m", "a").await.unwrap().unwrap();
    assert_eq!(store.claim("m", "b").await.unwrap(), None, "held by a");
    assert_eq!(
        store.claim("z", "ghost").await.unwrap(),
        None,
        "a replica that is not alive takes nothing"
    );
    assert_eq!(
        store.owners(&["m".into(), "n".into()]).await.unwrap(),
        [Some("a".to_owned()), None]
    );
    assert_eq!(
        store.holders().await.unwrap(),
        HashMap::from([("m".to_owned(), "a".to_owned())])
    );
    let a1 = store.heartbeat("a", "pa", short).await.unwrap();
    assert!(a1.unbroken);
    assert!(a1.version > a0.version, "a claim moves the version");
    let a2 = store.heartbeat("a", "pa", short).await.unwrap();
    assert_eq!(a2.version, a1.version, "nothing moved");
    // Claimed again by its holder (a later process, or a lease it stopped trusting): a new
    // token, and the old one writes nothing.
    let t2 = store.claim("m", "a").await.unwrap().unwrap();
    assert!(t2 > t1);
    let fence = |replica: &str, token: u64| Fence {
        replica: replica.into(),
        token,
    };
    store.put_mailbox(creds("m", "pw")).await.unwrap();
    assert_eq!(counts(store).await, "Starting 1 | a 1");
    // What got a new generation since a version, as far back as the store keeps it.
    assert_eq!(
        store.changed_since(a2.version).await.unwrap(),
        Some(vec!["m".to_owned()])
    );
    store.put_mailbox(creds("m", "pw")).await.unwrap();
    let now = store.heartbeat("a", "pa", short).await.unwrap().version;
    assert_eq!(
        store.changed_since(now).await.unwrap(),
        Some(vec![]),
        "the same again"
    );
    assert_eq!(store.changed_since(now + 1).await.unwrap(), None, "not yet");
    store
        .transition("m", WorkerState::Streaming, None, None)
        .await
        .unwrap();
    assert_eq!(counts(store).await, "Streaming 1 | a 1");
    let written = cursor("S1", 1_700_000_000_000, SyncPhase::Live);
    assert_eq!(
        store.set_sync_state("m", &written, &fence("a", t1)).await,
        Err(StoreError::Fenced)
    );
    store
        .set_sync_state("m", &written, &fence("a", t2))
        .await
        .unwrap();
    // a's heartbeat lapses: its lease is free, and passes to b with a greater token.
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    assert_eq!(store.owners(&["m".into()]).await.unwrap(), [None]);
    assert!(store.holders().await.unwrap().is_empty());
    let b1 = store.heartbeat("b", "pb", LONG).await.unwrap();
    assert_eq!(b1.live, ["b"]);
    assert!(b1.version > a2.version, "a left");
    let t3 = store.claim("m", "b").await.unwrap().unwrap();
    assert!(t3 > t2);
    assert_eq!(counts(store).await, "Streaming 1 | b 1");
    assert_eq!(
        store.set_sync_state("m", &written, &fence("a", t2)).await,
        Err(StoreError::Fenced),
        "a lost the mailbox"
    );
    // a comes back: its heartbeat says it was gone, and the lease stays b's.
    let a3 = store.heartbeat("a", "pa", LONG).await.unwrap();
    assert!(!a3.unbroken, "a was not alive meanwhile");
    assert_eq!(store.claim("m", "a").await.unwrap(), None);
    // Released by its holder only.
    store.release("m", &fence("a", t2)).await.unwrap();
    assert_eq!(
        store.owners(&["m".into()]).await.unwrap(),
        [Some("b".to_owned())]
    );
    let before = store.heartbeat("a", "pa", LONG).await.unwrap().version;
    store.release("m", &fence("b", t3)).await.unwrap();
    assert_eq!(store.owners(&["m".into()]).await.unwrap(), [None]);
    assert_eq!(counts(store).await, "Streaming 1 | ");
    let after = store.heartbeat("a", "pa", LONG).await.unwrap().version;
    assert!(after > before, "a lease given back moves the version");
    let t4 = store.claim("m", "a").await.unwrap().unwrap();
    assert!(t4 > t3, "tokens only grow");
    store.leave("b").await.unwrap();
    let a4 = store.heartbeat("a", "pa", LONG).await.unwrap();
    assert_eq!(a4.live, ["a"]);
    assert!(a4.version > after);
    // Closing a mailbox moves the version; so does opening one.
    store.remove_mailbox("m").await.unwrap();
    let a5 = store.heartbeat("a", "pa", LONG).await.unwrap();
    assert!(a5.version > a4.version);
    assert_eq!(
        counts(store).await,
        " | a 1",
        "its lease stays until given back"
    );
    // Every open mailbox is listed; changes are announced.
    let mut changes = store.changes().expect("a store that announces changes");
    store.put_mailbox(creds("x1", "pw")).await.unwrap();
    let announced = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .expect("announced")
        .unwrap();
    assert_eq!(announced, "x1");
    assert!(
        store
            .open_mailboxes()
            .await
            .unwrap()
            .contains(&"x1".to_owned())
    );
}

/// A Redis store on `redis`, under the prefix `el:`.
async fn redis_store(redis: &Redis) -> RedisStore {
    RedisStore::connect(
        &redis.url,
        None,
        "el:",
        Sealer::from_base64(KEY).unwrap(),
        SeenLimits::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn the_memory_store_keeps_the_lease_contract() {
    leases(&MemoryStore::new(SeenLimits::default())).await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_lease_contract() {
    let redis = Redis::start().await;
    let store = redis_store(&redis).await;
    // The change channel is listened to in the background; give it a moment to subscribe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    leases(&store).await;
    // Counts lost (or never kept, by an older version) are made again from the mailboxes.
    store.put_mailbox(creds("n", "pw")).await.unwrap();
    let kept = counts(&store).await;
    let mut conn = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg("el:states")
        .arg("el:held")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counts(&store).await, kept);
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    contract(&MemoryStore::new(SeenLimits::default())).await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_contract() {
    let redis = Redis::start().await;
    contract(&redis_store(&redis).await).await;
}

#[tokio::test]
async fn the_redis_store_holds_no_password_in_the_clear_and_keeps_deployments_apart() {
    let redis = Redis::start().await;
    let connect = async |prefix: &str, sealer: Sealer| {
        Arc::new(
            RedisStore::connect(&redis.url, None, prefix, sealer, SeenLimits::default())
                .await
                .unwrap(),
        )
    };
    let a = connect("a:", Sealer::from_base64(KEY).unwrap()).await;
    let b = connect("b:", Sealer::from_base64(KEY).unwrap()).await;
    a.put_mailbox(creds("m1", "Zebra-Pa55")).await.unwrap();
    assert!(
        b.wanted("m1").await.unwrap().is_none(),
        "prefixes keep apart"
    );

    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.iter().all(|k| k.starts_with("a:")), "{keys:?}");
    for key in keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            !dump.windows(5).any(|w| w == b"Zebra"),
            "{key} holds the password"
        );
    }
    // Another key cannot open them, and says so rather than guessing.
    let wrong = connect(
        "a:",
        Sealer::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap(),
    )
    .await;
    assert!(wrong.wanted("m1").await.is_err());
}

#[tokio::test]
async fn the_redis_store_speaks_tls_to_a_server_with_an_internal_ca() {
    let (redis, ca) = Redis::start_tls().await;
    let sealer = || Sealer::from_base64(KEY).unwrap();
    let store = RedisStore::connect(&redis.url, Some(ca), "el:", sealer(), SeenLimits::default())
        .await
        .unwrap();
    store.put_mailbox(creds("m1", "pw")).await.unwrap();
    assert_eq!(
        *store.wanted("m1").await.unwrap().unwrap().creds,
        creds("m1", "pw")
    );
    // Without the CA the server's certificate is not trusted.
    let untrusting = RedisStore::connect(&redis.url, None, "el:", sealer(), SeenLimits::default())
        .await
        .unwrap();
    assert!(untrusting.wanted("m1").await.is_err());
}

#[tokio::test]
async fn replicas_write_back_what_they_served_after_redis_lost_its_data() {
    let mut redis = Redis::start().await;
    // Two replicas' stores: `a` serves the mailbox now, `b` served it before.
    let (a, b) = (redis_store(&redis).await, redis_store(&redis).await);
    a.put_mailbox(creds("m", "pw")).await.unwrap();
    let serve = async |store: &RedisStore, replica: &str, state: &str, at: i64| {
        let fence = Fence {
            replica: replica.into(),
            token: claim(store, "m", replica).await,
        };
        assert!(store.wanted("m").await.unwrap().is_some());
        let written = cursor(state, at, SyncPhase::Live);
        store.set_sync_state("m", &written, &fence).await.unwrap();
        fence
    };
    let fence = serve(&b, "b", "S0", 1_700_000_000_000).await;
    b.release("m", &fence).await.unwrap();
    let fence = serve(&a, "a", "S1", 1_700_000_000_500).await;
    a.record("m", "i1", Outcome::Delivered, &fence)
        .await
        .unwrap();
    let before = a.sync_state("m").await.unwrap().unwrap();
    // A mailbox `a` stopped serving (closed or moved) is not written back by it.
    a.put_mailbox(creds("gone", "pw")).await.unwrap();
    assert!(a.wanted("gone").await.unwrap().is_some());
    a.forget("gone");

    redis.restart().await;
    for store in [&a, &b] {
        eventually("Redis back", PATIENCE, async || {
            store.epoch("e2").await.ok()
        })
        .await;
    }
    assert!(
        a.open_mailboxes().await.unwrap().is_empty(),
        "lost with Redis"
    );

    // The older knowledge comes back first; the newer one replaces it while no replica has
    // leased the mailbox.
    assert_eq!(b.write_back().await.unwrap(), 1);
    assert_eq!(a.write_back().await.unwrap(), 1);
    assert_eq!(a.open_mailboxes().await.unwrap(), ["m"]);
    assert_eq!(a.sync_state("m").await.unwrap(), Some(before.clone()));
    assert_eq!(
        *a.wanted("m").await.unwrap().unwrap().creds,
        creds("m", "pw")
    );
    assert!(!a.is_new("m", "i1").await.unwrap(), "delivered before");
    assert!(a.is_new("m", "i2").await.unwrap());

    // Once leased, the mailbox is left alone; so is one written back already.
    claim(&a, "m", "a").await;
    assert_eq!(b.write_back().await.unwrap(), 0);
    assert_eq!(a.write_back().await.unwrap(), 0);
    assert_eq!(a.sync_state("m").await.unwrap(), Some(before));
}

#[tokio::test]
async fn a_replay_asked_of_any_replica_wakes_the_worker_where_it_runs() {
    let redis = Redis::start().await;
    let (owner, other) = (redis_store(&redis).await, redis_store(&redis).await);
    owner.put_mailbox(creds("m", "pw")).await.unwrap();
    let fence = Fence {
        replica: "owner".into(),
        token: claim(&owner, "m", "owner").await,
    };
    owner
        .record(
            "m",
            "lost",
            Outcome::DeadLettered(letter("lost", "HTTP 400")),
            &fence,
        )
        .await
        .unwrap();
    let signal = owner.replay_signal("m").unwrap();
    // The subscription to the replays channel is made in the background.
    eventually(
        "the owner woken by a replay asked elsewhere",
        PATIENCE,
        async || {
            assert!(other.replay_dead_letters("m").await.unwrap().is_some());
            tokio::time::timeout(Duration::from_millis(200), signal.notified())
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(owner.replays("m").await.unwrap(), ["lost"]);
}

#[tokio::test]
async fn a_second_process_under_a_live_replica_s_id_is_kept_out() {
    let redis = Redis::start().await;
    let (first, second) = (redis_store(&redis).await, redis_store(&redis).await);
    assert_eq!(
        first.heartbeat("r0", "first", LONG).await.unwrap().live,
        ["r0"]
    );
    assert_eq!(
        second.heartbeat("r0", "second", LONG).await,
        Err(StoreError::Duplicate("r0".into()))
    );
    // The first goes on; once it leaves (or its heartbeat lapses), the second may take over.
    assert!(first.heartbeat("r0", "first", LONG).await.unwrap().unbroken);
    first.leave("r0").await.unwrap();
    let second_beat = second.heartbeat("r0", "second", LONG).await.unwrap();
    assert_eq!(second_beat.live, ["r0"]);
    assert!(
        !second_beat.unbroken,
        "another process: its leases start over"
    );
    assert_eq!(
        first.heartbeat("r0", "first", LONG).await,
        Err(StoreError::Duplicate("r0".into()))
    );
}
