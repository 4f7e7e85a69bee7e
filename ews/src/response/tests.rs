use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::stream::EnvelopeSplitter;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn subscribe_success_yields_the_id() {
    assert_eq!(
        parse_subscribe(&fixture("subscribe_ok.xml")).unwrap(),
        "JgBjbzFwcjA2bWIxMjQ0LmFwY3ByZDA2LnByb2Qub3V0bG9vay5jb20QAAAA0Ag="
    );
}

#[test]
fn subscribe_error_in_default_namespace_is_typed() {
    let err = parse_subscribe(&fixture("subscribe_exceeded.xml")).unwrap_err();
    assert_eq!(err.code(), Some("ErrorExceededSubscriptionCount"));
    let EwsError::Response(r) = err else {
        panic!("{err:?}")
    };
    assert_eq!(
        r.message,
        "You have exceeded the maximum number of subscriptions."
    );
}

#[test]
fn fault_carries_back_off_whatever_the_operation() {
    let body = fixture("fault_server_busy.xml");
    for err in [
        parse_subscribe(&body).unwrap_err(),
        parse_unsubscribe(&body).unwrap_err(),
        parse_get_item(&body).unwrap_err(),
        parse_stream_envelope(&body).unwrap_err(),
    ] {
        assert_eq!(err.code(), Some("ErrorServerBusy"));
        assert_eq!(err.back_off(), Some(Duration::from_millis(297_749)));
        assert!(matches!(err, EwsError::Fault(_)));
    }
}

#[test]
fn unsubscribe_not_found_is_an_error() {
    let err = parse_unsubscribe(&fixture("unsubscribe_not_found.xml")).unwrap_err();
    assert_eq!(err.code(), Some("ErrorSubscriptionNotFound"));
}

#[test]
fn get_item_decodes_each_item_in_order() {
    let results = parse_get_item(&fixture("get_item_mixed.xml")).unwrap();
    assert_eq!(results.len(), 2);
    let msg = results[0].as_ref().unwrap();
    assert_eq!(msg.item_id.as_ref().unwrap().id, "AAMkAD1");
    assert_eq!(msg.subject.as_deref(), Some("Hello & welcome"));
    assert_eq!(msg.body.as_deref(), Some("<p>Hi</p>"));
    assert!(msg.body_is_html);
    assert_eq!(msg.internet_message_id.as_deref(), Some("<m1@example.com>"));
    assert_eq!(
        msg.sender.as_ref().unwrap().email.as_deref(),
        Some("bob@example.com")
    );
    assert_eq!(msg.sender.as_ref().unwrap().name.as_deref(), Some("Bob"));
    let to: Vec<_> = msg.to.iter().map(|m| m.email.as_deref().unwrap()).collect();
    assert_eq!(to, ["alice@contoso.example", "carol@contoso.example"]);
    assert_eq!(msg.date_time_sent.as_deref(), Some("2024-05-01T09:59:58Z"));
    assert_eq!(
        msg.mime_content.as_deref(),
        Some(&b"From: Bob <bob@example.com>\r\nSubject: Hello\r\nMessage-ID: <m1@example.com>\r\n\r\nHi\r\n"[..])
    );
    assert_eq!(results[1].as_ref().unwrap_err().code, "ErrorItemNotFound");
}

#[test]
fn mime_content_on_one_line_decodes_as_wrapped() {
    let wrapped = fixture("get_item_mixed.xml");
    let text = String::from_utf8(wrapped.clone()).unwrap();
    let one_line = text.replace("DQpT\ndWJq", "DQpTdWJq");
    assert_ne!(one_line, text);
    let mime = |bytes: &[u8]| {
        parse_get_item(bytes).unwrap()[0]
            .as_ref()
            .unwrap()
            .mime_content
            .clone()
    };
    assert!(mime(&wrapped).is_some());
    assert_eq!(mime(one_line.as_bytes()), mime(&wrapped));
}

#[test]
fn get_folder_decodes_the_folder() {
    let folders = parse_get_folder(&fixture("get_folder_inbox.xml")).unwrap();
    let inbox = folders[0].as_ref().unwrap();
    assert_eq!(inbox.display_name.as_deref(), Some("Inbox"));
    assert_eq!(inbox.total_count, Some(3));
}

#[test]
fn real_exchange_stream_splits_and_decodes() {
    let mut splitter = EnvelopeSplitter::new();
    let batches: Vec<StreamBatch> = splitter
        .push(&fixture("stream_exchange2013.xml"))
        .unwrap()
        .iter()
        .map(|env| parse_stream_envelope(env).unwrap())
        .collect();
    assert!(splitter.is_idle());
    assert_eq!(batches.len(), 4);
    assert_eq!(batches[0].status, Some(ConnectionStatus::Ok));
    assert!(batches[0].notifications.is_empty());

    let n = &batches[1].notifications[0];
    assert_eq!(n.subscription_id, "SUB1");
    let kinds: Vec<_> = n.events.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        [EventKind::Created, EventKind::NewMail, EventKind::Modified]
    );
    let new_items: Vec<_> = n
        .events
        .iter()
        .filter_map(Event::new_item)
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(new_items, ["AAMkAD1", "AAMkAD1"]);
    assert_eq!(
        n.events[2].target,
        Some(EventTarget::Folder("AQMkADinbox".into()))
    );
    assert_eq!(
        n.events[0].timestamp.as_deref(),
        Some("2024-05-01T10:00:00Z")
    );

    assert_eq!(
        batches[2].notifications[0].events[0].kind,
        EventKind::Status
    );
    assert!(batches[3].closed());
}

#[test]
fn stream_error_names_the_failed_subscriptions() {
    let batch = parse_stream_envelope(&fixture("stream_invalid_subscription.xml")).unwrap();
    assert!(batch.closed());
    assert_eq!(batch.errors.len(), 1);
    assert_eq!(batch.errors[0].error.code, "ErrorInvalidSubscription");
    assert_eq!(batch.errors[0].error.message, "Subscription is invalid.");
    assert_eq!(batch.errors[0].subscription_ids, ["SUB1"]);
}

#[test]
fn non_soap_bodies_are_malformed_not_panics() {
    for body in [
        &b""[..],
        b"<html>busy</html>",
        b"<s:Envelope xmlns:s=\"x\"/>",
        b"\xff\xfe",
    ] {
        assert!(matches!(
            parse_stream_envelope(body),
            Err(EwsError::Malformed(_))
        ));
    }
}

/// A notification batch rendered with the given prefixes (`""` means the default namespace).
fn render(soap: &str, m: &str, t: &str, notes: &[(String, Vec<String>)]) -> String {
    let q = |p: &str, name: &str| {
        if p.is_empty() {
            name.to_owned()
        } else {
            format!("{p}:{name}")
        }
    };
    let decl = |p: &str, uri: &str| {
        if p.is_empty() {
            format!(r#" xmlns="{uri}""#)
        } else {
            format!(r#" xmlns:{p}="{uri}""#)
        }
    };
    let mut body = String::new();
    for (sub, items) in notes {
        body += &format!(
            "<{n}{tx}><{s}>{}</{s}>",
            quick_xml::escape::escape(sub),
            n = q(m, "Notification"),
            s = q(t, "SubscriptionId"),
            tx = decl(t, crate::ns::TYPES)
        );
        for item in items {
            body += &format!(
                r#"<{e}><{ts}>2024-05-01T10:00:00Z</{ts}><{i} Id="{}"/></{e}>"#,
                quick_xml::escape::escape(item),
                e = q(t, "NewMailEvent"),
                ts = q(t, "TimeStamp"),
                i = q(t, "ItemId")
            );
        }
        body += &format!("</{}>", q(m, "Notification"));
    }
    format!(
        "<{env}{sd}><{b}><{r}{md}><{rms}><{rm} ResponseClass=\"Success\"><{rc}>NoError</{rc}><{ns}>{body}</{ns}></{rm}></{rms}></{r}></{b}></{env}>",
        env = q(soap, "Envelope"),
        sd = decl(soap, crate::ns::SOAP),
        b = q(soap, "Body"),
        r = q(m, "GetStreamingEventsResponse"),
        md = decl(m, crate::ns::MESSAGES),
        rms = q(m, "ResponseMessages"),
        rm = q(m, "GetStreamingEventsResponseMessage"),
        rc = q(m, "ResponseCode"),
        ns = q(m, "Notifications"),
    )
}

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z][a-z0-9]{0,6}"]
}

proptest! {
    /// Notifications survive rendering with any prefixes and any chunking of a multi-envelope
    /// stream, and decode to exactly what was rendered.
    #[test]
    fn notifications_round_trip(
        soap in prefix(), m in prefix(), t in prefix(),
        notes in proptest::collection::vec(
            ("[A-Za-z0-9+/=<>&\"']{1,20}", proptest::collection::vec("[A-Za-z0-9+/=<&\"]{1,30}", 1..4)),
            1..4),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        // Prefixes must differ where they name different namespaces in the same scope.
        prop_assume!(soap != m && m != t && soap != t);
        let envelope = render(&soap, &m, &t, &notes);
        let stream = format!("<?xml version=\"1.0\"?>{envelope}\r\n{envelope}");
        let bytes = stream.as_bytes();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len())).collect();
        cuts.sort_unstable();
        let mut splitter = EnvelopeSplitter::new();
        let mut envelopes = Vec::new();
        let mut from = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            envelopes.extend(splitter.push(&bytes[from..cut]).unwrap());
            from = cut;
        }
        prop_assert_eq!(envelopes.len(), 2);
        for env in envelopes {
            let batch = parse_stream_envelope(&env).unwrap();
            let got: Vec<(String, Vec<String>)> = batch.notifications.iter().map(|n| (
                n.subscription_id.clone(),
                n.events.iter().filter_map(Event::new_item).map(|i| i.id.clone()).collect(),
            )).collect();
            prop_assert_eq!(&got, &notes);
        }
    }
}

#[test]
fn sync_page_lists_every_change_kind() {
    let page = parse_sync_folder_items(&fixture("sync_folder_items_page.xml")).unwrap();
    assert_eq!(page.sync_state, "H4sIAAAB");
    assert!(!page.includes_last_item_in_range);
    let id = |s: &str| ItemId {
        id: s.into(),
        change_key: Some("CQAAAA==".into()),
    };
    assert_eq!(
        page.changes,
        [
            SyncChange::Create(id("AAMkC1")),
            SyncChange::Update(ItemId {
                id: "AAMkU1".into(),
                change_key: Some("CQAAAB==".into())
            }),
            SyncChange::Delete("AAMkD1".into()),
            SyncChange::ReadFlagChange {
                id: "AAMkR1".into(),
                is_read: true
            },
            SyncChange::Create(id("AAMkC2")),
        ]
    );
}

#[test]
fn invalid_sync_state_is_typed() {
    let err = parse_sync_folder_items(&fixture("sync_folder_items_invalid_state.xml")).unwrap_err();
    assert_eq!(err.code(), Some("ErrorInvalidSyncStateData"));
}

/// Every decoder, fed any bytes: arbitrary ones, and real fixtures with bytes flipped, cut or
/// spliced with multi-byte text. Whatever a server sends, a decoder answers; it never panics.
fn decode_everything(bytes: &[u8]) {
    let _ = parse_subscribe(bytes);
    let _ = parse_unsubscribe(bytes);
    let _ = parse_get_item(bytes);
    let _ = parse_get_folder(bytes);
    let _ = parse_sync_folder_items(bytes);
    let _ = parse_find_item(bytes);
    let _ = parse_stream_envelope(bytes);
    let mut splitter = crate::EnvelopeSplitter::new();
    if let Ok(envelopes) = splitter.push(bytes) {
        for e in envelopes {
            let _ = parse_stream_envelope(&e);
        }
    }
}

fn all_fixtures() -> Vec<Vec<u8>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_damaged_fixtures(
        which in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let fixtures = all_fixtures();
        let mut bytes = fixtures[which.index(fixtures.len())].clone();
        for (at, byte, how) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] = byte,
                1 => { bytes.splice(i..i, "é€\u{1F600}".bytes()); }
                _ => { bytes.remove(i); }
            }
        }
        let len = bytes.len();
        decode_everything(&bytes);
        decode_everything(&bytes[..cut.index(len + 1)]);
    }
}

#[test]
fn find_item_page_lists_ids_received_times_and_paging() {
    let page = parse_find_item(&fixture("find_item_page.xml")).unwrap();
    let found = |id: &str, key: &str, at: Option<&str>| FoundItem {
        id: ItemId {
            id: id.into(),
            change_key: Some(key.into()),
        },
        date_time_received: at.map(str::to_owned),
    };
    assert_eq!(
        page,
        FindPage {
            items: vec![
                found("AAMkF3", "CQAAAA==", Some("2026-11-30T10:02:00Z")),
                found("AAMkF2", "CQAAAB==", Some("2026-11-30T10:01:00Z")),
                found("AAMkF1", "CQAAAC==", None),
            ],
            next_offset: Some(3),
            includes_last_item_in_range: false,
            total_items_in_view: Some(7),
        }
    );
    let fault = parse_find_item(&fixture("fault_server_busy.xml")).unwrap_err();
    assert_eq!(fault.code(), Some("ErrorServerBusy"));
}

#[test]
fn an_older_server_says_which_version_it_takes() {
    let body = fixture("fault_invalid_server_version.xml");
    let err = parse_subscribe(&body).unwrap_err();
    assert_eq!(err.code(), Some("ErrorInvalidServerVersion"));
    let info = server_version_info(&body).unwrap();
    assert_eq!((info.major, info.minor, info.build), (14, 2, 247));
    assert_eq!(info.request_version(), Some(ServerVersion::Exchange2010Sp2));
    // No header: nothing to say.
    assert_eq!(server_version_info(&fixture("fault_server_busy.xml")), None);
}

#[test]
fn server_versions_map_to_request_versions_by_number_when_the_name_is_a_schema_date() {
    let info = |major, minor, build, version: &str| ServerVersionInfo {
        major,
        minor,
        build,
        version: Some(version.into()),
    };
    let cases = [
        (info(14, 0, 639, "Exchange2010"), None),
        (
            info(14, 1, 218, "Exchange2010_SP1"),
            Some(ServerVersion::Exchange2010Sp1),
        ),
        (
            info(14, 3, 123, "Exchange2010_SP2"),
            Some(ServerVersion::Exchange2010Sp2),
        ),
        (info(15, 0, 516, "V2_6"), Some(ServerVersion::Exchange2013)),
        (
            info(15, 0, 847, "V2_10"),
            Some(ServerVersion::Exchange2013Sp1),
        ),
        (
            info(15, 1, 2507, "V2017_07_11"),
            Some(ServerVersion::Exchange2016),
        ),
        (
            info(15, 2, 1118, "V2017_07_11"),
            Some(ServerVersion::Exchange2016),
        ),
        (info(8, 3, 83, "Exchange2007_SP1"), None),
    ];
    for (info, want) in cases {
        assert_eq!(info.request_version(), want, "{info:?}");
    }
    assert_eq!(
        ServerVersion::Exchange2013.older(),
        Some(ServerVersion::Exchange2010Sp2)
    );
    assert_eq!(ServerVersion::Exchange2010Sp1.older(), None);
}

#[test]
fn find_folder_page_lists_every_kind_of_folder_with_its_parent_and_class() {
    let page = parse_find_folder(&fixture("find_folder_page.xml")).unwrap();
    let folder = |id: &str, parent: &str, name: &str, class: Option<&str>| FoundFolder {
        id: id.into(),
        parent_id: Some(parent.into()),
        display_name: name.into(),
        folder_class: class.map(str::to_owned),
    };
    assert_eq!(
        page,
        FolderPage {
            folders: vec![
                folder("AQMkInbox", "AQMkRoot", "Inbox", Some("IPF.Note")),
                folder(
                    "AQMkProjects",
                    "AQMkInbox",
                    "Projects & Bids",
                    Some("IPF.Note")
                ),
                folder(
                    "AQMkCalendar",
                    "AQMkRoot",
                    "Calendar",
                    Some("IPF.Appointment")
                ),
                folder("AQMkSearch", "AQMkRoot", "Unread", None),
            ],
            next_offset: Some(4),
            includes_last_item_in_range: false,
        }
    );
    let fault = parse_find_folder(&fixture("fault_server_busy.xml")).unwrap_err();
    assert_eq!(fault.code(), Some("ErrorServerBusy"));
}
