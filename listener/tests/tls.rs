//! Exchange over HTTPS as on-premises servers have it: a certificate from the company's own
//! CA is refused by default with a clear error, trusted with `--ews-ca-file`, and accepted
//! unchecked only with `--ews-tls-insecure`, which says so.

mod common;

use common::{ForwardProxy, Listener, PATIENCE, World, eventually, temp_dir, test_certificates};
use mock_creatio::MockCreatio;
use mock_ews::{Config, MockEws, NewMail};
use serde_json::json;

const ALICE: &str = "alice@contoso.example";

/// mock-ews over HTTPS with a certificate from a CA of its own; answers the world and the
/// path of the CA's PEM.
async fn world() -> (World, std::path::PathBuf) {
    let dir = temp_dir("ews-tls");
    let (_, cert, key) = test_certificates(&dir);
    let ews = MockEws::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        Config::default(),
        &cert,
        &key,
    )
    .await
    .unwrap();
    ews.create_mailbox(ALICE, "secret").unwrap();
    let creatio = MockCreatio::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (World { ews, creatio }, dir.join("ca.crt"))
}

async fn create(world: &World, listener: &Listener) {
    let creds = world.credentials("mbx-1", ALICE, "secret", "ProcessFullEmail");
    assert!(world.ews.ews_url().starts_with("https://"));
    let (code, body) = listener.send("create", &json!([creds])).await;
    assert_eq!(code, 200, "{body}");
}

/// Waits until the mailbox streams over TLS: mail sent before its first sync is not new.
async fn streams(world: &World) {
    eventually("the mailbox to stream over TLS", PATIENCE, async || {
        (world.ews.stats().open_streams == 1).then_some(())
    })
    .await;
}

async fn delivers(world: &World) {
    let sent = world
        .ews
        .inject(
            ALICE,
            NewMail {
                from: "bob@example.com".into(),
                subject: "over TLS".into(),
                ..NewMail::default()
            },
        )
        .unwrap()
        .message_id;
    eventually("the mail at Creatio", PATIENCE, async || {
        common::delivered(world).contains(&sent).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_refused_with_a_clear_error() {
    let (world, _) = world().await;
    let listener = Listener::spawn(&[]).await;
    create(&world, &listener).await;
    let error = eventually(
        "the certificate error in the mailbox's state",
        PATIENCE,
        async || {
            let (_, view) = listener.get("/api/listeners/mbx-1").await;
            view["Status"]["LastError"]
                .as_str()
                .filter(|e| e.contains("certificate"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(error.contains("UnknownIssuer"), "{error}");
    let (_, answer) = listener
        .send(
            "validate",
            &world.credentials("", ALICE, "secret", "ProcessFullEmail"),
        )
        .await;
    assert_eq!(answer["IsValid"], false);
    assert!(
        answer["Message"]
            .as_str()
            .unwrap()
            .contains("--ews-ca-file"),
        "{answer}"
    );
}

#[tokio::test]
async fn the_internal_ca_is_trusted_when_given() {
    let (world, ca) = world().await;
    let listener = Listener::spawn(&["--ews-ca-file", ca.to_str().unwrap()]).await;
    create(&world, &listener).await;
    streams(&world).await;
    delivers(&world).await;
}

#[tokio::test]
async fn tls_insecure_accepts_any_certificate_and_says_so() {
    let (world, _) = world().await;
    let listener = Listener::spawn(&["--ews-tls-insecure"]).await;
    create(&world, &listener).await;
    streams(&world).await;
    delivers(&world).await;
    let warnings = listener
        .logs()
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("--ews-tls-insecure"))
        .count();
    assert!(
        warnings >= 2,
        "a warning at start and on the mailbox's connect"
    );
}

/// Runs the mailbox with `HTTPS_PROXY` and `HTTP_PROXY` naming a forward proxy and `NO_PROXY`
/// as given, until a mail arrives; answers the world and what the proxy saw.
async fn through_proxy(no_proxy: &str) -> (World, Vec<String>) {
    let (world, ca) = world().await;
    let proxy = ForwardProxy::start().await;
    let listener = Listener::spawn_with_env(
        &["--ews-ca-file", ca.to_str().unwrap()],
        &[
            ("HTTPS_PROXY", &proxy.url),
            ("HTTP_PROXY", &proxy.url),
            ("NO_PROXY", no_proxy),
        ],
    )
    .await;
    create(&world, &listener).await;
    streams(&world).await;
    delivers(&world).await;
    (world, proxy.seen())
}

/// Through the proxies the environment names, as administrators expect: Exchange over HTTPS
/// through a `CONNECT` tunnel (`HTTPS_PROXY`), Creatio over HTTP as absolute-form requests
/// (`HTTP_PROXY`).
#[tokio::test]
async fn exchange_and_creatio_are_reached_through_the_environment_s_proxies() {
    let (world, seen) = through_proxy("").await;
    let ews = world
        .ews
        .ews_url()
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    assert!(seen.contains(&format!("CONNECT {ews}")), "{seen:?}");
    assert!(
        seen.contains(&format!("POST {}", world.creatio.addr())),
        "{seen:?}"
    );
}

/// `NO_PROXY` keeps the hosts it names off the proxy.
#[tokio::test]
async fn no_proxy_keeps_its_hosts_off_the_proxy() {
    let (_, seen) = through_proxy("127.0.0.1").await;
    assert_eq!(seen, Vec::<String>::new());
}

/// NTLM over HTTPS with the company's CA, as on premises: each NTLM mailbox's own connections
/// trust the CA given with `--ews-ca-file` too.
#[tokio::test]
async fn ntlm_over_https_trusts_the_internal_ca() {
    let (world, ca) = world().await;
    world.ews.set_settings(mock_ews::Settings {
        auth: Some("ntlm".into()),
        ..mock_ews::Settings::default()
    });
    let listener = Listener::spawn(&["--ews-ca-file", ca.to_str().unwrap()]).await;
    create(&world, &listener).await;
    streams(&world).await;
    delivers(&world).await;
    assert!(
        world.ews.request_log().iter().any(|r| r.status == 401),
        "the mailbox logged in with NTLM"
    );
}
