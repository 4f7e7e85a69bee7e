//! mock-creatio records what arrives and fails on demand.

use mock_creatio::MockCreatio;
use serde_json::{Value, json};

const TICKS: i64 = 638_501_544_000_000_000;

/// GETs one of mock-creatio's control paths and reads its JSON.
async fn control<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    creatio: &MockCreatio,
    path: &str,
) -> T {
    http.get(format!("http://{}{path}", creatio.addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A `NewEmail` call as Creatio reads it.
fn new_email(id: &str) -> String {
    json!({"newEvent": {"uniqueIds": ["AAMk"], "id": id, "sysAdminUnit": "Supervisor",
        "workspaceName": "Default", "timeZoneId": "UTC", "eventTimeStamp": TICKS}})
    .to_string()
}

/// A `ProcessFullEmail` call as Creatio reads it, with one mail whose subject is `n`.
fn full_email(n: i64) -> Value {
    json!({
        "SubscriptionInfo": {"Id": "m", "SysAdminUnit": "Supervisor", "MailboxId": "m",
            "WorkspaceName": "Default", "TimeZoneId": "UTC", "EventTimeStamp": TICKS},
        "Emails": [{
            "Id": "AAMk", "Subject": n.to_string(), "Body": "", "Sender": "a@b.c",
            "Recepients": [], "CopyRecepients": [], "BlindCopyRecepients": [], "Headers": [],
            "Importance": 1, "IsHtmlBody": false, "Attachments": [],
            "SendDateTimeStamp": TICKS, "MessageId": format!("<{n}@b.c>"),
            "InReplyTo": "", "References": "",
        }],
    })
}

fn mailbox_state() -> Value {
    json!({"MailboxId": "m", "SenderEmailAddress": "a@b.c", "BpmUserName": "Supervisor",
        "BpmUserWorkspace": "Default", "Avaliable": true, "ExceptionClassName": "",
        "ExceptionMessage": "", "Context": ""})
}

#[tokio::test]
async fn records_calls_and_fails_on_demand() {
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |op: &str, body: String| {
        http.post(creatio.url(op))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };

    creatio.fail_next(1);
    assert_eq!(
        post("NewEmail", new_email("m0")).await.unwrap().status(),
        503
    );
    assert_eq!(
        post("NewEmail", new_email("m1")).await.unwrap().status(),
        200
    );
    assert_eq!(
        post("ProcessFullEmail", "not json".into())
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(post("Bogus", "{}".into()).await.unwrap().status(), 404);

    let calls = creatio.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].operation, "NewEmail");
    assert_eq!(calls[0].body["newEvent"]["id"], "m1");

    let listed: Value = control(&http, &creatio, "/_control/calls?operation=NewEmail").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);

    let stats: mock_creatio::Stats = control(&http, &creatio, "/_control/stats").await;
    assert_eq!(stats.calls.get("NewEmail"), Some(&1));
    assert_eq!(stats.failed, 1);
    assert_eq!(stats, creatio.stats());
}

#[tokio::test]
async fn drops_and_doubles_mail_when_told_over_http() {
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let told = http
        .post(format!("http://{}/_control/mischief", creatio.addr()))
        .json(&serde_json::json!({ "drop": 1, "duplicate": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(told.status(), 204);
    for (op, body) in [
        ("ProcessMailboxState", mailbox_state()),
        ("ProcessFullEmail", full_email(1)),
        ("ProcessFullEmail", full_email(2)),
        ("ProcessFullEmail", full_email(3)),
    ] {
        let answer = http.post(creatio.url(op)).json(&body).send().await.unwrap();
        assert_eq!(answer.status(), 200, "every call is answered as taken");
    }
    // State reports are not mail: untouched. The first mail is lost, the second recorded twice.
    let seen: Vec<(String, i64)> = creatio
        .calls()
        .iter()
        .map(|c| {
            let subject = c.body["Emails"][0]["Subject"].as_str().unwrap_or("0");
            (c.operation.clone(), subject.parse().unwrap())
        })
        .collect();
    let full = |n| ("ProcessFullEmail".to_owned(), n);
    assert_eq!(
        seen,
        [
            ("ProcessMailboxState".to_owned(), 0),
            full(2),
            full(2),
            full(3)
        ]
    );
}

#[tokio::test]
async fn refuses_what_creatio_would_not_read_and_says_why() {
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut unix_time = full_email(1);
    unix_time["Emails"][0]["SendDateTimeStamp"] = json!(1_714_557_600_000_i64);
    let mut null_list = full_email(2);
    null_list["Emails"][0]["Headers"] = Value::Null;
    for body in [unix_time, null_list] {
        let answer = http
            .post(creatio.url("ProcessFullEmail"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400);
    }
    assert!(creatio.calls().is_empty());
    let listed: Vec<mock_creatio::Rejection> =
        control(&http, &creatio, "/_control/rejections").await;
    let reasons: Vec<&str> = listed.iter().map(|r| r.reason.as_str()).collect();
    assert!(reasons[0].contains("SendDateTimeStamp") && reasons[0].contains("ticks"));
    assert!(reasons[1].contains("Headers is null"));
    assert_eq!(creatio.stats().rejected, 2);
}
