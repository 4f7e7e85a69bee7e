//! Microsoft 365 mailboxes through Microsoft Graph end to end: the real listener binary,
//! mock-graph (the token authority and Graph at one address) and mock-creatio; each mailbox
//! created by a body written as Creatio writes a Microsoft 365 mailbox today (Exchange,
//! `ServiceUrl` on outlook.office365.com, an OAuth token for EWS).

mod common;

use std::path::{Path, PathBuf};

use common::{Listener, PATIENCE, eventually, temp_dir};
use mock_creatio::MockCreatio;
use mock_creatio::calling::{microsoft365_credentials, unquoted};
use mock_graph::{App, Fault, MockGraph, NewMail};
use serde_json::{Value, json};

const ALICE: &str = "alice@contoso.com";
const BOB: &str = "bob@contoso.com";
const TENANT: &str = "contoso.onmicrosoft.com";
const CLIENT: &str = "0f5d2b8e-6c1a-4d7e-9a3b-2c4e6f8a1b3d";
const SECRET: &str = "app-secret-Zq8~x";
/// The token Creatio holds for EWS: the listener has no use for it.
const EWS_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJub25jZSI6ImV3cyJ9.creatio-ews-token";

struct World {
    graph: MockGraph,
    creatio: MockCreatio,
    dir: PathBuf,
}

impl World {
    /// mock-graph with Alice and Bob and an app registration of their tenant (a secret).
    async fn start() -> World {
        let graph = MockGraph::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        graph.add_user(ALICE);
        graph.add_user(BOB);
        graph.add_app(App {
            tenant: TENANT.into(),
            client_id: CLIENT.into(),
            secret: Some(SECRET.into()),
            ..App::default()
        });
        World {
            graph,
            creatio: MockCreatio::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
            dir: temp_dir("graph"),
        }
    }

    /// An apps file with one app for contoso.com, proving itself as `proof` says (JSON
    /// members), its authority and Graph at mock-graph.
    fn apps_file(&self, proof: Value) -> PathBuf {
        let mut app = json!({
            "tenant": TENANT, "client_id": CLIENT, "domains": ["contoso.com"],
            "authority": self.graph.url(), "graph": self.graph.url(),
        });
        for (k, v) in proof.as_object().unwrap() {
            app[k] = v.clone();
        }
        let path = self.dir.join(format!("apps-{}.json", fastrand::u32(..)));
        std::fs::write(&path, json!([app]).to_string()).unwrap();
        path
    }

    /// The listener serving contoso.com through Graph, polling every 1 to 2 s.
    async fn listener(&self, apps: &Path) -> Listener {
        self.listener_polling(apps, 1, 2).await
    }

    /// The listener serving contoso.com through Graph, polling every `min` to `max` seconds.
    async fn listener_polling(&self, apps: &Path, min: u32, max: u32) -> Listener {
        let (min, max) = (min.to_string(), max.to_string());
        Listener::spawn(&[
            "--graph-apps",
            apps.to_str().unwrap(),
            "--creatio-hosts",
            "127.0.0.1",
            "--graph-poll-min-secs",
            &min,
            "--graph-poll-max-secs",
            &max,
        ])
        .await
    }

    fn credentials(&self, id: &str, user: &str) -> Value {
        microsoft365_credentials(id, user, EWS_TOKEN, &self.creatio.url("ProcessFullEmail"))
    }

    /// The Message-IDs Creatio received through this mailbox, in order.
    fn received(&self, id: &str) -> Vec<String> {
        self.creatio
            .calls_of("ProcessFullEmail")
            .into_iter()
            .filter(|c| c.body["SubscriptionInfo"]["MailboxId"] == id)
            .flat_map(|c| c.body["Emails"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["MessageId"].as_str().map(str::to_owned))
            .collect()
    }

    fn mail(&self, user: &str, folder: Option<&str>, message_id: &str) -> String {
        self.graph
            .deliver(
                user,
                NewMail {
                    from: "carol@fabrikam.com".into(),
                    subject: format!("About {message_id}"),
                    body: "Hello".into(),
                    message_id: Some(format!("<{message_id}@fabrikam.com>")),
                    folder: folder.map(str::to_owned),
                    ..NewMail::default()
                },
            )
            .unwrap()
            .internet_message_id
    }

    /// Puts one more mail into the mailbox and waits for it (a mail posted twice would have
    /// arrived before it); then Creatio holds `expected` through this mailbox, each once.
    async fn assert_received_once(&self, id: &str, user: &str, expected: &[String]) {
        let last = self.mail(user, None, &format!("last-{}", fastrand::u32(..)));
        eventually("every mail at Creatio", PATIENCE, async || {
            self.received(id).contains(&last).then_some(())
        })
        .await;
        let mut got = self.received(id);
        got.retain(|m| *m != last);
        got.sort();
        let mut want = expected.to_vec();
        want.sort();
        assert_eq!(got, want);
    }
}

async fn create_watched(listener: &Listener, id: &str, creds: &Value) {
    let (status, body) = listener.send("create", &json!([creds])).await;
    assert_eq!(status, 200, "{body}");
    eventually("the Graph mailbox to be watched", PATIENCE, async || {
        (listener.state_of(id).await == "exists").then_some(())
    })
    .await;
}

async fn validate(listener: &Listener, creds: &Value) -> Value {
    let (status, body) = listener
        .post("/api/mailbox/validate", unquoted(creds))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_microsoft_365_mailbox_is_read_through_graph_as_creatio_sends_it() {
    let world = World::start().await;
    world
        .graph
        .add_folder(ALICE, "Projects", Some("Inbox"))
        .unwrap();
    // Mail received an hour ago: old when the mailbox is created. (Mail received since the
    // Create is posted, however fast it came.)
    world
        .graph
        .deliver(
            ALICE,
            NewMail {
                from: "carol@fabrikam.com".into(),
                subject: "Old".into(),
                body: "Hello".into(),
                message_id: Some("<old@fabrikam.com>".into()),
                received_unix: Some(mock_ews::clock::now_unix() - 3600),
                ..NewMail::default()
            },
        )
        .unwrap();
    let listener = world
        .listener(&world.apps_file(json!({ "client_secret": SECRET })))
        .await;
    let id = "a1ce0365-d9cb-469f-a165-70867728950e";
    create_watched(&listener, id, &world.credentials(id, ALICE)).await;

    let new = [
        world.mail(ALICE, None, "new-1"),
        world.mail(ALICE, Some("Projects"), "in-projects"),
        world.mail(ALICE, None, "new-2"),
    ];
    // Mail that was there before is not new; what came after is posted once, from any
    // watched folder.
    world.assert_received_once(id, ALICE, &new).await;
    let stats = world.graph.stats();
    assert_eq!(stats.tokens_issued, 1, "one token, kept: {stats:?}");
    // Four watched folders (Inbox, Projects, Sent Items, Archive): each poll asks for all of
    // them in one $batch request.
    eventually("a poll in one $batch request", PATIENCE, async || {
        world
            .graph
            .requests()
            .iter()
            .any(|r| r.path == "/v1.0/$batch" && r.status == 200)
            .then_some(())
    })
    .await;
    let late = world.mail(ALICE, Some("Projects"), "by-batch");
    eventually("mail found by a batched poll", PATIENCE, async || {
        world.received(id).contains(&late).then_some(())
    })
    .await;
    assert!(stats.max_in_flight_per_user <= 4, "{stats:?}");
    let logs = listener.logs().join("\n");
    for secret in [SECRET, EWS_TOKEN, "eyJ0eXAiOiJKV1QifQ.mock"] {
        assert!(!logs.contains(secret), "{secret} in the log");
    }
}

#[tokio::test]
async fn validate_and_folders_answer_through_graph_and_a_policy_that_excludes_the_mailbox_is_named()
{
    let world = World::start().await;
    world
        .graph
        .add_folder(ALICE, "Projects", Some("Inbox"))
        .unwrap();
    let listener = world
        .listener(&world.apps_file(json!({ "client_secret": SECRET })))
        .await;
    let id = "a1ce0366-d9cb-469f-a165-70867728950e";
    let answer = validate(&listener, &world.credentials(id, ALICE)).await;
    assert_eq!(answer["IsValid"], true, "{answer}");

    let mut creds = world.credentials(id, ALICE);
    creds["FolderClassName"] = json!("");
    let (status, body) = listener
        .post("/api/mailbox/folders", unquoted(&creds))
        .await;
    assert_eq!(status, 200, "{body}");
    let folders = body.as_array().unwrap();
    let named = |name: &str| {
        folders
            .iter()
            .find(|f| f["Name"] == name)
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    assert_eq!(named("Projects")["ParentId"], named("Inbox")["Id"]);
    assert_eq!(named("Inbox")["ParentId"], "");

    // The tenant's application access policy lets the app read Bob's mailbox only.
    let restricted = World::start().await;
    restricted.graph.add_app(App {
        tenant: TENANT.into(),
        client_id: "1a2b3c4d-0000-4d7e-9a3b-2c4e6f8a1b3d".into(),
        secret: Some(SECRET.into()),
        users: Some(vec![BOB.into()]),
        ..App::default()
    });
    let apps = restricted.apps_file(json!({
        "client_secret": SECRET, "client_id": "1a2b3c4d-0000-4d7e-9a3b-2c4e6f8a1b3d",
    }));
    let listener = restricted.listener(&apps).await;
    let answer = validate(&listener, &restricted.credentials(id, ALICE)).await;
    assert_eq!(answer["IsValid"], false, "{answer}");
    assert!(
        answer["Message"]
            .as_str()
            .unwrap()
            .contains("application access policy"),
        "{answer}"
    );
    let answer = validate(&listener, &restricted.credentials(id, BOB)).await;
    assert_eq!(answer["IsValid"], true, "{answer}");
}

/// An RSA key and a self-signed certificate for it, as PEM files in `dir`.
fn key_and_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is needed for these tests: apt-get install openssl");
    assert!(out.status.success(), "{out:?}");
    (key, cert)
}

#[tokio::test]
async fn a_certificate_proves_the_app_and_a_key_that_does_not_match_it_is_refused_clearly() {
    let world = World::start().await;
    let (key, cert) = key_and_certificate(&world.dir, "listener");
    let (other_key, _) = key_and_certificate(&world.dir, "other");
    world.graph.add_app(App {
        tenant: TENANT.into(),
        client_id: "c3c3c3c3-0000-4d7e-9a3b-2c4e6f8a1b3d".into(),
        certificate_pem: Some(std::fs::read_to_string(&cert).unwrap()),
        ..App::default()
    });
    let proof = |key: &Path| {
        json!({
            "client_id": "c3c3c3c3-0000-4d7e-9a3b-2c4e6f8a1b3d",
            "certificate": cert.file_name().unwrap().to_str().unwrap(),
            "private_key": key.file_name().unwrap().to_str().unwrap(),
        })
    };
    let id = "a1ce0367-d9cb-469f-a165-70867728950e";
    let listener = world.listener(&world.apps_file(proof(&key))).await;
    let answer = validate(&listener, &world.credentials(id, ALICE)).await;
    assert_eq!(answer["IsValid"], true, "{answer}");
    assert_eq!(world.graph.stats().tokens_issued, 1);

    let listener = world.listener(&world.apps_file(proof(&other_key))).await;
    let answer = validate(&listener, &world.credentials(id, ALICE)).await;
    assert_eq!(answer["IsValid"], false, "{answer}");
    let message = answer["Message"].as_str().unwrap();
    assert!(message.contains("Microsoft Entra refused"), "{answer}");
    assert!(message.contains("AADSTS700027"), "{answer}");
    assert_eq!(world.graph.stats().tokens_refused, 1);
}

#[tokio::test]
async fn an_expired_delta_link_takes_a_new_baseline_and_the_gap_is_recovered_once() {
    let world = World::start().await;
    let listener = world
        .listener(&world.apps_file(json!({ "client_secret": SECRET })))
        .await;
    let id = "a1ce0368-d9cb-469f-a165-70867728950e";
    create_watched(&listener, id, &world.credentials(id, ALICE)).await;
    let before = world.mail(ALICE, None, "before");
    eventually("the mail before the expiry", PATIENCE, async || {
        world.received(id).contains(&before).then_some(())
    })
    .await;

    // Graph forgets every delta link; mail arrives meanwhile.
    world.graph.expire_delta();
    let during = [
        world.mail(ALICE, None, "during-1"),
        world.mail(ALICE, None, "during-2"),
    ];
    let mut expected = vec![before];
    expected.extend(during);
    world.assert_received_once(id, ALICE, &expected).await;
    assert!(
        world.graph.requests().iter().any(|r| r.status == 410),
        "the expired link was used and refused"
    );
}

#[tokio::test]
async fn a_throttled_app_holds_back_every_mailbox_and_loses_nothing() {
    let world = World::start().await;
    // Each mailbox polls every second: held back only by the app's hold-back.
    let listener = world
        .listener_polling(&world.apps_file(json!({ "client_secret": SECRET })), 1, 1)
        .await;
    let alice = "a1ce0369-d9cb-469f-a165-70867728950e";
    let bob = "b0b00369-d9cb-469f-a165-70867728950e";
    // The token endpoint throttles first, then Graph itself once both mailboxes poll.
    world.graph.fault(Fault::Throttle {
        count: 2,
        retry_after_secs: 2,
    });
    create_watched(&listener, alice, &world.credentials(alice, ALICE)).await;
    create_watched(&listener, bob, &world.credentials(bob, BOB)).await;
    // Both polling: a few polls each (every folder of a mailbox in one $batch request).
    eventually("both mailboxes polling", PATIENCE, async || {
        let polls = world
            .graph
            .requests()
            .iter()
            .filter(|r| r.path == "/v1.0/$batch")
            .count();
        (polls >= 8).then_some(())
    })
    .await;
    // One poll throttled: the other mailbox's must wait as well.
    world.graph.fault(Fault::Throttle {
        count: 1,
        retry_after_secs: 2,
    });
    let sent = [
        world.mail(ALICE, None, "throttled-1"),
        world.mail(ALICE, None, "throttled-2"),
    ];
    world.assert_received_once(alice, ALICE, &sent).await;
    let requests = world.graph.requests();
    let throttled: Vec<usize> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == 429)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(throttled.len(), 3, "{requests:?}");
    assert!(
        throttled
            .iter()
            .any(|&i| requests[i].path.starts_with("/v1.0/")),
        "Graph's own answers were throttled too"
    );
    // A request already on its way when a 429 was
    // answered cannot be held back; any sent after it waits for the Retry-After.
    for &i in &throttled {
        let answered = requests[i].at_unix_ms;
        let early: Vec<_> = requests
            .iter()
            .filter(|r| r.arrived_unix_ms > answered + 50 && r.arrived_unix_ms < answered + 1_900)
            .collect();
        assert!(
            early.is_empty(),
            "asked again within the Retry-After: {early:#?}"
        );
    }
}

#[tokio::test]
async fn a_mail_creatio_sends_goes_out_through_graph_once_with_its_message_id() {
    let world = World::start().await;
    let listener = world
        .listener(&world.apps_file(json!({ "client_secret": SECRET })))
        .await;
    let bob_id = "b0b00365-d9cb-469f-a165-70867728950e";
    create_watched(&listener, bob_id, &world.credentials(bob_id, BOB)).await;

    let mut creds = world.credentials("a1ce0370-d9cb-469f-a165-70867728950e", ALICE);
    creds["BpmEndpoint"] = Value::Null;
    let body = json!({
        "Email": {
            "Id": "5b9c7a1e-2f4d-4e8a-9c3b-1d2e3f4a5b6c", "Subject": "Offer for Q3",
            "Body": "<p>Dear Bob,</p>", "Sender": format!("Alice <{ALICE}>"),
            "Recepients": [format!("Bob <{BOB}>")], "CopyRecepients": [],
            "BlindCopyRecepients": [], "Headers": [], "Importance": 2, "IsHtmlBody": true,
            "Attachments": [], "SendDateTimeStamp": 639_012_345_678_900_000_i64,
            "MessageId": "<offer-1@creatio.contoso.com>", "InReplyTo": null, "References": null,
        },
        "Attachments": null,
        "Credentials": creds,
    })
    .to_string();
    for _ in 0..2 {
        // Creatio retries (a timeout on its side): sent once all the same.
        let (status, answer) = listener.post("/apiv2/email/send", body.clone()).await;
        assert_eq!((status, answer), (200, Value::String(String::new())));
    }
    let sent = world.graph.messages(ALICE, Some("Sent Items")).unwrap();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].internet_message_id, "<offer-1@creatio.contoso.com>");
    let email = eventually(
        "the mail at Creatio through Bob's mailbox",
        PATIENCE,
        async || {
            world
                .creatio
                .calls_of("ProcessFullEmail")
                .into_iter()
                .flat_map(|c| c.body["Emails"].as_array().cloned().unwrap_or_default())
                .find(|e| e["MessageId"] == "<offer-1@creatio.contoso.com>")
        },
    )
    .await;
    assert_eq!(email["Subject"], "Offer for Q3");
}

#[tokio::test]
async fn a_mailbox_on_premises_stays_on_ews() {
    let world = World::start().await;
    let listener = world
        .listener(&world.apps_file(json!({ "client_secret": SECRET })))
        .await;
    // A domain the app serves, but on an on-premises Exchange (here, nothing answers): EWS
    // is asked, Graph is not.
    let id = "fab00365-d9cb-469f-a165-70867728950e";
    let mut creds = world.credentials(id, ALICE);
    creds["ServiceUrl"] = json!("http://127.0.0.1:9/EWS/Exchange.asmx");
    let answer = validate(&listener, &creds).await;
    assert_eq!(answer["IsValid"], false, "{answer}");
    assert_eq!(world.graph.stats().requests, 0);
}

/// The listener taking Graph's change notifications at `/graph/notifications`, through a
/// relay whose address it is given before it starts (as an ingress's would be); polling
/// only every 30 s, so mail that arrives sooner came by a notification.
async fn notified_listener(world: &World, apps: &Path) -> (Listener, harness::proxy::Proxy) {
    let relay = harness::proxy::Proxy::start("127.0.0.1:9".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}/graph/notifications", relay.addr());
    let listener = Listener::spawn(&[
        "--graph-apps",
        apps.to_str().unwrap(),
        "--creatio-hosts",
        "127.0.0.1",
        "--graph-notification-url",
        &url,
        "--graph-poll-min-secs",
        "30",
        "--graph-poll-max-secs",
        "30",
        "--stream-idle-secs",
        "70",
    ])
    .await;
    let _ = world;
    relay.set_upstream(listener.base.trim_start_matches("http://").parse().unwrap());
    (listener, relay)
}

/// Well within the 30 s between polls.
const BY_NOTIFICATION: std::time::Duration = std::time::Duration::from_secs(8);

#[tokio::test]
async fn change_notifications_bring_mail_at_once_and_lost_or_removed_ones_are_recovered() {
    let world = World::start().await;
    let (listener, _relay) =
        notified_listener(&world, &world.apps_file(json!({ "client_secret": SECRET }))).await;
    let id = "a1ce0371-d9cb-469f-a165-70867728950e";
    create_watched(&listener, id, &world.credentials(id, ALICE)).await;
    // Inbox, Sent Items, Archive: one subscription each, each made after Graph's validation
    // request was echoed.
    eventually("a subscription per watched folder", PATIENCE, async || {
        (world.graph.subscriptions() == 3).then_some(())
    })
    .await;
    assert_eq!(world.graph.stats().subscriptions_refused, 0);
    let arrives = async |message_id: &str, within| {
        eventually(&format!("{message_id} at Creatio"), within, async || {
            world
                .received(id)
                .iter()
                .any(|m| m == message_id)
                .then_some(())
        })
        .await
    };

    let first = world.mail(ALICE, None, "notified-1");
    arrives(&first, BY_NOTIFICATION).await;

    // A notification Graph lost; its `missed` lifecycle event catches up.
    world.graph.drop_notifications(1);
    let lost = world.mail(ALICE, None, "notification-lost");
    world.graph.lifecycle("missed");
    arrives(&lost, BY_NOTIFICATION).await;

    // Graph removed the subscriptions: the listener makes them again.
    let created = world.graph.stats().subscriptions_created;
    world.graph.lifecycle("subscriptionRemoved");
    eventually("the subscriptions made again", PATIENCE, async || {
        (world.graph.stats().subscriptions_created >= created + 3
            && world.graph.subscriptions() == 3)
            .then_some(())
    })
    .await;
    let after = world.mail(ALICE, None, "after-removal");
    arrives(&after, BY_NOTIFICATION).await;

    let stats = world.graph.stats();
    assert!(
        stats.slowest_notification_ms < 1_000,
        "answered at once: {stats:?}"
    );
    assert_eq!(stats.notifications_failed, 0, "{stats:?}");
    world
        .assert_received_once(id, ALICE, &[first, lost, after])
        .await;

    // Subscribed twice, the mailbox looked its well-known folders up once.
    let lookups = world
        .graph
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/mailFolders/drafts"))
        .count();
    assert_eq!(lookups, 1);

    // Closed, the mailbox gives its subscriptions back.
    let (status, body) = listener.send("close", &json!([id])).await;
    assert_eq!(status, 200, "{body}");
    eventually("no subscription left", PATIENCE, async || {
        (world.graph.subscriptions() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_notification_endpoint_echoes_validation_and_ignores_a_forged_client_state() {
    let world = World::start().await;
    let (listener, _relay) =
        notified_listener(&world, &world.apps_file(json!({ "client_secret": SECRET }))).await;
    let (status, body) = listener
        .get_text("/graph/notifications?validationToken=Validation%3A%20abc")
        .await;
    assert_eq!(
        (status, body.as_str()),
        (405, ""),
        "Graph validates with a POST"
    );
    let answer = listener
        .http
        .post(format!(
            "{}/graph/notifications?validationToken=Validation%3A%20abc",
            listener.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "Validation: abc");
    let forged = json!({ "value": [{
        "subscriptionId": "x", "changeType": "created",
        "clientState": "a1ce0371-d9cb-469f-a165-70867728950e.AAAAAAAAAAAAAAAAAAAAAAAA",
    }]});
    let (status, _) = listener
        .post("/graph/notifications", forged.to_string())
        .await;
    assert_eq!(status, 202);
    assert!(
        listener
            .logs()
            .iter()
            .any(|l| l.contains("without a valid clientState")),
        "the forged notification was noticed and ignored"
    );
}

#[tokio::test]
async fn folder_ids_creatio_kept_from_ews_are_translated_and_unknown_ones_are_said() {
    let world = World::start().await;
    let projects = world
        .graph
        .add_folder(ALICE, "Projects", Some("Inbox"))
        .unwrap();
    let listener = world
        .listener(&world.apps_file(json!({ "client_secret": SECRET })))
        .await;
    // The mailbox as Creatio kept it from EWS days: one folder chosen, by its EWS id.
    let id = "a1ce0372-d9cb-469f-a165-70867728950e";
    let mut creds = world.credentials(id, ALICE);
    creds["FolderIds"] = json!([mock_graph::ews_id(&projects)]);
    create_watched(&listener, id, &creds).await;
    let in_inbox = world.mail(ALICE, None, "not-chosen");
    let in_projects = world.mail(ALICE, Some("Projects"), "chosen-folder");
    let last = world.mail(ALICE, Some("Projects"), "chosen-folder-last");
    eventually(
        "the chosen folder's mail at Creatio",
        PATIENCE,
        async || world.received(id).contains(&last).then_some(()),
    )
    .await;
    assert_eq!(world.received(id), [in_projects, last], "not {in_inbox}");

    // An id Microsoft 365 does not know: the mailbox fails, saying so.
    let lost = "a1ce0373-d9cb-469f-a165-70867728950e";
    let mut creds = world.credentials(lost, ALICE);
    creds["FolderIds"] = json!(["AAMkNoSuchFolder"]);
    let (status, body) = listener.send("create", &json!([creds])).await;
    assert_eq!(status, 200, "{body}");
    let (_, view) = eventually("the mailbox to fail", PATIENCE, async || {
        let (status, view) = listener.get(&format!("/api/listeners/{lost}")).await;
        (view["Status"]["State"] == "Failed").then_some((status, view))
    })
    .await;
    assert!(
        view["Status"]["Error"]
            .as_str()
            .unwrap_or_default()
            .contains("choose the mailbox's folders again"),
        "{view}"
    );
}

/// A mail put into `user`'s inbox, received `ago_secs` before now.
fn old_mail(world: &World, user: &str, message_id: &str, ago_secs: i64) -> String {
    world
        .graph
        .deliver(
            user,
            NewMail {
                from: "carol@fabrikam.com".into(),
                subject: format!("About {message_id}"),
                body: "Hello".into(),
                message_id: Some(format!("<{message_id}@fabrikam.com>")),
                received_unix: Some(mock_ews::clock::now_unix() - ago_secs),
                ..NewMail::default()
            },
        )
        .unwrap()
        .internet_message_id
}

#[tokio::test]
async fn history_and_fetch_by_message_id_go_through_graph() {
    let world = World::start().await;
    let older = old_mail(&world, ALICE, "two-hours-ago", 7200);
    let old = old_mail(&world, ALICE, "an-hour-ago", 3600);
    let listener = world
        .listener(&world.apps_file(json!({ "client_secret": SECRET })))
        .await;
    let id = "a1ce0374-d9cb-469f-a165-70867728950e";
    let creds = world.credentials(id, ALICE);
    create_watched(&listener, id, &creds).await;
    let fresh = world.mail(ALICE, None, "fresh");
    eventually("the new mail at Creatio", PATIENCE, async || {
        world.received(id).contains(&fresh).then_some(())
    })
    .await;

    // Creatio's history load from 90 minutes ago, in .NET ticks: the older mail stays out.
    let since_unix = mock_ews::clock::now_unix() - 5400;
    let ticks = since_unix * 10_000_000 + 621_355_968_000_000_000;
    let (status, body) = listener
        .post(
            "/api/email/synchronize",
            json!({ "Credentials": creds, "Filters": ticks.to_string() }).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(
        "the hour-old mail loaded as history",
        PATIENCE,
        async || world.received(id).contains(&old).then_some(()),
    )
    .await;
    world.assert_received_once(id, ALICE, &[fresh, old]).await;
    assert!(!world.received(id).contains(&older));

    // Creatio asks for one mail of Bob's by its Message-ID (Bob's mailbox is not watched).
    let wanted = old_mail(&world, BOB, "wanted", 600);
    let bob = "b0b00374-d9cb-469f-a165-70867728950e";
    let body = json!({
        "Credentials": world.credentials(bob, BOB),
        "Filters": format!("{wanted};<nowhere@fabrikam.com>"),
    });
    let (status, answer) = listener.post("/api/email/fetch", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    eventually("the fetched mail at Creatio", PATIENCE, async || {
        (world.received(bob) == [wanted.clone()]).then_some(())
    })
    .await;
}
