//! The daemon under a `Type=notify` systemd unit, with a fake service manager: a Unix
//! datagram socket named by `NOTIFY_SOCKET`, as systemd provides. It hears a status while the
//! daemon starts, `READY=1` only once the plugins meant to run are running, `WATCHDOG=1` at
//! half of `WATCHDOG_USEC`, `RELOADING=1` then `READY=1` around a reload, and `STOPPING=1`
//! at shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::net::UnixDatagram;
use torud_api::pb::PluginState;

/// The next notification (one datagram, `KEY=value` lines), within `limit`.
async fn next(socket: &UnixDatagram, limit: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(limit, socket.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(String::from_utf8(buf[..n].to_vec()).unwrap())
}

/// Notifications until one satisfies `wanted` (returned with all those before it).
async fn until(
    socket: &UnixDatagram,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> (String, Vec<String>) {
    let deadline = Instant::now() + SECS10;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = next(socket, left)
            .await
            .unwrap_or_else(|| panic!("no {what} within 10 s; heard {before:?}"));
        if wanted(&message) {
            return (message, before);
        }
        before.push(message);
    }
}

#[tokio::test]
async fn the_service_manager_hears_status_ready_watchdog_and_stopping() {
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    d.install_fixture("slow", "slow-metadata", &["--ms", "500"]);
    let path = d.root.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    d.envs
        .push(("NOTIFY_SOCKET".into(), path.to_str().unwrap().into()));
    d.envs.push(("WATCHDOG_USEC".into(), "200000".into()));
    d.start().await;

    let (ready, before) = until(&socket, "READY=1", |m| m.contains("READY=1")).await;
    assert!(
        before.iter().any(|m| m.contains("STATUS=listening")),
        "a status while starting: {before:?}"
    );
    assert!(
        ready.contains("STATUS=ready: 1 plugins, 1 enabled, 1 running, 0 skipped"),
        "{ready}"
    );
    // Ready means the plugin meant to run is running.
    let mut client = d.client().await;
    assert_eq!(
        state_of(&get(&mut client, "slow").await),
        PluginState::Running
    );

    // The watchdog every 100 ms (half of WATCHDOG_USEC).
    let began = Instant::now();
    for _ in 0..3 {
        until(&socket, "WATCHDOG=1", |m| m.contains("WATCHDOG=1")).await;
    }
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "three watchdog pings took {:?}",
        began.elapsed()
    );

    // A reload (SIGHUP, as `systemctl reload` sends) is framed by RELOADING=1 and READY=1.
    signal(d.pid(), libc::SIGHUP);
    let (reloading, _) = until(&socket, "RELOADING=1", |m| m.contains("RELOADING=1")).await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let (reloaded, _) = until(&socket, "READY=1", |m| m.contains("READY=1")).await;
    assert!(
        reloaded.contains("STATUS=configuration reloaded"),
        "{reloaded}"
    );

    let stop = tokio::spawn(async move {
        let status = d.stop().await;
        (d, status)
    });
    let (stopping, _) = until(&socket, "STOPPING=1", |m| m.contains("STOPPING=1")).await;
    assert!(stopping.contains("STATUS=stopping plugins"), "{stopping}");
    let (_d, status) = stop.await.unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn plugins_never_inherit_the_service_managers_socket() {
    // Their environment is built from an allowlist.
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    d.install_fixture("envdump", "normal", &[]);
    let path = d.root.path().join("notify.sock");
    let _socket = UnixDatagram::bind(&path).unwrap();
    d.envs
        .push(("NOTIFY_SOCKET".into(), path.to_str().unwrap().into()));
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events
        .wait_state("envdump", PluginState::Running, SECS10)
        .await;
    let pid = get(&mut client, "envdump").await.pid;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains("NOTIFY_SOCKET"),
        "the plugin inherited NOTIFY_SOCKET: {environ}"
    );
}

#[test]
fn a_daemon_that_outlives_stop_is_reported_with_what_it_is_blocked_in() {
    // What `Daemon::stop` prints when a daemon does not exit: shown on a process that
    // sleeps, and on its child (read once the child sleeps: just after its fork it runs).
    let mut parent = std::process::Command::new("sh")
        .args(["-c", "sleep 30 & wait"])
        .spawn()
        .unwrap();
    let pid = parent.id();
    let report = (0..200)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            blocked_in(pid)
        })
        .find(|r| r.contains("\"sleep\" state S"))
        .unwrap_or_else(|| blocked_in(pid));
    parent.kill().unwrap();
    parent.wait().unwrap();
    assert!(
        report.contains(&format!("pid {pid} task {pid} \"sh\" state S")),
        "{report}"
    );
    assert!(report.contains("\"sleep\" state S"), "{report}");
}

#[tokio::test]
async fn an_upgrade_is_reloading_then_ready_from_the_same_pid() {
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    d.install_fixture("echo", "v2-echo", &[]);
    let path = d.root.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    d.envs
        .push(("NOTIFY_SOCKET".into(), path.to_str().unwrap().into()));
    d.envs.push(("WATCHDOG_USEC".into(), "200000".into()));
    d.start().await;
    until(&socket, "READY=1", |m| m.contains("READY=1")).await;
    let daemon = d.pid();

    let binary = d.root.path().join("torud-next");
    std::fs::copy(env!("CARGO_BIN_EXE_torud"), &binary).unwrap();
    let mut config =
        torud_api::pb::config_service_client::ConfigServiceClient::new(d.channel().await);
    config
        .upgrade_daemon(torud_api::pb::UpgradeDaemonRequest {
            binary: binary.display().to_string(),
        })
        .await
        .unwrap();
    let (reloading, _) = until(&socket, "RELOADING=1", |m| m.contains("RELOADING=1")).await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert!(reloading.contains("upgrading"), "{reloading}");
    // The new image says READY=1 once it has taken over, as the same process.
    let (ready, _) = until(&socket, "READY=1", |m| m.contains("READY=1")).await;
    assert!(ready.contains("ready: 1 plugins"), "{ready}");
    assert_eq!(d.pid(), daemon);
    // Its watchdog goes on.
    until(&socket, "WATCHDOG=1", |m| m.contains("WATCHDOG=1")).await;
    assert!(d.stop().await.success());
}
