//! Discovery through the real daemon: bad metadata is skipped with a reason while the others
//! load, and rescans pick up added and removed files.

mod common;

use common::*;
use torud_api::pb;
use torud_api::pb::PluginState;

#[tokio::test]
async fn misbehaving_metadata_is_skipped_and_never_delays_the_others() {
    let mut d = Daemon::new(&["--metadata-timeout", "3s"]);
    d.install_fixture("hangs", "hang-metadata", &[]);
    d.install_fixture("bad", "bad-metadata", &[]);
    d.install_fixture("garbage", "garbage-metadata", &[]);
    d.install_fixture("good", "normal", &[]);
    d.install_fixture("twin", "normal", &[]);
    common::write_executable(
        &d.plugins_dir.join("zz-twin.binary"),
        &std::fs::read_to_string(d.plugins_dir.join("twin.binary")).unwrap(),
    );
    let outside = d.root.path().join("outside.binary");
    d.install_hello("hello");
    std::fs::rename(d.plugins_dir.join("hello.binary"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, d.plugins_dir.join("linked.binary")).unwrap();
    common::write_executable(
        &d.plugins_dir.join("not-a-plugin.txt"),
        "#!/bin/sh\nexit 1\n",
    );
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events
        .wait_for("good added", SECS10, |e| {
            e.plugin_id == "good" && e.kind == pb::EventKind::PluginAdded as i32
        })
        .await;
    let hang_skip = events
        .wait_for("hanging plugin skipped", SECS10, |e| {
            e.kind == pb::EventKind::PluginSkipped as i32
                && e.details["path"].ends_with("hangs.binary")
        })
        .await;
    assert!(
        hang_skip
            .reason
            .contains("did not answer --metadata within 3s"),
        "{}",
        hang_skip.reason
    );

    let list = client
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list.plugins.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["good", "twin"]);
    let reason_for = |file: &str| {
        list.skipped
            .iter()
            .find(|s| s.path.ends_with(file))
            .unwrap_or_else(|| panic!("{file} not reported as skipped: {:?}", list.skipped))
            .reason
            .clone()
    };
    assert!(reason_for("bad.binary").contains("id \"bad id!\" is invalid"));
    assert!(reason_for("garbage.binary").contains("not valid JSON"));
    assert!(reason_for("linked.binary").contains("outside the plugins directory"));
    let twin = reason_for("twin.binary");
    assert!(twin.contains("duplicate id \"twin\""), "{twin}");
    assert_eq!(list.skipped.len(), 5, "{:?}", list.skipped);
}

#[tokio::test]
async fn rescan_picks_up_a_new_plugin_and_forgets_a_removed_one() {
    let mut d = Daemon::new(&[]);
    d.start().await;
    let mut client = d.client().await;
    let report = rescan(&mut client).await;
    assert!(report.added.is_empty() && report.removed.is_empty());

    let file = d.install_fixture("late", "normal", &[]);
    let report = rescan(&mut client).await;
    assert_eq!(report.added, ["late"]);
    let plugin = enable(&mut client, "late").await;
    assert_eq!(state_of(&plugin), PluginState::Running);
    let pid = plugin.pid;
    let report = rescan(&mut client).await;
    assert!(report.added.is_empty() && report.removed.is_empty() && report.updated.is_empty());

    std::fs::remove_file(file).unwrap();
    let report = rescan(&mut client).await;
    assert_eq!(report.removed, ["late"]);
    assert!(process_gone(pid), "a removed plugin must be stopped");
    let err = client
        .get_plugin(pb::GetPluginRequest {
            plugin_id: "late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let list = client
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.plugins.is_empty());
}

#[tokio::test]
async fn new_metadata_leaves_a_running_plugin_healthy() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("steady", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["steady"]).await;
    let plugin = enable(&mut client, "steady").await;

    // A new version: the plugin is updated, and its health is untouched.
    d.install_fixture("steady", "normal", &["--version", "0.2"]);
    let report = rescan(&mut client).await;
    assert_eq!(report.updated, ["steady"]);
    assert!(plugin.healthy);
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let check = tonic_health::pb::HealthCheckRequest {
        service: "toru.plugin.steady".into(),
    };
    let status = health.check(check).await.unwrap().into_inner().status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn a_failing_probe_of_a_known_plugin_keeps_it_running() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("steady", "normal", &["--version", "0.2"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["steady"]).await;
    let pid = enable(&mut client, "steady").await.pid;

    // Its file now answers --metadata with garbage: skipped, but not removed.
    d.install_fixture("steady", "garbage-metadata", &[]);
    let report = rescan(&mut client).await;
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(report.skipped.len(), 1);
    assert!(
        !process_gone(pid),
        "a plugin whose file is still there must keep running"
    );
    let plugin = get(&mut client, "steady").await;
    assert_eq!(
        (state_of(&plugin), plugin.version.as_str()),
        (PluginState::Running, "0.2")
    );
}

#[tokio::test]
async fn the_logs_folder_holds_only_plugin_ids_folders() {
    let (d, mut client) = start_enabled(
        &[],
        |d| drop(d.install_fixture("solo", "normal", &[])),
        &["solo"],
    )
    .await;
    disable(&mut client, "solo").await;
    let mut names: Vec<String> = std::fs::read_dir(d.data_dir.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["solo"], "logs/ must hold one folder per plugin id");
}

/// Installs the fixture as `file` declaring `id` at `version`, answering after `delay`.
fn install_as(d: &Daemon, file: &str, id: &str, version: &str, delay: &str) {
    let script = format!(
        "#!/bin/sh\nsleep {delay}\nexec python3 {FIXTURE} --id {id} --mode normal --version {version} \"$@\"\n"
    );
    write_executable(&d.plugins_dir.join(file), &script);
}

/// Waits (with a deadline) until plugin `id` is known and running.
async fn running(client: &mut Client, id: &str) -> pb::Plugin {
    let deadline = tokio::time::Instant::now() + SECS10;
    loop {
        let request = pb::GetPluginRequest {
            plugin_id: id.into(),
        };
        let plugin = client
            .get_plugin(request)
            .await
            .map(|r| r.into_inner().plugin);
        if let Ok(Some(plugin)) = &plugin {
            if state_of(plugin) == PluginState::Running {
                return plugin.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} not running within 10 s: {plugin:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The command line of a process, its NULs as spaces.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[tokio::test]
async fn of_two_files_declaring_one_id_the_first_by_name_runs_every_time() {
    let mut d = Daemon::new(&[]);
    // The first by name answers --metadata later: a race would let the second win.
    install_as(&d, "a-dup.binary", "dup", "1.0-a", "0.15");
    install_as(&d, "b-dup.binary", "dup", "2.0-b", "0");
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["dup"])
        .await;
    enable(&mut client, "dup").await;
    for round in 0..6 {
        if round > 0 {
            // Half the rounds restart the daemon, half rescan it.
            if round % 2 == 0 {
                assert_eq!(d.stop().await.code(), Some(0));
                d.start().await;
                client = d.client().await;
            } else {
                rescan(&mut client).await;
            }
        }
        running(&mut client, "dup").await;
        let list = client
            .list_plugins(pb::ListPluginsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let dup = &list.plugins[0];
        assert_eq!(list.plugins.len(), 1, "round {round}");
        assert!(
            dup.binary_path.ends_with("a-dup.binary"),
            "round {round}: {dup:?}"
        );
        assert_eq!(dup.version, "1.0-a", "round {round}");
        assert!(
            cmdline(dup.pid).contains("1.0-a"),
            "round {round}: {}",
            cmdline(dup.pid)
        );
        let skipped: Vec<_> = list.skipped.iter().collect();
        assert_eq!(skipped.len(), 1, "round {round}: {skipped:?}");
        assert!(skipped[0].path.ends_with("b-dup.binary"), "round {round}");
        assert!(
            skipped[0].reason.contains("duplicate id \"dup\"")
                && skipped[0].reason.contains("a-dup.binary"),
            "round {round}: {}",
            skipped[0].reason
        );
    }
}

#[tokio::test]
async fn a_file_rewritten_to_declare_another_id_is_not_restarted_under_the_old_one() {
    let (d, mut client) = start_enabled(
        &[],
        |d| {
            d.install_fixture("one", "normal", &[]);
            d.install_fixture("two", "normal", &[]);
        },
        &["one", "two"],
    )
    .await;
    install_as(&d, "one.binary", "two", "0.9", "0");
    let err = client
        .restart_plugin(pb::RestartPluginRequest {
            plugin_id: "one".into(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("now declares id \"two\", not \"one\""),
        "{err:?}"
    );
    let one = get(&mut client, "one").await;
    assert_eq!(state_of(&one), PluginState::Disabled);
    assert!(
        one.last_error.contains("declares id \"two\""),
        "{}",
        one.last_error
    );
    assert_eq!(one.pid, 0, "nothing runs as one");
    // The other plugin is untouched.
    assert_eq!(
        state_of(&get(&mut client, "two").await),
        PluginState::Running
    );
}

#[tokio::test]
async fn a_first_file_answering_after_the_hold_takes_its_id_over() {
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    // The first by name answers --metadata after the one-second hold: the second runs
    // until then, and is replaced.
    install_as(&d, "a-dup.binary", "dup", "1.0-a", "1.5");
    install_as(&d, "b-dup.binary", "dup", "2.0-b", "0");
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    let updated = events
        .wait_for("dup moved to a-dup.binary", SECS10, |e| {
            e.plugin_id == "dup" && e.kind == pb::EventKind::PluginUpdated as i32
        })
        .await;
    assert!(
        updated.reason.contains("a-dup.binary"),
        "{}",
        updated.reason
    );
    let deadline = tokio::time::Instant::now() + SECS10;
    let dup = loop {
        let dup = running(&mut client, "dup").await;
        if cmdline(dup.pid).contains("1.0-a") {
            break dup;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b-dup.binary still runs: {dup:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(dup.binary_path.ends_with("a-dup.binary"));
    let list = client
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.skipped.len(), 1, "{:?}", list.skipped);
    assert!(list.skipped[0].path.ends_with("b-dup.binary"));
}

#[tokio::test]
async fn control_characters_in_metadata_or_a_file_name_are_refused_with_a_reason() {
    let mut d = Daemon::new(&[]);
    let fields = ["name", "version", "author", "icon", "route", "description"];
    for field in fields {
        d.install_fixture(
            &format!("m-{field}"),
            "hostile-metadata",
            &["--field", field],
        );
    }
    let red = d.install_fixture("red", "normal", &[]);
    let hostile_name = d.plugins_dir.join("e\x1b[31mRED.binary");
    std::fs::rename(&red, &hostile_name).unwrap();
    d.install_fixture("good", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let report = rescan(&mut client).await;
    let reason_for = |file: &str| {
        report
            .skipped
            .iter()
            .find(|s| s.path.ends_with(file))
            .unwrap_or_else(|| panic!("{file:?} not reported as skipped: {:?}", report.skipped))
            .reason
            .clone()
    };
    for field in fields {
        let reason = reason_for(&format!("m-{field}.binary"));
        assert!(
            reason.starts_with(&format!(
                "invalid metadata: {field} contains the control character U+001B at character 2"
            )),
            "{reason}"
        );
    }
    let reason = reason_for("e\x1b[31mRED.binary");
    assert!(
        reason.starts_with("its file name contains the control character U+001B at character 1")
            && reason.contains("rename the file"),
        "{reason}"
    );
    assert_eq!(
        report.skipped.len(),
        fields.len() + 1,
        "{:?}",
        report.skipped
    );
    let list = client
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list.plugins.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["good"]);
}

#[tokio::test]
async fn the_first_answers_wait_for_the_whole_plugins_directory() {
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    d.install_fixture("quick", "normal", &[]);
    // Its --metadata takes 2.5 s: the daemon listens long before the first scan ends.
    d.install_fixture("slow", "slow-metadata", &["--ms", "2500"]);
    d.start().await;
    let began = std::time::Instant::now();
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let daemon = || tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    // Health answers at once, and says the daemon is not ready yet.
    let early = health.check(daemon()).await.unwrap().into_inner().status;
    assert!(
        began.elapsed() < std::time::Duration::from_millis(2000),
        "health was held"
    );
    assert_eq!(early, ServingStatus::NotServing as i32);
    // A call without a token is refused at once, not held.
    let mut anonymous =
        torud_api::pb::plugin_service_client::PluginServiceClient::new(d.tcp_channel().await);
    let refused = anonymous
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        began.elapsed() < std::time::Duration::from_millis(2000),
        "the refusal was held: {:?}",
        began.elapsed()
    );

    // The first ListPlugins lists the slow plugin too, and naming it works at once.
    let mut client = d.client().await;
    let list = client
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list.plugins.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["quick", "slow"]);
    client
        .get_plugin(pb::GetPluginRequest {
            plugin_id: "slow".into(),
        })
        .await
        .unwrap();

    // Ready once both enabled plugins have started.
    let mut watch = health.watch(daemon()).await.unwrap().into_inner();
    tokio::time::timeout(SECS10, async {
        while let Some(status) = watch.message().await.unwrap() {
            if status.status == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("the health stream ended");
    })
    .await
    .expect("the daemon became ready");
    for id in ["quick", "slow"] {
        let plugin = client
            .get_plugin(pb::GetPluginRequest {
                plugin_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .plugin
            .unwrap();
        assert_eq!(
            plugin.state,
            PluginState::Running as i32,
            "{id}: {plugin:?}\n{}",
            d.daemon_stderr()
        );
    }
    assert!(d.daemon_stderr().contains("ready"));
}
