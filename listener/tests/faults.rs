//! Every fault mock-ews can produce, one test each: the listener delivers every injected mail
//! exactly once through it, or (for rejected credentials) backs off and reports the mailbox.

mod common;

use std::time::Duration;

use common::{
    Listener, PATIENCE, World, assert_each_delivered_once, assert_slow_second_login, challenges,
    eventually,
};
use mock_ews::{Config, Fault, FaultKind, NewMail, Settings};
use serde_json::json;

const ALICE: &str = "alice@contoso.example";

fn mail(subject: &str) -> NewMail {
    NewMail {
        from: "bob@example.com".into(),
        subject: subject.into(),
        body: "hello".into(),
        ..NewMail::default()
    }
}

/// Mocks and a listener; alice exists in mock-ews but not yet in the listener.
async fn start(extra: &[&str]) -> (World, Listener) {
    let world = World::start().await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    (world, Listener::spawn(extra).await)
}

/// Mocks and a listener with alice streaming.
async fn streaming() -> (World, Listener) {
    let (world, listener) = start(&[]).await;
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    (world, listener)
}

fn inject(world: &World, subject: &str) -> String {
    world.ews.inject(ALICE, mail(subject)).unwrap().message_id
}

/// Statuses and arrival times of every request of one operation, in order.
fn requests(world: &World, operation: &str) -> Vec<(u16, tokio::time::Instant)> {
    world
        .ews
        .request_log()
        .into_iter()
        .filter(|r| r.operation == operation)
        .map(|r| (r.status, r.at))
        .collect()
}

fn count(world: &World, operation: &str) -> usize {
    requests(world, operation).len()
}

/// Waits for the first successful request after the first failed one; answers the gap.
async fn retry_gap(world: &World, operation: &str) -> Duration {
    eventually("a retry that succeeds", PATIENCE, async || {
        let log = requests(world, operation);
        let failed = log.iter().position(|(status, _)| *status != 200)?;
        let (_, ok_at) = log[failed + 1..]
            .iter()
            .find(|(status, _)| *status == 200)?;
        Some(ok_at.duration_since(log[failed].1))
    })
    .await
}

#[tokio::test]
async fn server_busy_back_off_is_honoured() {
    let (world, listener) = start(&[]).await;
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::ServerBusy { back_off_ms: 1500 }).for_operation("Subscribe"),
        )
        .unwrap();
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    let gap = retry_gap(&world, "Subscribe").await;
    assert!(
        gap >= Duration::from_millis(1500),
        "retried after {gap:?}, before the server's 1500 ms"
    );
    let sent = [inject(&world, "after busy")];
    assert_each_delivered_once(&world, ALICE, &sent).await;
}

#[tokio::test]
async fn unavailable_with_retry_after_is_honoured() {
    let (world, listener) = start(&[]).await;
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Unavailable {
                retry_after_secs: Some(1),
            })
            .for_operation("Subscribe"),
        )
        .unwrap();
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    let gap = retry_gap(&world, "Subscribe").await;
    assert!(
        gap >= Duration::from_secs(1),
        "retried after {gap:?}, before Retry-After"
    );
    assert_each_delivered_once(&world, ALICE, &[inject(&world, "after 503")]).await;
}

#[tokio::test]
async fn unavailable_without_retry_after_backs_off_and_recovers() {
    let (world, listener) = start(&[]).await;
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Unavailable {
                retry_after_secs: None,
            })
            .for_operation("GetStreamingEvents")
            .times(3),
        )
        .unwrap();
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    let opens = requests(&world, "GetStreamingEvents");
    let statuses: Vec<u16> = opens.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses[..4], [503, 503, 503, 200], "{statuses:?}");
    // Retry k waits at least half of 100 ms × 2^k (the listener runs with a 100 ms base):
    // the waits grow, and none is skipped.
    for k in 0..3 {
        let gap = opens[k + 1].1.duration_since(opens[k].1);
        let floor = Duration::from_millis(50 << k);
        assert!(
            gap >= floor,
            "retry {k} came {gap:?} after the 503, before its {floor:?} backoff"
        );
    }
    assert_each_delivered_once(&world, ALICE, &[inject(&world, "after 503s")]).await;
}

#[tokio::test]
async fn unauthorized_marks_the_mailbox_failed_without_hammering() {
    let (world, listener) = start(&["--failed-retry-base-secs", "4"]).await;
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Unauthorized)
                .for_mailbox(ALICE)
                .lasting(Duration::from_secs(60)),
        )
        .unwrap();
    let creds = world.credentials("mbx-1", ALICE, "secret", "ProcessFullEmail");
    assert_eq!(listener.send("create", &json!([creds])).await.0, 200);
    eventually("the mailbox to be Failed", PATIENCE, async || {
        let (_, view) = listener.get("/api/listeners/mbx-1").await;
        (view["Status"]["State"] == "Failed").then_some(())
    })
    .await;
    let report = eventually("a ProcessMailboxState report", PATIENCE, async || {
        world.creatio.calls_of("ProcessMailboxState").pop()
    })
    .await;
    assert_eq!(report.body["Avaliable"], false);
    assert_slow_second_login(&world, Duration::from_secs(4)).await;
}

/// The server forgets the subscription: the listener subscribes again, and a mail sent while
/// no subscription existed arrives through catch-up.
async fn lost_subscription_is_replaced(kind: FaultKind) {
    let (world, _listener) = streaming().await;
    let before = count(&world, "Subscribe");
    world
        .ews
        .inject_fault(Fault::once(kind).for_mailbox(ALICE))
        .unwrap();
    // Sent while the server has no subscription: only catch-up can find it.
    let sent = [inject(&world, "while unsubscribed")];
    assert_each_delivered_once(&world, ALICE, &sent).await;
    assert!(count(&world, "Subscribe") > before, "no new subscription");
}

#[tokio::test]
async fn subscription_not_found_resubscribes_and_catches_up() {
    lost_subscription_is_replaced(FaultKind::SubscriptionNotFound).await;
}

#[tokio::test]
async fn invalid_subscription_resubscribes_and_catches_up() {
    lost_subscription_is_replaced(FaultKind::InvalidSubscription).await;
}

#[tokio::test]
async fn missed_notification_events_are_caught_up() {
    let (world, _listener) = streaming().await;
    world
        .ews
        .inject_fault(Fault::once(FaultKind::MissedNotificationEvents).for_mailbox(ALICE))
        .unwrap();
    let sent = [inject(&world, "dropped by the server")];
    eventually("the events to be dropped", PATIENCE, async || {
        (world.ews.stats().events_dropped > 0).then_some(())
    })
    .await;
    assert_each_delivered_once(&world, ALICE, &sent).await;
}

/// The server drops a mail's event and then rejects the sync state the catch-up presents:
/// only a search by received time can find that mail.
#[tokio::test]
async fn a_rejected_sync_state_loses_no_mail() {
    // Streams are not cut on a timer here: the catch-up after the dropped event is the first
    // sync the rejection meets, with the mail already in the inbox.
    let world = World::start_with(Config {
        keepalive: Duration::from_secs(1),
        max_connection_time: None,
    })
    .await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    let listener = Listener::spawn(&[]).await;
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    let delivered_before = inject(&world, "before the gap");
    assert_each_delivered_once(&world, ALICE, std::slice::from_ref(&delivered_before)).await;
    for kind in [
        FaultKind::InvalidSyncState,
        FaultKind::MissedNotificationEvents,
    ] {
        world
            .ews
            .inject_fault(Fault::once(kind).for_mailbox(ALICE))
            .unwrap();
    }
    let sent = [inject(&world, "in the gap")];
    assert_each_delivered_once(&world, ALICE, &sent).await;
    assert!(world.ews.faults().is_empty(), "both faults fired");
    assert!(count(&world, "FindItem") > 0, "the gap was searched");
    // The mail delivered before the gap is in the search too; it is not posted again.
    assert_each_delivered_once(&world, ALICE, &[delivered_before]).await;
}

#[tokio::test]
async fn connection_cut_mid_envelope_loses_nothing() {
    let (world, _listener) = streaming().await;
    world
        .ews
        .inject_fault(Fault::once(FaultKind::CloseMidEnvelope).for_mailbox(ALICE))
        .unwrap();
    let sent = [
        inject(&world, "in the cut envelope"),
        inject(&world, "right after"),
    ];
    assert_each_delivered_once(&world, ALICE, &sent).await;
    assert!(
        world.ews.stats().events_dropped > 0,
        "the fault never fired"
    );
}

#[tokio::test]
async fn a_silent_stream_is_reopened_by_the_watchdog() {
    // No connection cap here: only the listener's idle watchdog can end a silent stream.
    let world = World::start_with(Config {
        keepalive: Duration::from_millis(300),
        max_connection_time: None,
    })
    .await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    let listener = Listener::spawn(&["--stream-idle-secs", "1"]).await;
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    let before = count(&world, "GetStreamingEvents");
    // Six seconds of silence against a one-second watchdog: two reconnects fit with room to
    // spare on a loaded machine.
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Silence)
                .for_mailbox(ALICE)
                .lasting(Duration::from_secs(6)),
        )
        .unwrap();
    let sent = [inject(&world, "during silence")];
    eventually(
        "the watchdog to reopen the stream twice",
        PATIENCE,
        async || (count(&world, "GetStreamingEvents") >= before + 2).then_some(()),
    )
    .await;
    assert_each_delivered_once(&world, ALICE, &sent).await;
}

#[tokio::test]
async fn an_expired_subscription_is_replaced() {
    let (world, _listener) = streaming().await;
    world.ews.set_settings(Settings {
        subscription_expiry_ms: Some(300),
        ..Settings::default()
    });
    let before = count(&world, "Subscribe");
    // Keep the listener from reconnecting long enough for its subscription to expire.
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Unavailable {
                retry_after_secs: None,
            })
            .for_operation("GetStreamingEvents")
            .lasting(Duration::from_millis(2500)),
        )
        .unwrap();
    eventually("the subscription to expire", PATIENCE, async || {
        (world.ews.stats().live_subscriptions == 0).then_some(())
    })
    .await;
    // Sent while the server has forgotten the subscription: only catch-up can find it.
    let sent = [inject(&world, "while expired")];
    eventually("a new subscription", PATIENCE, async || {
        (count(&world, "Subscribe") > before).then_some(())
    })
    .await;
    assert_each_delivered_once(&world, ALICE, &sent).await;
}

/// Under a server limit the mailbox cannot stream: the error shows in its state, the listener
/// keeps retrying with backoff, and once the limit is lifted every mail arrives.
async fn limit_backs_off_until_lifted(limit: Settings, code: &str) {
    let (world, listener) = start(&[]).await;
    world.ews.set_settings(limit);
    let creds = world.credentials("mbx-1", ALICE, "secret", "ProcessFullEmail");
    assert_eq!(listener.send("create", &json!([creds])).await.0, 200);
    eventually(
        "the limit to show in the mailbox state",
        PATIENCE,
        async || {
            let (_, view) = listener.get("/api/listeners/mbx-1").await;
            view["Status"]["LastError"]
                .as_str()?
                .contains(code)
                .then_some(())
        },
    )
    .await;
    world.ews.set_settings(Settings::default());
    eventually("a stream", PATIENCE, async || {
        (world.ews.stats().open_streams > 0).then_some(())
    })
    .await;
    assert_each_delivered_once(&world, ALICE, &[inject(&world, "after the limit")]).await;
}

#[tokio::test]
async fn connection_limit_backs_off_until_lifted() {
    let limit = Settings {
        max_streams_per_user: Some(0),
        ..Settings::default()
    };
    limit_backs_off_until_lifted(limit, "ErrorExceededConnectionCount").await;
}

#[tokio::test]
async fn subscription_limit_backs_off_until_lifted() {
    let limit = Settings {
        max_subscriptions_per_mailbox: Some(0),
        ..Settings::default()
    };
    limit_backs_off_until_lifted(limit, "ErrorExceededSubscriptionCount").await;
}

#[tokio::test]
async fn slow_operations_still_deliver() {
    let (world, _listener) = streaming().await;
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Latency { ms: 400 })
                .for_operation("GetItem")
                .lasting(Duration::from_secs(30)),
        )
        .unwrap();
    let sent = [inject(&world, "slow one"), inject(&world, "slow two")];
    assert_each_delivered_once(&world, ALICE, &sent).await;
}

/// Exchange 2010 SP2 refuses the listener's default `Exchange2013_SP1` with
/// `ErrorInvalidServerVersion` and names its own version: the listener speaks that from then
/// on, for every mailbox on the server, and streams.
#[tokio::test]
async fn an_older_server_is_spoken_to_in_the_version_it_names() {
    const CAROL: &str = "carol@contoso.example";
    let (world, listener) = start(&[]).await;
    world.ews.create_mailbox(CAROL, "secret").unwrap();
    world.ews.set_settings(Settings {
        server_version: Some("Exchange2010_SP2".into()),
        ..Settings::default()
    });
    let refused = |world: &World| {
        world
            .ews
            .request_log()
            .iter()
            .filter(|r| r.status == 500)
            .count()
    };
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    assert_eq!(refused(&world), 1, "{:?}", world.ews.request_log());
    world
        .create(&listener, "mbx-2", CAROL, "ProcessFullEmail")
        .await;
    assert_eq!(
        refused(&world),
        1,
        "the second mailbox is asked in the right version at once"
    );
    assert_each_delivered_once(&world, ALICE, &[inject(&world, "on Exchange 2010")]).await;
}

/// Where Basic is switched off on the EWS virtual directory, a 401 offers only NTLM: the
/// listener logs in with NTLM from then on, on each connection it opens, and streams and
/// delivers.
#[tokio::test]
async fn where_basic_is_off_the_listener_logs_in_with_ntlm() {
    let (world, listener) = start(&[]).await;
    world.ews.set_settings(Settings {
        auth: Some("ntlm".into()),
        ..Settings::default()
    });
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    assert_each_delivered_once(&world, ALICE, &[inject(&world, "over NTLM")]).await;
    // The stream and the other calls each took a connection, and each connection a handshake.
    assert!(challenges(&world) >= 2, "{:?}", world.ews.request_log());
}

/// `--ews-auth ntlm` logs in with NTLM even where Basic is offered too, and a down-level
/// user name (`CONTOSO\alice`) works as well as a UPN.
#[tokio::test]
async fn ntlm_can_be_forced_and_takes_a_domain_user_name() {
    let (world, listener) = start(&["--ews-auth", "ntlm"]).await;
    world.ews.set_settings(Settings {
        auth: Some("both".into()),
        ..Settings::default()
    });
    let mut creds = world.credentials("mbx-1", ALICE, "secret", "ProcessFullEmail");
    creds["UserName"] = json!("CONTOSO\\alice");
    let (status, body) = listener.send("create", &json!([creds])).await;
    assert_eq!(status, 200, "{body}");
    eventually("the mailbox to stream", PATIENCE, async || {
        (world.ews.stats().open_streams > 0).then_some(())
    })
    .await;
    assert_each_delivered_once(&world, ALICE, &[inject(&world, "forced NTLM")]).await;
}

/// A server that offers only `Negotiate` gets NTLM's messages under that scheme.
#[tokio::test]
async fn a_server_offering_only_negotiate_gets_ntlm_inside_it() {
    let (world, listener) = start(&[]).await;
    world.ews.set_settings(Settings {
        auth: Some("negotiate".into()),
        ..Settings::default()
    });
    world
        .create(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    assert_each_delivered_once(&world, ALICE, &[inject(&world, "over Negotiate")]).await;
}
