//! Golden tests: every kind of response mock-ews writes, compared element by element with a
//! fixture in `tests/golden/` written from the protocol reference. Namespaces, names,
//! attributes, text and child order must match; `{{any}}` in a fixture stands for a value the
//! server chooses (ids, timestamps, MIME).

use std::time::Duration;

use mock_ews::{Config, Fault, FaultKind, MockEws, NewMail, Settings};
use roxmltree::{Document, Node};

const ANY: &str = "{{any}}";
const MAILBOX: &str = "alice@contoso.example";

fn text_of(node: Node<'_, '_>) -> String {
    node.children()
        .filter(Node::is_text)
        .filter_map(|t| t.text())
        .collect::<String>()
        .trim()
        .to_owned()
}

fn name(node: Node<'_, '_>) -> String {
    format!(
        "{{{}}}{}",
        node.tag_name().namespace().unwrap_or(""),
        node.tag_name().name()
    )
}

fn compare(expected: Node<'_, '_>, actual: Node<'_, '_>, path: &str) -> Result<(), String> {
    let path = format!("{path}/{}", actual.tag_name().name());
    if name(expected) != name(actual) {
        return Err(format!(
            "{path}: expected element {}, found {}",
            name(expected),
            name(actual)
        ));
    }
    let attrs = |n: Node<'_, '_>| {
        let mut v: Vec<(String, String, String)> = n
            .attributes()
            .map(|a| {
                (
                    a.namespace().unwrap_or("").to_owned(),
                    a.name().to_owned(),
                    a.value().to_owned(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let (want, got) = (attrs(expected), attrs(actual));
    let same_attrs = want.len() == got.len()
        && want
            .iter()
            .zip(&got)
            .all(|(w, g)| w.0 == g.0 && w.1 == g.1 && (w.2 == ANY || w.2 == g.2));
    if !same_attrs {
        return Err(format!("{path}: attributes {got:?}, expected {want:?}"));
    }
    let (want, got) = (text_of(expected), text_of(actual));
    if want != ANY && want != got {
        return Err(format!("{path}: text {got:?}, expected {want:?}"));
    }
    let want: Vec<Node<'_, '_>> = expected.children().filter(Node::is_element).collect();
    let got: Vec<Node<'_, '_>> = actual.children().filter(Node::is_element).collect();
    if want.len() != got.len() {
        let names = |v: &[Node<'_, '_>]| {
            v.iter()
                .map(|n| n.tag_name().name().to_owned())
                .collect::<Vec<_>>()
        };
        return Err(format!(
            "{path}: children {:?}, expected {:?}",
            names(&got),
            names(&want)
        ));
    }
    want.iter()
        .zip(&got)
        .try_for_each(|(w, g)| compare(*w, *g, &path))
}

fn assert_golden(fixture: &str, actual: &str) {
    let path = format!("{}/tests/golden/{fixture}.xml", env!("CARGO_MANIFEST_DIR"));
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let expected = Document::parse(&expected).unwrap_or_else(|e| panic!("{path}: {e}"));
    let actual_doc =
        Document::parse(actual).unwrap_or_else(|e| panic!("{fixture}: not XML: {e}\n{actual}"));
    if let Err(why) = compare(expected.root_element(), actual_doc.root_element(), "") {
        panic!("{fixture}: {why}\n{actual}");
    }
}

struct Client {
    ews: MockEws,
    http: reqwest::Client,
}

impl Client {
    async fn post(&self, body: String) -> (u16, String) {
        let resp = self
            .http
            .post(self.ews.ews_url())
            .basic_auth(MAILBOX, Some("secret"))
            .header("Content-Type", "text/xml; charset=utf-8")
            .body(body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    async fn op(&self, soap_body: &str) -> (u16, String) {
        self.post(mock_ews::request_envelope(soap_body)).await
    }

    async fn subscribe(&self) -> String {
        let (_, body) = self
            .op(r#"<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/></t:FolderIds><t:EventTypes><t:EventType>NewMailEvent</t:EventType><t:EventType>CreatedEvent</t:EventType><t:EventType>ModifiedEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"#)
            .await;
        let from =
            body.find("<m:SubscriptionId>").expect("subscribed") + "<m:SubscriptionId>".len();
        body[from..from + body[from..].find('<').unwrap()].to_owned()
    }

    /// A whole stream (the server caps it at a second), cut into its envelopes.
    async fn stream(&self, subscription: &str) -> Vec<String> {
        let (status, body) = self
            .op(&format!("<m:GetStreamingEvents><m:SubscriptionIds><t:SubscriptionId>{subscription}</t:SubscriptionId></m:SubscriptionIds><m:ConnectionTimeout>1</m:ConnectionTimeout></m:GetStreamingEvents>"))
            .await;
        assert_eq!(status, 200);
        let body = body
            .strip_prefix(r#"<?xml version="1.0" encoding="utf-8"?>"#)
            .expect("one XML declaration first");
        body.split("<s:Envelope ")
            .skip(1)
            .map(|e| format!("<s:Envelope {e}"))
            .collect()
    }

    fn inject(&self, subject: &str, message_id: &str) -> String {
        self.ews
            .inject(
                MAILBOX,
                NewMail {
                    from: "bob@example.com".into(),
                    from_name: Some("Bob".into()),
                    subject: subject.into(),
                    body: "Hi".into(),
                    message_id: Some(message_id.into()),
                    ..NewMail::default()
                },
            )
            .unwrap()
            .item_id
    }
}

async fn client() -> Client {
    // Keep-alives far apart, so a stream holds only what a test provokes.
    let config = Config {
        keepalive: Duration::from_secs(30),
        max_connection_time: Some(Duration::from_secs(1)),
    };
    let ews = MockEws::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    ews.create_mailbox(MAILBOX, "secret").unwrap();
    Client {
        ews,
        http: reqwest::Client::new(),
    }
}

#[tokio::test]
async fn request_response_operations() {
    let c = client().await;
    let sub = c.subscribe().await;
    let (_, body) = c.op(r#"<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/></t:FolderIds><t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"#).await;
    assert_golden("subscribe_ok", &body);

    let item = c.inject("Hello & welcome", "<m1@example.com>");
    let (_, body) = c
        .op(&format!(r#"<m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape><t:IncludeMimeContent>true</t:IncludeMimeContent><t:AdditionalProperties><t:FieldURI FieldURI="item:Subject"/><t:FieldURI FieldURI="item:DateTimeReceived"/><t:FieldURI FieldURI="message:Sender"/><t:FieldURI FieldURI="message:InternetMessageId"/></t:AdditionalProperties></m:ItemShape><m:ItemIds><t:ItemId Id="{item}"/><t:ItemId Id="missing"/></m:ItemIds></m:GetItem>"#))
        .await;
    assert_golden("get_item", &body);

    let (_, body) = c.op(r#"<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape><m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds></m:GetFolder>"#).await;
    assert_golden("get_folder_inbox", &body);

    let sync = |state: &str| {
        format!(
            r#"<m:SyncFolderItems><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:SyncFolderId><t:DistinguishedFolderId Id="inbox"/></m:SyncFolderId>{state}<m:MaxChangesReturned>512</m:MaxChangesReturned></m:SyncFolderItems>"#
        )
    };
    assert_golden("sync_page", &c.op(&sync("")).await.1);
    assert_golden(
        "sync_invalid_state",
        &c.op(&sync("<m:SyncState>bm9wZQ==</m:SyncState>")).await.1,
    );

    let unsub =
        format!("<m:Unsubscribe><m:SubscriptionId>{sub}</m:SubscriptionId></m:Unsubscribe>");
    assert_golden("unsubscribe_ok", &c.op(&unsub).await.1);
    assert_golden("unsubscribe_not_found", &c.op(&unsub).await.1);

    let send = r#"<m:CreateItem MessageDisposition="SendAndSaveCopy"><m:SavedItemFolderId><t:DistinguishedFolderId Id="sentitems"/></m:SavedItemFolderId><m:Items><t:Message><t:Subject>Hi</t:Subject><t:Body BodyType="Text">Hello</t:Body><t:ToRecipients><t:Mailbox><t:EmailAddress>bob@example.com</t:EmailAddress></t:Mailbox></t:ToRecipients></t:Message></m:Items></m:CreateItem>"#;
    assert_golden("create_item_sent", &c.op(send).await.1);
    c.ews.set_settings(Settings {
        max_message_bytes: Some(16),
        ..Settings::default()
    });
    assert_golden("create_item_too_large", &c.op(send).await.1);

    c.ews.set_settings(Settings {
        max_subscriptions_per_mailbox: Some(0),
        ..Settings::default()
    });
    let (_, body) = c.op(r#"<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/></t:FolderIds><t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>"#).await;
    assert_golden("subscribe_exceeded", &body);
}

#[tokio::test]
async fn faults() {
    let c = client().await;
    c.ews
        .inject_fault(Fault::once(FaultKind::ServerBusy {
            back_off_ms: 297_749,
        }))
        .unwrap();
    let (status, body) = c.op(r#"<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape><m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds></m:GetFolder>"#).await;
    assert_eq!(status, 500);
    assert_golden("fault_server_busy", &body);

    let (status, body) = c.post("<not-soap/>".into()).await;
    assert_eq!(status, 500);
    assert_golden("fault_schema_validation", &body);
}

#[tokio::test]
async fn stream_messages() {
    let c = client().await;
    let sub = c.subscribe().await;
    c.inject("one", "<s1@example.com>");
    let envelopes = c.stream(&sub).await;
    assert_eq!(envelopes.len(), 3, "{envelopes:#?}");
    assert_golden("stream_ok", &envelopes[0]);
    assert_golden("stream_notification", &envelopes[1]);
    assert_golden("stream_closed", &envelopes[2]);

    c.ews
        .inject_fault(Fault::once(FaultKind::MissedNotificationEvents))
        .unwrap();
    c.inject("dropped", "<s2@example.com>");
    let envelopes = c.stream(&sub).await;
    assert_golden("stream_ok", &envelopes[0]);
    assert_golden("stream_missed_events", &envelopes[1]);
    assert_golden("stream_closed", envelopes.last().unwrap());

    c.ews
        .inject_fault(Fault::once(FaultKind::InvalidSubscription))
        .unwrap();
    let envelopes = c.stream(&sub).await;
    assert_eq!(envelopes.len(), 2, "{envelopes:#?}");
    assert_golden("stream_invalid_subscription", &envelopes[1]);

    // The server forgot it: a new connection names it as not found.
    let envelopes = c.stream(&sub).await;
    assert_eq!(envelopes.len(), 1, "{envelopes:#?}");
    assert_golden("stream_subscription_not_found", &envelopes[0]);

    let fresh = c.subscribe().await;
    c.ews.set_settings(Settings {
        max_streams_per_user: Some(0),
        ..Settings::default()
    });
    let envelopes = c.stream(&fresh).await;
    assert_golden("stream_exceeded_connections", &envelopes[0]);
}
