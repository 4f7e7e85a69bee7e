//! mock-graph as a Graph client sees it: tokens, delta, MIME, sendMail, faults.

use base64::Engine as _;
use mock_graph::{App, Fault, MockGraph, NewMail};
use serde_json::Value;

const USER: &str = "alice@contoso.com";

async fn started() -> MockGraph {
    let graph = MockGraph::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    graph.add_app(App {
        tenant: "contoso".into(),
        client_id: "app".into(),
        secret: Some("s3cret".into()),
        ..App::default()
    });
    graph.add_user(USER);
    graph
}

async fn token(graph: &MockGraph, secret: &str) -> (u16, Value) {
    let answer = reqwest::Client::new()
        .post(format!("{}/contoso/oauth2/v2.0/token", graph.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_id=app&client_secret={secret}&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default"
        ))
        .send()
        .await
        .unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

async fn get(graph: &MockGraph, token: &str, target: &str) -> (u16, Value) {
    let url = if target.starts_with("http") {
        target.to_owned()
    } else {
        format!("{}{target}", graph.url())
    };
    let answer = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .header("prefer", "odata.maxpagesize=2")
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

fn mail(n: u32) -> NewMail {
    NewMail {
        from: "bob@fabrikam.com".into(),
        subject: format!("mail {n}"),
        body: "hi".into(),
        message_id: Some(format!("<m{n}@fabrikam.com>")),
        ..NewMail::default()
    }
}

/// Follows delta links from `target` to the end: the ids listed and the deltaLink.
async fn follow(graph: &MockGraph, token: &str, target: &str) -> (Vec<String>, String) {
    let mut ids = Vec::new();
    let mut at = target.to_owned();
    loop {
        let (status, page) = get(graph, token, &at).await;
        assert_eq!(status, 200, "{page}");
        for m in page["value"].as_array().unwrap() {
            ids.push(m["id"].as_str().unwrap().to_owned());
        }
        if let Some(next) = page["@odata.nextLink"].as_str() {
            at = next.to_owned();
            continue;
        }
        return (ids, page["@odata.deltaLink"].as_str().unwrap().to_owned());
    }
}

#[tokio::test]
async fn a_secret_earns_a_token_and_a_wrong_one_is_refused() {
    let graph = started().await;
    let (status, answer) = token(&graph, "wrong").await;
    assert_eq!(status, 401);
    assert_eq!(answer["error"], "invalid_client");
    let (status, answer) = token(&graph, "s3cret").await;
    assert_eq!(status, 200, "{answer}");
    let t = answer["access_token"].as_str().unwrap();
    let (status, _) = get(
        &graph,
        "not-a-token",
        "/v1.0/users/alice@contoso.com/mailFolders",
    )
    .await;
    assert_eq!(status, 401);
    let (status, folders) = get(&graph, t, "/v1.0/users/alice@contoso.com/mailFolders").await;
    assert_eq!(status, 200);
    assert!(
        folders["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["displayName"] == "Inbox")
    );
    let (status, body) = get(&graph, t, "/v1.0/users/nobody@contoso.com/mailFolders").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("ErrorInvalidUser"))
    );
}

#[tokio::test]
async fn delta_lists_a_baseline_in_pages_then_only_what_is_new_until_it_expires() {
    let graph = started().await;
    let t = token(&graph, "s3cret").await.1["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for n in 0..3 {
        graph.deliver(USER, mail(n)).unwrap();
    }
    let start = "/v1.0/users/alice@contoso.com/mailFolders/inbox/messages/delta";
    let (baseline, link) = follow(&graph, &t, start).await;
    assert_eq!(baseline.len(), 3);
    let new = graph.deliver(USER, mail(3)).unwrap();
    let (listed, link) = follow(&graph, &t, &link).await;
    assert_eq!(listed, std::slice::from_ref(&new.id));
    let (listed, _) = follow(&graph, &t, &link).await;
    assert!(listed.is_empty());

    let (status, mime) = {
        let answer = reqwest::Client::new()
            .get(format!(
                "{}/v1.0/users/{USER}/messages/{}/$value",
                graph.url(),
                new.id
            ))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    };
    assert_eq!(status, 200);
    assert!(mime.contains("Message-ID: <m3@fabrikam.com>"), "{mime}");

    graph.expire_delta();
    let (status, body) = get(&graph, &t, &link).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (410, Some("SyncStateNotFound"))
    );
}

#[tokio::test]
async fn send_mail_keeps_a_copy_and_delivers_to_local_users_and_faults_apply_in_order() {
    let graph = started().await;
    graph.add_user("bob@contoso.com");
    let t = token(&graph, "s3cret").await.1["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mime = "From: alice@contoso.com\r\nTo: Bob <bob@contoso.com>\r\nSubject: Hi\r\nMessage-ID: <sent-1@contoso.com>\r\n\r\nHello\r\n";
    let send = || {
        reqwest::Client::new()
            .post(format!("{}/v1.0/users/{USER}/sendMail", graph.url()))
            .bearer_auth(&t)
            .header("content-type", "text/plain")
            .body(base64::engine::general_purpose::STANDARD.encode(mime))
            .send()
    };
    graph.fault(Fault::Throttle {
        count: 1,
        retry_after_secs: 7,
    });
    let throttled = send().await.unwrap();
    assert_eq!(throttled.status().as_u16(), 429);
    assert_eq!(throttled.headers()["retry-after"], "7");
    assert_eq!(send().await.unwrap().status().as_u16(), 202);
    let sent = graph.messages(USER, Some("Sent Items")).unwrap();
    assert_eq!(sent[0].internet_message_id, "<sent-1@contoso.com>");
    let got = graph.messages("bob@contoso.com", Some("Inbox")).unwrap();
    assert_eq!(got[0].internet_message_id, "<sent-1@contoso.com>");
    assert_eq!(graph.stats().throttled, 1);
}
