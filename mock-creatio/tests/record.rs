//! mock-creatio records what arrives and fails on demand.

use mock_creatio::MockCreatio;

#[tokio::test]
async fn records_calls_and_fails_on_demand() {
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |op: &str, body: &'static str| {
        http.post(creatio.url(op))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };

    creatio.fail_next(1);
    assert_eq!(
        post("NewEmail", r#"{"newEvent":{}}"#)
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        post("NewEmail", r#"{"newEvent":{"Id":"m1"}}"#)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post("ProcessFullEmail", "not json").await.unwrap().status(),
        400
    );
    assert_eq!(post("Bogus", "{}").await.unwrap().status(), 404);

    let calls = creatio.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].operation, "NewEmail");
    assert_eq!(calls[0].body["newEvent"]["Id"], "m1");

    let listed: serde_json::Value = http
        .get(format!(
            "http://{}/_control/calls?operation=NewEmail",
            creatio.addr()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);

    let stats: mock_creatio::Stats = http
        .get(format!("http://{}/_control/stats", creatio.addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
    for (op, n) in [
        ("ProcessMailboxState", 0),
        ("ProcessFullEmail", 1),
        ("ProcessFullEmail", 2),
        ("ProcessFullEmail", 3),
    ] {
        let answer = http
            .post(creatio.url(op))
            .json(&serde_json::json!({ "n": n }))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "every call is answered as taken");
    }
    // State reports are not mail: untouched. The first mail is lost, the second recorded twice.
    let seen: Vec<(String, i64)> = creatio
        .calls()
        .iter()
        .map(|c| (c.operation.clone(), c.body["n"].as_i64().unwrap()))
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
