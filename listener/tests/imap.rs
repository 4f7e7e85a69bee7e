//! IMAP mailboxes end to end: the real listener binary, a real Dovecot, and mock-creatio;
//! each mailbox created by a body written as Creatio writes it.

mod common;

use std::time::Duration;

use common::{Listener, PATIENCE, eventually};
use imap_world::{Dovecot, mail};
use mock_creatio::MockCreatio;
use serde_json::{Value, json};

const ALICE: &str = "alice@contoso.test";
const IMAP_TYPE: &str = "844F0837-EAA0-4F40-B965-71F5DB9EAE6E";

/// Credentials for Alice's IMAP mailbox on `dovecot`, as Creatio sends them (plain text:
/// `SecureOption` None).
fn credentials(id: &str, dovecot: &Dovecot, password: &str, bpm_endpoint: &str) -> Value {
    json!({
        "Id": id, "UserName": ALICE, "Password": password, "AccessToken": null,
        "SenderEmailAddress": ALICE, "ServiceUrl": "127.0.0.1", "Port": dovecot.port,
        "UseSsl": false, "SecureOption": 0, "IsAutodiscover": false,
        "ServerTypeId": IMAP_TYPE, "SubscriptionTtl": 0, "BpmEndpoint": bpm_endpoint,
        "BpmUser": "Supervisor", "BpmUserWorkspace": "Default",
        "Context": "{UserRequested:true,HasError:false}", "FolderIds": [],
        "UseFullEmail": true, "FeatureValues": {},
    })
}

/// The Message-IDs Creatio received for this mailbox (or any), in order.
fn received(creatio: &MockCreatio, id: Option<&str>) -> Vec<String> {
    creatio
        .calls_of("ProcessFullEmail")
        .into_iter()
        .filter(|c| id.is_none_or(|id| c.body["SubscriptionInfo"]["MailboxId"] == id))
        .flat_map(|c| c.body["Emails"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["MessageId"].as_str().map(str::to_owned))
        .collect()
}

/// Creates the mailbox through `listener` and waits until Creatio would read it as alive.
async fn create_watched(listener: &Listener, id: &str, creds: &Value) {
    let (status, body) = listener.send("create", &json!([creds])).await;
    assert_eq!(status, 200, "{body}");
    eventually("the IMAP mailbox to be watched", PATIENCE, async || {
        (listener.state_of(id).await == "exists").then_some(())
    })
    .await;
}

/// Puts one more mail into each of `mailboxes` (user, mailbox id) and waits until each reached
/// Creatio (a mail posted twice would have arrived before it); then Creatio holds exactly
/// `expected` (sorted Message-IDs) through these mailboxes, but for such last mails: each once.
async fn assert_received_once(
    creatio: &MockCreatio,
    dovecot: &Dovecot,
    mailboxes: &[(&str, &str)],
    expected: &[&str],
) {
    static LAST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let round = LAST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut sentinels = Vec::new();
    for (user, id) in mailboxes {
        let message_id = format!("last-{round}-{id}@fabrikam.test");
        let last = mail("bob@fabrikam.test", user, "Last", &message_id);
        dovecot.deliver_to(user, "INBOX", &last).await.unwrap();
        sentinels.push((*id, format!("<{message_id}>")));
    }
    eventually("the last mails at Creatio", PATIENCE, async || {
        sentinels
            .iter()
            .all(|(id, last)| received(creatio, Some(id)).contains(last))
            .then_some(())
    })
    .await;
    let mut got: Vec<String> = mailboxes
        .iter()
        .flat_map(|(_, id)| received(creatio, Some(id)))
        .filter(|m| !m.starts_with("<last-"))
        .collect();
    got.sort();
    assert_eq!(got, expected, "each mail once, and no other");
}

#[tokio::test]
async fn an_imap_mailbox_streams_each_new_mail_once_and_not_what_it_held_before() {
    let dovecot = Dovecot::start(&[(ALICE, "secret")]).await.expect("Dovecot");
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let listener = Listener::spawn(&[]).await;
    dovecot
        .deliver_to(
            ALICE,
            "INBOX",
            &mail("bob@fabrikam.test", ALICE, "Old", "old@fabrikam.test"),
        )
        .await
        .unwrap();
    dovecot.create_folder(ALICE, "Projects").await.unwrap();
    // Received times are whole seconds, and mail received in the second before a mailbox is
    // created counts as new (a duplicate is better than a loss): the old mail is older.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let creds = credentials(id, &dovecot, "secret", &creatio.url("ProcessFullEmail"));
    create_watched(&listener, id, &creds).await;

    dovecot
        .deliver_to(
            ALICE,
            "INBOX",
            &mail("bob@fabrikam.test", ALICE, "First", "first@fabrikam.test"),
        )
        .await
        .unwrap();
    eventually("the first mail at Creatio", PATIENCE, async || {
        received(&creatio, Some(id))
            .contains(&"<first@fabrikam.test>".to_owned())
            .then_some(())
    })
    .await;
    // Filed by a server rule into another folder: watched too.
    dovecot
        .deliver_to(
            ALICE,
            "Projects",
            &mail("carol@fabrikam.test", ALICE, "Filed", "filed@fabrikam.test"),
        )
        .await
        .unwrap();
    dovecot
        .deliver_to(
            ALICE,
            "INBOX",
            &mail("bob@fabrikam.test", ALICE, "Second", "second@fabrikam.test"),
        )
        .await
        .unwrap();
    eventually("every new mail at Creatio", PATIENCE, async || {
        let got = received(&creatio, Some(id));
        (got.contains(&"<second@fabrikam.test>".to_owned())
            && got.contains(&"<filed@fabrikam.test>".to_owned()))
        .then_some(())
    })
    .await;
    assert_received_once(
        &creatio,
        &dovecot,
        &[(ALICE, id)],
        &[
            "<filed@fabrikam.test>",
            "<first@fabrikam.test>",
            "<second@fabrikam.test>",
        ],
    )
    .await;
    // The mailbox watches and fetches on one connection.
    eventually("one connection to Dovecot", PATIENCE, async || {
        (dovecot.connections() == 1).then_some(())
    })
    .await;

    // Creatio's history load of an IMAP mailbox: its SEARCH filter's date.
    let (status, body) = listener
        .post(
            "/api/email/synchronize",
            json!({"Credentials": creds, "Filters": "UNDRAFT UNDELETED SENTSINCE 01-Jan-2026"})
                .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("the old mail loaded as history", PATIENCE, async || {
        received(&creatio, Some(id))
            .contains(&"<old@fabrikam.test>".to_owned())
            .then_some(())
    })
    .await;
    let (status, body) = listener
        .post(
            "/api/email/synchronize",
            json!({"Credentials": creds, "Filters": "UNDELETED OR FROM a b"}).to_string(),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("Filters"), "{body}");
    // History adds what the mailbox held, nothing twice.
    assert_received_once(
        &creatio,
        &dovecot,
        &[(ALICE, id)],
        &[
            "<filed@fabrikam.test>",
            "<first@fabrikam.test>",
            "<old@fabrikam.test>",
            "<second@fabrikam.test>",
        ],
    )
    .await;

    let email = creatio
        .calls_of("ProcessFullEmail")
        .into_iter()
        .flat_map(|c| c.body["Emails"].as_array().cloned().unwrap_or_default())
        .find(|e| e["MessageId"] == "<first@fabrikam.test>")
        .unwrap();
    assert_eq!(email["Subject"], "First");
    assert!(
        email["Body"]
            .as_str()
            .unwrap()
            .contains("First, in a few words.")
    );
}

#[tokio::test]
async fn validate_and_folders_answer_for_an_imap_mailbox() {
    let dovecot = Dovecot::start(&[(ALICE, "secret")]).await.expect("Dovecot");
    dovecot.create_folder(ALICE, "Projects").await.unwrap();
    dovecot.create_folder(ALICE, "Projects.2026").await.unwrap();
    let listener = Listener::spawn(&[]).await;
    let bpm = "http://127.0.0.1:9/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail";
    let id = "5b0f8fad-d9cb-469f-a165-70867728950e";

    let (status, body) = listener
        .post(
            "/api/mailbox/validate",
            mock_creatio::calling::unquoted(&credentials(id, &dovecot, "secret", bpm)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["IsValid"], true, "{body}");
    let (_, body) = listener
        .post(
            "/api/mailbox/validate",
            mock_creatio::calling::unquoted(&credentials(id, &dovecot, "wrong", bpm)),
        )
        .await;
    assert_eq!(body["IsValid"], false, "{body}");
    assert!(
        body["Message"]
            .as_str()
            .unwrap()
            .contains("Invalid credentials"),
        "{body}"
    );
    assert!(
        !body.to_string().contains("wrong"),
        "no password in the answer: {body}"
    );

    let mut creds = credentials(id, &dovecot, "secret", bpm);
    creds["FolderClassName"] = json!("");
    let (status, body) = listener
        .post(
            "/api/mailbox/folders",
            mock_creatio::calling::unquoted(&creds),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let folders: Vec<(String, String, String)> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["Id"].as_str().unwrap().to_owned(),
                f["Name"].as_str().unwrap().to_owned(),
                f["ParentId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("INBOX", "INBOX", ""),
        ("Projects", "Projects", ""),
        ("Projects.2026", "2026", "Projects"),
    ] {
        assert!(
            folders.contains(&(expected.0.into(), expected.1.into(), expected.2.into())),
            "{expected:?} in {folders:?}"
        );
    }
}

#[tokio::test]
async fn mail_that_arrives_while_the_imap_server_is_down_is_posted_once_it_is_back() {
    let dovecot = Dovecot::start(&[(ALICE, "secret")]).await.expect("Dovecot");
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let listener = Listener::spawn(&[]).await;
    let id = "6fa8fad5-d9cb-469f-a165-70867728950e";
    let creds = credentials(id, &dovecot, "secret", &creatio.url("ProcessFullEmail"));
    create_watched(&listener, id, &creds).await;
    let before = mail("bob@fabrikam.test", ALICE, "Before", "before@fabrikam.test");
    dovecot.deliver_to(ALICE, "INBOX", &before).await.unwrap();
    eventually("the mail before the outage", PATIENCE, async || {
        (!received(&creatio, Some(id)).is_empty()).then_some(())
    })
    .await;

    dovecot.kill().await.unwrap();
    // Delivered while no IMAP connection can be open: the server's store takes it.
    for n in 0..3 {
        let during = mail(
            "bob@fabrikam.test",
            ALICE,
            "During",
            &format!("during-{n}@fabrikam.test"),
        );
        dovecot.deliver_offline(ALICE, &during).unwrap();
    }
    dovecot.start_again().await.unwrap();
    let after = mail("bob@fabrikam.test", ALICE, "After", "after@fabrikam.test");
    dovecot.deliver_to(ALICE, "INBOX", &after).await.unwrap();

    eventually("every mail at Creatio", PATIENCE, async || {
        (received(&creatio, Some(id)).len() >= 5).then_some(())
    })
    .await;
    assert_received_once(
        &creatio,
        &dovecot,
        &[(ALICE, id)],
        &[
            "<after@fabrikam.test>",
            "<before@fabrikam.test>",
            "<during-0@fabrikam.test>",
            "<during-1@fabrikam.test>",
            "<during-2@fabrikam.test>",
        ],
    )
    .await;
}

/// Validate's answer for these settings.
async fn validate(listener: &Listener, creds: &Value) -> Value {
    let (status, body) = listener
        .post(
            "/api/mailbox/validate",
            mock_creatio::calling::unquoted(creds),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn tls_and_starttls_are_trusted_with_the_servers_ca_and_refused_without_it() {
    let (dovecot, ca) = Dovecot::start_tls(&[(ALICE, "secret")])
        .await
        .expect("Dovecot");
    let dir = common::temp_dir("imap-ca");
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca).unwrap();
    let bpm = "http://127.0.0.1:9/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail";
    let id = "7a8fad5b-d9cb-469f-a165-70867728950e";
    let tls_port = dovecot.tls_port.unwrap();
    let with = |port: u16, secure_option: u8| {
        let mut creds = credentials(id, &dovecot, "secret", bpm);
        creds["Port"] = json!(port);
        creds["SecureOption"] = json!(secure_option);
        creds["UseSsl"] = json!(secure_option != 0);
        creds
    };

    let trusting = Listener::spawn(&["--imap-ca-file", ca_file.to_str().unwrap()]).await;
    // Ssl on the TLS port; StartTls, and Auto (which finds STARTTLS), on the plain one.
    for (port, option) in [(tls_port, 2), (dovecot.port, 3), (dovecot.port, 1)] {
        let answer = validate(&trusting, &with(port, option)).await;
        assert_eq!(
            answer["IsValid"], true,
            "port {port}, SecureOption {option}: {answer}"
        );
    }

    let untrusting = Listener::spawn(&[]).await;
    for (port, option) in [(tls_port, 2), (dovecot.port, 3)] {
        let answer = validate(&untrusting, &with(port, option)).await;
        assert_eq!(answer["IsValid"], false, "{answer}");
        assert!(
            answer["Message"]
                .as_str()
                .unwrap()
                .contains("--imap-ca-file"),
            "{answer}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_killed_replicas_imap_mailboxes_are_watched_elsewhere_with_nothing_lost_or_doubled() {
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let users: Vec<(String, String)> = (0..6)
        .map(|i| (format!("user{i}@contoso.test"), format!("pw-{i}")))
        .collect();
    let logins: Vec<(&str, &str)> = users
        .iter()
        .map(|(u, p)| (u.as_str(), p.as_str()))
        .collect();
    let dovecot = Dovecot::start(&logins).await.expect("Dovecot");
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let redis = common::Redis::start().await;
    let replica = async |name: &str| {
        Listener::spawn(&[
            "--redis-url",
            &redis.url,
            "--secret-key",
            KEY,
            "--replica-id",
            name,
            "--lease-ms",
            "1500",
        ])
        .await
    };
    let (r0, mut r1) = (replica("r0").await, replica("r1").await);
    let id = |i: usize| format!("00000000-0000-4000-8000-{i:012}");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut creds = credentials(&id(i), &dovecot, password, &creatio.url("ProcessFullEmail"));
        creds["UserName"] = json!(user);
        creds["SenderEmailAddress"] = json!(user);
        let via = if i % 2 == 0 { &r0 } else { &r1 };
        let (status, body) = via.send("create", &json!([creds])).await;
        assert_eq!(status, 200, "{body}");
    }
    let streaming = async |n: u64| {
        eventually("every IMAP mailbox watched", PATIENCE, async || {
            let (_, status) = r0.get("/api/listeners/status").await;
            (status["States"]["Streaming"] == n).then_some(())
        })
        .await
    };
    streaming(6).await;
    let deliver = async |round: &str| {
        let mut sent = Vec::new();
        for (user, _) in &users {
            let message_id = format!("{round}-{user}");
            dovecot
                .deliver_to(
                    user,
                    "INBOX",
                    &mail("bob@fabrikam.test", user, round, &message_id),
                )
                .await
                .unwrap();
            sent.push(format!("<{message_id}>"));
        }
        sent
    };
    let before = deliver("before").await;

    r1.kill9().await;
    let during = deliver("during").await;
    eventually("r1's mailboxes owned by r0", PATIENCE, async || {
        let (_, status) = r0.get("/api/listeners/status").await;
        (status["Owners"]["r0"] == 6 && status["States"]["Streaming"] == 6).then_some(())
    })
    .await;
    let after = deliver("after").await;

    let mut all: Vec<String> = [before, during, after].concat();
    eventually("every mail at Creatio", PATIENCE, async || {
        let got = received(&creatio, None);
        all.iter().all(|m| got.contains(m)).then_some(())
    })
    .await;
    all.sort();
    let expected: Vec<&str> = all.iter().map(String::as_str).collect();
    let ids: Vec<String> = (0..users.len()).map(id).collect();
    let mailboxes: Vec<(&str, &str)> = users
        .iter()
        .zip(&ids)
        .map(|((user, _), id)| (user.as_str(), id.as_str()))
        .collect();
    assert_received_once(&creatio, &dovecot, &mailboxes, &expected).await;
}

/// Creatio's send of a mail from Alice's IMAP mailbox to Bob, through the SMTP server at
/// `smtp_port` (the send call's `ServiceUrl` and `Port` name the SMTP server).
fn send_command(smtp_port: u16, password: &str, message: &str) -> String {
    json!({
        "Email": {
            "Id": "5b9c7a1e-2f4d-4e8a-9c3b-1d2e3f4a5b6c", "Subject": "Offer for Q3",
            "Body": "<p>Dear Bob,</p><p>our offer: <img src=\"cid:logo-1\"></p>",
            "Sender": format!("Alice <{ALICE}>"), "Recepients": [format!("Bob <{BOB}>")],
            "CopyRecepients": [], "BlindCopyRecepients": [], "Headers": [], "Importance": 2,
            "IsHtmlBody": true,
            "Attachments": [
                {"Id": "logo-1", "Name": "logo.png", "Base64Data": "iVBORw0KGgo=", "IsInline": true},
                {"Id": "f3a1", "Name": "offer.pdf", "Base64Data": "JVBERi0xLjQ=", "IsInline": false},
            ],
            "SendDateTimeStamp": 639_012_345_678_900_000_i64,
            "MessageId": format!("<{message}@creatio.contoso.test>"),
            "InReplyTo": null, "References": null,
        },
        "Attachments": null,
        "Credentials": {
            "Id": "a11ce000-d9cb-469f-a165-70867728950e", "UserName": ALICE, "Password": password,
            "AccessToken": null, "SenderEmailAddress": ALICE, "ServiceUrl": "127.0.0.1",
            "Port": smtp_port, "UseSsl": false, "SecureOption": 0, "UseOAuth": false,
            "ServerTypeId": IMAP_TYPE, "BpmEndpoint": null, "FolderIds": [],
            "UseFullEmail": true, "FeatureValues": {},
        },
    })
    .to_string()
}

const BOB: &str = "bob@contoso.test";

#[tokio::test]
async fn a_mail_creatio_sends_from_an_imap_mailbox_goes_out_over_smtp_once() {
    let dovecot = std::sync::Arc::new(
        Dovecot::start(&[(ALICE, "secret"), (BOB, "bob-pw")])
            .await
            .expect("Dovecot"),
    );
    let sink = imap_world::SmtpSink::start(&[(ALICE, "secret")], &[ALICE, BOB], dovecot.clone())
        .await
        .expect("the SMTP sink");
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let listener = Listener::spawn(&[]).await;
    // Bob's IMAP mailbox is watched here: what Alice sends reaches Creatio through it.
    let bob = "b0b00000-d9cb-469f-a165-70867728950e";
    let mut creds = credentials(bob, &dovecot, "bob-pw", &creatio.url("ProcessFullEmail"));
    creds["UserName"] = json!(BOB);
    creds["SenderEmailAddress"] = json!(BOB);
    create_watched(&listener, bob, &creds).await;

    let body = send_command(sink.port, "secret", "offer-1");
    for _ in 0..2 {
        // Creatio retries (a timeout on its side): sent once all the same.
        let (status, answer) = listener.post("/apiv2/email/send", body.clone()).await;
        assert_eq!((status, answer), (200, Value::String(String::new())));
    }
    let accepted = sink.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0].from, ALICE);
    assert_eq!(accepted[0].to, [BOB]);

    let email = eventually(
        "the mail at Creatio through Bob's mailbox",
        PATIENCE,
        async || {
            creatio
                .calls_of("ProcessFullEmail")
                .into_iter()
                .flat_map(|c| c.body["Emails"].as_array().cloned().unwrap_or_default())
                .find(|e| e["MessageId"] == "<offer-1@creatio.contoso.test>")
        },
    )
    .await;
    assert_eq!(email["Subject"], "Offer for Q3");
    assert_eq!(email["Importance"], 2);
    let attachments: Vec<(String, bool)> = email["Attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["Name"].as_str().unwrap().to_owned(),
                a["IsInline"] == true,
            )
        })
        .collect();
    assert!(
        attachments.contains(&("logo.png".into(), true)),
        "{attachments:?}"
    );
    assert!(
        attachments.contains(&("offer.pdf".into(), false)),
        "{attachments:?}"
    );

    // A password the SMTP server refuses: said in words Creatio shows, nothing sent.
    let (status, answer) = listener
        .post(
            "/apiv2/email/send",
            send_command(sink.port, "wrong", "offer-2"),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        "The SMTP server rejected the user name or password of the sending mailbox"
    );
    assert_eq!(sink.accepted().len(), 1);
}

#[tokio::test]
async fn mailboxes_sharing_a_login_stay_within_the_servers_connection_limit() {
    // Dovecot lets a user hold two connections from one address; three Creatio mailboxes
    // share the login (one shared mailbox added by three Creatio users).
    let limited = imap_world::Options {
        connections_per_user: 2,
        ..imap_world::Options::default()
    };
    let (dovecot, _) = Dovecot::start_with(&[(ALICE, "secret")], limited)
        .await
        .expect("Dovecot");
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let listener = Listener::spawn(&["--imap-connections-per-user", "2"]).await;
    let ids = ["a1", "a2", "a3"].map(|n| format!("{n}fa8fad5-d9cb-469f-a165-70867728950e"));
    for id in &ids {
        let creds = credentials(id, &dovecot, "secret", &creatio.url("ProcessFullEmail"));
        let (status, body) = listener.send("create", &json!([creds])).await;
        assert_eq!(status, 200, "{body}");
    }
    // Each mailbox watching posts the mail: two do, the third waits for a connection
    // (it tried as soon as it was created, well before Dovecot tells of the mail).
    let first = mail("bob@fabrikam.test", ALICE, "First", "first@fabrikam.test");
    dovecot.deliver_to(ALICE, "INBOX", &first).await.unwrap();
    let through = |message_id: &str| -> Vec<String> {
        ids.iter()
            .filter(|id| received(&creatio, Some(id)).iter().any(|m| m == message_id))
            .cloned()
            .collect()
    };
    eventually(
        "the first mail through two mailboxes",
        PATIENCE,
        async || (through("<first@fabrikam.test>").len() >= 2).then_some(()),
    )
    .await;
    assert!(dovecot.connections() <= 2, "{}", dovecot.connections());
    let refused = "Maximum number of connections";
    assert!(!dovecot.log().contains(refused), "{}", dovecot.log());
    // One closes; the one that waited takes its connection and hears the next mail.
    let (status, _) = listener.send("close", &json!([ids[0]])).await;
    assert_eq!(status, 200);
    let second = mail("bob@fabrikam.test", ALICE, "Second", "second@fabrikam.test");
    dovecot.deliver_to(ALICE, "INBOX", &second).await.unwrap();
    eventually(
        "the second mail through the two open mailboxes",
        PATIENCE,
        async || (through("<second@fabrikam.test>") == ids[1..]).then_some(()),
    )
    .await;
    assert!(dovecot.connections() <= 2, "{}", dovecot.connections());
    assert!(!dovecot.log().contains(refused), "{}", dovecot.log());
}

#[tokio::test]
async fn mail_filed_into_a_folder_after_the_first_is_heard_at_once_through_notify() {
    let dovecot = Dovecot::start(&[(ALICE, "secret")]).await.expect("Dovecot");
    dovecot.create_folder(ALICE, "Projects").await.unwrap();
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Folders are looked at only every ten minutes: only NOTIFY tells of Projects sooner.
    let listener =
        Listener::spawn(&["--stream-idle-secs", "1200", "--imap-poll-secs", "600"]).await;
    let id = "7fa8fad5-d9cb-469f-a165-70867728950e";
    let creds = credentials(id, &dovecot, "secret", &creatio.url("ProcessFullEmail"));
    create_watched(&listener, id, &creds).await;
    let inbox = mail("bob@fabrikam.test", ALICE, "Inbox", "inbox@fabrikam.test");
    dovecot.deliver_to(ALICE, "INBOX", &inbox).await.unwrap();
    // The watch has looked, and IDLEs on the inbox again.
    eventually("the inbox's mail at Creatio", PATIENCE, async || {
        received(&creatio, Some(id))
            .contains(&"<inbox@fabrikam.test>".to_owned())
            .then_some(())
    })
    .await;
    let filed = mail("carol@fabrikam.test", ALICE, "Filed", "filed@fabrikam.test");
    dovecot.deliver_to(ALICE, "Projects", &filed).await.unwrap();
    eventually("the filed mail at Creatio", PATIENCE, async || {
        received(&creatio, Some(id))
            .contains(&"<filed@fabrikam.test>".to_owned())
            .then_some(())
    })
    .await;
    assert_eq!(dovecot.connections(), 1);
}
