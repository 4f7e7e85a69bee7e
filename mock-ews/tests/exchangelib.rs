//! An unmodified third-party EWS client, Python's exchangelib, against mock-ews.
//!
//! The client runs `tests/exchangelib_client.py` with the interpreter named by
//! `EXCHANGELIB_PYTHON` (default `python3`); `ci/test.sh` installs exchangelib into a
//! virtual environment and points the variable at it.

use std::time::Duration;

use mock_ews::{Config, MockEws};

/// Runs the client against a fresh mock-ews that takes `auth` (`basic` or `ntlm`).
async fn run_client(auth: &str) -> MockEws {
    let python = std::env::var("EXCHANGELIB_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import exchangelib; assert exchangelib.__version__ == '5.6.0', exchangelib.__version__"])
        .output()
        .await;
    match probe {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "exchangelib 5.6.0 is not available to {python:?} ({other:?}); run ci/test.sh, \
             or `pip install exchangelib==5.6.0` and set EXCHANGELIB_PYTHON to that interpreter"
        ),
    }
    let config = Config {
        keepalive: Duration::from_millis(500),
        max_connection_time: Some(Duration::from_secs(5)),
    };
    let ews = MockEws::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    ews.create_mailbox("alice@contoso.example", "secret")
        .unwrap();
    ews.set_settings(mock_ews::Settings {
        auth: Some(auth.into()),
        ..mock_ews::Settings::default()
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/exchangelib_client.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .args([
                script,
                &format!("http://{}", ews.addr()),
                "alice@contoso.example",
                "secret",
                auth,
            ])
            .env("NO_PROXY", "127.0.0.1,localhost")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the exchangelib client did not finish in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "exchangelib client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.lines().last() == Some("ok"), "{stdout}");
    ews
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchangelib_streams_fetches_syncs_and_sees_faults() {
    let ews = run_client("basic").await;
    let ops = ews.stats().requests;
    for op in [
        "GetFolder",
        "Subscribe",
        "GetStreamingEvents",
        "GetItem",
        "SyncFolderItems",
        "Unsubscribe",
        "FindItem",
        "ConvertId",
    ] {
        assert!(ops.contains_key(op), "exchangelib never sent {op}: {ops:?}");
    }
}

/// With Basic switched off, as on many on-premises EWS virtual directories: exchangelib's
/// NTLM (`auth_type=NTLM`, pyspnego underneath) logs in per connection, streams and fetches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchangelib_logs_in_with_ntlm_when_basic_is_off() {
    let ews = run_client("ntlm").await;
    let log = ews.request_log();
    assert!(
        log.iter().any(|r| r.status == 401),
        "an NTLM handshake starts with a 401 challenge"
    );
    assert!(
        log.iter()
            .any(|r| r.operation == "GetStreamingEvents" && r.status == 200)
    );
}
