//! Faults around the daemon itself: what it hands plugins, and a damaged state file.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;

use common::*;

#[tokio::test]
async fn no_secret_of_the_daemon_reaches_a_plugin() {
    let mut d = Daemon::new(&["--plugin-env", "EXTRA_ALLOWED"]);
    d.install_fixture("env", "dump-env", &[]);
    // The daemon gets this process's environment plus these.
    d.envs
        .push(("TORUD_TEST_SECRET_TOKEN".into(), "hunter2".into()));
    d.envs.push(("EXTRA_ALLOWED".into(), "yes".into()));
    d.envs
        .push(("TORUD_ADMIN_TOKEN".into(), "admin-secret-0123456789".into()));
    d.envs
        .push(("TORUD_READ_TOKEN".into(), "read-secret-0123456789".into()));
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["env"])
        .await;
    enable(&mut client, "env").await;
    let text = std::fs::read_to_string(d.data_dir.join("plugins/env/env.json")).unwrap();
    let env: BTreeMap<String, String> = serde_json::from_str(&text).unwrap();
    for secret in ["hunter2", "admin-secret", "read-secret"] {
        assert!(!text.contains(secret), "a secret leaked: {env:?}");
    }
    // Every variable of the daemon's environment that reached the plugin must be allowed.
    // (The fixture's /bin/sh wrapper and pyenv's shim add a few of their own, which are not
    // the daemon's; PWD and SHLVL are re-set by the shell whatever it inherited.)
    let allowed = torud::config::DEFAULT_PLUGIN_ENV;
    let daemon_env = std::env::vars()
        .map(|(k, _)| k)
        .chain(d.envs.iter().map(|(k, _)| k.clone()));
    for name in daemon_env {
        let reached = env.contains_key(&name);
        let ok = allowed.contains(&name.as_str())
            || name == "EXTRA_ALLOWED"
            || ["PWD", "OLDPWD", "SHLVL", "_"].contains(&name.as_str());
        assert!(!reached || ok, "{name} reached the plugin");
    }
    assert_eq!(env.get("EXTRA_ALLOWED").map(String::as_str), Some("yes"));
    assert_eq!(env.get("TORU_PLUGIN_ID").map(String::as_str), Some("env"));
    for var in ["TORU_PLUGIN_SOCKET", "TORU_INSTANCE_ID", "TORU_DATA_DIR"] {
        assert!(env.contains_key(var), "{var} missing");
    }
}

#[tokio::test]
async fn a_corrupt_state_file_is_a_clear_error_naming_it() {
    let d = Daemon::new(&[]);
    std::fs::create_dir_all(&d.data_dir).unwrap();
    let state = d.data_dir.join("state.json");
    std::fs::write(&state, b"{\"version\": 1, \"plugins\": {\"a\": tru").unwrap();
    let out = std::process::Command::new(TORUD)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--plugins-dir")
        .arg(&d.plugins_dir)
        .arg("--data-dir")
        .arg(&d.data_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&state.display().to_string()) && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
