//! Several real `exchange-listener` processes on one real `redis-server`: any replica answers,
//! the mailboxes are spread, and a replica that dies or stops hands its mailboxes on with no
//! mail lost and none doubled.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Listener, PATIENCE, Redis, Relay, World, delivered, eventually};
use mock_ews::{Config, NewMail};
use serde_json::{Value, json};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A replica on the Redis at `url`, with a short lease so failover tests stay short.
async fn replica_at(url: &str, name: &str, extra: &[&str]) -> Listener {
    let mut args = vec![
        "--redis-url",
        url,
        "--secret-key",
        KEY,
        "--replica-id",
        name,
        "--lease-ms",
        "1500",
    ];
    args.extend_from_slice(extra);
    Listener::spawn(&args).await
}

async fn replica(redis: &Redis, name: &str) -> Listener {
    replica_at(&redis.url, name, &[]).await
}

/// Creates mailboxes `0..n` across `replicas` and waits until every one streams.
async fn streaming(world: &World, replicas: &[&Listener], n: usize) {
    create(world, replicas, 0..n).await;
    eventually("every mailbox streaming", PATIENCE, async || {
        let (_, states) = spread(replicas[0]).await;
        (states.get("Streaming") == Some(&(n as u64))).then_some(())
    })
    .await;
}

/// Mocks whose streams are not cut on a timer: with many mailboxes, reconnects every two
/// seconds would be most of the work.
async fn world() -> World {
    World::start_with(Config {
        keepalive: Duration::from_secs(1),
        max_connection_time: None,
    })
    .await
}

fn email(i: usize) -> String {
    format!("user{i}@contoso.example")
}

fn id(i: usize) -> String {
    format!("mbx-{i}")
}

/// Mailboxes owned per replica and mailboxes per state, as one replica reports them.
async fn spread(listener: &Listener) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let (_, status) = listener.get("/api/listeners/status").await;
    let owners = serde_json::from_value(status["Owners"].clone()).unwrap_or_default();
    let states = serde_json::from_value(status["States"].clone()).unwrap_or_default();
    (owners, states)
}

/// Creates mailboxes `range` in mock-ews and sends each Create to the replicas in turn.
async fn create(world: &World, replicas: &[&Listener], range: std::ops::Range<usize>) {
    for i in range {
        world.ews.create_mailbox(&email(i), "secret").unwrap();
        let creds = world.credentials(&id(i), &email(i), "secret", "ProcessFullEmail");
        let (code, body) = replicas[i % replicas.len()]
            .send("create", &json!([creds]))
            .await;
        assert_eq!(code, 200, "{body}");
    }
}

fn inject(world: &World, i: usize, subject: &str) -> String {
    world
        .ews
        .inject(
            &email(i),
            NewMail {
                from: "sender@example.com".into(),
                subject: subject.into(),
                ..NewMail::default()
            },
        )
        .unwrap()
        .message_id
}

async fn assert_delivered_once(world: &World, sent: &[String]) {
    eventually("every mail at Creatio", PATIENCE, async || {
        let got = delivered(world);
        sent.iter().all(|m| got.contains(m)).then_some(())
    })
    .await;
    // Anything doubled arrives soon after the first copy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = delivered(world);
    for m in sent {
        assert_eq!(
            got.iter().filter(|g| *g == m).count(),
            1,
            "{m} delivered twice"
        );
    }
}

#[tokio::test]
async fn three_replicas_spread_150_mailboxes_and_any_one_answers_for_all() {
    let redis = Redis::start().await;
    let world = world().await;
    let r = [
        replica(&redis, "r0").await,
        replica(&redis, "r1").await,
        replica(&redis, "r2").await,
    ];
    create(&world, &[&r[0], &r[1], &r[2]], 0..150).await;
    let (owners, _) = eventually("150 mailboxes spread and streaming", PATIENCE, async || {
        let (owners, states) = spread(&r[1]).await;
        (states.get("Streaming") == Some(&150) && world.ews.stats().open_streams == 150)
            .then_some((owners, states))
    })
    .await;
    assert_eq!(
        owners,
        BTreeMap::from([("r0".into(), 50), ("r1".into(), 50), ("r2".into(), 50)])
    );

    // Any replica answers for any mailbox.
    let ids: Vec<String> = (0..150).map(id).collect();
    for listener in &r {
        let (code, states) = listener.send("subscriptionsstate", &json!(ids)).await;
        assert_eq!(code, 200);
        assert!(
            ids.iter().all(|i| states[i]["State"] == "exists"),
            "{states}"
        );
    }
    let (_, view) = r[2].get("/api/listeners/mbx-7").await;
    let owner = view["Owner"].as_str().expect("an owner").to_owned();
    assert_eq!(view["Status"]["State"], "Streaming");

    // Mail reaches Creatio once, whoever owns the mailbox.
    let sent: Vec<String> = (0..150)
        .step_by(10)
        .map(|i| inject(&world, i, "hello"))
        .collect();
    assert_delivered_once(&world, &sent).await;

    // A Close sent to a replica that does not own the mailbox stops it on its owner.
    let other = &r[(owner[1..].parse::<usize>().unwrap() + 1) % 3];
    let (code, _) = other.send("close", &json!(["mbx-7"])).await;
    assert_eq!(code, 200);
    eventually(
        "the owner to stop the closed mailbox",
        PATIENCE,
        async || (world.ews.stats().open_streams == 149).then_some(()),
    )
    .await;
    for listener in &r {
        assert_eq!(listener.state_of("mbx-7").await, "notExists");
    }
}

#[tokio::test]
async fn a_killed_replica_s_mailboxes_stream_again_elsewhere_with_nothing_lost() {
    let redis = Redis::start().await;
    let world = world().await;
    let mut r = vec![
        replica(&redis, "r0").await,
        replica(&redis, "r1").await,
        replica(&redis, "r2").await,
    ];
    create(&world, &[&r[0], &r[1], &r[2]], 0..30).await;
    eventually("30 mailboxes streaming", PATIENCE, async || {
        let (_, states) = spread(&r[0]).await;
        (states.get("Streaming") == Some(&30) && world.ews.stats().open_streams == 30).then_some(())
    })
    .await;
    let before: Vec<String> = (0..30).map(|i| inject(&world, i, "before")).collect();
    assert_delivered_once(&world, &before).await;

    let (owners, _) = spread(&r[0]).await;
    assert_eq!(owners.get("r2"), Some(&10));
    let mut dead = r.pop().unwrap();
    dead.kill9().await;
    let killed = tokio::time::Instant::now();
    // Mail for every mailbox while r2's are served by no one: only catch-up can find those.
    let during: Vec<String> = (0..30).map(|i| inject(&world, i, "during")).collect();
    eventually("r2's mailboxes owned by the others", PATIENCE, async || {
        let (owners, states) = spread(&r[0]).await;
        (owners.get("r0") == Some(&15)
            && owners.get("r1") == Some(&15)
            && states.get("Streaming") == Some(&30))
        .then_some(())
    })
    .await;
    println!("failover took {:?}", killed.elapsed());
    let after: Vec<String> = (0..30).map(|i| inject(&world, i, "after")).collect();
    assert_delivered_once(&world, &[before, during, after].concat()).await;
}

#[tokio::test]
async fn a_replica_stopped_with_sigterm_hands_over_without_waiting_for_its_leases() {
    let redis = Redis::start().await;
    let world = world().await;
    let mut r = vec![replica(&redis, "r0").await, replica(&redis, "r1").await];
    streaming(&world, &[&r[0], &r[1]], 20).await;
    let mut leaving = r.pop().unwrap();
    leaving.terminate();
    let stopped = tokio::time::Instant::now();
    let status = leaving.wait().await;
    assert!(status.success(), "{status:?}");
    let during: Vec<String> = (0..20).map(|i| inject(&world, i, "during")).collect();
    eventually(
        "every mailbox on the remaining replica",
        PATIENCE,
        async || {
            let (owners, states) = spread(&r[0]).await;
            (owners.get("r0") == Some(&20) && states.get("Streaming") == Some(&20)).then_some(())
        },
    )
    .await;
    let handover = stopped.elapsed();
    println!("handover took {handover:?}");
    assert_delivered_once(&world, &during).await;
    let (_, view): (u16, Value) = r[0].get("/api/listeners/status").await;
    assert_eq!(view["Owners"], json!({ "r0": 20 }));
}

#[tokio::test]
async fn a_replica_is_ready_only_once_redis_answers() {
    let mut redis = Redis::start().await;
    redis.kill().await;
    let listener = replica(&redis, "r0").await;
    assert_eq!(listener.get("/healthz").await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(listener.get("/readyz").await.0, 503, "no Redis, not ready");
    redis.restart().await;
    eventually("ready once Redis answers", PATIENCE, async || {
        (listener.get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    // Redis lost: not ready again (a load balancer sends the calls elsewhere), until it is back.
    redis.kill().await;
    eventually("not ready while Redis is away", PATIENCE, async || {
        (listener.get("/readyz").await.0 == 503).then_some(())
    })
    .await;
    redis.restart().await;
    eventually("ready once Redis is back", PATIENCE, async || {
        (listener.get("/readyz").await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn redis_restarted_empty_heals_and_later_mail_arrives_once() {
    let mut redis = Redis::start().await;
    let world = world().await;
    let r = [replica(&redis, "r0").await, replica(&redis, "r1").await];
    streaming(&world, &[&r[0], &r[1]], 10).await;
    redis.restart().await;
    eventually(
        "the mailboxes written back and streaming",
        PATIENCE,
        async || {
            let (owners, states) = spread(&r[1]).await;
            (owners.values().sum::<u64>() == 10 && states.get("Streaming") == Some(&10))
                .then_some(())
        },
    )
    .await;
    let ids: Vec<String> = (0..10).map(id).collect();
    let (_, states) = r[0].send("subscriptionsstate", &json!(ids)).await;
    assert!(
        ids.iter().all(|i| states[i]["State"] == "exists"),
        "{states}"
    );
    let after: Vec<String> = (0..10).map(|i| inject(&world, i, "after")).collect();
    assert_delivered_once(&world, &after).await;
}

#[tokio::test]
async fn redis_down_longer_than_a_lease_and_back_empty_loses_nothing() {
    let mut redis = Redis::start().await;
    let world = world().await;
    let r = [replica(&redis, "r0").await, replica(&redis, "r1").await];
    streaming(&world, &[&r[0], &r[1]], 10).await;
    // Down for three leases: every replica stops trusting its leases and stops its workers;
    // mail keeps arriving in Exchange meanwhile.
    let outage = async {
        redis.restart_after(Duration::from_millis(4500)).await;
    };
    let during = async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        (0..10)
            .map(|i| inject(&world, i, "during"))
            .collect::<Vec<String>>()
    };
    let ((), during) = tokio::join!(outage, during);
    eventually(
        "the mailboxes written back and streaming",
        PATIENCE,
        async || {
            let (_, states) = spread(&r[1]).await;
            (states.get("Streaming") == Some(&10)).then_some(())
        },
    )
    .await;
    let after: Vec<String> = (0..10).map(|i| inject(&world, i, "after")).collect();
    assert_delivered_once(&world, &[during, after].concat()).await;
}

/// r0 loses Redis (`cut`: refused at once, or `silence`d: nothing answers); r1 takes over; no
/// mail is lost or doubled, and r0 takes its share back once the link mends.
async fn cut_off_replica_gives_way(silence: bool) {
    let redis = Redis::start().await;
    let relay = Relay::start(&redis).await;
    let world = world().await;
    let r0 = replica_at(&relay.url, "r0", &[]).await;
    let r1 = replica(&redis, "r1").await;
    create(&world, &[&r0, &r1], 0..10).await;
    eventually("10 mailboxes spread and streaming", PATIENCE, async || {
        let (owners, states) = spread(&r1).await;
        (owners.get("r0") == Some(&5) && states.get("Streaming") == Some(&10)).then_some(())
    })
    .await;

    if silence {
        relay.silence();
    } else {
        relay.cut();
    }
    // While r0 cannot reach Redis, mail arrives for every mailbox; r0 must not post it.
    let during: Vec<String> = (0..10)
        .map(|i| inject(&world, i, "during the cut"))
        .collect();
    eventually("r1 to serve all ten", PATIENCE, async || {
        let (owners, states) = spread(&r1).await;
        (owners.get("r1") == Some(&10) && states.get("Streaming") == Some(&10)).then_some(())
    })
    .await;
    assert_delivered_once(&world, &during).await;

    relay.mend();
    eventually("r0 back with its share", PATIENCE, async || {
        let (owners, states) = spread(&r1).await;
        (owners.get("r0") == Some(&5) && states.get("Streaming") == Some(&10)).then_some(())
    })
    .await;
    let after: Vec<String> = (0..10).map(|i| inject(&world, i, "after")).collect();
    assert_delivered_once(&world, &[during, after].concat()).await;
}

#[tokio::test]
async fn a_replica_cut_off_from_redis_stops_before_another_takes_over() {
    cut_off_replica_gives_way(false).await;
}

#[tokio::test]
async fn a_replica_whose_redis_falls_silent_stops_before_another_takes_over() {
    cut_off_replica_gives_way(true).await;
}

#[tokio::test]
async fn a_mailbox_no_replica_serves_is_not_reported_to_exist() {
    let redis = Redis::start().await;
    let world = world().await;
    let full = ["--max-active-mailboxes", "1"];
    let mut r0 = replica_at(&redis.url, "r0", &full).await;
    let r1 = replica_at(&redis.url, "r1", &full).await;
    create(&world, &[&r0, &r1], 0..2).await;
    eventually("one mailbox on each replica", PATIENCE, async || {
        let (owners, states) = spread(&r1).await;
        (owners.len() == 2 && states.get("Streaming") == Some(&2)).then_some(())
    })
    .await;
    let (_, view) = r1.get("/api/listeners/mbx-0").await;
    let (orphan, served) = if view["Owner"] == "r0" {
        ("mbx-0", "mbx-1")
    } else {
        ("mbx-1", "mbx-0")
    };
    // r0 dies; r1 is full: r0's mailbox is served by no one and says so, r1's stays served.
    r0.kill9().await;
    eventually("the orphan reported notExists", PATIENCE, async || {
        (r1.state_of(orphan).await == "notExists").then_some(())
    })
    .await;
    assert_eq!(r1.state_of(served).await, "exists");
    let (_, view) = r1.get(&format!("/api/listeners/{served}")).await;
    assert_eq!(view["Owner"], "r1", "r1 kept the mailbox it served");
}

#[tokio::test]
async fn creatio_down_through_a_failover_delays_mail_but_loses_none() {
    let redis = Redis::start().await;
    let world = world().await;
    let mut r = vec![replica(&redis, "r0").await, replica(&redis, "r1").await];
    streaming(&world, &[&r[0], &r[1]], 10).await;
    // Creatio answers 503 to everything; mail arrives and is retried by both replicas.
    world.creatio.fail_with(mock_creatio::Failure {
        count: u32::MAX,
        status: Some(503),
        retry_after_secs: None,
    });
    let sent: Vec<String> = (0..10).map(|i| inject(&world, i, "while down")).collect();
    eventually("deliveries failing", PATIENCE, async || {
        (world.creatio.attempts().len() >= 10).then_some(())
    })
    .await;
    // One replica dies with its mail still unaccepted; then Creatio comes back.
    let mut dead = r.pop().unwrap();
    dead.kill9().await;
    // The survivor takes the dead replica's mailboxes while Creatio is still down (their
    // catch-up waits on Creatio, so they do not stream yet).
    eventually("r0 to hold all ten leases", PATIENCE, async || {
        let (owners, _) = spread(&r[0]).await;
        (owners.get("r0") == Some(&10)).then_some(())
    })
    .await;
    world.creatio.fail_with(mock_creatio::Failure::default());
    assert_delivered_once(&world, &sent).await;
}

#[tokio::test]
async fn a_send_its_replica_left_unfinished_is_taken_over_and_sent_only_if_it_did_not_go_out() {
    let redis = Redis::start().await;
    let world = world().await;
    let listener = replica(&redis, "r0").await;
    for mailbox in ["alice@contoso.example", "bob@contoso.example"] {
        world.ews.create_mailbox(mailbox, "secret").unwrap();
    }
    let conn = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let send = async |message_id: &str| {
        let body = json!({
            "Email": {
                "Id": message_id, "Subject": "Offer", "Body": "text", "IsHtmlBody": false,
                "Recepients": ["bob@contoso.example"], "CopyRecepients": [], "BlindCopyRecepients": [],
                "Headers": [], "Importance": 1, "Attachments": [], "MessageId": message_id,
            },
            "Attachments": null,
            "Credentials": world.credentials("", "alice@contoso.example", "secret", "ProcessFullEmail"),
        })
        .to_string();
        // A replica began this send an hour ago and died before it said how it ended.
        let command = exchange_listener::creatio::contract::parse_send(body.as_bytes()).unwrap();
        let key = exchange_listener::engine::send::ledger_key(&command);
        let long_ago = exchange_listener::creatio::mail::unix_now_ms() - 3_600_000;
        let _: () = redis::cmd("SET")
            .arg(format!("el:send:{{{key}}}"))
            .arg(format!("sending:{long_ago}"))
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        listener.post("/apiv2/email/send", body).await
    };
    // It had gone out: Sent Items holds it, so it is not sent again.
    world
        .ews
        .inject(
            "alice@contoso.example",
            NewMail {
                from: "alice@contoso.example".into(),
                to: vec!["bob@contoso.example".into()],
                message_id: Some("<went@creatio.example>".into()),
                folder: Some("Sent Items".into()),
                ..NewMail::default()
            },
        )
        .unwrap();
    assert_eq!(
        send("<went@creatio.example>").await,
        (200, Value::String(String::new()))
    );
    assert!(world.ews.sent("bob@contoso.example").unwrap().is_empty());
    // It had not: it is sent now.
    assert_eq!(
        send("<stuck@creatio.example>").await,
        (200, Value::String(String::new()))
    );
    let bobs: Vec<String> = world
        .ews
        .sent("bob@contoso.example")
        .unwrap()
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(bobs, ["<stuck@creatio.example>"]);
}

#[tokio::test]
async fn a_replica_given_another_key_names_both_keys_and_serves_the_mailboxes_it_can_open() {
    use exchange_listener::engine::store::seal::Sealer;
    let redis = Redis::start().await;
    let world = world().await;
    let mut first = replica(&redis, "r0").await;
    streaming(&world, &[&first], 1).await;
    first.kill9().await;
    // The key changed (a chart rendered anew): mbx-0 was sealed with the old one.
    const OTHER: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let second = Listener::spawn(&[
        "--redis-url",
        &redis.url,
        "--secret-key",
        OTHER,
        "--replica-id",
        "r1",
        "--lease-ms",
        "1500",
    ])
    .await;
    create(&world, &[&second], 1..2).await;
    let old_id = Sealer::from_base64(KEY).unwrap().key_id().unwrap();
    let new_id = Sealer::from_base64(OTHER).unwrap().key_id().unwrap();
    let named = format!("sealed with key {old_id}, and this replica's key is {new_id}");
    eventually(
        "the new mailbox streaming, the old one's key named",
        PATIENCE,
        async || {
            let (_, states) = spread(&second).await;
            let said = second
                .logs
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(&named));
            (states.get("Streaming") == Some(&1) && states.get("Failed") == Some(&1) && said)
                .then_some(())
        },
    )
    .await;
    // Creatio sees the old one failed...
    let (_, state) = second.send("subscriptionsstate", &json!([id(0)])).await;
    assert_eq!(state[id(0)]["State"], "failed", "{state}");
    // ...and sends its credentials anew: sealed with this replica's key, it streams again.
    let creds = world.credentials(&id(0), &email(0), "secret", "ProcessFullEmail");
    let (code, body) = second.send("create", &json!([creds])).await;
    assert_eq!(code, 200, "{body}");
    eventually("the old mailbox streaming again", PATIENCE, async || {
        let (_, states) = spread(&second).await;
        (states.get("Streaming") == Some(&2)).then_some(())
    })
    .await;
    let logs = second.logs.lock().unwrap().join("\n");
    assert!(
        !logs.contains(KEY) && !logs.contains(OTHER),
        "no key in the log"
    );
}

#[tokio::test]
async fn with_sentinel_the_replicas_follow_the_promoted_master_with_nothing_lost() {
    let dir = common::temp_dir("sentinel");
    let mut set = harness::sentinel::SentinelSet::start(&dir)
        .await
        .expect("a Redis master, its replica and three sentinels");
    let world = world().await;
    let r = [
        replica_at(&set.url, "r0", &[]).await,
        replica_at(&set.url, "r1", &[]).await,
    ];
    streaming(&world, &[&r[0], &r[1]], 6).await;
    let before: Vec<String> = (0..6).map(|i| inject(&world, i, "before")).collect();
    assert_delivered_once(&world, &before).await;

    set.kill_master().await.unwrap();
    let killed = tokio::time::Instant::now();
    let during: Vec<String> = (0..6).map(|i| inject(&world, i, "during")).collect();
    let promoted = format!("master=127.0.0.1:{}", set.replica_port);
    eventually(
        "both replicas on the promoted master",
        Duration::from_secs(40),
        async || {
            r.iter()
                .all(|l| {
                    l.logs
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|line| line.contains(&promoted))
                })
                .then_some(())
        },
    )
    .await;
    println!("Sentinel's failover followed after {:?}", killed.elapsed());
    let after: Vec<String> = (0..6).map(|i| inject(&world, i, "after")).collect();
    eventually("every mailbox streaming", PATIENCE, async || {
        let (_, states) = spread(&r[0]).await;
        (states.get("Streaming") == Some(&6)).then_some(())
    })
    .await;
    assert_delivered_once(&world, &[before, during, after].concat()).await;
}
