//! Plugin isolation through the real daemon (run as root, as in CI): a hostile plugin
//! reporting from inside what it could reach, the data directory's owners and modes (even
//! under `umask 000`), descriptors the daemon inherited, the start-up line, and a
//! `setsid()` grandchild that must not outlive Disable, Restart or a daemon shutdown.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;

fn owner(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().uid()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Waits for a JSON file a plugin writes, and parses it.
async fn read_json(path: &Path) -> serde_json::Value {
    let mut value = None;
    wait_until(&format!("{}", path.display()), SECS10, || {
        value = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        value.is_some()
    })
    .await;
    value.unwrap()
}

/// Waits for the pid a fixture wrote into its directory.
async fn read_pid(path: &Path) -> u32 {
    let mut pid = None;
    wait_until(&format!("{}", path.display()), SECS10, || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        pid.is_some()
    })
    .await;
    pid.unwrap()
}

#[tokio::test]
async fn a_hostile_plugin_reaches_nothing_but_its_own_directory() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests run as root");
    let (d, mut client) = start_enabled(
        &[],
        |d| {
            d.install_fixture("victim", "normal", &[]);
        },
        &["victim"],
    )
    .await;
    let victim_dir = d.data_dir.join("plugins/victim");
    let victim_uid = owner(&victim_dir);
    let secret = victim_dir.join("secret.txt");
    std::fs::write(&secret, "victim's secret").unwrap();
    std::os::unix::fs::chown(&secret, Some(victim_uid), Some(victim_uid)).unwrap();

    let token = d.data_dir.join("admin.token");
    let token = token.to_str().unwrap();
    d.install_fixture(
        "hostile",
        "hostile",
        &["--other", "victim", "--probe-read", token],
    );
    rescan(&mut client).await;
    let name = get(&mut client, "hostile").await.name;
    assert_eq!(
        name, "Fixture hostile probe denied",
        "the --metadata probe is confined too"
    );
    enable(&mut client, "hostile").await;
    let report = read_json(&d.data_dir.join("plugins/hostile/hostile.json")).await;
    let report: BTreeMap<String, serde_json::Value> = serde_json::from_value(report).unwrap();

    let uid = report["uid"].as_u64().unwrap() as u32;
    assert!(uid >= 524_288 && uid != victim_uid, "uid {uid}");
    assert!(victim_uid >= 524_288, "victim uid {victim_uid}");
    assert_eq!(report["gid"].as_u64().unwrap() as u32, uid);
    assert_eq!(report["groups"], serde_json::json!([]), "groups cleared");
    assert_eq!(report["write own dir"], "allowed");
    for (what, outcome) in &report {
        if matches!(
            what.as_str(),
            "uid" | "gid" | "groups" | "fds" | "write own dir"
        ) {
            continue;
        }
        let outcome = outcome.as_str().unwrap();
        assert!(
            outcome.starts_with("denied"),
            "a plugin could {what}: {outcome}; the whole report: {report:#?}"
        );
    }
    // What it reached stays its own; the victim still serves.
    assert_eq!(owner(&d.data_dir.join("plugins/hostile/mine.txt")), uid);
    assert_eq!(
        state_of(&get(&mut client, "victim").await),
        torud_api::pb::PluginState::Running
    );
}

#[tokio::test]
async fn the_data_directory_is_laid_out_for_per_plugin_users_even_under_umask_000() {
    let mut d = Daemon::new(&[]);
    d.umask = Some(0);
    d.install_hello("hello");
    d.install_fixture("fx", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["hello", "fx"])
        .await;
    enable(&mut client, "hello").await;
    enable(&mut client, "fx").await;
    let data = &d.data_dir;
    let hello_uid = owner(&data.join("plugins/hello"));
    assert!(hello_uid >= 524_288);
    assert_ne!(hello_uid, owner(&data.join("plugins/fx")));
    assert_eq!(owner(&data.join("run/hello")), hello_uid);
    for dir in ["", "plugins", "run"] {
        assert_eq!(mode(&data.join(dir)), 0o711, "{dir:?}");
        assert_eq!(owner(&data.join(dir)), 0);
    }
    for dir in ["plugins/hello", "run/hello", "events", "logs", "logs/hello"] {
        assert_eq!(mode(&data.join(dir)), 0o700, "{dir}");
    }
    for file in ["admin.token", "read.token", "torud.sock", "users.json"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
        assert_eq!(owner(&data.join(file)), 0, "{file}");
    }
    // Nothing in the data directory is readable or writable by group or others.
    let mut stack = vec![data.clone()];
    let mut seen = 0;
    while let Some(path) = stack.pop() {
        let m = mode(&path);
        assert_eq!(m & 0o066, 0, "{} is {m:04o}", path.display());
        seen += 1;
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(seen > 15, "walked {seen} entries");
    assert!(
        data.join("storage.redb").exists() && data.join("state.json").exists(),
        "storage and state were walked"
    );
    let stderr = d.daemon_stderr();
    assert!(
        stderr.contains("isolation: per-plugin users (uids 524288–589823), cgroup v2 /"),
        "{stderr}"
    );
}

#[tokio::test]
async fn descriptors_the_daemon_inherited_do_not_reach_plugins() {
    let mut d = Daemon::new(&[]);
    // SAFETY: a plain open of a file the test owns; closed at the end.
    let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    assert!(fd > 2);
    let high = 77;
    assert_eq!(unsafe { libc::dup2(fd, high) }, high);
    d.inherit_fd = Some(high);
    d.install_fixture("hostile", "hostile", &["--other", "nobody"]);
    d.start().await;
    let daemon_fds: Vec<String> = std::fs::read_dir(daemon_fd_dir(d.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        daemon_fds.contains(&high.to_string()),
        "the daemon inherited fd {high}: {daemon_fds:?}"
    );
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["hostile"])
        .await;
    enable(&mut client, "hostile").await;
    let report = read_json(&d.data_dir.join("plugins/hostile/hostile.json")).await;
    let fds: Vec<u64> = report["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        fds.iter().all(|&fd| fd <= 3),
        "the plugin holds descriptors beyond stdio (3 is the listing's own): {fds:?}"
    );
    unsafe {
        libc::close(high);
        libc::close(fd);
    }
}

/// Waits until `pid` leads a session of its own (left the plugin's session and group).
async fn wait_for_setsid(pid: u32) {
    let session = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest = stat.rsplit(')').next().unwrap_or("").to_owned();
        rest.split_whitespace().nth(3).map(str::to_owned)
    };
    wait_until("the grandchild's setsid()", SECS10, || {
        session() == Some(pid.to_string())
    })
    .await;
}

/// Starts a daemon with the `setsid-grandchild` fixture enabled; returns the grandchild's pid.
async fn daemon_with_a_setsid_grandchild() -> (Daemon, Client, u32) {
    let (d, client) = start_enabled(
        &["--stop-grace", "300ms", "--kill-grace", "300ms"],
        |d| {
            d.install_fixture("forker", "setsid-grandchild", &[]);
        },
        &["forker"],
    )
    .await;
    let pid_file = d.data_dir.join("plugins/forker/grandchild.pid");
    let grandchild = read_pid(&pid_file).await;
    std::fs::remove_file(&pid_file).unwrap();
    assert!(!process_gone(grandchild));
    wait_for_setsid(grandchild).await;
    (d, client, grandchild)
}

#[tokio::test]
async fn a_setsid_grandchild_of_a_metadata_probe_does_not_outlive_the_probe() {
    let mut d = Daemon::new(&[]);
    // The probe has no directory of its own: it leaves the pid in a world-writable one.
    let drop_box = d.root.path().join("drop");
    std::fs::create_dir(&drop_box).unwrap();
    std::fs::set_permissions(&drop_box, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let pid_file = drop_box.join("grandchild.pid");
    d.install_fixture(
        "prober",
        "normal",
        &["--probe-grandchild", pid_file.to_str().unwrap()],
    );
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["prober"])
        .await;
    let grandchild = read_pid(&pid_file).await;
    wait_until("the probe's grandchild to die", SECS10, || {
        process_gone(grandchild)
    })
    .await;
}

#[tokio::test]
async fn a_setsid_grandchild_does_not_outlive_disable() {
    let (_d, mut client, grandchild) = daemon_with_a_setsid_grandchild().await;
    disable(&mut client, "forker").await;
    wait_until("the grandchild to die", Duration::from_secs(5), || {
        process_gone(grandchild)
    })
    .await;
}

#[tokio::test]
async fn a_setsid_grandchild_does_not_outlive_restart() {
    let (d, mut client, grandchild) = daemon_with_a_setsid_grandchild().await;
    let req = torud_api::pb::RestartPluginRequest {
        plugin_id: "forker".into(),
    };
    client.restart_plugin(req).await.unwrap();
    wait_until("the grandchild to die", Duration::from_secs(5), || {
        process_gone(grandchild)
    })
    .await;
    // The new run has a grandchild of its own, alive.
    let next = read_pid(&d.data_dir.join("plugins/forker/grandchild.pid")).await;
    assert_ne!(next, grandchild);
    assert!(!process_gone(next));
}

#[tokio::test]
async fn a_setsid_grandchild_does_not_outlive_a_daemon_shutdown() {
    let (mut d, _client, grandchild) = daemon_with_a_setsid_grandchild().await;
    assert!(d.stop().await.success());
    wait_until("the grandchild to die", Duration::from_secs(5), || {
        process_gone(grandchild)
    })
    .await;
}

#[tokio::test]
async fn a_plugin_cannot_point_the_daemon_at_another_plugins_socket() {
    let (d, mut client) = start_enabled(
        &["--start-timeout", "3s", "--backoff-base", "1h"],
        |d| {
            d.install_fixture("victim", "normal", &[]);
            d.install_fixture("redirect", "redirect", &["--other", "victim"]);
        },
        &["victim"],
    )
    .await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["redirect"])
        .await;
    let victim_uid = owner(&d.data_dir.join("plugins/victim"));
    let err = client
        .enable_plugin(torud_api::pb::EnablePluginRequest {
            plugin_id: "redirect".into(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("it is a symbolic link; a plugin's socket must be the socket itself"),
        "{}",
        err.message()
    );
    assert_ne!(victim_uid, owner(&d.data_dir.join("plugins/redirect")));
    assert_eq!(
        d.log_text("victim")
            .matches("received lifecycle init")
            .count(),
        1,
        "the victim got its own init only, not the redirected plugin's"
    );
}

#[tokio::test]
async fn an_executable_its_user_cannot_reach_is_a_clear_error() {
    let (d, mut client) = start_discovered(
        &[],
        |d| {
            d.install_fixture("fx", "normal", &[]);
        },
        &["fx"],
    )
    .await;
    std::fs::set_permissions(&d.plugins_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = client
        .enable_plugin(torud_api::pb::EnablePluginRequest {
            plugin_id: "fx".into(),
        })
        .await
        .unwrap_err();
    let expected = format!(
        "cannot reach {}: the directory {} is mode 0700 owned by 0:0; let it be traversed (chmod o+x {})",
        d.plugins_dir.join("fx.binary").display(),
        d.plugins_dir.display(),
        d.plugins_dir.display()
    );
    assert!(err.message().contains(&expected), "{}", err.message());
    assert!(
        err.message().contains("--plugin-user fx=USER"),
        "{}",
        err.message()
    );
    // The `--metadata` probe, unprivileged too, says the same on a rescan.
    let report = rescan(&mut client).await;
    let skipped = format!("{:?}", report);
    assert!(skipped.contains("chmod o+x"), "{skipped}");
}

#[tokio::test]
async fn root_is_only_an_explicit_choice_per_plugin() {
    let (d, _client) = start_enabled(
        &["--plugin-user", "sys=root", "--plugin-user", "other=65534"],
        |d| {
            d.install_fixture("sys", "hostile", &["--other", "other"]);
            d.install_fixture("other", "hostile", &["--other", "sys"]);
        },
        &["sys", "other"],
    )
    .await;
    let sys = read_json(&d.data_dir.join("plugins/sys/hostile.json")).await;
    assert_eq!(sys["uid"], 0);
    assert_eq!(
        sys["admin.token"], "allowed",
        "root chosen for it, root it is"
    );
    let other = read_json(&d.data_dir.join("plugins/other/hostile.json")).await;
    assert_eq!(other["uid"], 65534);
    assert!(other["admin.token"].as_str().unwrap().starts_with("denied"));
    assert_eq!(owner(&d.data_dir.join("plugins/other")), 65534);
    let stderr = d.daemon_stderr();
    assert!(
        stderr.contains("chosen users other=65534 sys=0"),
        "{stderr}"
    );
}

#[tokio::test]
async fn without_root_a_hostile_plugin_sees_only_its_own_directories() {
    const NOBODY: u32 = 65534;
    let mut d = Daemon::new(&[]);
    d.hand_to(NOBODY);
    d.install_fixture("victim", "normal", &[]);
    let token = d.data_dir.join("admin.token");
    let token = token.to_str().unwrap();
    d.install_fixture(
        "hostile",
        "hostile",
        &["--other", "victim", "--probe-read", token],
    );
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["victim", "hostile"])
        .await;
    let name = get(&mut client, "hostile").await.name;
    assert_eq!(
        name, "Fixture hostile probe denied",
        "the --metadata probe is confined too"
    );
    enable(&mut client, "victim").await;
    let secret = d.data_dir.join("plugins/victim/secret.txt");
    std::fs::write(&secret, "victim's secret").unwrap();
    std::os::unix::fs::chown(&secret, Some(NOBODY), Some(NOBODY)).unwrap();
    enable(&mut client, "hostile").await;
    let report = read_json(&d.data_dir.join("plugins/hostile/hostile.json")).await;
    assert_eq!(report["uid"], NOBODY, "the daemon's own user");
    assert_eq!(report["write own dir"], "allowed");
    for what in [
        "admin.token",
        "read.token",
        "storage.redb",
        "state.json",
        "list events",
        "list logs",
        "list other's logs",
        "list other's dir",
        "read other's secret",
        "list other's run dir",
        "connect other's socket",
        "connect control socket",
        "create in data dir",
        "daemon environ",
        "signal daemon",
    ] {
        let outcome = report[what].as_str().unwrap();
        assert!(
            outcome.starts_with("denied"),
            "a plugin of an unprivileged daemon could {what}: {outcome}; {report:#}"
        );
    }
    assert!(d.data_dir.join("admin.token").exists() && d.data_dir.join("events").exists());
    let stderr = d.daemon_stderr();
    assert!(
        stderr.contains(
            "isolation: same user as the daemon, a private mount namespace per plugin showing \
             only its own directories, Landlock ABI 7 (ptrace, signals and abstract sockets scoped), no cgroups"
        ),
        "{stderr}"
    );
    assert_eq!(
        state_of(&get(&mut client, "victim").await),
        torud_api::pb::PluginState::Running
    );
}

#[tokio::test]
async fn without_root_a_plugin_cannot_point_the_daemon_at_another_plugins_socket() {
    let mut d = Daemon::new(&["--start-timeout", "3s", "--backoff-base", "1h"]);
    d.hand_to(65534);
    d.install_fixture("victim", "normal", &[]);
    d.install_fixture("redirect", "redirect", &["--other", "victim"]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["victim", "redirect"])
        .await;
    enable(&mut client, "victim").await;
    let err = client
        .enable_plugin(torud_api::pb::EnablePluginRequest {
            plugin_id: "redirect".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("symbolic link"), "{}", err.message());
    assert_eq!(
        d.log_text("victim")
            .matches("received lifecycle init")
            .count(),
        1,
        "the victim got its own init only"
    );
}

/// Bytes a client of `socket` receives after the HTTP/2 preface (0: closed on it), run as
/// uid 65534, in a user namespace of its own when `own_namespace`.
fn control_socket_answer(socket: &Path, own_namespace: bool) -> usize {
    let script = "import socket, sys\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.connect(sys.argv[1])\n\
        s.settimeout(5)\n\
        try:\n    s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))\n    data = s.recv(100)\nexcept OSError:\n    data = b''\n\
        print(len(data))\n";
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    if own_namespace {
        cmd.args(["unshare", "-U"]);
    }
    let out = cmd
        .args(["/usr/bin/python3", "-c", script])
        .arg(socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[tokio::test]
async fn without_root_the_control_socket_refuses_clients_in_other_user_namespaces() {
    let mut d = Daemon::new(&[]);
    d.hand_to(65534);
    d.start().await;
    let socket = d.data_dir.join(torud_api::CONTROL_SOCKET);
    let answered = control_socket_answer(&socket, false);
    assert!(answered > 0, "the daemon's user in its namespace is served");
    assert_eq!(
        control_socket_answer(&socket, true),
        0,
        "closed on a plugin-like client"
    );
    assert!(d
        .daemon_stderr()
        .contains("control socket: refused a client"));
    // Root is served.
    let mut client = d.client().await;
    client
        .list_plugins(torud_api::pb::ListPluginsRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn without_root_or_cgroups_a_setsid_grandchild_still_dies_with_its_plugin() {
    let mut d = Daemon::new(&["--stop-grace", "300ms", "--kill-grace", "300ms"]);
    d.hand_to(65534);
    d.install_fixture("forker", "setsid-grandchild", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["forker"])
        .await;
    enable(&mut client, "forker").await;
    assert!(d.daemon_stderr().contains("no cgroups"));
    let grandchild = read_pid(&d.data_dir.join("plugins/forker/grandchild.pid")).await;
    wait_for_setsid(grandchild).await;
    disable(&mut client, "forker").await;
    wait_until("the grandchild to die", Duration::from_secs(5), || {
        process_gone(grandchild)
    })
    .await;
}

#[tokio::test]
async fn the_cgroups_of_a_sigkilled_daemon_are_emptied_at_the_next_start() {
    let (mut d, _client) = start_enabled(
        &[],
        |d| {
            d.install_fixture("forker", "scrubbed-grandchild", &[]);
        },
        &["forker"],
    )
    .await;
    let pid_file = d.data_dir.join("plugins/forker/grandchild.pid");
    let grandchild = read_pid(&pid_file).await;
    wait_for_setsid(grandchild).await;
    wait_until("the grandchild's empty environment", SECS10, || {
        std::fs::read(format!("/proc/{grandchild}/environ")).is_ok_and(|e| e.is_empty())
    })
    .await;
    d.kill9().await;
    assert!(
        !process_gone(grandchild),
        "nothing but its cgroup finds it now"
    );
    d.start().await;
    wait_until(
        "the grandchild to be killed",
        Duration::from_secs(5),
        || process_gone(grandchild),
    )
    .await;
    // The sweep says so once the cgroup is empty, which can be just after the process is.
    wait_until("the sweep to report it", SECS10, || {
        d.daemon_stderr()
            .contains("killed plugin processes left over from an earlier run")
    })
    .await;
}
