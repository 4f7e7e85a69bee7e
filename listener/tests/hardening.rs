//! A replica that cannot be tricked: Creatio's retry loop, storms of concurrent calls, slow
//! clients, hostile servers and long outages, each against the real binary.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Listener, PATIENCE, World, delivered, eventually};
use mock_ews::{Fault, FaultKind, NewMail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALICE: &str = "alice@contoso.example";

fn mail(subject: &str) -> NewMail {
    NewMail {
        from: "sender@example.com".into(),
        subject: subject.into(),
        body: format!("Body of {subject}"),
        ..NewMail::default()
    }
}

async fn streaming(extra: &[&str], operation: &str) -> (World, Listener) {
    let world = World::start().await;
    let listener = Listener::spawn(extra).await;
    world.subscribe(&listener, "mbx-1", ALICE, operation).await;
    (world, listener)
}

async fn status(listener: &Listener, id: &str) -> Value {
    let (code, body) = listener.get(&format!("/api/listeners/{id}")).await;
    assert_eq!(code, 200, "{body}");
    body["Status"].clone()
}

#[tokio::test]
async fn creatios_minute_loop_does_not_undo_the_slow_retry_of_a_rejected_password() {
    let world = World::start().await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    let listener = Listener::spawn(&[]).await;
    let creds = mock_creatio::calling::unquoted(&json!([world.credentials(
        "mbx-1",
        ALICE,
        "wrong",
        "ProcessFullEmail"
    )]));
    let (code, _) = listener.call("create", creds.clone()).await;
    assert_eq!(code, 200);
    eventually("the failure report", PATIENCE, async || {
        (!world.creatio.calls_of("ProcessMailboxState").is_empty()).then_some(())
    })
    .await;
    assert_eq!(listener.state_of("mbx-1").await, "failed");
    let logins = world.ews.stats().unauthorized;
    // Creatio sees `failed` and sends Recreate, again and again, with the same credentials.
    for _ in 0..5 {
        let (code, _) = listener.call("recreate", creds.clone()).await;
        assert_eq!(code, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        world.ews.stats().unauthorized,
        logins,
        "a Recreate with the same credentials must not log in again"
    );
    assert_eq!(world.creatio.calls_of("ProcessMailboxState").len(), 1);
    // New credentials are tried at once.
    let fixed = json!([world.credentials("mbx-1", ALICE, "secret", "ProcessFullEmail")]);
    listener.send("update", &fixed).await;
    eventually("the mailbox to stream", PATIENCE, async || {
        (listener.state_of("mbx-1").await == "exists" && world.ews.stats().open_streams == 1)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stream_whose_answer_never_starts_is_given_up_in_time() {
    let (world, listener) = streaming(&["--request-timeout-secs", "1"], "ProcessFullEmail").await;
    // The next GetStreamingEvents hangs before its response head, far longer than the test.
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Latency { ms: 600_000 }).for_operation("GetStreamingEvents"),
        )
        .unwrap();
    let opened = |world: &World| {
        world
            .ews
            .stats()
            .requests
            .get("GetStreamingEvents")
            .copied()
            .unwrap_or(0)
    };
    let before = opened(&world);
    eventually("the hanging GetStreamingEvents", PATIENCE, async || {
        (opened(&world) > before && world.ews.stats().open_streams == 0).then_some(())
    })
    .await;
    let sent = world
        .ews
        .inject(ALICE, mail("after the hang"))
        .unwrap()
        .message_id;
    eventually("the mail, over a new stream", PATIENCE, async || {
        delivered(&world).contains(&sent).then_some(())
    })
    .await;
    drop(listener);
}

#[tokio::test]
async fn the_state_says_streaming_and_keeps_the_last_error_apart() {
    let (world, listener) = streaming(&[], "ProcessFullEmail").await;
    eventually("state Streaming", PATIENCE, async || {
        (status(&listener, "mbx-1").await["State"] == "Streaming").then_some(())
    })
    .await;
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Unavailable {
                retry_after_secs: None,
            })
            .for_operation("GetStreamingEvents"),
        )
        .unwrap();
    let s = eventually("recovery after the fault", PATIENCE, async || {
        let s = status(&listener, "mbx-1").await;
        (s["State"] == "Streaming" && s["LastError"].is_string()).then_some(s)
    })
    .await;
    assert!(
        s["Error"].is_null(),
        "no current error while streaming: {s}"
    );
    assert!(s["LastError"].as_str().unwrap().contains("503"), "{s}");
    assert!(s["LastErrorUnixMs"].as_i64().unwrap() > 0, "{s}");
}

#[tokio::test]
async fn recreate_answers_while_old_subscriptions_are_slow_to_end() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    for i in 0..3 {
        let email = format!("user{i}@contoso.example");
        world
            .subscribe(&listener, &format!("mbx-{i}"), &email, "ProcessFullEmail")
            .await;
    }
    // Unsubscribe hangs for a minute: each old worker takes that long to stop.
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Latency { ms: 60_000 })
                .for_operation("Unsubscribe")
                .times(3),
        )
        .unwrap();
    let changed: Vec<Value> = (0..3)
        .map(|i| {
            let mut c = world.credentials(
                &format!("mbx-{i}"),
                &format!("user{i}@contoso.example"),
                "secret",
                "ProcessFullEmail",
            );
            c["BpmUserTimeZone"] = json!("Europe/Kyiv");
            c
        })
        .collect();
    let answered = tokio::time::timeout(PATIENCE, listener.send("recreate", &json!(changed))).await;
    let (code, body) = answered.expect("Recreate must not wait for old subscriptions to end");
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn subscriptions_start_paced_under_a_cap() {
    let world = World::start().await;
    let listener = Listener::spawn(&["--max-active-mailboxes", "2", "--subscribe-rate", "5"]).await;
    let creds: Vec<Value> = (0..3)
        .map(|i| {
            let email = format!("user{i}@contoso.example");
            world.ews.create_mailbox(&email, "secret").unwrap();
            world.credentials(&format!("mbx-{i}"), &email, "secret", "ProcessFullEmail")
        })
        .collect();
    let (code, _) = listener.send("create", &json!(creds)).await;
    assert_eq!(code, 200);
    eventually("two streams", PATIENCE, async || {
        (world.ews.stats().open_streams == 2).then_some(())
    })
    .await;
    let mut queued = None;
    for i in 0..3 {
        if status(&listener, &format!("mbx-{i}")).await["State"] == "Queued" {
            queued = Some(i);
        }
    }
    let queued = queued.expect("the third mailbox says it waits for a place");
    let other = (queued + 1) % 3;
    listener
        .send("close", &json!([format!("mbx-{other}")]))
        .await;
    eventually("the queued mailbox to stream", PATIENCE, async || {
        (status(&listener, &format!("mbx-{queued}")).await["State"] == "Streaming").then_some(())
    })
    .await;
    // Three Subscribe calls at five a second: no two in the same turn, so the first and the
    // last are at least a turn apart (jitter moves each within its turn).
    let subscribes: Vec<_> = world
        .ews
        .request_log()
        .into_iter()
        .filter(|r| r.operation == "Subscribe")
        .map(|r| r.at)
        .collect();
    assert!(subscribes.len() >= 3);
    let span = subscribes[2].duration_since(subscribes[0]);
    assert!(
        span >= Duration::from_millis(200),
        "Subscribe calls not paced: {span:?}"
    );
}

#[tokio::test]
async fn a_transient_item_error_is_retried_and_a_gone_item_counted() {
    let (world, listener) = streaming(&[], "ProcessFullEmail").await;
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::ItemError {
                code: "ErrorMailboxStoreUnavailable".into(),
            })
            .for_operation("GetItem")
            .times(2),
        )
        .unwrap();
    let sent = world
        .ews
        .inject(ALICE, mail("store busy"))
        .unwrap()
        .message_id;
    eventually(
        "the mail, after the store came back",
        PATIENCE,
        async || delivered(&world).contains(&sent).then_some(()),
    )
    .await;
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::ItemError {
                code: "ErrorItemNotFound".into(),
            })
            .for_operation("GetItem"),
        )
        .unwrap();
    world.ews.inject(ALICE, mail("deleted at once")).unwrap();
    eventually("the gone item counted", PATIENCE, async || {
        (status(&listener, "mbx-1").await["Skipped"] == 1).then_some(())
    })
    .await;
    assert_eq!(delivered(&world).iter().filter(|m| **m == sent).count(), 1);
}

#[tokio::test]
async fn each_mail_carries_its_own_short_stable_idempotency_key() {
    let (world, _listener) = streaming(&[], "NewEmail").await;
    world.ews.inject_batch(ALICE, 7, 0, 6).unwrap();
    let calls = eventually("six announced mails", PATIENCE, async || {
        let calls = world.creatio.calls_of("NewEmail");
        let ids: usize = calls
            .iter()
            .map(|c| {
                c.body["newEvent"]["uniqueIds"]
                    .as_array()
                    .map_or(0, Vec::len)
            })
            .sum();
        (ids == 6).then_some(calls)
    })
    .await;
    let mut keys: Vec<String> = calls
        .iter()
        .map(|c| {
            assert_eq!(c.body["newEvent"]["uniqueIds"].as_array().unwrap().len(), 1);
            c.idempotency_key.clone().expect("every call has a key")
        })
        .collect();
    assert!(keys.iter().all(|k| k.len() == 32), "{keys:?}");
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 6, "one key per mail");
}

#[tokio::test]
async fn a_storm_of_creates_and_closes_leaves_one_subscription_per_open_mailbox() {
    // Streams are not cut here: every open mailbox holds its stream still while counted.
    let world = World::start_with(mock_ews::Config {
        keepalive: Duration::from_secs(1),
        max_connection_time: None,
    })
    .await;
    let listener = Arc::new(Listener::spawn(&["--subscribe-rate", "1000"]).await);
    let ids: Vec<String> = (0..10).map(|i| format!("mbx-{i}")).collect();
    let creds: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let email = format!("user{i}@contoso.example");
            world.ews.create_mailbox(&email, "secret").unwrap();
            world.credentials(id, &email, "secret", "ProcessFullEmail")
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(6);
    let mut calls = Vec::new();
    for _ in 0..1_000 {
        let i = rng.usize(..ids.len());
        let call = if rng.bool() {
            ("create", json!([creds[i]]))
        } else {
            ("close", json!([ids[i]]))
        };
        let listener = listener.clone();
        calls.push(tokio::spawn(async move {
            listener.send(call.0, &call.1).await.0
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let open = eventually(
        "EWS subscriptions to match the open mailboxes",
        PATIENCE,
        async || {
            let mut open = 0;
            for id in &ids {
                match listener.state_of(id).await.as_str() {
                    "exists" => open += 1,
                    "notExists" => {}
                    other => panic!("{id} is {other}"),
                }
            }
            let stats = world.ews.stats();
            (stats.live_subscriptions == open && stats.open_streams == open).then_some(open)
        },
    )
    .await;
    // And it stays so: nothing leaked that shows up later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = world.ews.stats();
    assert_eq!((stats.live_subscriptions, stats.open_streams), (open, open));
}

#[tokio::test]
async fn dead_letters_are_kept_listed_and_replayed() {
    let (world, listener) = streaming(&[], "ProcessFullEmail").await;
    // Creatio refuses the call outright: no retry can help, the mail becomes a dead letter.
    world.creatio.fail_with(mock_creatio::Failure {
        count: 1,
        status: Some(400),
        retry_after_secs: None,
    });
    let sent = world
        .ews
        .inject(
            ALICE,
            NewMail {
                message_id: Some("<refused@example.com>".into()),
                ..mail("refused once")
            },
        )
        .unwrap()
        .message_id;
    let letters = eventually("the dead letter", PATIENCE, async || {
        let (_, body) = listener.get("/api/listeners/mbx-1/dead-letters").await;
        let letters = body["DeadLetters"].as_array().cloned().unwrap_or_default();
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters[0]["MessageId"], sent.as_str());
    assert_eq!(letters[0]["Subject"], "refused once");
    assert!(letters[0]["Error"].as_str().unwrap().contains("400"));
    assert!(
        listener
            .logs()
            .iter()
            .any(|l| l.contains("dead-lettered") && l.contains("refused@example.com")),
        "the log names the Message-ID"
    );
    assert!(!delivered(&world).contains(&sent));
    let resp = listener
        .http
        .post(format!(
            "{}/api/listeners/mbx-1/dead-letters/replay",
            listener.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    eventually("the replayed mail at Creatio", PATIENCE, async || {
        delivered(&world).contains(&sent).then_some(())
    })
    .await;
    let (_, body) = listener.get("/api/listeners/mbx-1/dead-letters").await;
    assert_eq!(body["DeadLetters"], json!([]));
}

#[tokio::test]
async fn a_gateway_refusing_a_creatio_that_answered_before_delays_mail_but_loses_none() {
    let (world, listener) = streaming(&[], "ProcessFullEmail").await;
    let first = world.ews.inject(ALICE, mail("before")).unwrap().message_id;
    eventually("the first mail", PATIENCE, async || {
        delivered(&world).contains(&first).then_some(())
    })
    .await;
    // Creatio is redeployed: its ingress answers 404, then its firewall 403, for a while.
    for status in [404, 403] {
        world.creatio.fail_with(mock_creatio::Failure {
            count: 2,
            status: Some(status),
            retry_after_secs: None,
        });
        let sent = world
            .ews
            .inject(ALICE, mail(&format!("through {status}")))
            .unwrap()
            .message_id;
        eventually("the mail once Creatio is back", PATIENCE, async || {
            delivered(&world).contains(&sent).then_some(())
        })
        .await;
    }
    let (_, body) = listener.get("/api/listeners/mbx-1/dead-letters").await;
    assert_eq!(body["DeadLetters"], json!([]));
}

#[tokio::test]
async fn creatios_retry_after_is_honoured() {
    let (world, _listener) = streaming(&[], "ProcessFullEmail").await;
    world.creatio.fail_with(mock_creatio::Failure {
        count: 1,
        status: Some(503),
        retry_after_secs: Some(2),
    });
    let sent = world
        .ews
        .inject(ALICE, mail("after a pause"))
        .unwrap()
        .message_id;
    eventually("the mail", PATIENCE, async || {
        delivered(&world).contains(&sent).then_some(())
    })
    .await;
    let attempts: Vec<_> = world
        .creatio
        .attempts()
        .into_iter()
        .filter(|a| a.operation == "ProcessFullEmail")
        .collect();
    assert_eq!(attempts[0].status, 503);
    let gap = attempts[1].received.duration_since(attempts[0].received);
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
}

#[tokio::test]
async fn a_mailbox_long_without_a_stream_is_reported_failed() {
    let (world, listener) = streaming(&["--unhealthy-after-secs", "1"], "ProcessFullEmail").await;
    assert_eq!(listener.state_of("mbx-1").await, "exists");
    world
        .ews
        .inject_fault(
            Fault::once(FaultKind::Unavailable {
                retry_after_secs: None,
            })
            .lasting(Duration::from_secs(60)),
        )
        .unwrap();
    eventually("SubscriptionsState to say failed", PATIENCE, async || {
        (listener.state_of("mbx-1").await == "failed").then_some(())
    })
    .await;
    let s = status(&listener, "mbx-1").await;
    assert_ne!(s["State"], "Failed", "{s}");
    assert!(s["Error"].as_str().unwrap().contains("503"), "{s}");
    world.ews.clear_faults();
    eventually("exists again once it streams", PATIENCE, async || {
        (listener.state_of("mbx-1").await == "exists").then_some(())
    })
    .await;
}

#[tokio::test]
async fn slow_clients_neither_hold_a_connection_nor_block_shutdown() {
    let world = World::start().await;
    let mut listener = Listener::spawn(&[
        "--http-header-timeout-secs",
        "1",
        "--http-request-timeout-secs",
        "2",
        "--shutdown-timeout-secs",
        "2",
    ])
    .await;
    world
        .subscribe(&listener, "mbx-1", ALICE, "ProcessFullEmail")
        .await;
    let addr = listener.base.trim_start_matches("http://").to_owned();
    // Headers that never end.
    let mut slow_head = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_head
        .write_all(b"POST /api/listeners/create HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A body that never ends.
    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(b"POST /api/listeners/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[{\"Id\":")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, slow_head.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a request head that never ends is cut off");
    let mut buf = Vec::new();
    let answered = tokio::time::timeout(PATIENCE, slow_body.read_to_end(&mut buf)).await;
    assert!(answered.is_ok(), "a body that never ends is cut off");
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    // A third one holds its body open while the service shuts down.
    let mut held = tokio::net::TcpStream::connect(&addr).await.unwrap();
    held.write_all(
        b"POST /api/listeners/create HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n[",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = listener.pid().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let exit = listener.wait().await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(
        world.ews.stats().live_subscriptions,
        0,
        "the mailbox unsubscribed"
    );
}

/// A server that answers 200 and then streams bytes for as long as the client reads.
async fn endless_server() -> (String, Arc<AtomicU64>) {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/EWS/Exchange.asmx", server.local_addr().unwrap());
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = server.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                while socket.write_all(chunk.as_bytes()).await.is_ok() {
                    counter.fetch_add(0x10000, Ordering::Relaxed);
                }
            });
        }
    });
    (url, sent)
}

#[tokio::test]
async fn an_endless_answer_from_exchange_is_cut_at_the_cap() {
    let world = World::start().await;
    let listener = Listener::spawn(&[
        "--ews-max-body-bytes",
        "1048576",
        "--request-timeout-secs",
        "5",
    ])
    .await;
    let (url, sent) = endless_server().await;
    let mut creds = world.credentials("", ALICE, "secret", "ProcessFullEmail");
    creds["ServiceUrl"] = json!(url);
    let (code, body) = listener.send("validate", &creds).await;
    assert_eq!(code, 200);
    assert_eq!(body["IsValid"], false, "{body}");
    assert_eq!(
        body["Message"], "ServiceUrl did not answer as an Exchange EWS endpoint",
        "{body}"
    );
    // What the server got out before the listener hung up: the cap plus socket buffers.
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent < 64 * 1024 * 1024, "{sent} bytes read");
}

#[tokio::test]
async fn validate_says_one_thing_for_every_unreachable_address() {
    let world = World::start().await;
    let listener = Listener::spawn(&["--request-timeout-secs", "2"]).await;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let mut messages = Vec::new();
    for address in [
        format!("http://127.0.0.1:{closed_port}/EWS/Exchange.asmx"),
        format!("http://127.0.0.1:{silent_port}/EWS/Exchange.asmx"),
        "http://no-such-host.invalid/EWS/Exchange.asmx".to_owned(),
    ] {
        let mut creds = world.credentials("", ALICE, "secret", "ProcessFullEmail");
        creds["ServiceUrl"] = json!(address);
        let (_, body) = listener.send("validate", &creds).await;
        assert_eq!(body["IsValid"], false);
        messages.push(body["Message"].as_str().unwrap().to_owned());
    }
    messages.dedup();
    assert_eq!(messages, ["Exchange could not be reached at ServiceUrl"]);
    for address in ["file://x", "gopher://mail.contoso.com/"] {
        let mut creds = world.credentials("m", ALICE, "secret", "ProcessFullEmail");
        creds["ServiceUrl"] = json!(address);
        let (code, body) = listener.send("create", &json!([creds])).await;
        assert_eq!(code, 400, "{address}: {body}");
        assert!(
            body["error"].as_str().unwrap().starts_with("ServiceUrl"),
            "{body}"
        );
    }
    drop(silent);
}

#[tokio::test]
async fn an_id_that_would_forge_a_log_line_is_refused() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    let creds = world.credentials("m\nINFO forged", ALICE, "secret", "ProcessFullEmail");
    let (code, body) = listener.send("create", &json!([creds])).await;
    assert_eq!(code, 400);
    assert_eq!(body["error"], "Id must not contain control characters");
    let (code, _) = listener
        .send(
            "create",
            &json!([world.credentials(&"x".repeat(1 << 20), ALICE, "secret", "ProcessFullEmail")]),
        )
        .await;
    assert_eq!(code, 400);
    assert!(
        !listener.logs().iter().any(|l| l.starts_with("INFO forged")),
        "no forged line in the log"
    );
}

/// Every path that handles credentials, at debug level: a rejected login and its report, an
/// Update, Validate failing three ways, a token, a refused body and a call the listener does
/// not know. The secret must appear on none of their log lines.
#[tokio::test]
async fn no_secret_reaches_the_log_on_any_path() {
    const SECRET: &str = "Zebra-Pa55";
    let world = World::start().await;
    let listener = Listener::spawn(&["--log", "debug"]).await;
    world.ews.create_mailbox(ALICE, "the-right-one").unwrap();
    let with_secret = |id: &str| world.credentials(id, ALICE, SECRET, "ProcessFullEmail");

    let (code, _) = listener
        .send("create", &json!([with_secret("mbx-1")]))
        .await;
    assert_eq!(code, 200);
    let mut updated = with_secret("mbx-1");
    updated["Password"] = json!(format!("{SECRET}-2"));
    assert_eq!(listener.send("update", &json!([updated])).await.0, 200);
    let mut token = with_secret("mbx-2");
    token["AccessToken"] = json!(format!("{SECRET}-token"));
    token["UseOAuth"] = json!(true);
    assert_eq!(listener.send("create", &json!([token])).await.0, 200);
    let mut unreachable = with_secret("");
    unreachable["ServiceUrl"] = json!("http://127.0.0.1:1/EWS/Exchange.asmx");
    let mut not_ews = with_secret("");
    not_ews["ServiceUrl"] = json!(format!("{}/nothing-here", world.creatio.url("x")));
    for creds in [with_secret(""), unreachable, not_ews] {
        let (code, body) = listener.send("validate", &creds).await;
        assert_eq!((code, &body["IsValid"]), (200, &json!(false)), "{body}");
    }
    let mut refused = with_secret("mbx-3");
    refused["BpmEndpoint"] = json!("not a url");
    assert_eq!(listener.send("create", &json!([refused])).await.0, 400);
    assert_eq!(
        listener
            .send("frobnicate", &json!([with_secret("mbx-4")]))
            .await
            .0,
        404
    );
    // The password's mailbox is reported unavailable; the token's asks for a new token.
    eventually("both rejections reported", PATIENCE, async || {
        (!world.creatio.calls_of("ProcessMailboxState").is_empty()
            && !world.creatio.calls_of("RefreshToken").is_empty())
        .then_some(())
    })
    .await;

    let logs = listener.logs();
    assert!(logs.len() > 10, "the paths were logged: {logs:#?}");
    let leaks: Vec<&String> = logs.iter().filter(|l| l.contains(SECRET)).collect();
    assert!(leaks.is_empty(), "secrets in the log: {leaks:#?}");
}

#[tokio::test]
async fn link_local_addresses_and_hosts_off_the_allow_lists_are_refused() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    let mut metadata = world.credentials("m", ALICE, "secret", "ProcessFullEmail");
    metadata["ServiceUrl"] = json!("http://169.254.169.254/EWS/Exchange.asmx");
    for action in ["create", "validate"] {
        let body = if action == "create" {
            json!([metadata])
        } else {
            metadata.clone()
        };
        let (code, answer) = listener.send(action, &body).await;
        assert_eq!(code, 400, "{action}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.starts_with("ServiceUrl") && error.contains("link-local"),
            "{error}"
        );
    }
    assert_eq!(listener.state_of("m").await, "notExists");

    // A locked-down install names its Exchange and Creatio hosts.
    let locked = Listener::spawn(&[
        "--exchange-hosts",
        "mail.contoso.example,*.corp.example",
        "--creatio-hosts",
        "127.0.0.1",
    ])
    .await;
    let creds = world.credentials("m", ALICE, "secret", "ProcessFullEmail");
    let (code, answer) = locked.send("create", &json!([creds])).await;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not among the hosts this listener may reach (--exchange-hosts)"),
        "{answer}"
    );
    let open = Listener::spawn(&[
        "--exchange-hosts",
        "127.0.0.1",
        "--creatio-hosts",
        "127.0.0.1",
    ])
    .await;
    world.subscribe(&open, "m", ALICE, "ProcessFullEmail").await;
}

#[tokio::test]
async fn with_a_token_the_api_answers_only_calls_that_carry_it_and_metrics_live_elsewhere() {
    let token = "tok-0123456789_abcdef";
    let file = common::temp_dir("api-token").join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let listener = Listener::spawn(&[
        "--api-token-file",
        file.to_str().unwrap(),
        "--base-path",
        "/exchangelistener",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let http = reqwest::Client::new();
    let status_of = async |path: &str, bearer: Option<&str>| {
        let mut get = http.get(format!("{}{path}", listener.base));
        if let Some(b) = bearer {
            get = get.bearer_auth(b);
        }
        get.send().await.unwrap().status().as_u16()
    };
    for path in [
        "/api/listeners/status",
        "/exchangelistener/api/listeners/status",
        "/metrics",
    ] {
        assert_eq!(status_of(path, None).await, 401, "{path}");
        assert_eq!(
            status_of(path, Some("tok-0123456789_abcdeX")).await,
            401,
            "{path}"
        );
    }
    assert_eq!(status_of("/api/listeners/status", Some(token)).await, 200);
    // In the path, for a Creatio that cannot send headers: after the base path, or first.
    for path in [
        format!("/exchangelistener/{token}/api/listeners/status"),
        format!("/{token}/api/listeners/status"),
    ] {
        assert_eq!(status_of(&path, None).await, 200, "{path}");
    }
    assert_ne!(
        status_of(
            "/exchangelistener/tok-0123456789_abcdeX/api/listeners/status",
            None
        )
        .await,
        200
    );
    // A Creatio call as Creatio writes it, through the token in the path.
    let create = http
        .post(format!(
            "{}/exchangelistener/{token}/api/listeners/close",
            listener.base
        ))
        .body("[\"mbx-none\"]")
        .send()
        .await
        .unwrap();
    assert_eq!(create.status().as_u16(), 200);
    // The probes need no token.
    for path in ["/healthz", "/exchangelistener/healthz", "/readyz"] {
        assert_eq!(status_of(path, None).await, 200, "{path}");
    }
    // /metrics is not the API's (even with the token), but its own address's.
    assert_eq!(status_of("/metrics", Some(token)).await, 404);
    let metrics = listener
        .logs
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| l.split("metrics on ").nth(1).map(str::to_owned))
        .expect("the metrics address logged");
    let text = http
        .get(metrics.split_whitespace().next().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("exchange_listener_"), "{text}");
}
