//! The harness's checks can fail: a run against a mock-creatio that loses one mail it took and
//! records another twice must report exactly that lost mail and that duplicate, and exit
//! non-zero. Nothing in the listener is switched for it: the lie is mock-creatio's.

use std::path::Path;
use std::process::Command;

#[test]
fn a_lying_creatio_is_caught() {
    let out = std::env::temp_dir().join(format!("harness-self-test-{}", std::process::id()));
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/creatio-lies.toml");
    let run = Command::new(env!("CARGO_BIN_EXE_harness"))
        .arg("run")
        .arg(&scenario)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("the harness runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        run.status.code(),
        Some(1),
        "a run with broken rules exits 1\n{stdout}\n{stderr}"
    );

    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("creatio-lies/report.json"))
            .unwrap_or_else(|e| panic!("no report ({e})\n{stdout}\n{stderr}")),
    )
    .unwrap();
    let rules: Vec<&str> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules, ["lost", "duplicated"], "{report:#}");
    assert_eq!(
        (&report["lost"], &report["duplicated"]),
        (&1.into(), &1.into())
    );
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent >= 30, "{report:#}");
    assert_eq!(report["delivered"].as_u64(), Some(sent - 1));
    // The summary names each, by its Message-ID and mailbox.
    let named = |rule: &str| {
        stdout
            .lines()
            .filter(|l| l.contains(&format!("VIOLATION {rule}")) && l.contains("mail <"))
            .count()
    };
    assert_eq!((named("lost"), named("duplicated")), (1, 1), "{stdout}");
    let _ = std::fs::remove_dir_all(&out);
}
