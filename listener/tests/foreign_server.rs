//! The listener against an EWS server that is not mock-ews: real Exchange 2013 wire shapes
//! (default-namespace Envelope, `soap11:` Header and Body, unprefixed messages), the stream cut
//! into 7-byte chunks, and the same notification replayed on every connection.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use common::{Listener, PATIENCE, eventually};
use mock_creatio::MockCreatio;
use serde_json::json;

const STREAM: &str = include_str!("../../ews/fixtures/stream_exchange2013.xml");

const SUBSCRIBED: &str = r#"<?xml version="1.0" encoding="utf-8"?><Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><soap11:Header xmlns:soap11="http://schemas.xmlsoap.org/soap/envelope/"><ServerVersionInfo xmlns="http://schemas.microsoft.com/exchange/services/2006/types" MajorVersion="15" MinorVersion="0" MajorBuildNumber="1210" MinorBuildNumber="3"/></soap11:Header><soap11:Body xmlns:soap11="http://schemas.xmlsoap.org/soap/envelope/"><SubscribeResponse xmlns="http://schemas.microsoft.com/exchange/services/2006/messages"><ResponseMessages><SubscribeResponseMessage ResponseClass="Success"><ResponseCode>NoError</ResponseCode><SubscriptionId>SUB1</SubscriptionId></SubscribeResponseMessage></ResponseMessages></SubscribeResponse></soap11:Body></Envelope>"#;

const ITEM: &str = r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Header><ServerVersionInfo xmlns="http://schemas.microsoft.com/exchange/services/2006/types" MajorVersion="15" MinorVersion="0" MajorBuildNumber="1210" MinorBuildNumber="3"/></soap:Header><soap:Body><GetItemResponse xmlns="http://schemas.microsoft.com/exchange/services/2006/messages" xmlns:ty="http://schemas.microsoft.com/exchange/services/2006/types"><ResponseMessages><GetItemResponseMessage ResponseClass="Success"><ResponseCode>NoError</ResponseCode><Items><ty:Message><ty:ItemId Id="AAMkAD1" ChangeKey="CQAAAA=="/><ty:Subject>From a real Exchange</ty:Subject><ty:Body BodyType="HTML">&lt;b&gt;hi&lt;/b&gt;</ty:Body><ty:DateTimeSent>2024-05-01T09:59:58Z</ty:DateTimeSent><ty:Sender><ty:Mailbox><ty:Name>Bob</ty:Name><ty:EmailAddress>bob@example.com</ty:EmailAddress></ty:Mailbox></ty:Sender><ty:InternetMessageId>&lt;real@example.com&gt;</ty:InternetMessageId></ty:Message></Items></GetItemResponseMessage></ResponseMessages></GetItemResponse></soap:Body></soap:Envelope>"#;

const SYNCED: &str = r#"<?xml version="1.0" encoding="utf-8"?><Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><soap11:Header xmlns:soap11="http://schemas.xmlsoap.org/soap/envelope/"><ServerVersionInfo xmlns="http://schemas.microsoft.com/exchange/services/2006/types" MajorVersion="15" MinorVersion="0" MajorBuildNumber="1210" MinorBuildNumber="3"/></soap11:Header><soap11:Body xmlns:soap11="http://schemas.xmlsoap.org/soap/envelope/"><m:SyncFolderItemsResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"><m:ResponseMessages><m:SyncFolderItemsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode><m:SyncState>H4sIAAAA</m:SyncState><m:IncludesLastItemInRange>true</m:IncludesLastItemInRange><m:Changes/></m:SyncFolderItemsResponseMessage></m:ResponseMessages></m:SyncFolderItemsResponse></soap11:Body></Envelope>"#;

/// FindItem of an empty inbox, as Exchange 2013 answers it (a new mailbox's first catch-up
/// looks for mail received since the Create).
const FOUND_NONE: &str = r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header><h:ServerVersionInfo MajorVersion="15" MinorVersion="0" MajorBuildNumber="1210" MinorBuildNumber="3" xmlns:h="http://schemas.microsoft.com/exchange/services/2006/types"/></s:Header><s:Body><m:FindItemResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><m:ResponseMessages><m:FindItemResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode><m:RootFolder TotalItemsInView="0" IncludesLastItemInRange="true"><t:Items/></m:RootFolder></m:FindItemResponseMessage></m:ResponseMessages></m:FindItemResponse></s:Body></s:Envelope>"#;

/// The folder tree, as Exchange 2013 lists it: the inbox (the one mail folder) and a calendar.
const FOLDERS: &str = r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header><h:ServerVersionInfo MajorVersion="15" MinorVersion="0" MajorBuildNumber="1210" MinorBuildNumber="3" xmlns:h="http://schemas.microsoft.com/exchange/services/2006/types"/></s:Header><s:Body><m:FindFolderResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><m:ResponseMessages><m:FindFolderResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode><m:RootFolder TotalItemsInView="2" IncludesLastItemInRange="true"><t:Folders><t:Folder><t:FolderId Id="AQMkInbox" ChangeKey="AQAAAA=="/><t:ParentFolderId Id="AQMkRoot" ChangeKey="AQAAAA=="/><t:FolderClass>IPF.Note</t:FolderClass><t:DisplayName>Inbox</t:DisplayName></t:Folder><t:CalendarFolder><t:FolderId Id="AQMkCalendar" ChangeKey="AgAAAA=="/><t:ParentFolderId Id="AQMkRoot" ChangeKey="AQAAAA=="/><t:FolderClass>IPF.Appointment</t:FolderClass><t:DisplayName>Calendar</t:DisplayName></t:CalendarFolder></t:Folders></m:RootFolder></m:FindFolderResponseMessage></m:ResponseMessages></m:FindFolderResponse></s:Body></s:Envelope>"#;

const GOT_INBOX: &str = include_str!("../../ews/fixtures/get_folder_inbox.xml");

const UNSUBSCRIBED: &str = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header/><s:Body><m:UnsubscribeResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"><m:ResponseMessages><m:UnsubscribeResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode></m:UnsubscribeResponseMessage></m:ResponseMessages></m:UnsubscribeResponse></s:Body></s:Envelope>"#;

/// What the stub server does beyond the happy path.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Announce the mail on every connection, not only the first.
    replay: bool,
    /// Answer the first GetItem with HTTP 503.
    fail_first_fetch: bool,
}

/// The stream without the envelope that announces the mail.
fn quiet_stream() -> String {
    let decl_end = STREAM.find("?>").unwrap() + 2;
    let kept: String = STREAM[decl_end..]
        .split_inclusive("</Envelope>")
        .filter(|envelope| !envelope.contains("CreatedEvent"))
        .collect();
    format!("{}{kept}", &STREAM[..decl_end])
}

/// Starts the stub; answers its EWS URL and its count of streaming connections.
async fn stub(behaviour: Behaviour) -> (String, Arc<AtomicUsize>) {
    let connections = Arc::new(AtomicUsize::new(0));
    let fetches = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    let app = Router::new().route(
        "/EWS/Exchange.asmx",
        post(move |body: String| {
            let (seen, fetches) = (seen.clone(), fetches.clone());
            async move {
                if body.contains("GetStreamingEvents") {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    let text = if n == 0 || behaviour.replay {
                        STREAM.to_owned()
                    } else {
                        quiet_stream()
                    };
                    let chunks: Vec<Result<Bytes, std::convert::Infallible>> = text
                        .as_bytes()
                        .chunks(7)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect();
                    Body::from_stream(futures_util::stream::iter(chunks)).into_response()
                } else if body.contains("GetItem") {
                    if fetches.fetch_add(1, Ordering::SeqCst) == 0 && behaviour.fail_first_fetch {
                        StatusCode::SERVICE_UNAVAILABLE.into_response()
                    } else {
                        ITEM.into_response()
                    }
                } else if body.contains("SyncFolderItems") {
                    SYNCED.into_response()
                } else if body.contains("FindItem") {
                    FOUND_NONE.into_response()
                } else if body.contains("FindFolder") {
                    FOLDERS.into_response()
                } else if body.contains("GetFolder") {
                    GOT_INBOX.into_response()
                } else if body.contains("Unsubscribe") {
                    UNSUBSCRIBED.into_response()
                } else {
                    SUBSCRIBED.into_response()
                }
            }
        }),
    );
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/EWS/Exchange.asmx", server.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(server, app).await });
    (url, connections)
}

/// Runs the listener against the stub until it has opened `connections` streams; answers
/// what reached Creatio.
async fn run(behaviour: Behaviour, connections: usize) -> Vec<mock_creatio::Call> {
    let (url, opened) = stub(behaviour).await;
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let listener = Listener::spawn(&[]).await;
    let creds = json!([{
        "Id": "mbx-x", "SenderEmailAddress": "alice@contoso.example", "Password": "pw",
        "ServiceUrl": url, "BpmEndpoint": creatio.url("ProcessFullEmail"),
    }]);
    assert_eq!(listener.send("create", &creds).await.0, 200);
    eventually("stream connections", PATIENCE, async || {
        (opened.load(Ordering::SeqCst) >= connections).then_some(())
    })
    .await;
    creatio.calls_of("ProcessFullEmail")
}

#[tokio::test]
async fn real_exchange_shapes_in_odd_chunks_deliver_one_mail_once() {
    // The same notification on every connection: delivered once all the same.
    let calls = run(
        Behaviour {
            replay: true,
            fail_first_fetch: false,
        },
        3,
    )
    .await;
    assert_eq!(calls.len(), 1, "one mail, delivered once: {calls:#?}");
    let email = &calls[0].body["Emails"][0];
    assert_eq!(email["MessageId"], "<real@example.com>");
    assert_eq!(email["Subject"], "From a real Exchange");
    assert_eq!(email["Sender"], "Bob <bob@example.com>");
    assert_eq!(email["Body"], "<b>hi</b>");
    assert_eq!(email["IsHtmlBody"], true);
    // 2024-05-01T09:59:58Z in .NET ticks.
    assert_eq!(email["SendDateTimeStamp"], 638_501_543_980_000_000i64);
}

#[tokio::test]
async fn a_failed_fetch_is_retried_not_lost() {
    // Announced once only, and the first fetch fails: only a retry in place delivers it.
    let calls = run(
        Behaviour {
            replay: false,
            fail_first_fetch: true,
        },
        3,
    )
    .await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(
        calls[0].body["Emails"][0]["MessageId"],
        "<real@example.com>"
    );
}
