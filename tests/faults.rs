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

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "2m") at `path`, or returns `None` where mounting is
    /// not permitted (not root, or no CAP_SYS_ADMIN).
    fn mount(path: &std::path::Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with one file; returns it.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test]
async fn a_full_log_disk_degrades_logging_without_stopping_plugins() {
    let mut d = Daemon::new(&["--log-segment-bytes", "65536", "--log-segments", "100"]);
    let Some(_mount) = Tmpfs::mount(&d.data_dir.join("logs"), "1m") else {
        eprintln!("SKIPPED: mounting a size-capped tmpfs needs CAP_SYS_ADMIN here");
        return;
    };
    d.install_fixture("fx", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["fx"]).await;
    let pid = enable(&mut client, "fx").await.pid;
    let kv = d.kv_client().await;
    let kv_get = |key: String| {
        let mut kv = kv.clone();
        async move {
            // This fixture logs each request and does not answer KV: the call fails, the
            // line is what matters.
            let _ = kv
                .get_value(torud_api::pb::GetValueRequest {
                    plugin_id: "fx".into(),
                    key,
                })
                .await;
        }
    };

    let filler = fill(&d.data_dir.join("logs"));
    // Each request makes the plugin write a line; the first that cannot be stored degrades
    // logging, once. (The log's last page has room for a few dozen lines first.)
    for i in 0..80 {
        kv_get(format!("full-{i}")).await;
    }
    let degraded = events
        .wait_for("logging degraded", SECS10, |e| {
            e.kind == torud_api::pb::EventKind::LoggingDegraded as i32
        })
        .await;
    assert_eq!(degraded.plugin_id, "fx");
    assert!(
        degraded.healthy,
        "a logging event keeps the plugin's health"
    );
    assert!(
        degraded.reason.contains("No space left"),
        "{}",
        degraded.reason
    );
    let plugin = get(&mut client, "fx").await;
    assert_eq!(plugin.pid, pid, "the plugin kept running");
    assert_eq!(state_of(&plugin), torud_api::pb::PluginState::Running);

    let before = d.log_text("fx").matches("received kv get").count();
    assert!(
        before < 80,
        "every line of the full spell was stored: {before}"
    );
    // Space returns: the next line is stored and logging resumes.
    std::fs::remove_file(filler).unwrap();
    kv_get("after".into()).await;
    events
        .wait_for("logging resumed", SECS10, |e| {
            e.kind == torud_api::pb::EventKind::LoggingResumed as i32 && e.plugin_id == "fx"
        })
        .await;
    // The line after the full spell was stored.
    wait_until("the line after recovery to be stored", SECS10, || {
        d.log_text("fx").matches("received kv get").count() > before
    })
    .await;
    let kinds: Vec<i32> = events.seen.iter().map(|e| e.kind).collect();
    let degraded_count = kinds
        .iter()
        .filter(|k| **k == torud_api::pb::EventKind::LoggingDegraded as i32)
        .count();
    assert_eq!(degraded_count, 1, "degraded is reported once, not per line");
    d.stop().await;
}

/// Every record of `id` oldest first, through QueryLogs pages.
async fn all_records(d: &Daemon, id: &str) -> Vec<torud_api::pb::LogRecord> {
    let mut logs = torud_api::pb::log_service_client::LogServiceClient::new(d.channel().await);
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = logs
            .query_logs(torud_api::pb::QueryLogsRequest {
                filter: Some(torud_api::pb::LogFilter {
                    plugin_ids: vec![id.into()],
                    min_level: 0,
                    contains: String::new(),
                }),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn a_sigkilled_daemon_restarts_with_state_events_and_logs_intact() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.install_fixture("burst", "burst", &["--lines", "2000"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["hello", "burst"]).await;
    // Acknowledged decisions: hello enabled, burst enabled then disabled after its burst.
    enable(&mut client, "hello").await;
    enable(&mut client, "burst").await;
    wait_until("the burst to be stored", SECS10, || {
        d.log_text("burst").contains("burst done")
    })
    .await;
    disable(&mut client, "burst").await;
    let before_logs = all_records(&d, "burst").await;
    let lines: Vec<&str> = before_logs
        .iter()
        .filter(|r| r.message.starts_with("line "))
        .map(|r| r.message.as_str())
        .collect();
    assert_eq!(lines.len(), 2000);
    // Every event so far, as a watcher saw them.
    let last = get(&mut client, "burst").await;
    assert_eq!(state_of(&last), torud_api::pb::PluginState::Stopped);
    events
        .wait_for("burst's stop", SECS10, |e| {
            e.plugin_id == "burst" && e.to_state == torud_api::pb::PluginState::Stopped as i32
        })
        .await;
    let seen_before = events.seen.clone();

    d.kill9().await;
    d.start().await;
    let mut client = d.client().await;
    let mut replay = Events::watch(&mut client, Some(0)).await;
    let last_seq = seen_before.last().unwrap().seq;
    // Files are taken in name order: burst is added before hello, which then starts.
    replay
        .wait_for("burst to be discovered again", SECS10, |e| {
            e.seq > last_seq
                && e.plugin_id == "burst"
                && e.kind == torud_api::pb::EventKind::PluginAdded as i32
        })
        .await;
    replay
        .wait_for("hello to run again after the restart", SECS10, |e| {
            e.seq > last_seq
                && e.plugin_id == "hello"
                && e.to_state == torud_api::pb::PluginState::Running as i32
        })
        .await;
    // Enabled state: hello runs again, burst stays stopped.
    let hello = get(&mut client, "hello").await;
    assert!(hello.enabled);
    assert!(!get(&mut client, "burst").await.enabled);

    // Events: everything seen before is still there, unchanged, and numbering goes on.
    while replay.seen.len() < seen_before.len() + 1 {
        replay.next_within(SECS10).await.expect("replay stalled");
    }
    for (old, new) in seen_before.iter().zip(&replay.seen) {
        assert_eq!(old, new, "an acknowledged event changed or vanished");
    }
    let seqs: Vec<u64> = replay.seen.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // Logs: every line is still there; new records continue the numbering.
    let after_logs = all_records(&d, "burst").await;
    assert_eq!(&after_logs[..before_logs.len()], &before_logs[..]);
    let hello_logs = all_records(&d, "hello").await;
    let seqs: Vec<u64> = hello_logs.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(
        hello_logs
            .iter()
            .filter(|r| r.stream == torud_api::pb::LogStream::Supervisor as i32)
            .count()
            >= 4,
        "the notes of both runs are kept"
    );
}

/// The enabled flag of `id` in `state.json`, if it has one.
fn saved_enabled(d: &Daemon, id: &str) -> Option<bool> {
    let text = std::fs::read_to_string(d.data_dir.join("state.json")).ok()?;
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    file["plugins"][id].as_bool()
}

#[tokio::test]
async fn an_enable_or_disable_that_cannot_be_saved_changes_nothing() {
    let mut d = Daemon::new(&[]);
    let Some(_mount) = Tmpfs::mount(&d.data_dir, "16m") else {
        eprintln!("SKIPPED: mounting a size-capped tmpfs needs CAP_SYS_ADMIN here");
        return;
    };
    d.install_fixture("on", "normal", &[]);
    d.install_fixture("off", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["on", "off"])
        .await;
    let running = enable(&mut client, "on").await;
    let filler = fill(&d.data_dir);

    let err = client
        .disable_plugin(torud_api::pb::DisablePluginRequest {
            plugin_id: "on".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("could not save"), "{err:?}");
    let on = get(&mut client, "on").await;
    assert!(on.enabled, "a disable that was not saved must not show");
    assert_eq!(state_of(&on), torud_api::pb::PluginState::Running);
    assert_eq!(on.pid, running.pid, "the plugin was not stopped");
    assert_eq!(saved_enabled(&d, "on"), Some(true));

    let err = client
        .enable_plugin(torud_api::pb::EnablePluginRequest {
            plugin_id: "off".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("could not save"), "{err:?}");
    let off = get(&mut client, "off").await;
    assert!(!off.enabled, "an enable that was not saved must not show");
    assert_eq!(state_of(&off), torud_api::pb::PluginState::Stopped);
    assert_eq!(saved_enabled(&d, "off"), None);

    // Space returns: the same calls succeed and are saved.
    std::fs::remove_file(filler).unwrap();
    assert!(!disable(&mut client, "on").await.enabled);
    assert_eq!(saved_enabled(&d, "on"), Some(false));
    assert!(enable(&mut client, "off").await.enabled);
    assert_eq!(saved_enabled(&d, "off"), Some(true));
    d.stop().await;
}

#[tokio::test]
async fn events_on_a_full_disk_are_kept_replayed_and_stored_when_space_returns() {
    let mut d = Daemon::new(&[]);
    let Some(_mount) = Tmpfs::mount(&d.data_dir.join("events"), "1m") else {
        eprintln!("SKIPPED: mounting a size-capped tmpfs needs CAP_SYS_ADMIN here");
        return;
    };
    d.install_fixture("fx", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut live = Events::watch(&mut client, Some(0)).await;
    live.wait_added(&["fx"]).await;

    let filler = fill(&d.data_dir.join("events"));
    // The segment's last page has room for a few events; restarts make more than fit.
    enable(&mut client, "fx").await;
    for _ in 0..8 {
        client
            .restart_plugin(torud_api::pb::RestartPluginRequest {
                plugin_id: "fx".into(),
            })
            .await
            .unwrap();
    }
    disable(&mut client, "fx").await;
    let degraded = live
        .wait_for("event storage degraded", SECS10, |e| {
            e.kind == torud_api::pb::EventKind::EventStorageDegraded as i32
        })
        .await;
    assert!(
        degraded.reason.contains("No space left"),
        "{}",
        degraded.reason
    );
    live.wait_for("fx to stop for good", SECS10, |e| {
        e.plugin_id == "fx"
            && e.to_state == torud_api::pb::PluginState::Stopped as i32
            && e.reason.contains("disabled")
    })
    .await;
    let seen_live = live.seen.clone();

    // While the disk is full, a replay still has every event, in order, with no gap.
    let mut replay = Events::watch(&mut client, Some(0)).await;
    while replay.seen.len() < seen_live.len() {
        replay.next_within(SECS10).await.expect("a replayed event");
    }
    assert_eq!(replay.seen, seen_live);
    assert!(replay.gaps.is_empty(), "{:?}", replay.gaps);

    // Space returns: the kept events are written, and that is said.
    std::fs::remove_file(filler).unwrap();
    let resumed = live
        .wait_for("event storage resumed", SECS10, |e| {
            e.kind == torud_api::pb::EventKind::EventStorageResumed as i32
        })
        .await;
    assert!(
        resumed.reason.contains("every event kept"),
        "{}",
        resumed.reason
    );
    let seen_live = live.seen.clone();

    // After a restart every event, delivered live during the full spell, is on file.
    assert_eq!(d.stop().await.code(), Some(0));
    d.start().await;
    let mut client = d.client().await;
    let mut after = Events::watch(&mut client, Some(0)).await;
    while after.seen.len() < seen_live.len() {
        after.next_within(SECS10).await.expect("a stored event");
    }
    assert_eq!(after.seen[..seen_live.len()], seen_live[..]);
    assert!(after.gaps.is_empty(), "{:?}", after.gaps);
    d.stop().await;
}

#[tokio::test]
async fn a_plugin_user_that_cannot_be_recorded_yet_is_retried_not_disabled() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: plugin users exist only when the daemon runs as root");
        return;
    }
    let mut d = Daemon::new(&["--backoff-base", "50ms"]);
    d.install_fixture("late", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["late"]).await;
    // users.json is written through users.tmp: a directory there makes the write fail.
    let blocker = d.data_dir.join("users.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let mut enabling = client.clone();
    let enable = tokio::spawn(async move {
        let req = torud_api::pb::EnablePluginRequest {
            plugin_id: "late".into(),
        };
        enabling.enable_plugin(req).await
    });
    events
        .wait_for("a failed start naming users.json", SECS10, |e| {
            e.plugin_id == "late" && e.reason.contains("users.json")
        })
        .await;
    std::fs::remove_dir(&blocker).unwrap();
    events
        .wait_state("late", torud_api::pb::PluginState::Running, SECS10)
        .await;
    assert!(get(&mut client, "late").await.enabled);
    let _ = enable.await;
}
