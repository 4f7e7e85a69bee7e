//! The whole path, Exchange to Creatio: mock-ews, the real listener binary, mock-creatio.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Listener, PATIENCE, World, assert_slow_second_login, eventually};
use mock_ews::{Fault, FaultKind, NewMail};
use serde_json::{Value, json};
use tokio::time::Instant;

fn mail(n: usize) -> NewMail {
    NewMail {
        from: format!("sender{n}@example.com"),
        from_name: Some(format!("Sender {n}")),
        subject: format!("Subject {n} <&> ünïcode"),
        body: format!("Body of mail {n}"),
        message_id: Some(format!("<mail-{n}@example.com>")),
        // Mail 2 is multipart with an HTML body and a Cc.
        html: (n == 2).then(|| format!("<p>Body of mail {n}</p>")),
        cc: if n == 2 {
            vec!["cc@example.com".into()]
        } else {
            vec![]
        },
        ..NewMail::default()
    }
}

/// The emails in every ProcessFullEmail call so far, in arrival order, with arrival times.
fn full_emails(world: &World) -> Vec<(Value, Instant)> {
    world
        .creatio
        .calls_of("ProcessFullEmail")
        .into_iter()
        .flat_map(|c| {
            let at = c.received;
            c.body["Emails"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |e| (e, at))
        })
        .collect()
}

/// The mocks, a listener, and mailbox `mbx-1` (alice, full-email mode) streaming.
async fn alice_streaming() -> (World, Listener) {
    alice_streaming_with(&[]).await
}

/// As [`alice_streaming`], the listener started with these flags.
async fn alice_streaming_with(flags: &[&str]) -> (World, Listener) {
    let world = World::start().await;
    let listener = Listener::spawn(flags).await;
    world
        .subscribe(
            &listener,
            "mbx-1",
            "alice@contoso.example",
            "ProcessFullEmail",
        )
        .await;
    (world, listener)
}

#[tokio::test]
async fn three_mails_arrive_once_each_with_their_headers() {
    let (world, listener) = alice_streaming().await;
    assert_eq!(listener.state_of("mbx-1").await, "exists");

    let mut injected = HashMap::new();
    for n in 1..=3 {
        let sent = world.ews.inject("alice@contoso.example", mail(n)).unwrap();
        injected.insert(sent.message_id.clone(), (n, Instant::now()));
        // Spread the mails over the two-second stream lifetime, so some cross a reconnect.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    eventually("three emails at Creatio", PATIENCE, async || {
        (full_emails(&world).len() >= 3).then_some(())
    })
    .await;

    // A fourth mail after them: anything delivered twice would have arrived before it.
    world.ews.inject("alice@contoso.example", mail(4)).unwrap();
    eventually("the sentinel email", PATIENCE, async || {
        (full_emails(&world).len() >= 4).then_some(())
    })
    .await;

    let emails = full_emails(&world);
    assert_eq!(emails.len(), 4, "each mail exactly once: {emails:#?}");
    let mut latencies = Vec::new();
    for (email, arrived) in emails.iter().take(3) {
        let message_id = email["MessageId"].as_str().unwrap();
        let (n, sent_at) = injected
            .remove(message_id)
            .unwrap_or_else(|| panic!("unexpected or repeated {message_id}"));
        assert_eq!(email["Subject"], format!("Subject {n} <&> ünïcode"));
        assert_eq!(
            email["Sender"],
            format!("Sender {n} <sender{n}@example.com>")
        );
        assert_eq!(email["Recepients"], json!(["alice@contoso.example"]));
        if n == 2 {
            assert_eq!(
                email["Body"].as_str().unwrap().trim_end(),
                "<p>Body of mail 2</p>"
            );
            assert_eq!(email["IsHtmlBody"], true);
            assert_eq!(email["CopyRecepients"], json!(["cc@example.com"]));
        } else {
            assert_eq!(
                email["Body"].as_str().unwrap().trim_end(),
                format!("Body of mail {n}")
            );
            assert_eq!(email["IsHtmlBody"], false);
        }
        // .NET ticks of a time after 2023.
        assert!(email["SendDateTimeStamp"].as_i64().unwrap() > 638_000_000_000_000_000);
        latencies.push(arrived.duration_since(sent_at));
    }
    assert!(injected.is_empty());
    let call = &world.creatio.calls_of("ProcessFullEmail")[0].body;
    assert_eq!(call["SubscriptionInfo"]["MailboxId"], "mbx-1");
    assert_eq!(call["SubscriptionInfo"]["SysAdminUnit"], "Supervisor");
    assert!(
        world.creatio.rejections().is_empty(),
        "{:?}",
        world.creatio.rejections()
    );
    println!("injection-to-arrival latency: {latencies:?}");
    let (_, view) = listener.get("/api/listeners/mbx-1").await;
    assert!(
        view["Status"]["LastEventUnixMs"].as_i64().unwrap_or(0) > 1_700_000_000_000,
        "the view says when mail was last announced: {view}"
    );
}

#[tokio::test]
async fn api_answers_status_state_and_rejects_bad_input() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;

    let (status, body) = listener.get("/api/listeners/status").await;
    assert_eq!(status, 200);
    assert_eq!(body["ServiceStatus"], "Started");
    assert_eq!(body["Version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(listener.state_of("never-created").await, "notExists");

    let good = world.credentials(
        "mbx-1",
        "alice@contoso.example",
        "secret",
        "ProcessFullEmail",
    );
    for (field, expected) in [
        ("Id", "Id is required"),
        ("SenderEmailAddress", "SenderEmailAddress is required"),
        ("BpmEndpoint", "BpmEndpoint is required"),
    ] {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        let (status, answer) = listener.send("create", &json!([body])).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"], expected);
    }
    let (status, answer) = listener.call("Create", "[{\"Id\": ").await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("request body is not valid JSON"),
        "{answer}"
    );
    let (status, _) = listener.call("frobnicate", "{}").await;
    assert_eq!(status, 404);
    let (status, _) = listener.get("/api/listeners/nobody").await;
    assert_eq!(status, 404);

    // Still serving after all of that.
    let (status, _) = listener.get("/api/listeners/status").await;
    assert_eq!(status, 200);
    assert_eq!(listener.get("/healthz").await.0, 200);
    assert_eq!(listener.get("/readyz").await.0, 200);

    // The status counts mailboxes by state.
    world
        .subscribe(
            &listener,
            "mbx-1",
            "alice@contoso.example",
            "ProcessFullEmail",
        )
        .await;
    eventually(
        "the status to count one mailbox streaming",
        PATIENCE,
        async || {
            let (_, body) = listener.get("/api/listeners/status").await;
            (body["Mailboxes"] == 1 && body["States"] == json!({ "Streaming": 1 })).then_some(())
        },
    )
    .await;
    // And so do the metrics, in Prometheus's text format.
    let metrics = listener
        .http
        .get(format!("{}/metrics", listener.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"exchange_listener_mailboxes{state="Streaming"} 1"#,
        "exchange_listener_leases_taken_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn wrong_password_is_invalid_backs_off_and_recovers_on_update() {
    let world = World::start().await;
    let listener = Listener::spawn(&["--failed-retry-base-secs", "4"]).await;
    world
        .ews
        .create_mailbox("bob@contoso.example", "right")
        .unwrap();

    let (status, answer) = listener
        .send(
            "validate",
            &world.credentials("", "bob@contoso.example", "wrong", "NewEmail"),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["IsValid"], false);
    assert!(
        answer["Message"]
            .as_str()
            .unwrap()
            .contains("Invalid credentials"),
        "{answer}"
    );
    let (_, answer) = listener
        .send(
            "validate",
            &world.credentials("", "bob@contoso.example", "right", "NewEmail"),
        )
        .await;
    assert_eq!(answer["IsValid"], true, "{answer}");

    let (status, _) = listener
        .send(
            "create",
            &json!([world.credentials(
                "mbx-b",
                "bob@contoso.example",
                "wrong",
                "ProcessFullEmail"
            )]),
        )
        .await;
    assert_eq!(status, 200);
    let view = eventually("the mailbox to be Failed", PATIENCE, async || {
        let (_, view) = listener.get("/api/listeners/mbx-b").await;
        (view["Status"]["State"] == "Failed").then_some(view)
    })
    .await;
    assert!(
        view["Status"]["LastError"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{view}"
    );
    assert_ne!(listener.state_of("mbx-b").await, "exists");
    let report = eventually("a ProcessMailboxState report", PATIENCE, async || {
        world.creatio.calls_of("ProcessMailboxState").pop()
    })
    .await;
    assert_eq!(report.body["Avaliable"], false);
    assert_eq!(report.body["SenderEmailAddress"], "bob@contoso.example");

    // No tight loop: the next login waits the slow schedule.
    assert_slow_second_login(&world, Duration::from_secs(4)).await;

    // Creatio sends the right password: the mailbox recovers and mail flows.
    let (status, _) = listener
        .send(
            "update",
            &json!([world.credentials(
                "mbx-b",
                "bob@contoso.example",
                "right",
                "ProcessFullEmail"
            )]),
        )
        .await;
    assert_eq!(status, 200);
    eventually("the mailbox to stream", PATIENCE, async || {
        (world.ews.stats().open_streams > 0).then_some(())
    })
    .await;
    assert_eq!(listener.state_of("mbx-b").await, "exists");
    world.ews.inject("bob@contoso.example", mail(1)).unwrap();
    eventually("the mail after recovery", PATIENCE, async || {
        (full_emails(&world).len() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn close_stops_one_mailbox_and_new_email_mode_sends_ids() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    world
        .subscribe(
            &listener,
            "mbx-a",
            "alice@contoso.example",
            "ProcessFullEmail",
        )
        .await;
    world
        .subscribe(&listener, "mbx-c", "carol@contoso.example", "NewEmail")
        .await;
    assert_eq!(world.ews.stats().live_subscriptions, 2);

    let (status, _) = listener.send("close", &json!(["mbx-a"])).await;
    assert_eq!(status, 200);
    assert_eq!(listener.state_of("mbx-a").await, "notExists");
    assert_eq!(listener.state_of("mbx-c").await, "exists");
    // Close answers at once; the worker unsubscribes right after.
    eventually("Close to unsubscribe", PATIENCE, async || {
        (world.ews.stats().live_subscriptions == 1).then_some(())
    })
    .await;

    // Mail to the closed mailbox, then to the open one: only the second arrives.
    world.ews.inject("alice@contoso.example", mail(1)).unwrap();
    let sent = world.ews.inject("carol@contoso.example", mail(2)).unwrap();
    let call = eventually("carol's NewEmail", PATIENCE, async || {
        world.creatio.calls_of("NewEmail").pop()
    })
    .await;
    assert_eq!(call.body["newEvent"]["id"], "mbx-c");
    assert_eq!(call.body["newEvent"]["uniqueIds"], json!([sent.item_id]));
    assert!(
        world.creatio.calls_of("ProcessFullEmail").is_empty(),
        "a closed mailbox delivered mail"
    );
}

#[tokio::test]
async fn mail_sent_right_after_the_create_is_delivered() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    world
        .ews
        .create_mailbox("alice@contoso.example", "secret")
        .unwrap();
    // The first Subscribe takes a while, as on a loaded server: the mail Creatio's user sends
    // meanwhile arrives before any subscription could announce it.
    world
        .ews
        .inject_fault(Fault::once(FaultKind::Latency { ms: 1500 }).for_operation("Subscribe"))
        .unwrap();
    let (status, body) = listener
        .send(
            "create",
            &json!([world.credentials(
                "mbx-1",
                "alice@contoso.example",
                "secret",
                "ProcessFullEmail"
            )]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(listener.state_of("mbx-1").await, "exists");
    world.ews.inject("alice@contoso.example", mail(1)).unwrap();

    eventually("the mail sent after the Create", PATIENCE, async || {
        (full_emails(&world).len() == 1).then_some(())
    })
    .await;
    assert_eq!(
        full_emails(&world)[0].0["MessageId"],
        "<mail-1@example.com>"
    );
}

#[tokio::test]
async fn creatio_outage_is_retried_not_lost() {
    let (world, _listener) = alice_streaming().await;
    world.creatio.fail_next(3);
    world.ews.inject("alice@contoso.example", mail(1)).unwrap();
    eventually("the mail after Creatio recovers", PATIENCE, async || {
        (full_emails(&world).len() == 1).then_some(())
    })
    .await;
    world.ews.inject("alice@contoso.example", mail(2)).unwrap();
    eventually("the next mail", PATIENCE, async || {
        (full_emails(&world).len() == 2).then_some(())
    })
    .await;
    let ids: Vec<_> = full_emails(&world)
        .iter()
        .map(|(e, _)| e["MessageId"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!("<mail-1@example.com>"), json!("<mail-2@example.com>")]
    );
}

#[tokio::test]
async fn sigterm_unsubscribes_and_exits_cleanly() {
    let (world, mut listener) = alice_streaming().await;
    assert_eq!(world.ews.stats().live_subscriptions, 1);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &listener.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(listener.wait().await.success());
    assert_eq!(
        world.ews.stats().live_subscriptions,
        0,
        "shutdown unsubscribes"
    );
}

#[tokio::test]
async fn a_stopping_replica_answers_through_its_drain_time_while_saying_it_is_not_ready() {
    let (world, mut listener) = alice_streaming_with(&["--drain-secs", "3"]).await;
    eventually("the replica ready", PATIENCE, async || {
        (listener.get_text("/readyz").await.0 == 200).then_some(())
    })
    .await;
    listener.terminate();
    // Endpoints are told to forget it at once, and its mailboxes hand over at once...
    eventually("/readyz 503", PATIENCE, async || {
        (listener.get_text("/readyz").await.0 == 503).then_some(())
    })
    .await;
    eventually("the mailbox handed over", PATIENCE, async || {
        (world.ews.stats().live_subscriptions == 0).then_some(())
    })
    .await;
    // ...while a call that still reaches it is answered, not refused.
    let (status, body) = listener.get("/api/listeners/status").await;
    assert_eq!((status, &body["ServiceStatus"]), (200, &json!("Started")));
    assert!(listener.wait().await.success());
}

#[tokio::test]
async fn the_api_answers_under_the_ingress_path_too() {
    let listener = Listener::spawn(&["--base-path", "/exchangelistener/"]).await;
    for path in [
        "/api/listeners/status",
        "/exchangelistener/api/listeners/status",
    ] {
        let (code, body) = listener.get(path).await;
        assert_eq!(
            (code, &body["ServiceStatus"]),
            (200, &json!("Started")),
            "{path}"
        );
    }
    let answer = listener
        .http
        .post(format!(
            "{}/exchangelistener/api/listeners/subscriptionsstate",
            listener.base
        ))
        .header("Content-Type", "application/json")
        .body(r#"["x"]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(listener.get("/exchangelistener/readyz").await.0, 200);
    assert_eq!(listener.get("/other/api/listeners/status").await.0, 404);
}
