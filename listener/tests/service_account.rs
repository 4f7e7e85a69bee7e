//! A service account with the ApplicationImpersonation role serves the mailboxes Creatio
//! sends without a password; their subscriptions share one stream per mailbox server.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Listener, PATIENCE, World, challenges, delivered, eventually, temp_dir};
use mock_ews::RequestRecord;
use mock_ews::{Fault, FaultKind, NewMail, Settings};
use serde_json::json;

const SERVICE: &str = "svc-creatio@contoso.example";

/// mock-ews with two mailbox servers, a service account holding the role, `count` mailboxes
/// (each with a password of its own the listener never learns), and the listener given the
/// account; every mailbox created without a password. `auth` as mock-ews's setting.
async fn start(count: usize, auth: Option<&str>) -> (World, Listener, Vec<String>) {
    start_with(count, auth, "svc-secret", &[], World::start().await).await
}

/// As [`start`], with the listener given `password` for the account and `extra` flags, in
/// `world`.
async fn start_with(
    count: usize,
    auth: Option<&str>,
    password: &str,
    extra: &[&str],
    world: World,
) -> (World, Listener, Vec<String>) {
    world.ews.create_mailbox(SERVICE, "svc-secret").unwrap();
    world.ews.set_settings(Settings {
        auth: auth.map(str::to_owned),
        impersonators: vec![SERVICE.into()],
        backends: Some(2),
        // Per-mailbox streams would need `count`; grouped ones need one per server at a time,
        // and one more while a connection Exchange ended is replaced.
        max_streams_per_user: Some(2),
        ..Settings::default()
    });
    let file = temp_dir("service-accounts").join("accounts.json");
    let accounts = json!([{ "url": world.ews.ews_url(), "user": SERVICE, "password": password }]);
    std::fs::write(&file, accounts.to_string()).unwrap();
    let mut args = vec![
        "--ews-service-accounts",
        file.to_str().unwrap(),
        "--creatio-hosts",
        "127.0.0.1",
    ];
    args.extend_from_slice(extra);
    let listener = Listener::spawn(&args).await;
    let mailboxes: Vec<String> = (0..count)
        .map(|i| format!("user{i:02}@contoso.example"))
        .collect();
    let creds: Vec<_> = mailboxes
        .iter()
        .enumerate()
        .map(|(i, m)| {
            world.ews.create_mailbox(m, "their-own").unwrap();
            let mut c = world.credentials(&format!("mbx-{i}"), m, "", "ProcessFullEmail");
            let c_obj = c.as_object_mut().unwrap();
            c_obj.remove("Password");
            c_obj.remove("UserName");
            c
        })
        .collect();
    let (status, body) = listener.send("create", &json!(creds)).await;
    assert_eq!(status, 200, "{body}");
    (world, listener, mailboxes)
}

/// The mailboxes by the server they live on.
fn by_server(world: &World, mailboxes: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut servers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in mailboxes {
        servers
            .entry(world.ews.backend_of(m))
            .or_default()
            .insert(m.clone());
    }
    servers
}

/// The Subscribe calls that acted as `mailbox`.
fn subscribes(log: &[RequestRecord], mailbox: &str) -> usize {
    log.iter()
        .filter(|r| r.operation == "Subscribe" && r.mailbox == mailbox)
        .count()
}

/// The anchor of a mailbox server holding at least two of `mailboxes`: its address and its
/// mailbox id.
fn anchor_with_company(world: &World, mailboxes: &[String]) -> (String, String) {
    let servers = by_server(world, mailboxes);
    let group = servers
        .values()
        .find(|s| s.len() > 1)
        .expect("a server with two mailboxes");
    let anchor = group.first().unwrap().clone();
    let id = format!(
        "mbx-{}",
        mailboxes.iter().position(|m| *m == anchor).unwrap()
    );
    (anchor, id)
}

async fn until_failed(listener: &Listener, id: &str) {
    eventually(&format!("{id} to fail"), PATIENCE, async || {
        (listener.state_of(id).await == "failed").then_some(())
    })
    .await;
}

/// Mails each mailbox one message; answers their Message-IDs.
fn mail_each(world: &World, mailboxes: &[String], subject: &str) -> Vec<String> {
    mailboxes
        .iter()
        .map(|m| {
            let mail = NewMail {
                from: "customer@example.com".into(),
                subject: subject.into(),
                ..NewMail::default()
            };
            world.ews.inject(m, mail).unwrap().message_id
        })
        .collect()
}

async fn assert_delivered_once(world: &World, sent: &[String]) {
    eventually("every mail at Creatio", PATIENCE, async || {
        let got = delivered(world);
        sent.iter().all(|m| got.contains(m)).then_some(())
    })
    .await;
    let got = delivered(world);
    for m in sent {
        assert_eq!(got.iter().filter(|g| *g == m).count(), 1, "{m}: {got:?}");
    }
}

/// Waits until the listener counts `count` mailboxes streaming.
async fn all_streaming(listener: &Listener, count: usize) {
    let line = format!(r#"exchange_listener_mailboxes{{state="Streaming"}} {count}"#);
    metric(listener, &line).await;
}

/// Waits until `/metrics` has this line.
async fn metric(listener: &Listener, line: &str) {
    eventually(line, PATIENCE, async || {
        let metrics = listener
            .http
            .get(format!("{}/metrics", listener.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metrics.lines().any(|l| l == line).then_some(())
    })
    .await;
}

#[tokio::test]
async fn mailboxes_without_a_password_share_one_stream_per_mailbox_server() {
    let (world, listener, mailboxes) = start(20, None).await;
    all_streaming(&listener, mailboxes.len()).await;
    metric(&listener, "exchange_listener_shared_streams 2").await;
    let sent = mail_each(&world, &mailboxes, "through the service account");
    assert_delivered_once(&world, &sent).await;

    let servers = by_server(&world, &mailboxes);
    assert_eq!(servers.len(), 2, "{servers:?}");
    let log = world.ews.request_log();
    let streamed_as: BTreeSet<&String> = log
        .iter()
        .filter(|r| r.operation == "GetStreamingEvents")
        .map(|r| &r.mailbox)
        .collect();
    // Each server's stream acts as its first mailbox; a mailbox slow to join may have started
    // a second group, anchored in the same server.
    for (server, members) in &servers {
        let anchors: Vec<&&String> = streamed_as
            .iter()
            .filter(|a| members.contains(**a))
            .collect();
        assert!(
            anchors.first().map(|a| **a) == members.first() && anchors.len() <= 2,
            "{server}: streams as {anchors:?}"
        );
    }
    assert!(
        streamed_as
            .iter()
            .all(|a| servers.values().any(|m| m.contains(*a))),
        "{streamed_as:?}"
    );
    // Two servers, and a connection Exchange ended may overlap with its replacement.
    assert!(
        world.ews.stats().open_streams <= 4,
        "{:?}",
        world.ews.stats()
    );
    for m in &mailboxes {
        assert_eq!(subscribes(&log, m), 1, "{m} subscribed as itself, once");
    }
    let logs = listener.logs().join("\n");
    assert!(!logs.contains("svc-secret"), "a secret in the logs");
}

#[tokio::test]
async fn a_lost_subscription_in_a_shared_stream_touches_only_its_mailbox() {
    let (world, listener, mailboxes) = start(8, None).await;
    all_streaming(&listener, mailboxes.len()).await;
    // Its stream goes on under another anchor.
    let (lost, lost_id) = anchor_with_company(&world, &mailboxes);
    let deleted_at = tokio::time::Instant::now();
    world.ews.delete_mailbox(&lost).unwrap();
    until_failed(&listener, &lost_id).await;

    let others: Vec<String> = mailboxes.iter().filter(|m| **m != lost).cloned().collect();
    let sent = mail_each(&world, &others, "after a neighbour left");
    assert_delivered_once(&world, &sent).await;
    let log = world.ews.request_log();
    for m in &others {
        assert_eq!(subscribes(&log, m), 1, "{m} kept its subscription");
        // A mailbox whose stream broke would catch up before streaming again.
        let syncs = log
            .iter()
            .filter(|r| r.operation == "SyncFolderItems" && &r.mailbox == m && r.at > deleted_at)
            .count();
        assert_eq!(syncs, 0, "{m} kept streaming without a break");
    }
}

/// Where Basic is off, the account logs in with NTLM: its mailboxes' calls share a few
/// authenticated connections, where a connection per mailbox would each need a handshake.
#[tokio::test]
async fn a_service_account_logging_in_with_ntlm_shares_its_connections() {
    let count = 30;
    let (world, listener, mailboxes) = start(count, Some("ntlm")).await;
    all_streaming(&listener, count).await;
    let sent = mail_each(&world, &mailboxes, "over shared NTLM connections");
    assert_delivered_once(&world, &sent).await;
    let challenges = challenges(&world);
    assert!(
        challenges > 0 && challenges < 2 * count,
        "{challenges} challenges for {count} mailboxes"
    );
}

/// Validate without a password asks whether the account may act as the mailbox.
#[tokio::test]
async fn validate_without_a_password_checks_the_account_may_act_as_the_mailbox() {
    let (world, listener, mailboxes) = start(1, None).await;
    let validate = async |email: &str| {
        let mut creds = world.credentials("", email, "", "ProcessFullEmail");
        let obj = creds.as_object_mut().unwrap();
        obj.remove("Password");
        obj.remove("UserName");
        let (code, body) = listener.send("validate", &creds).await;
        assert_eq!(code, 200, "{body}");
        (
            body["IsValid"] == true,
            body["Message"].as_str().unwrap_or("").to_owned(),
        )
    };
    assert_eq!(validate(&mailboxes[0]).await, (true, String::new()));
    let (valid, message) = validate("nobody@contoso.example").await;
    assert!(
        !valid && message.contains("ErrorNonExistentMailbox"),
        "{message}"
    );
    world.ews.set_settings(Settings::default());
    let (valid, message) = validate(&mailboxes[0]).await;
    assert!(
        !valid && message.contains("ErrorImpersonateUserDenied"),
        "{message}"
    );
}

/// A wrong password for the account is not tried by every mailbox: after Exchange rejects it,
/// one call a while probes it and the rest wait, so the domain does not lock the account out.
/// Once Exchange takes the password, every mailbox streams.
#[tokio::test]
async fn a_rejected_service_account_is_probed_not_retried_by_every_mailbox() {
    let count = 20;
    let fast_failed_retry = [
        "--failed-retry-base-secs",
        "1",
        "--failed-retry-max-secs",
        "2",
    ];
    let (world, listener, _) = start_with(
        count,
        None,
        "stale",
        &fast_failed_retry,
        World::start().await,
    )
    .await;
    let ids: Vec<String> = (0..count).map(|i| format!("mbx-{i}")).collect();
    eventually("every mailbox failed", PATIENCE, async || {
        let (_, body) = listener.send("subscriptionsstate", &json!(ids)).await;
        ids.iter()
            .all(|id| body[id]["State"] == "failed")
            .then_some(())
    })
    .await;
    let first = challenges(&world);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let later = challenges(&world);
    // Alone, each mailbox would have been refused at least once, and again every 1-2 s.
    assert!(
        first <= 5 && later - first <= 4,
        "{first} rejections, then {} more in 3 s, for {count} mailboxes",
        later - first
    );

    world.ews.set_password(SERVICE, "stale").unwrap();
    all_streaming(&listener, count).await;
}

/// Exchange refusing to act as a shared stream's anchor (its mailbox gone from the directory,
/// say) fails that mailbox alone: the group streams on under its next mailbox.
#[tokio::test]
async fn a_refused_anchor_fails_alone_and_the_next_mailbox_anchors_the_group() {
    let (world, listener, mailboxes) = start(8, None).await;
    all_streaming(&listener, mailboxes.len()).await;
    let (anchor, anchor_id) = anchor_with_company(&world, &mailboxes);
    let fault = Fault::once(FaultKind::SoapFault {
        code: "ErrorNonExistentMailbox".into(),
    })
    .for_mailbox(&anchor)
    .for_operation("GetStreamingEvents")
    .lasting(std::time::Duration::from_secs(60));
    world.ews.inject_fault(fault).unwrap();
    until_failed(&listener, &anchor_id).await;

    let others: Vec<String> = mailboxes
        .iter()
        .filter(|m| **m != anchor)
        .cloned()
        .collect();
    let sent = mail_each(&world, &others, "under the next anchor");
    assert_delivered_once(&world, &sent).await;
    for (i, m) in mailboxes.iter().enumerate() {
        if *m != anchor {
            assert_ne!(
                listener.state_of(&format!("mbx-{i}")).await,
                "failed",
                "{m}"
            );
        }
    }
}

#[tokio::test]
async fn an_anchor_whose_server_fails_hands_the_shared_stream_to_the_next_mailbox() {
    let (world, listener, mailboxes) = start(8, None).await;
    all_streaming(&listener, mailboxes.len()).await;
    let (anchor, _) = anchor_with_company(&world, &mailboxes);
    // The anchor's mailbox server answers 503 to streams acting as it (mock-ews ends every
    // stream after a couple of seconds, so the group reopens soon).
    let down = Fault::once(FaultKind::Unavailable {
        retry_after_secs: None,
    })
    .for_mailbox(&anchor)
    .for_operation("GetStreamingEvents")
    .lasting(std::time::Duration::from_secs(60));
    world.ews.inject_fault(down).unwrap();
    let refused = || {
        world
            .ews
            .request_log()
            .iter()
            .filter(|r| {
                r.operation == "GetStreamingEvents" && r.mailbox == anchor && r.status == 503
            })
            .count()
    };
    eventually("a stream refused under the anchor", PATIENCE, async || {
        (refused() > 0).then_some(())
    })
    .await;

    // The group goes on under another member: the anchor's own mailbox streams too, and
    // nothing keeps knocking at the failing server.
    all_streaming(&listener, mailboxes.len()).await;
    let knocked = refused();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        refused(),
        knocked,
        "the group kept trying its failing anchor"
    );
    all_streaming(&listener, mailboxes.len()).await;
    let sent = mail_each(&world, &mailboxes, "under another anchor");
    assert_delivered_once(&world, &sent).await;
}

/// A burst of one account's calls (every member of the shared streams catching up at once
/// after the streams were cut) waits its turn in the listener rather than running into
/// Exchange's limit on an account's concurrent calls.
#[tokio::test]
async fn a_burst_of_the_accounts_calls_waits_its_turn_under_exchanges_limit() {
    let count = 30;
    let (world, listener, mailboxes) = start(count, None).await;
    world.ews.set_settings(Settings {
        // The listener's own bound is 16.
        max_concurrent_calls_per_user: Some(16),
        ..world.ews.settings()
    });
    all_streaming(&listener, count).await;
    let slow_sync = Fault::once(FaultKind::Latency { ms: 300 })
        .for_operation("SyncFolderItems")
        .lasting(std::time::Duration::from_secs(10));
    world.ews.inject_fault(slow_sync).unwrap();
    world
        .ews
        .inject_fault(Fault::once(FaultKind::CloseMidEnvelope).times(2))
        .unwrap();
    eventually(
        "the cut streams' mailboxes catching up",
        PATIENCE,
        async || {
            let syncs = world
                .ews
                .request_log()
                .iter()
                .filter(|r| r.operation == "SyncFolderItems")
                .count();
            (syncs >= 2 * count).then_some(())
        },
    )
    .await;
    all_streaming(&listener, count).await;
    let sent = mail_each(&world, &mailboxes, "after the burst");
    assert_delivered_once(&world, &sent).await;
    let refused = world
        .ews
        .request_log()
        .iter()
        .filter(|r| r.operation == "SyncFolderItems" && r.status == 500)
        .count();
    assert_eq!(refused, 0, "calls refused for the account's concurrency");
}

/// A subscription that left its shared stream (to catch up after Exchange missed events for
/// it) still rides on that connection until the connection ends: mail announced there while
/// its mailbox is away is held for it, not dropped.
#[tokio::test]
async fn mail_announced_while_a_mailbox_rejoins_its_group_is_not_lost() {
    // Streams Exchange does not end, so the left subscription stays on its connection.
    let world = World::start_with(mock_ews::Config {
        keepalive: std::time::Duration::from_secs(1),
        max_connection_time: None,
    })
    .await;
    let (world, listener, mailboxes) = start_with(8, None, "svc-secret", &[], world).await;
    all_streaming(&listener, mailboxes.len()).await;
    // A mailbox whose connection carries others too, so it stays open when this one leaves.
    let (away, _) = anchor_with_company(&world, &mailboxes);
    let away = &away;
    let missed_at = tokio::time::Instant::now();
    world
        .ews
        .inject_fault(Fault::once(FaultKind::MissedNotificationEvents))
        .unwrap();
    let mut sent = mail_each(&world, std::slice::from_ref(away), "missed");
    // It catches up, then waits for its group to gather: mail now is announced on the
    // connection it left.
    eventually("the mailbox catching up", PATIENCE, async || {
        world
            .ews
            .request_log()
            .iter()
            .any(|r| r.operation == "SyncFolderItems" && &r.mailbox == away && r.at > missed_at)
            .then_some(())
    })
    .await;
    sent.extend(mail_each(&world, std::slice::from_ref(away), "while away"));
    assert_delivered_once(&world, &sent).await;
}

#[test]
fn a_service_account_without_a_list_of_creatio_hosts_is_refused_at_start() {
    let file = temp_dir("service-accounts-unbounded").join("accounts.json");
    let accounts = json!([{ "url": "https://mail.contoso.example/EWS/Exchange.asmx",
                            "user": SERVICE, "password": "svc-secret" }]);
    std::fs::write(&file, accounts.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_exchange-listener"))
        .args(["--listen", "127.0.0.1:0", "--ews-service-accounts"])
        .arg(&file)
        .output()
        .expect("run exchange-listener");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(stderr.contains("--creatio-hosts"), "{stderr}");
}
