//! mock-ews on the wire: what strict EWS clients rely on, checked on raw HTTP.

use std::time::Duration;

use mock_ews::request_envelope as envelope;
use mock_ews::{Config, MockEws, NewMail};

async fn start() -> MockEws {
    let config = Config {
        keepalive: Duration::from_millis(200),
        max_connection_time: Some(Duration::from_secs(1)),
    };
    let ews = MockEws::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    ews.create_mailbox("alice@contoso.example", "secret")
        .unwrap();
    ews
}

async fn post(ews: &MockEws, password: &str, body: String) -> reqwest::Response {
    reqwest::Client::new()
        .post(ews.ews_url())
        .basic_auth("alice@contoso.example", Some(password))
        .header("Content-Type", "text/xml; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap()
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
    let from = s.find(start).unwrap() + start.len();
    &s[from..from + s[from..].find(end).unwrap()]
}

#[tokio::test]
async fn bad_credentials_get_401_before_the_body_is_read() {
    // IIS authenticates first: a malformed envelope with a wrong password is a 401, not a
    // SOAP fault that would tell an unauthenticated caller about the server.
    let ews = start().await;
    let resp = post(&ews, "wrong", "<not-an-envelope".into()).await;
    assert_eq!(resp.status().as_u16(), 401);
    let resp = post(&ews, "secret", "<not-an-envelope".into()).await;
    assert_eq!(resp.status().as_u16(), 500);
}

#[tokio::test]
async fn wrong_password_gets_401_with_basic_challenge() {
    let ews = start().await;
    let resp = post(
        &ews,
        "wrong",
        envelope("<m:Unsubscribe><m:SubscriptionId>x</m:SubscriptionId></m:Unsubscribe>"),
    )
    .await;
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic ")
    );
    assert_eq!(ews.stats().unauthorized, 1);
    assert_eq!(ews.stats().responses["Unsubscribe"][&401], 1);
}

#[tokio::test]
async fn stream_follows_the_strict_client_rules() {
    let ews = start().await;
    let resp = post(&ews, "secret", envelope(concat!(
        r#"<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/></t:FolderIds>"#,
        "<t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"
    ))).await;
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with("X-BackEndOverrideCookie=")
            && !cookie.to_ascii_lowercase().contains("secure")
    );
    let sub = between(
        &resp.text().await.unwrap(),
        "<m:SubscriptionId>",
        "</m:SubscriptionId>",
    )
    .to_owned();

    // Events queue while no stream is open.
    ews.inject(
        "alice@contoso.example",
        NewMail {
            from: "bob@example.com".into(),
            subject: "queued".into(),
            ..NewMail::default()
        },
    )
    .unwrap();

    let body = post(&ews, "secret", envelope(&format!(
        "<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{sub}</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>"
    ))).await.text().await.unwrap();
    // The server capped the connection at one second and ended it with Closed.
    assert!(
        body.starts_with(r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope "#),
        "{body}"
    );
    assert_eq!(body.matches("<?xml").count(), 1);
    let envelopes: Vec<&str> = body.split("<s:Envelope ").skip(1).collect();
    assert!(envelopes.len() >= 3, "{body}");
    for env in &envelopes {
        assert!(env.contains("<s:Header><h:ServerVersionInfo "), "{env}");
        assert!(
            !(env.contains("<m:Notifications>") && env.contains("<m:ConnectionStatus>")),
            "{env}"
        );
    }
    assert!(envelopes[0].contains("<m:ConnectionStatus>OK</m:ConnectionStatus>"));
    assert!(
        envelopes[1].contains("<t:NewMailEvent><t:TimeStamp>"),
        "{}",
        envelopes[1]
    );
    assert!(
        !envelopes[1].contains("CreatedEvent"),
        "only subscribed event types are sent"
    );
    assert!(
        envelopes
            .last()
            .unwrap()
            .contains("<m:ConnectionStatus>Closed</m:ConnectionStatus>")
    );

    // The subscription outlives its connection; Unsubscribe ends it.
    assert_eq!(ews.stats().live_subscriptions, 1);
    let unsub = envelope(&format!(
        "<m:Unsubscribe><m:SubscriptionId>{sub}</m:SubscriptionId></m:Unsubscribe>"
    ));
    assert!(
        post(&ews, "secret", unsub.clone())
            .await
            .text()
            .await
            .unwrap()
            .contains("NoError")
    );
    assert!(
        post(&ews, "secret", unsub)
            .await
            .text()
            .await
            .unwrap()
            .contains("ErrorSubscriptionNotFound")
    );
    assert_eq!(ews.stats().live_subscriptions, 0);
}

#[tokio::test]
async fn get_item_returns_asked_properties_mime_and_per_id_errors() {
    let ews = start().await;
    let sent = ews
        .inject(
            "alice@contoso.example",
            NewMail {
                from: "bob@example.com".into(),
                subject: "a < b & c".into(),
                body: "hello".into(),
                message_id: Some("<fixed@example.com>".into()),
                ..NewMail::default()
            },
        )
        .unwrap();
    let body = post(&ews, "secret", envelope(&format!(
        r#"<m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape><t:IncludeMimeContent>true</t:IncludeMimeContent><t:AdditionalProperties><t:FieldURI FieldURI="item:Subject"/><t:FieldURI FieldURI="message:InternetMessageId"/></t:AdditionalProperties></m:ItemShape><m:ItemIds><t:ItemId Id="{}"/><t:ItemId Id="missing"/></m:ItemIds></m:GetItem>"#,
        sent.item_id
    ))).await.text().await.unwrap();
    assert!(
        body.contains("<t:Subject>a &lt; b &amp; c</t:Subject>"),
        "{body}"
    );
    assert!(body.contains("<t:InternetMessageId>&lt;fixed@example.com&gt;</t:InternetMessageId>"));
    use base64::Engine as _;
    let mime = base64::engine::general_purpose::STANDARD
        .decode(between(
            &body,
            r#"<t:MimeContent CharacterSet="UTF-8">"#,
            "</t:MimeContent>",
        ))
        .unwrap();
    let mime = String::from_utf8(mime).unwrap();
    assert!(
        mime.contains("\r\nMessage-ID: <fixed@example.com>\r\n")
            && mime.ends_with("\r\n\r\nhello\r\n"),
        "{mime}"
    );
    let second = body.split("<m:GetItemResponseMessage ").nth(2).unwrap();
    assert!(
        second.starts_with(r#"ResponseClass="Error"><m:MessageText>"#),
        "{second}"
    );
    assert!(second.contains("<m:ResponseCode>ErrorItemNotFound</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"));
}

#[tokio::test]
async fn sync_folder_items_pages_through_the_change_log() {
    let ews = start().await;
    let ids: Vec<String> = (0..3)
        .map(|n| {
            ews.inject(
                "alice@contoso.example",
                NewMail {
                    from: "bob@example.com".into(),
                    subject: format!("m{n}"),
                    ..NewMail::default()
                },
            )
            .unwrap()
            .item_id
        })
        .collect();
    let sync = |state: Option<&str>| {
        let state = state
            .map(|s| format!("<m:SyncState>{s}</m:SyncState>"))
            .unwrap_or_default();
        envelope(&format!(
            r#"<m:SyncFolderItems><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:SyncFolderId><t:DistinguishedFolderId Id="inbox"/></m:SyncFolderId>{state}<m:MaxChangesReturned>2</m:MaxChangesReturned></m:SyncFolderItems>"#
        ))
    };
    let first = post(&ews, "secret", sync(None)).await.text().await.unwrap();
    assert!(
        first.contains("<m:IncludesLastItemInRange>false</m:IncludesLastItemInRange>"),
        "{first}"
    );
    assert!(first.contains(&format!(
        r#"<t:Create><t:Message><t:ItemId Id="{}""#,
        ids[0]
    )));
    assert!(first.contains(&ids[1]) && !first.contains(&ids[2]));
    let state = between(&first, "<m:SyncState>", "</m:SyncState>").to_owned();

    let second = post(&ews, "secret", sync(Some(&state)))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        second.contains("<m:IncludesLastItemInRange>true</m:IncludesLastItemInRange>"),
        "{second}"
    );
    assert!(second.contains(&ids[2]) && !second.contains(&ids[0]));

    let bad = post(&ews, "secret", sync(Some("Ym9ndXM=")))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        bad.contains("<m:ResponseCode>ErrorInvalidSyncStateData</m:ResponseCode>"),
        "{bad}"
    );

    // The invalid_sync_state fault rejects the next valid state once; a first sync is spared.
    ews.inject_fault(mock_ews::Fault::once(mock_ews::FaultKind::InvalidSyncState))
        .unwrap();
    let fresh = post(&ews, "secret", sync(None)).await.text().await.unwrap();
    assert!(fresh.contains("NoError"), "{fresh}");
    let rejected = post(&ews, "secret", sync(Some(&state)))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        rejected.contains("<m:ResponseCode>ErrorInvalidSyncStateData</m:ResponseCode>"),
        "{rejected}"
    );
    let again = post(&ews, "secret", sync(Some(&state)))
        .await
        .text()
        .await
        .unwrap();
    assert!(again.contains("NoError"), "{again}");
}

#[tokio::test]
async fn generated_traffic_is_reproducible_and_bounded() {
    let ews = start().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", ews.addr());
    let batch: Vec<serde_json::Value> = http
        .post(format!(
            "{base}/_control/mailboxes/alice@contoso.example/messages/batch"
        ))
        .json(&serde_json::json!({"count": 3, "seed": 42}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<_> = batch
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        [
            "<seed-42-0@mock-ews.invalid>",
            "<seed-42-1@mock-ews.invalid>",
            "<seed-42-2@mock-ews.invalid>"
        ]
    );
    let sent = ews.sent("alice@contoso.example").unwrap();
    assert_eq!(sent[1].subject, mock_ews::generated(42, 1).subject);

    let resp = http
        .post(format!("{base}/_control/rate"))
        .json(&serde_json::json!({"per_second": 50.0, "duration_ms": 200, "seed": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let expected = resp.json::<serde_json::Value>().await.unwrap()["expected"]
        .as_u64()
        .unwrap();
    assert_eq!(expected, 10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ews.sent("alice@contoso.example").unwrap().len() < 3 + 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rate did not deliver its 10 mails"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bad = http
        .post(format!("{base}/_control/rate"))
        .json(&serde_json::json!({"per_second": 0.0, "duration_ms": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn a_silenced_stream_says_nothing_after_its_first_envelope() {
    let ews = start().await;
    let resp = post(&ews, "secret", envelope(concat!(
        r#"<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/></t:FolderIds>"#,
        "<t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"
    ))).await;
    let sub = between(
        &resp.text().await.unwrap(),
        "<m:SubscriptionId>",
        "</m:SubscriptionId>",
    )
    .to_owned();
    let silence =
        mock_ews::Fault::once(mock_ews::FaultKind::Silence).lasting(Duration::from_secs(5));
    ews.inject_fault(silence).unwrap();
    ews.inject(
        "alice@contoso.example",
        NewMail {
            from: "bob@example.com".into(),
            ..NewMail::default()
        },
    )
    .unwrap();
    // Keep-alives every 200 ms and a one-second connection: none of it may show.
    let body = post(&ews, "secret", envelope(&format!(
        "<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{sub}</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>"
    ))).await.text().await.unwrap();
    assert_eq!(body.matches("<s:Envelope ").count(), 1, "{body}");
    assert!(body.contains("<m:ConnectionStatus>OK</m:ConnectionStatus>"));
    assert!(
        !body.contains("Closed") && !body.contains("NewMailEvent"),
        "{body}"
    );
    assert_eq!(
        ews.stats().events_delivered,
        0,
        "the mail waits on the subscription"
    );
}

#[tokio::test]
async fn an_older_server_refuses_newer_request_versions_and_names_its_own() {
    let ews = start().await;
    let settings_url = ews
        .ews_url()
        .replace("/EWS/Exchange.asmx", "/_control/settings");
    let put =
        |body: serde_json::Value| reqwest::Client::new().put(&settings_url).json(&body).send();
    assert_eq!(
        put(serde_json::json!({ "server_version": "Exchange2003" }))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        put(serde_json::json!({ "server_version": "Exchange2010_SP2" }))
            .await
            .unwrap()
            .status(),
        204
    );
    let get_folder = envelope(
        r#"<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape><m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds></m:GetFolder>"#,
    );

    let resp = post(&ews, "secret", get_folder.clone()).await;
    assert_eq!(resp.status(), 500);
    let text = resp.text().await.unwrap();
    assert!(text.contains("ErrorInvalidServerVersion"), "{text}");
    assert_eq!(between(&text, "MajorVersion=\"", "\""), "14");
    assert_eq!(between(&text, " Version=\"", "\""), "Exchange2010_SP2");

    let older = get_folder.replace("Exchange2013_SP1", "Exchange2010_SP2");
    let resp = post(&ews, "secret", older).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("GetFolderResponse"), "{text}");
    assert_eq!(between(&text, "MinorVersion=\"", "\""), "2");
}

#[tokio::test]
async fn only_an_account_with_the_impersonation_role_acts_as_another_mailbox() {
    let ews = start().await;
    ews.create_mailbox("bob@contoso.example", "bobs").unwrap();
    let as_bob = |body: &str| {
        envelope(body).replace(
            "</soap:Header>",
            "<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>bob@contoso.example</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></soap:Header>",
        )
    };
    let get_folder = as_bob(
        r#"<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape><m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds></m:GetFolder>"#,
    );
    let resp = post(&ews, "secret", get_folder.clone()).await;
    assert_eq!(resp.status(), 500);
    let text = resp.text().await.unwrap();
    assert!(text.contains("ErrorImpersonateUserDenied"), "{text}");

    ews.set_settings(mock_ews::Settings {
        impersonators: vec!["alice@contoso.example".into()],
        ..mock_ews::Settings::default()
    });
    let resp = post(&ews, "secret", get_folder).await;
    assert_eq!(resp.status(), 200);
    let log = ews.request_log();
    assert_eq!(
        log.last().map(|r| r.mailbox.as_str()),
        Some("bob@contoso.example"),
        "the request acted as bob"
    );
}

/// A request with Basic auth and extra headers.
async fn post_as(
    ews: &MockEws,
    (user, password): (&str, &str),
    headers: &[(&str, &str)],
    body: String,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(ews.ews_url())
        .basic_auth(user, Some(password))
        .header("Content-Type", "text/xml; charset=utf-8");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(body).send().await.unwrap()
}

fn impersonating(who: &str, body: &str) -> String {
    envelope(body).replace(
        "</soap:Header>",
        &format!("<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{who}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></soap:Header>"),
    )
}

fn get_streaming_events(ids: &[&str]) -> String {
    let ids: String = ids
        .iter()
        .map(|id| format!("<t:SubscriptionId>{id}</t:SubscriptionId>"))
        .collect();
    format!(
        "<m:GetStreamingEvents><m:SubscriptionIds>{ids}</m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>"
    )
}

#[tokio::test]
async fn a_service_account_streams_one_servers_subscriptions_together_as_their_anchor() {
    const SERVICE: (&str, &str) = ("alice@contoso.example", "secret");
    let ews = start().await;
    ews.set_settings(mock_ews::Settings {
        impersonators: vec![SERVICE.0.into()],
        backends: Some(2),
        max_streams_per_user: Some(1),
        ..mock_ews::Settings::default()
    });
    let users: Vec<String> = (0..12).map(|i| format!("u{i}@contoso.example")).collect();
    for u in &users {
        ews.create_mailbox(u, "own").unwrap();
    }
    let first = ews.backend_of(&users[0]);
    let same: Vec<&String> = users
        .iter()
        .filter(|u| ews.backend_of(u) == first)
        .collect();
    let other = users
        .iter()
        .find(|u| ews.backend_of(u) != first)
        .expect("twelve mailboxes over two servers");
    let (a, b) = (same[0].as_str(), same[1].as_str());

    // The service account subscribes each mailbox as that mailbox; the cookie names its server.
    let mut subs = Vec::new();
    for who in [a, b, other.as_str()] {
        let resp = post_as(&ews, SERVICE, &[("X-AnchorMailbox", who)], impersonating(who, concat!(
            r#"<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/></t:FolderIds>"#,
            "<t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"
        ))).await;
        let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(
            cookie.starts_with(&format!("X-BackEndOverrideCookie={}~", ews.backend_of(who))),
            "{cookie}"
        );
        let text = resp.text().await.unwrap();
        subs.push(between(&text, "<m:SubscriptionId>", "</m:SubscriptionId>").to_owned());
    }
    for who in [a, b] {
        let mail = NewMail {
            from: "carol@example.com".into(),
            ..NewMail::default()
        };
        ews.inject(who, mail).unwrap();
    }

    // One stream, acting as the anchor, carries both mailboxes of the server.
    let cookie = format!("X-BackEndOverrideCookie={first}~1");
    let affinity = [("X-AnchorMailbox", a), ("Cookie", cookie.as_str())];
    let both = [subs[0].as_str(), subs[1].as_str()];
    let held = post_as(
        &ews,
        SERVICE,
        &affinity,
        impersonating(a, &get_streaming_events(&both)),
    )
    .await;
    assert_eq!(held.status(), 200);

    // The connection counts against the anchor's limit, not the service account's.
    let again = post_as(
        &ews,
        SERVICE,
        &affinity,
        impersonating(a, &get_streaming_events(&both[..1])),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(again.contains("ErrorExceededConnectionCount"), "{again}");
    let other_anchor = post_as(
        &ews,
        SERVICE,
        &[("X-AnchorMailbox", b), ("Cookie", cookie.as_str())],
        impersonating(b, &get_streaming_events(&both[1..])),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(
        !other_anchor.contains("ErrorExceededConnectionCount"),
        "{other_anchor}"
    );

    let body = held.text().await.unwrap();
    for sub in both {
        let note = format!("<t:SubscriptionId>{sub}</t:SubscriptionId><t:NewMailEvent>");
        assert!(body.contains(&note), "{sub} streamed: {body}");
    }

    // A subscription living on the other server is not found there.
    let wrong = post_as(
        &ews,
        SERVICE,
        &affinity,
        impersonating(a, &get_streaming_events(&[&subs[0], &subs[2]])),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(wrong.contains("ErrorSubscriptionNotFound"), "{wrong}");
    assert_eq!(
        between(
            &wrong,
            "<m:ErrorSubscriptionIds>",
            "</m:ErrorSubscriptionIds>"
        ),
        format!("<m:SubscriptionId>{}</m:SubscriptionId>", subs[2])
    );

    // The subscriptions belong to the account that made them.
    let own = post_as(
        &ews,
        (b, "own"),
        &[],
        envelope(&get_streaming_events(&both[1..])),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(own.contains("ErrorSubscriptionAccessDenied"), "{own}");
}

#[tokio::test]
async fn find_folder_lists_the_tree_deep_or_shallow_a_page_at_a_time() {
    let ews = start().await;
    let find = |traversal: &str, parent: &str, offset: usize, max: usize| {
        envelope(&format!(
            concat!(
                r#"<m:FindFolder Traversal="{}"><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>"#,
                r#"<m:IndexedPageFolderView MaxEntriesReturned="{}" Offset="{}" BasePoint="Beginning"/>"#,
                r#"<m:ParentFolderIds><t:DistinguishedFolderId Id="{}"/></m:ParentFolderIds></m:FindFolder>"#
            ),
            traversal, max, offset, parent
        ))
    };
    let names = |body: &str| -> Vec<String> {
        body.split("<t:DisplayName>")
            .skip(1)
            .map(|s| s[..s.find('<').unwrap()].to_owned())
            .collect()
    };
    let deep = post(&ews, "secret", find("Deep", "msgfolderroot", 0, 1000))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(names(&deep).len(), 9, "{deep}");
    assert!(deep.contains(r#"IncludesLastItemInRange="true""#));
    assert!(deep.contains("<t:CalendarFolder>"));
    let shallow = post(&ews, "secret", find("Shallow", "msgfolderroot", 0, 1000))
        .await
        .text()
        .await
        .unwrap();
    assert!(!names(&shallow).contains(&"Projects".to_owned()));
    assert_eq!(names(&shallow).len(), 8);
    let below_inbox = post(&ews, "secret", find("Deep", "inbox", 0, 1000))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(names(&below_inbox), ["Projects"]);
    // Pages: four, then the rest from where the first said to go on.
    let first = post(&ews, "secret", find("Deep", "msgfolderroot", 0, 4))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(names(&first).len(), 4);
    assert!(first.contains(r#"IndexedPagingOffset="4""#));
    assert!(first.contains(r#"IncludesLastItemInRange="false""#));
    let rest = post(&ews, "secret", find("Deep", "msgfolderroot", 4, 1000))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!([names(&first), names(&rest)].concat(), names(&deep));
}

fn create_item(disposition: &str, message: &str) -> String {
    envelope(&format!(
        concat!(
            r#"<m:CreateItem MessageDisposition="{}"><m:SavedItemFolderId><t:DistinguishedFolderId Id="sentitems"/></m:SavedItemFolderId>"#,
            "<m:Items><t:Message>{}</t:Message></m:Items></m:CreateItem>"
        ),
        disposition, message
    ))
}

#[tokio::test]
async fn create_item_sends_to_local_recipients_and_keeps_a_copy() {
    let ews = start().await;
    ews.create_mailbox("bob@contoso.example", "pw").unwrap();
    let message = concat!(
        r#"<t:Subject>Plan</t:Subject><t:Body BodyType="HTML">&lt;p&gt;see &lt;img src="cid:logo"&gt;&lt;/p&gt;</t:Body>"#,
        "<t:Attachments><t:FileAttachment><t:Name>logo.png</t:Name><t:ContentType>image/png</t:ContentType>",
        "<t:ContentId>logo</t:ContentId><t:IsInline>true</t:IsInline><t:Content>iVBORw0KGgo=</t:Content></t:FileAttachment></t:Attachments>",
        "<t:Importance>High</t:Importance><t:InReplyTo>&lt;prev@contoso.example&gt;</t:InReplyTo>",
        "<t:ToRecipients><t:Mailbox><t:Name>Bob</t:Name><t:EmailAddress>bob@contoso.example</t:EmailAddress></t:Mailbox>",
        "<t:Mailbox><t:EmailAddress>far@elsewhere.example</t:EmailAddress></t:Mailbox></t:ToRecipients>",
        "<t:InternetMessageId>&lt;plan-1@creatio.example&gt;</t:InternetMessageId>",
        "<t:References>&lt;prev@contoso.example&gt;</t:References>",
    );
    let resp = post(&ews, "secret", create_item("SendAndSaveCopy", message)).await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.contains(r#"ResponseClass="Success""#), "{body}");
    // Bob, who lives here, received it with the sender's Message-ID and thread.
    let inbox = ews.sent("bob@contoso.example").unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].message_id, "<plan-1@creatio.example>");
    assert_eq!(inbox[0].from, "alice@contoso.example");
    let mime = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &inbox[0].mime_base64,
        )
        .unwrap(),
    )
    .unwrap();
    for line in [
        "In-Reply-To: <prev@contoso.example>",
        "Importance: high",
        "Content-ID: <logo>",
        "Subject: Plan",
    ] {
        assert!(mime.contains(line), "{line} missing from\n{mime}");
    }
    // The sender keeps a copy, found by its Message-ID in Sent Items.
    assert_eq!(ews.outgoing("alice@contoso.example").unwrap().len(), 1);
    let find = envelope(concat!(
        r#"<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape>"#,
        r#"<m:IndexedPageItemView MaxEntriesReturned="10" Offset="0" BasePoint="Beginning"/>"#,
        r#"<m:Restriction><t:IsEqualTo><t:FieldURI FieldURI="message:InternetMessageId"/>"#,
        r#"<t:FieldURIOrConstant><t:Constant Value="&lt;plan-1@creatio.example&gt;"/></t:FieldURIOrConstant></t:IsEqualTo></m:Restriction>"#,
        r#"<m:ParentFolderIds><t:DistinguishedFolderId Id="sentitems"/></m:ParentFolderIds></m:FindItem>"#
    ));
    let found = post(&ews, "secret", find).await.text().await.unwrap();
    assert!(found.contains(r#"TotalItemsInView="1""#), "{found}");
}

#[tokio::test]
async fn create_item_refuses_what_exchange_refuses() {
    let ews = start().await;
    ews.create_mailbox("bob@contoso.example", "pw").unwrap();
    let to_bob = "<t:ToRecipients><t:Mailbox><t:EmailAddress>bob@contoso.example</t:EmailAddress></t:Mailbox></t:ToRecipients>";
    // Larger than the server's limit.
    ews.set_settings(mock_ews::Settings {
        max_message_bytes: Some(4096),
        ..Default::default()
    });
    let big = format!(
        "<t:Subject>big</t:Subject><t:Attachments><t:FileAttachment><t:Name>a.bin</t:Name><t:Content>{}</t:Content></t:FileAttachment></t:Attachments>{to_bob}",
        "A".repeat(8192)
    );
    let body = post(&ews, "secret", create_item("SendAndSaveCopy", &big))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("<m:ResponseCode>ErrorMessageSizeExceeded</m:ResponseCode>"),
        "{body}"
    );
    assert!(ews.sent("bob@contoso.example").unwrap().is_empty());
    assert!(ews.outgoing("alice@contoso.example").unwrap().is_empty());
    // Out of the schema's order: a schema-validation fault, as Exchange answers.
    let disordered = format!("{to_bob}<t:Subject>late</t:Subject>");
    let resp = post(&ews, "secret", create_item("SendAndSaveCopy", &disordered)).await;
    assert_eq!(resp.status(), 500);
    assert!(resp.text().await.unwrap().contains("ErrorSchemaValidation"));
    // Without a recipient.
    let body = post(
        &ews,
        "secret",
        create_item("SendOnly", "<t:Subject>nobody</t:Subject>"),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(body.contains("ErrorInvalidRecipients"), "{body}");
}

#[tokio::test]
async fn find_item_lists_what_was_received_since_a_moment_oldest_first() {
    let ews = start().await;
    let now = mock_ews::clock::now_unix();
    for (subject, ago) in [("middle", 1800), ("newest", 60), ("oldest", 3600)] {
        ews.inject(
            "alice@contoso.example",
            NewMail {
                from: "bob@example.com".into(),
                subject: subject.into(),
                received_unix: Some(now - ago),
                ..NewMail::default()
            },
        )
        .unwrap();
    }
    let find = |since: i64, order: &str, offset: usize| {
        envelope(&format!(
            concat!(
                r#"<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>"#,
                r#"<t:AdditionalProperties><t:FieldURI FieldURI="item:Subject"/></t:AdditionalProperties></m:ItemShape>"#,
                r#"<m:IndexedPageItemView MaxEntriesReturned="1" Offset="{}" BasePoint="Beginning"/>"#,
                r#"<m:Restriction><t:IsGreaterThanOrEqualTo><t:FieldURI FieldURI="item:DateTimeReceived"/>"#,
                r#"<t:FieldURIOrConstant><t:Constant Value="{}"/></t:FieldURIOrConstant></t:IsGreaterThanOrEqualTo></m:Restriction>"#,
                r#"<m:SortOrder><t:FieldOrder Order="{}"><t:FieldURI FieldURI="item:DateTimeReceived"/></t:FieldOrder></m:SortOrder>"#,
                r#"<m:ParentFolderIds><t:DistinguishedFolderId Id="inbox"/></m:ParentFolderIds></m:FindItem>"#
            ),
            offset,
            mock_ews::clock::xs_datetime(since),
            order
        ))
    };
    let mut subjects = Vec::new();
    for offset in 0..3 {
        let body = post(&ews, "secret", find(now - 2000, "Ascending", offset))
            .await
            .text()
            .await
            .unwrap();
        assert!(body.contains(r#"TotalItemsInView="2""#), "{body}");
        if offset < 2 {
            subjects.push(between(&body, "<t:Subject>", "<").to_owned());
        } else {
            assert!(!body.contains("<t:Subject>"), "{body}");
        }
    }
    assert_eq!(subjects, ["middle", "newest"]);
    let body = post(&ews, "secret", find(0, "Descending", 0))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(between(&body, "<t:Subject>", "<"), "newest");
    assert!(body.contains(r#"TotalItemsInView="3""#), "{body}");
}

#[tokio::test]
async fn subscriptions_and_syncs_watch_the_folders_they_name() {
    let ews = start().await;
    ews.create_mailbox("bob@contoso.example", "pw").unwrap();
    // The folder ids FindFolder gives, by name.
    let tree = post(&ews, "secret", envelope(concat!(
        r#"<m:FindFolder Traversal="Deep"><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>"#,
        r#"<m:ParentFolderIds><t:DistinguishedFolderId Id="msgfolderroot"/></m:ParentFolderIds></m:FindFolder>"#
    ))).await.text().await.unwrap();
    let id_of = |name: &str| {
        let at = tree.find(&format!("<t:DisplayName>{name}<")).unwrap();
        let before = &tree[..at];
        let from = before.rfind("<t:FolderId Id=\"").unwrap() + "<t:FolderId Id=\"".len();
        before[from..from + before[from..].find('"').unwrap()].to_owned()
    };
    let (projects, sent) = (id_of("Projects"), id_of("Sent Items"));
    let subscribe = async |folders: &str| {
        let body = post(&ews, "secret", envelope(&format!(
            concat!(
                r#"<m:Subscribe><m:StreamingSubscriptionRequest{}><t:FolderIds>{}</t:FolderIds>"#,
                "<t:EventTypes><t:EventType>NewMailEvent</t:EventType><t:EventType>CreatedEvent</t:EventType></t:EventTypes>",
                "</m:StreamingSubscriptionRequest></m:Subscribe>"
            ),
            if folders.is_empty() { r#" SubscribeToAllFolders="true""# } else { "" },
            folders
        ))).await.text().await.unwrap();
        between(&body, "<m:SubscriptionId>", "</m:SubscriptionId>").to_owned()
    };
    let named = subscribe(&format!(
        r#"<t:FolderId Id="{projects}"/><t:DistinguishedFolderId Id="sentitems"/>"#
    ))
    .await;
    let all = subscribe("").await;
    let mail = |subject: &str, folder: Option<&str>| NewMail {
        from: "carol@example.com".into(),
        subject: subject.into(),
        folder: folder.map(str::to_owned),
        ..NewMail::default()
    };
    let in_projects = ews
        .inject("alice@contoso.example", mail("filed", Some("projects")))
        .unwrap();
    ews.inject("alice@contoso.example", mail("inbox", None))
        .unwrap();
    assert!(
        ews.inject("alice@contoso.example", mail("nowhere", Some("Calendar")))
            .is_err(),
        "not a mail folder"
    );
    let send = concat!(
        r#"<m:CreateItem MessageDisposition="SendAndSaveCopy"><m:Items><t:Message><t:Subject>out</t:Subject>"#,
        "<t:ToRecipients><t:Mailbox><t:EmailAddress>bob@contoso.example</t:EmailAddress></t:Mailbox></t:ToRecipients>",
        "</t:Message></m:Items></m:CreateItem>"
    );
    assert_eq!(post(&ews, "secret", envelope(send)).await.status(), 200);
    let stream = async |sub: &str| {
        post(&ews, "secret", envelope(&format!(
            "<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{sub}</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>"
        ))).await.text().await.unwrap()
    };
    let events = |body: &str, kind: &str, parent: &str| {
        body.split(&format!("<t:{kind}>"))
            .skip(1)
            .map(|e| &e[..e.find(&format!("</t:{kind}>")).unwrap()])
            .filter(|e| e.contains(&format!(r#"<t:ParentFolderId Id="{parent}""#)))
            .count()
    };
    let watched = stream(&named).await;
    // The filed mail in Projects (created, new mail), the sender's copy in Sent Items
    // (created only); nothing of the inbox.
    assert_eq!(events(&watched, "CreatedEvent", &projects), 1, "{watched}");
    assert_eq!(events(&watched, "NewMailEvent", &projects), 1, "{watched}");
    assert_eq!(events(&watched, "CreatedEvent", &sent), 1, "{watched}");
    assert_eq!(events(&watched, "NewMailEvent", &sent), 0, "{watched}");
    assert_eq!(watched.matches("<t:CreatedEvent>").count(), 2, "{watched}");
    let everything = stream(&all).await;
    assert_eq!(
        everything.matches("<t:CreatedEvent>").count(),
        3,
        "{everything}"
    );
    // Each folder keeps its own change log.
    let sync = |folder: &str| {
        envelope(&format!(
            concat!(
                r#"<m:SyncFolderItems><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:SyncFolderId>{}</m:SyncFolderId>"#,
                "<m:MaxChangesReturned>512</m:MaxChangesReturned></m:SyncFolderItems>"
            ),
            folder
        ))
    };
    let filed = post(
        &ews,
        "secret",
        sync(&format!(r#"<t:FolderId Id="{projects}"/>"#)),
    )
    .await
    .text()
    .await
    .unwrap();
    assert_eq!(filed.matches("<t:Create>").count(), 1, "{filed}");
    assert!(filed.contains(&in_projects.item_id));
    let inbox = post(
        &ews,
        "secret",
        sync(r#"<t:DistinguishedFolderId Id="inbox"/>"#),
    )
    .await
    .text()
    .await
    .unwrap();
    assert_eq!(inbox.matches("<t:Create>").count(), 1, "{inbox}");
    // A state is good only for the folder it was given for.
    let state = between(&filed, "<m:SyncState>", "</m:SyncState>").to_owned();
    let crossed = post(&ews, "secret", envelope(&format!(
        concat!(
            r#"<m:SyncFolderItems><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:SyncFolderId><t:DistinguishedFolderId Id="inbox"/></m:SyncFolderId>"#,
            "<m:SyncState>{}</m:SyncState><m:MaxChangesReturned>512</m:MaxChangesReturned></m:SyncFolderItems>"
        ),
        state
    ))).await.text().await.unwrap();
    assert!(crossed.contains("ErrorInvalidSyncStateData"), "{crossed}");
}
