//! `torud plugin check`: every example plugin conforms; misbehaving plugins fail with the
//! step and the reason named, and the command's exit code says so.

mod common;

use std::process::Command;

use common::*;

/// Runs the checker on `path`; its exit success and its report.
fn check(path: &std::path::Path, timeout: &str) -> (bool, String) {
    let out = Command::new(TORUD)
        .args(["plugin", "check", "--timeout", timeout])
        .arg(path)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

fn line<'a>(report: &'a str, step: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(step))
        .unwrap_or_else(|| panic!("no {step} line in:\n{report}"))
}

#[test]
fn the_example_plugins_conform() {
    let d = Daemon::new(&[]);
    for path in [example_path("hello-plugin"), d.install_py_echo()] {
        let (ok, report) = check(&path, "10s");
        assert!(ok, "{report}");
        for step in [
            "metadata",
            "init",
            "heartbeat",
            "kv",
            "call",
            "concurrency",
            "cancel",
            "shutdown",
        ] {
            assert!(
                line(&report, step).starts_with("  PASS"),
                "{step}:\n{report}"
            );
        }
        assert!(report.contains("durable storage"), "{report}");
        assert!(report.contains("structured logs"), "{report}");
        assert!(report.contains("verdict: conforms"), "{report}");
    }
}

#[test]
fn a_v1_plugin_is_checked_with_v1_rules() {
    let d = Daemon::new(&[]);
    let (ok, report) = check(&d.install_py_echo_v1(), "10s");
    assert!(ok, "{report}");
    assert!(line(&report, "heartbeat").starts_with("  SKIP"), "{report}");
    assert!(report.contains("protocol 1"), "{report}");
}

#[test]
fn a_plugin_that_never_answers_kv_fails_that_step_precisely() {
    // Toru's Rust crate drops kv requests; the checker says which step and why.
    let (ok, report) = check(&example_path("toru-crate-plugin"), "1s");
    assert!(!ok, "{report}");
    let kv = line(&report, "kv");
    assert!(
        kv.starts_with("  FAIL") && kv.contains("no answer within 1s"),
        "{report}"
    );
    assert!(line(&report, "call").starts_with("  PASS"), "{report}");
    assert!(report.contains("does NOT conform"), "{report}");
}

#[test]
fn a_plugin_that_ignores_shutdown_and_bad_metadata_fail() {
    let d = Daemon::new(&[]);
    let stubborn = d.install_fixture("stubborn", "ignore-term", &[]);
    let (ok, report) = check(&stubborn, "1s");
    assert!(!ok, "{report}");
    let shutdown = line(&report, "shutdown");
    assert!(
        shutdown.starts_with("  FAIL") && shutdown.contains("still running"),
        "{report}"
    );

    let crash = d.install_fixture("crash", "crash", &[]);
    let (ok, report) = check(&crash, "10s");
    assert!(!ok, "{report}");
    let start = line(&report, "start");
    assert!(
        start.starts_with("  FAIL") && start.contains("exited"),
        "{report}"
    );

    let bad = d.install_fixture("bad", "bad-metadata", &[]);
    let (ok, report) = check(&bad, "2s");
    assert!(!ok, "{report}");
    let meta = line(&report, "metadata");
    assert!(
        meta.starts_with("  FAIL") && meta.contains("invalid"),
        "{report}"
    );
}

#[tokio::test]
async fn sdk_plugins_exit_cleanly_on_sigterm() {
    let d = Daemon::new(&[]);
    for path in [example_path("hello-plugin"), d.install_py_echo()] {
        let socket = d.root.path().join("p.sock");
        let mut child = tokio::process::Command::new(&path)
            .env(toru_plugin_sdk::ENV_PLUGIN_SOCKET, &socket)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_until("the plugin's socket", SECS10, || socket.exists()).await;
        signal(child.id().unwrap(), libc::SIGTERM);
        let status = tokio::time::timeout(SECS10, child.wait())
            .await
            .expect("no exit within 10 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "{}: {status}", path.display());
        assert!(!socket.exists(), "{} left its socket", path.display());
    }
}
