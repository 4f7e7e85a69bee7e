//! Creatio's real contract, end to end: the golden bodies of `fixtures/creatio/requests/`,
//! written as Creatio writes them, on every path Creatio calls; every callback the listener
//! makes read by mock-creatio as Creatio's WCF service reads it, and shaped exactly like the
//! golden callbacks of `fixtures/creatio/callbacks/`.

mod common;

use std::path::PathBuf;

use common::{Listener, PATIENCE, World, eventually};
use mock_ews::{Attachment, NewMail};
use serde_json::{Value, json};

const MAILBOX: &str = "8f0e2a6c-1d4b-4c36-9f1e-6a0b1c2d3e4f";
const ALICE: &str = "alice@contoso.example";

fn fixture(path: &str) -> String {
    let file: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/creatio", path]
        .iter()
        .collect();
    std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// A request fixture with the test's addresses filled in.
fn request(world: &World, name: &str) -> String {
    fixture(&format!("requests/{name}.txt"))
        .replace("{EWS}", &world.ews.ews_url())
        .replace("{CALLBACK}", &world.creatio.url("ProcessFullEmail"))
        .replace("{MAILBOX}", MAILBOX)
}

fn golden(operation: &str) -> Value {
    serde_json::from_str(&fixture(&format!("callbacks/{operation}.json"))).unwrap()
}

/// Where `actual` differs from `expected` in shape: member names and JSON types, arrays by
/// their items' shape where both have items.
fn shape_differences(path: &str, expected: &Value, actual: &Value) -> Vec<String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let mut out = Vec::new();
            for (k, ev) in e {
                match a.get(k) {
                    Some(av) => out.extend(shape_differences(&format!("{path}.{k}"), ev, av)),
                    None => out.push(format!("{path}.{k} missing")),
                }
            }
            out.extend(
                a.keys()
                    .filter(|k| !e.contains_key(*k))
                    .map(|k| format!("{path}.{k} not in the contract")),
            );
            out
        }
        (Value::Array(e), Value::Array(a)) => match (e.first(), a.first()) {
            (Some(ev), Some(_)) => a
                .iter()
                .enumerate()
                .flat_map(|(i, av)| shape_differences(&format!("{path}[{i}]"), ev, av))
                .collect(),
            _ => Vec::new(),
        },
        (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_)) => Vec::new(),
        _ => vec![format!("{path}: {expected} but {actual}")],
    }
}

fn assert_shaped_like_golden(operation: &str, actual: &Value) {
    let differences = shape_differences(operation, &golden(operation), actual);
    assert!(differences.is_empty(), "{differences:#?}\nin {actual:#}");
}

fn subscribes(world: &World) -> u64 {
    world
        .ews
        .stats()
        .requests
        .get("Subscribe")
        .copied()
        .unwrap_or(0)
}

fn assert_nothing_rejected(world: &World) {
    let rejected = world.creatio.rejections();
    assert!(
        rejected.is_empty(),
        "callbacks Creatio would refuse: {rejected:#?}"
    );
}

#[test]
fn the_golden_callbacks_are_what_creatio_reads() {
    for op in mock_creatio::OPERATIONS {
        mock_creatio::wcf::read(op, &golden(op)).unwrap_or_else(|e| panic!("{op}: {e}"));
    }
}

#[tokio::test]
async fn creatio_written_requests_work_on_every_path_at_the_root_and_the_ingress_path() {
    let world = World::start().await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    let listener = Listener::spawn(&["--base-path", "/exchangelistener"]).await;
    let post = async |path: &str, body: String| listener.post(path, body).await;

    let (code, answer) = post(
        "/exchangelistener/api/listeners/create",
        request(&world, "create"),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    eventually("the mailbox to stream", PATIENCE, async || {
        (world.ews.stats().open_streams > 0).then_some(())
    })
    .await;
    for path in [
        "/api/listeners/subscriptionsstate",
        "/exchangelistener/api/listeners/subscriptionsstate",
    ] {
        let (code, states) = post(path, request(&world, "subscriptionsstate")).await;
        assert_eq!(code, 200, "{states}");
        assert_eq!(
            states,
            json!({MAILBOX: {"State": "exists"},
                "6a1d0c44-0d4e-4a55-8a3c-0f1e2d3c4b5a": {"State": "notExists"}})
        );
    }
    for path in [
        "/api/listeners/exists",
        "/exchangelistener/api/listeners/exists",
        "/api/listeners/status",
    ] {
        let (code, body) = listener.get(path).await;
        assert_eq!(code, 200, "{path}");
        assert_eq!(body["ServiceStatus"], "Started", "{path}");
        assert_eq!(body["Version"], env!("CARGO_PKG_VERSION"), "{path}");
    }
    for path in [
        "/api/mailbox/validate",
        "/exchangelistener/api/mailbox/validate",
        "/api/listeners/validate",
    ] {
        let (code, answer) = post(path, request(&world, "validate")).await;
        assert_eq!(code, 200, "{path}: {answer}");
        assert_eq!(answer["IsValid"], true, "{path}: {answer}");
        let data: Value = serde_json::from_str(answer["Data"].as_str().unwrap()).unwrap();
        assert_eq!(data, json!({"MailboxName": ALICE}), "{path}");
    }
    for path in [
        "/api/availability/app",
        "/exchangelistener/api/availability/app",
    ] {
        assert_eq!(
            post(path, request(&world, "availability")).await,
            (200, json!("pong")),
            "{path}"
        );
    }
    // Creatio's minute loop sends the same mailbox again: nothing restarts.
    let subscribes_before = subscribes(&world);
    // Its `Context` differs from call to call (here `UserRequested`), which is no change.
    let again = request(&world, "create").replace("UserRequested:false", "UserRequested:true");
    for action in ["recreate", "update"] {
        let path = format!("/exchangelistener/api/listeners/{action}");
        assert_eq!(post(&path, again.clone()).await.0, 200);
    }

    // A mail with everything Creatio reads: thread, importance, an inline image, a file.
    world
        .ews
        .inject(
            ALICE,
            NewMail {
                from: "bob@example.com".into(),
                from_name: Some("Smith, Bob".into()),
                cc: vec!["carol@example.com".into()],
                subject: "Quarterly report".into(),
                body: "See the logo".into(),
                html: Some("<p>See <img src=\"cid:logo@contoso\"></p>".into()),
                message_id: Some("<r1@example.com>".into()),
                in_reply_to: Some("<r0@example.com>".into()),
                references: Some("<q@example.com> <r0@example.com>".into()),
                importance: Some("high".into()),
                attachments: vec![
                    Attachment {
                        name: "logo.png".into(),
                        content_type: "image/png".into(),
                        content_base64: "iVBORw0K".into(),
                        content_id: Some("logo@contoso".into()),
                    },
                    Attachment {
                        name: "report.pdf".into(),
                        content_type: "application/pdf".into(),
                        content_base64: "JVBERi0=".into(),
                        content_id: None,
                    },
                ],
                ..NewMail::default()
            },
        )
        .unwrap();
    let call = eventually("the mail at Creatio", PATIENCE, async || {
        world.creatio.calls_of("ProcessFullEmail").pop()
    })
    .await;
    assert_nothing_rejected(&world);
    assert_shaped_like_golden("ProcessFullEmail", &call.body);
    let info = &call.body["SubscriptionInfo"];
    assert_eq!(info["MailboxId"], MAILBOX);
    assert_eq!(info["WorkspaceName"], "Default");
    assert_eq!(info["TimeZoneId"], "FLE Standard Time");
    let email = &call.body["Emails"][0];
    assert_eq!(email["Sender"], "\"Smith, Bob\" <bob@example.com>");
    assert_eq!(email["Recepients"], json!([ALICE]));
    assert_eq!(email["CopyRecepients"], json!(["carol@example.com"]));
    assert_eq!(email["BlindCopyRecepients"], json!([]));
    assert_eq!(email["IsHtmlBody"], true);
    assert_eq!(email["Importance"], 2);
    assert_eq!(email["MessageId"], "<r1@example.com>");
    assert_eq!(email["InReplyTo"], "<r0@example.com>");
    assert_eq!(email["References"], "<q@example.com> <r0@example.com>");
    let headers: Vec<&str> = email["Headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        headers.contains(&"In-Reply-To=<r0@example.com>"),
        "{headers:?}"
    );
    assert!(headers.contains(&"Importance=high"), "{headers:?}");
    assert_eq!(
        email["Attachments"],
        json!([
            {"Id": "logo@contoso", "Name": "logo.png", "Base64Data": "iVBORw0K", "IsInline": true},
            {"Id": "", "Name": "report.pdf", "Base64Data": "JVBERi0=", "IsInline": false},
        ])
    );
    assert!(
        email["Body"]
            .as_str()
            .unwrap()
            .contains("<img src=\"cid:logo@contoso\">"),
        "the body's cid: link names the attachment's Id"
    );
    assert_eq!(
        subscribes(&world),
        subscribes_before,
        "a Recreate or Update with the same settings restarts nothing"
    );

    let (code, _) = post(
        "/exchangelistener/api/listeners/close",
        request(&world, "close"),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(listener.state_of(MAILBOX).await, "notExists");
}

#[tokio::test]
async fn new_email_state_and_token_callbacks_have_creatios_shape() {
    let world = World::start().await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    world
        .ews
        .create_mailbox("bob@contoso.example", "secret")
        .unwrap();
    let listener = Listener::spawn(&["--failed-retry-base-secs", "60"]).await;

    world.create(&listener, "mbx-new", ALICE, "NewEmail").await;
    let sent = world
        .ews
        .inject(
            ALICE,
            NewMail {
                from: "bob@example.com".into(),
                ..NewMail::default()
            },
        )
        .unwrap();
    let call = eventually("a NewEmail call", PATIENCE, async || {
        world.creatio.calls_of("NewEmail").pop()
    })
    .await;
    assert_shaped_like_golden("NewEmail", &call.body);
    assert_eq!(call.body["newEvent"]["uniqueIds"], json!([sent.item_id]));
    assert_eq!(call.body["newEvent"]["id"], "mbx-new");

    let mut wrong = world.credentials(
        "mbx-wrong",
        "bob@contoso.example",
        "wrong",
        "ProcessFullEmail",
    );
    wrong["Context"] = json!("{UserRequested:true,HasError:false}");
    let mut token = world.credentials("mbx-token", ALICE, "", "ProcessFullEmail");
    token["UseOAuth"] = json!(true);
    token["AccessToken"] = json!("expired-token");
    assert_eq!(listener.send("create", &json!([wrong, token])).await.0, 200);
    let state = eventually("a ProcessMailboxState call", PATIENCE, async || {
        world
            .creatio
            .calls_of("ProcessMailboxState")
            .into_iter()
            .find(|c| c.body["MailboxId"] == "mbx-wrong")
    })
    .await;
    assert_shaped_like_golden("ProcessMailboxState", &state.body);
    assert_eq!(state.body["MailboxId"], "mbx-wrong");
    assert_eq!(state.body["Avaliable"], false);
    assert_eq!(state.body["Context"], "{UserRequested:true,HasError:false}");
    let refresh = eventually("a RefreshToken call", PATIENCE, async || {
        world.creatio.calls_of("RefreshToken").pop()
    })
    .await;
    assert_shaped_like_golden("RefreshToken", &refresh.body);
    assert_eq!(refresh.body["MailboxId"], "mbx-token");
    assert_eq!(refresh.body["BpmUserWorkspace"], "Default");
    assert_nothing_rejected(&world);
}

#[tokio::test]
async fn an_availability_check_names_what_fails() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    let check = async |url: &str| {
        listener
            .post("/api/availability/app", json!(url).to_string())
            .await
    };
    assert_eq!(
        check(&world.creatio.url("ProcessFullEmail")).await,
        (200, json!("pong"))
    );
    let (code, answer) =
        check("http://127.0.0.1:1/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail")
            .await;
    assert_eq!(code, 200);
    let text = answer.as_str().unwrap();
    assert!(
        text.starts_with("Creatio is not reachable from the listener"),
        "{text}"
    );
    // Behind a gateway: Creatio's own refusal of a GET is Creatio reached; the gateway's
    // failure is not.
    let gateway = wiremock::MockServer::start().await;
    for (path, status) in [("/creatio", 405), ("/down", 502), ("/busy", 503)] {
        wiremock::Mock::given(wiremock::matchers::path(path))
            .respond_with(wiremock::ResponseTemplate::new(status))
            .mount(&gateway)
            .await;
    }
    let at = |path: &str| format!("{}{path}", gateway.uri());
    assert_eq!(check(&at("/creatio")).await, (200, json!("pong")));
    for (path, status) in [("/down", 502), ("/busy", 503)] {
        assert_eq!(
            check(&at(path)).await,
            (
                200,
                json!(format!(
                    "Creatio is not reachable from the listener: a gateway answered HTTP {status}"
                ))
            )
        );
    }
    let (code, answer) = check("http://169.254.169.254/latest").await;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("callback URL host 169.254.169.254 is a link-local address")
    );
    let (code, answer) = listener.post("/api/availability/app", "{}").await;
    assert_eq!(code, 400, "{answer}");

    let locked = Listener::spawn(&["--creatio-hosts", "crm.contoso.com"]).await;
    let (code, answer) = locked
        .post(
            "/api/availability/app",
            json!(world.creatio.url("ProcessFullEmail")).to_string(),
        )
        .await;
    assert_eq!(code, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("--creatio-hosts"),
        "{answer}"
    );
}

#[tokio::test]
async fn an_imap_mailbox_is_accepted_shown_and_served_over_imap_not_ews() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    // An IMAP server that is not there: nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut imap = world.credentials("mbx-imap", ALICE, "secret", "ProcessFullEmail");
    imap["ServerTypeId"] = json!(mock_creatio::calling::IMAP_SERVER_TYPE);
    imap["ServiceUrl"] = json!("127.0.0.1");
    imap["Port"] = json!(closed);
    imap["SecureOption"] = json!(0);
    assert_eq!(listener.send("create", &json!([imap])).await.0, 200);
    let view = eventually("the IMAP server tried", PATIENCE, async || {
        let (_, view) = listener.get("/api/listeners/mbx-imap").await;
        view["Status"]["LastError"]
            .as_str()
            .is_some_and(|e| e.contains("IMAP server unreachable"))
            .then_some(view)
    })
    .await;
    assert_eq!(view["ServerType"], "IMAP", "{view}");
    assert_eq!(subscribes(&world), 0, "never Exchange");

    let (_, answer) = listener
        .post(
            "/api/mailbox/validate",
            mock_creatio::calling::unquoted(&imap),
        )
        .await;
    assert_eq!(answer["IsValid"], false);
    assert_eq!(
        answer["Message"], "The IMAP server could not be reached at ServiceUrl and Port",
        "{answer}"
    );

    let mut unknown = imap.clone();
    unknown["ServerTypeId"] = json!("11111111-2222-3333-4444-555555555555");
    let (code, answer) = listener.send("create", &json!([unknown])).await;
    assert_eq!(code, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("ServerTypeId "),
        "{answer}"
    );
    assert_nothing_rejected(&world);
}

#[tokio::test]
async fn folders_are_listed_by_class_as_creatio_asks_for_them() {
    let world = World::start().await;
    world
        .ews
        .create_mailbox("alice@contoso.example", "secret")
        .unwrap();
    let listener = Listener::spawn(&[]).await;
    let ask = async |class: &str| {
        let body = request(&world, "folders").replace("{CLASS}", class);
        listener.post("/api/mailbox/folders", body).await
    };

    let (status, notes) = ask("IPF.Note").await;
    assert_eq!(status, 200, "{notes}");
    let notes = notes.as_array().unwrap().clone();
    let names: Vec<&str> = notes.iter().map(|f| f["Name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "Inbox",
            "Projects",
            "Sent Items",
            "Drafts",
            "Deleted Items",
            "Junk Email"
        ]
    );
    // A subfolder names its parent; a folder at the top names none. Ids are stable.
    assert_eq!(notes[0]["ParentId"], "");
    assert_eq!(notes[1]["ParentId"], notes[0]["Id"]);
    assert_eq!(ask("IPF.Note").await.1.as_array().unwrap(), &notes);

    let (status, calendars) = ask("IPF.Appointment").await;
    assert_eq!(status, 200);
    assert_eq!(
        calendars,
        json!([{"Id": calendars[0]["Id"], "Name": "Calendar", "ParentId": ""}])
    );

    // A login Exchange refuses is said as Validate says it, with a gateway's status.
    let body = request(&world, "folders")
        .replace("{CLASS}", "IPF.Note")
        .replace("Password:\"secret\"", "Password:\"wrong\"");
    let (status, refused) = listener.post("/api/mailbox/folders", body).await;
    assert_eq!(status, 502, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("Invalid credentials")
    );
}

#[tokio::test]
async fn mails_creatio_fetches_by_message_id_are_posted_and_the_missing_skipped() {
    let world = World::start().await;
    world
        .ews
        .create_mailbox("alice@contoso.example", "secret")
        .unwrap();
    let wanted = world
        .ews
        .inject(
            "alice@contoso.example",
            NewMail {
                from: "bob@example.com".into(),
                message_id: Some("<wanted@example.com>".into()),
                subject: "Asked for again".into(),
                ..NewMail::default()
            },
        )
        .unwrap();
    world
        .ews
        .inject(
            "alice@contoso.example",
            NewMail {
                from: "carol@example.com".into(),
                subject: "Not asked for".into(),
                ..NewMail::default()
            },
        )
        .unwrap();
    let listener = Listener::spawn(&[]).await;
    // The mailbox need not be subscribed; the body is ordinary JSON, as Creatio writes it.
    let credentials = world.credentials(
        MAILBOX,
        "alice@contoso.example",
        "secret",
        "ProcessFullEmail",
    );
    let body = json!({
        "Credentials": credentials,
        "Filters": format!("{};<nowhere@example.com>", wanted.message_id),
    });
    let (status, answer) = listener.post("/api/email/fetch", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");

    eventually("the fetched mail at Creatio", PATIENCE, async || {
        (!world.creatio.calls_of("ProcessFullEmail").is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let posted = common::posted_emails(&world, None);
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0]["MessageId"], "<wanted@example.com>");
    assert_eq!(posted[0]["Subject"], "Asked for again");
    assert_nothing_rejected(&world);

    // Nothing to fetch is a bad request naming the field.
    let body = json!({ "Credentials": world.credentials(MAILBOX, "alice@contoso.example", "secret", "ProcessFullEmail"), "Filters": " ; " });
    let (status, answer) = listener.post("/api/email/fetch", body.to_string()).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("Filters"),
        "{answer}"
    );
}

/// Creatio's send body for Alice's offer, with a PDF of `pdf_bytes`.
fn send_request(world: &World, message: &str, password: &str, pdf_bytes: usize) -> String {
    let pdf = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        vec![b'%'; pdf_bytes],
    );
    request(world, "send")
        .replace("{MESSAGE}", message)
        .replace("{PASSWORD}", password)
        .replace("{PDF}", &pdf)
}

#[tokio::test]
async fn a_mail_creatio_sends_reaches_its_recipient_once_and_a_retry_sends_nothing() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    // Bob's mailbox is served here too: what Alice sends reaches Creatio through it.
    world
        .subscribe(&listener, "b0b", "bob@contoso.example", "ProcessFullEmail")
        .await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    for path in ["/apiv2/email/send", "/api/email/send"] {
        let message = if path.starts_with("/apiv2") {
            "offer-2"
        } else {
            "offer-1"
        };
        let body = send_request(&world, message, "secret", 4096);
        let (status, answer) = listener.post(path, body.clone()).await;
        assert_eq!(
            (status, answer),
            (200, Value::String(String::new())),
            "{path}"
        );
        // Creatio retries (a timeout on its side): sent once all the same.
        let (status, answer) = listener.post(path, body).await;
        assert_eq!(
            (status, answer),
            (200, Value::String(String::new())),
            "{path}"
        );
    }
    let sent = world.ews.outgoing(ALICE).unwrap();
    let ids: Vec<&str> = sent.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "<offer-2@creatio.contoso.example>",
            "<offer-1@creatio.contoso.example>"
        ]
    );
    eventually(
        "both mails at Creatio through Bob's mailbox",
        PATIENCE,
        async || {
            let got = common::delivered(&world);
            (got.len() >= 2).then_some(got)
        },
    )
    .await;
    let emails = common::posted_emails(&world, None);
    assert_eq!(emails.len(), 2, "{emails:#?}");
    let offer = emails
        .iter()
        .find(|e| e["MessageId"] == "<offer-1@creatio.contoso.example>")
        .unwrap();
    assert_eq!(offer["Subject"], "Offer for Q3");
    assert_eq!(offer["InReplyTo"], "<question-7@contoso.example>");
    assert_eq!(offer["Importance"], 2);
    assert!(offer["IsHtmlBody"].as_bool().unwrap());
    let files: Vec<(&str, bool)> = offer["Attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["Name"].as_str().unwrap(),
                a["IsInline"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(files, [("logo.png", true), ("offer.pdf", false)]);
    assert!(offer["Sender"].as_str().unwrap().contains(ALICE), "{offer}");
    assert_nothing_rejected(&world);
    let (_, metrics) = listener.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"exchange_listener_sends_total{outcome="already_sent"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_mail_that_cannot_go_says_why_in_words_creatio_shows() {
    let world = World::start().await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    world.ews.set_settings(mock_ews::Settings {
        max_message_bytes: Some(64 * 1024),
        ..Default::default()
    });
    let listener = Listener::spawn(&[]).await;
    let send = async |message: &str, password: &str, pdf: usize| {
        let (status, answer) = listener
            .post(
                "/apiv2/email/send",
                send_request(&world, message, password, pdf),
            )
            .await;
        assert_eq!(status, 200);
        answer.as_str().unwrap().to_owned()
    };
    let too_large = send("big", "secret", 128 * 1024).await;
    assert!(
        too_large.contains("ErrorMessageSizeExceeded"),
        "{too_large}"
    );
    let denied = send("denied", "wrong-password", 10).await;
    assert!(denied.contains("user name or password"), "{denied}");
    assert!(!denied.contains("wrong-password"));
    // A failed send is not remembered: once the limit allows it, the retry goes out.
    world.ews.set_settings(mock_ews::Settings::default());
    assert_eq!(send("big", "secret", 128 * 1024).await, "");
    assert_eq!(world.ews.outgoing(ALICE).unwrap().len(), 1);
    // A body that breaks the contract is a 400 naming the field.
    let no_recipients = send_request(&world, "none", "secret", 10).replace(
        r#""Recepients":["Bob <bob@contoso.example>"],"CopyRecepients":["carol@partner.example"]"#,
        r#""Recepients":[],"CopyRecepients":null"#,
    );
    let (status, answer) = listener.post("/apiv2/email/send", no_recipients).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("Recepients"),
        "{answer}"
    );
    assert!(
        listener
            .logs()
            .iter()
            .all(|l| !l.contains("wrong-password"))
    );
}

/// Mail filed into a mailbox's folder by name (`None`: the inbox); answers its Message-ID.
fn file_mail(world: &World, mailbox: &str, subject: &str, folder: Option<&str>) -> String {
    world
        .ews
        .inject(
            mailbox,
            NewMail {
                from: "carol@example.com".into(),
                subject: subject.into(),
                folder: folder.map(str::to_owned),
                ..NewMail::default()
            },
        )
        .unwrap()
        .message_id
}

#[tokio::test]
async fn every_mail_folder_is_watched_unless_creatio_chooses_some() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    // Alice: FolderIds empty, every mail folder (her own sent mail too; not junk).
    world
        .subscribe(&listener, MAILBOX, ALICE, "ProcessFullEmail")
        .await;
    // Bob: the one folder he chose from the list Creatio showed him.
    world
        .ews
        .create_mailbox("bob@contoso.example", "secret")
        .unwrap();
    let mut bob = world.credentials("b0b", "bob@contoso.example", "secret", "ProcessFullEmail");
    bob["FolderClassName"] = json!("IPF.Note");
    let (_, folders) = listener.post("/api/mailbox/folders", bob.to_string()).await;
    let projects = folders
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["Name"] == "Projects")
        .unwrap()["Id"]
        .clone();
    bob["FolderIds"] = json!([projects]);
    let streams = world.ews.stats().open_streams;
    assert_eq!(listener.send("create", &json!([bob])).await.0, 200);
    eventually("Bob's mailbox to stream", PATIENCE, async || {
        (world.ews.stats().open_streams > streams).then_some(())
    })
    .await;

    let filed = file_mail(&world, ALICE, "filed", Some("Projects"));
    let junk = file_mail(&world, ALICE, "junk", Some("Junk Email"));
    let bobs_inbox = file_mail(&world, "bob@contoso.example", "not chosen", None);
    let bobs_projects = file_mail(&world, "bob@contoso.example", "chosen", Some("Projects"));
    let (status, answer) = listener
        .post(
            "/apiv2/email/send",
            send_request(&world, "alice-sent", "secret", 10),
        )
        .await;
    assert_eq!((status, answer), (200, Value::String(String::new())));
    let sent = "<alice-sent@creatio.contoso.example>".to_owned();
    common::assert_each_delivered_once(
        &world,
        ALICE,
        &[filed, sent.clone(), bobs_projects.clone()],
    )
    .await;
    let got = common::delivered(&world);
    assert!(!got.contains(&junk), "junk mail is not watched");
    assert!(!got.contains(&bobs_inbox), "Bob did not choose his inbox");
    // Alice's copy of what she sent came through her mailbox.
    let alices = common::message_ids(&common::posted_emails(&world, Some(MAILBOX)));
    assert!(alices.contains(&sent), "{alices:?}");
    assert_nothing_rejected(&world);
}

/// .NET ticks, UTC, of a time in seconds since the Unix epoch.
fn ticks(unix: i64) -> String {
    (unix * 10_000_000 + 621_355_968_000_000_000).to_string()
}

#[tokio::test]
async fn a_history_load_posts_every_mail_since_its_date_once_oldest_first() {
    let world = World::start().await;
    world.ews.create_mailbox(ALICE, "secret").unwrap();
    let now = mock_ews::clock::now_unix();
    // 150 mails over the last days, and one older than the load.
    let mut sent = Vec::new();
    for n in 0..=150i64 {
        let mail = world
            .ews
            .inject(
                ALICE,
                NewMail {
                    from: "bob@example.com".into(),
                    subject: format!("old {n}"),
                    received_unix: Some(now - 86_400 * 3 + n * 60 - 60),
                    ..NewMail::default()
                },
            )
            .unwrap();
        sent.push(mail.message_id);
    }
    let before_the_load = sent.remove(0);
    let listener = Listener::spawn(&[]).await;
    world
        .create(&listener, MAILBOX, ALICE, "ProcessFullEmail")
        .await;
    // What was in the mailbox at the Create is not new mail.
    assert!(common::delivered(&world).is_empty());

    let credentials = world.credentials(MAILBOX, ALICE, "secret", "ProcessFullEmail");
    let body = json!({ "Credentials": credentials, "Filters": ticks(now - 86_400 * 3) });
    let (status, answer) = listener
        .post("/api/email/synchronize", body.to_string())
        .await;
    assert_eq!(status, 200, "{answer}");
    eventually("the history at Creatio", PATIENCE, async || {
        (common::delivered(&world).len() >= sent.len()).then_some(())
    })
    .await;
    common::assert_each_delivered_once(&world, ALICE, &sent).await;
    let got = common::delivered(&world);
    assert_eq!(&got[..sent.len()], &sent[..], "oldest first");
    assert!(!got.contains(&before_the_load));
    assert_nothing_rejected(&world);
    let (_, view) = listener.get(&format!("/api/listeners/{MAILBOX}")).await;
    assert_eq!(view["History"], Value::Null, "done: {view}");
    let (_, metrics) = listener.get_text("/metrics").await;
    assert!(
        metrics.contains("exchange_listener_history_mails_total 150"),
        "{metrics}"
    );

    // Creatio's failover asks again from a later moment: nothing is posted twice.
    let again = json!({ "Credentials": credentials, "Filters": ticks(now - 86_400) });
    let (status, _) = listener
        .post("/api/email/synchronize", again.to_string())
        .await;
    assert_eq!(status, 200);
    common::assert_each_delivered_once(&world, ALICE, &sent).await;
}

#[tokio::test]
async fn a_history_load_creatio_cannot_have_is_refused_plainly() {
    let world = World::start().await;
    let listener = Listener::spawn(&[]).await;
    let credentials = world.credentials(MAILBOX, ALICE, "secret", "ProcessFullEmail");
    let ask = async |credentials: &Value, filters: &str| {
        let body = json!({ "Credentials": credentials, "Filters": filters });
        listener
            .post("/api/email/synchronize", body.to_string())
            .await
    };
    let (status, answer) = ask(&credentials, &ticks(1_700_000_000)).await;
    assert_eq!(status, 409, "not open: {answer}");
    let (status, answer) = ask(&credentials, "UNDELETED SINCE 01-Dec-2026").await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("Filters"),
        "{answer}"
    );
    let mut imap = credentials.clone();
    imap["ServerTypeId"] = json!("844F0837-EAA0-4F40-B965-71F5DB9EAE6E");
    // An IMAP filter with a date is a load from that day; without one it is not served yet;
    // a key Creatio does not write is refused, never passed to the server.
    let (status, answer) = ask(&imap, "UNDRAFT UNDELETED SENTSINCE 01-Dec-2026").await;
    assert_eq!(status, 409, "a load, of a mailbox not open: {answer}");
    let (status, answer) = ask(&imap, "UID 42:*").await;
    assert_eq!(status, 501, "{answer}");
    let (status, answer) = ask(&imap, "UNDELETED OR FROM a b").await;
    assert_eq!(status, 400, "{answer}");
}
