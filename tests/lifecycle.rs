//! Lifecycle through the real daemon: enable, disable, persistence, crash and backoff,
//! crash loop, process cleanup, escalation.

mod common;

use std::time::{Duration, Instant};

use common::*;
use torud_api::pb;
use torud_api::pb::PluginState;

fn id_req(id: &str) -> pb::EnablePluginRequest {
    pb::EnablePluginRequest {
        plugin_id: id.into(),
    }
}

#[tokio::test]
async fn enable_spawns_and_becomes_ready_then_disable_sends_shutdown() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["hello"]).await;

    let plugin = enable(&mut client, "hello").await;
    assert_eq!(state_of(&plugin), PluginState::Running);
    assert!(plugin.healthy && plugin.enabled);
    assert_eq!(plugin.protocol_version, 2);
    let pid = plugin.pid;
    assert!(pid > 0 && !process_gone(pid));

    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(
        health
            .check(check("toru.plugin.hello"))
            .await
            .unwrap()
            .into_inner()
            .status,
        serving
    );
    assert_eq!(
        health.check(check("")).await.unwrap().into_inner().status,
        serving
    );

    let plugin = disable(&mut client, "hello").await;
    assert_eq!(state_of(&plugin), PluginState::Stopped);
    assert!(!plugin.enabled && !plugin.healthy && plugin.pid == 0);
    assert!(
        process_gone(pid),
        "pid {pid} still alive after DisablePlugin returned"
    );
    let exit = plugin.last_exit.unwrap();
    assert_eq!(
        exit.status,
        Some(pb::exit_info::Status::Code(0)),
        "it should exit on the shutdown message"
    );
    assert!(d
        .log_text("hello")
        .contains("shutdown requested by the host"));
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let status = health
        .check(check("toru.plugin.hello"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, not_serving);
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test]
async fn enabled_state_persists_across_daemon_restart() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("keep", "normal", &[]);
    d.install_fixture("off", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["keep", "off"]).await;
    let pid = enable(&mut client, "keep").await.pid;
    let status = d.stop().await;
    assert_eq!(status.code(), Some(0));
    assert!(process_gone(pid), "plugin outlived a SIGTERMed daemon");

    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    // The previous run's events replay first; wait for the new run's ready.
    let stopped = events
        .wait_state("keep", PluginState::Stopped, SECS10)
        .await;
    let ready = events
        .wait_state("keep", PluginState::Running, SECS10)
        .await;
    assert!(ready.seq > stopped.seq);
    let list = client
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let states: Vec<(String, bool)> = list
        .plugins
        .iter()
        .map(|p| (p.id.clone(), p.enabled))
        .collect();
    assert_eq!(
        states,
        [("keep".to_string(), true), ("off".to_string(), false)]
    );
}

#[tokio::test]
async fn sigkill_of_a_plugin_is_a_crash_then_a_restart_after_the_backoff() {
    let mut d = Daemon::new(&["--backoff-base", "300ms"]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["hello"]).await;
    let old_pid = enable(&mut client, "hello").await.pid;

    signal(old_pid, libc::SIGKILL);
    let crashed = events
        .wait_state("hello", PluginState::Crashed, SECS10)
        .await;
    let exit = crashed.exit.expect("crash carries the exit");
    assert_eq!(exit.status, Some(pb::exit_info::Status::Signal(9)));
    assert!(crashed.reason.contains("signal 9"), "{}", crashed.reason);
    let backoff = events
        .wait_state("hello", PluginState::Backoff, SECS10)
        .await;
    let crash_time = crashed.time.unwrap();
    let retry = backoff.next_restart_at.unwrap();
    let delay_ms = (retry.seconds - crash_time.seconds) * 1000
        + (retry.nanos - crash_time.nanos) as i64 / 1_000_000;
    assert!(
        (280..=400).contains(&delay_ms),
        "next restart {delay_ms} ms after the crash"
    );
    let waited = Instant::now();
    let starting = events
        .wait_state("hello", PluginState::Starting, SECS10)
        .await;
    events
        .wait_state("hello", PluginState::Running, SECS10)
        .await;
    assert!(waited.elapsed() < Duration::from_secs(3));
    let start_time = starting.time.unwrap();
    let gap_ms = (start_time.seconds - crash_time.seconds) * 1000
        + (start_time.nanos - crash_time.nanos) as i64 / 1_000_000;
    assert!(gap_ms >= 280, "restarted only {gap_ms} ms after the crash");

    let plugin = get(&mut client, "hello").await;
    assert_eq!(state_of(&plugin), PluginState::Running);
    assert!(plugin.healthy);
    assert_ne!(plugin.pid, old_pid);
    assert_eq!((plugin.restart_count, plugin.consecutive_failures), (1, 1));
    assert_eq!(
        plugin.last_exit.unwrap().status,
        Some(pb::exit_info::Status::Signal(9))
    );
    // The supervisor's notes are in the plugin's own log, between its lines.
    let log = d.log_text("hello");
    let crash = log.find(r#""stream":"supervisor","level":"error","message":"crashed: unexpected exit: killed by signal 9"#);
    let backoff = log.find(r#""message":"backoff: restarting in 300ms""#);
    assert!(crash.is_some() && backoff > crash, "{log}");
}

#[tokio::test]
async fn always_failing_plugin_walks_the_backoff_and_ends_disabled() {
    let mut d = Daemon::new(&["--backoff-base", "10ms", "--backoff-max", "40ms"]);
    d.install_fixture("doomed", "crash", &["--ms", "0"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["doomed"]).await;

    let err = client.enable_plugin(id_req("doomed")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("failed to start") && err.message().contains("code 3"),
        "{}",
        err.message()
    );

    let disabled = events
        .wait_state("doomed", PluginState::Disabled, Duration::from_secs(60))
        .await;
    assert!(
        disabled.reason.contains("crash loop"),
        "{}",
        disabled.reason
    );
    let transitions: Vec<PluginState> = events
        .seen
        .iter()
        .filter(|e| e.plugin_id == "doomed" && e.kind == pb::EventKind::StateChanged as i32)
        .map(|e| PluginState::try_from(e.to_state).unwrap())
        .collect();
    let mut expected = Vec::new();
    for run in 1..=10 {
        expected.extend([PluginState::Starting, PluginState::Crashed]);
        expected.push(if run < 10 {
            PluginState::Backoff
        } else {
            PluginState::Disabled
        });
    }
    assert_eq!(transitions, expected);
    let delays: Vec<i64> = events
        .seen
        .iter()
        .filter(|e| e.to_state == PluginState::Backoff as i32)
        .map(|e| {
            let (t, n) = (e.time.unwrap(), e.next_restart_at.unwrap());
            ((n.seconds - t.seconds) * 1000 + (n.nanos - t.nanos) as i64 / 1_000_000 + 2) / 10 * 10
        })
        .collect();
    assert_eq!(delays, [10, 20, 40, 40, 40, 40, 40, 40, 40]);
    let crashed = events
        .seen
        .iter()
        .find(|e| e.to_state == PluginState::Crashed as i32)
        .unwrap();
    let tail = &crashed.exit.as_ref().unwrap().stderr_tail;
    assert!(
        tail.iter().any(|l| l.contains("crashing before binding")),
        "{tail:?}"
    );

    let plugin = get(&mut client, "doomed").await;
    assert_eq!(state_of(&plugin), PluginState::Disabled);
    assert!(!plugin.enabled && plugin.last_error.contains("crash loop"));
    assert_eq!(plugin.consecutive_failures, 10);
}

#[tokio::test]
async fn sigkill_of_the_daemon_leaves_no_plugin_alive() {
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    d.install_hello("hello");
    d.install_fixture("py", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    let a = events
        .wait_state("hello", PluginState::Running, SECS10)
        .await;
    let b = events.wait_state("py", PluginState::Running, SECS10).await;
    let pids: Vec<u32> = [a, b]
        .iter()
        .map(|e| e.details["pid"].parse().unwrap())
        .collect();
    d.kill9().await;
    wait_until(
        "plugins to die with the daemon",
        Duration::from_secs(5),
        || pids.iter().all(|p| process_gone(*p)),
    )
    .await;
}

#[tokio::test]
async fn a_ten_megabyte_stdout_flood_does_not_block_the_plugin() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("flood", "flood", &["--bytes", "10485760"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["flood"]).await;
    let plugin = enable(&mut client, "flood").await;
    assert_eq!(state_of(&plugin), PluginState::Running);
    let logs = d.data_dir.join("logs/flood");
    let segments = || -> Vec<u64> {
        std::fs::read_dir(&logs)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            .map(|e| e.metadata().unwrap().len())
            .collect()
    };
    wait_until("10 MB of stdout in the log", SECS10, || {
        segments().iter().sum::<u64>() >= 10 * 1024 * 1024
    })
    .await;
    assert!(
        segments().len() >= 2,
        "the log should have rotated at 10 MB"
    );
    wait_until("the plugin to go on after its flood", SECS10, || {
        d.log_text("flood").contains("flood done")
    })
    .await;
}

#[tokio::test]
async fn a_plugin_ignoring_sigterm_is_killed_after_the_grace() {
    let mut d = Daemon::new(&["--stop-grace", "300ms", "--kill-grace", "300ms"]);
    d.install_fixture("stubborn", "ignore-term", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["stubborn"]).await;
    let pid = enable(&mut client, "stubborn").await.pid;
    let began = Instant::now();
    let plugin = disable(&mut client, "stubborn").await;
    assert!(
        began.elapsed() >= Duration::from_millis(600),
        "escalated too early: {:?}",
        began.elapsed()
    );
    assert_eq!(
        plugin.last_exit.unwrap().status,
        Some(pb::exit_info::Status::Signal(9))
    );
    assert!(process_gone(pid));
    assert!(
        d.log_text("stubborn")
            .contains("received lifecycle shutdown"),
        "the shutdown message comes first"
    );
}

#[tokio::test]
async fn a_forked_grandchild_dies_with_its_plugin() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("forker", "fork-grandchild", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["forker"]).await;
    enable(&mut client, "forker").await;
    let pid_file = d.data_dir.join("plugins/forker/grandchild.pid");
    let grandchild: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!process_gone(grandchild));
    disable(&mut client, "forker").await;
    wait_until("the grandchild to die", Duration::from_secs(5), || {
        process_gone(grandchild)
    })
    .await;
}

#[tokio::test]
async fn a_start_slower_than_the_start_timeout_fails_with_that_reason() {
    let mut d = Daemon::new(&["--start-timeout", "500ms", "--backoff-base", "1h"]);
    d.install_fixture("sleepy", "slow-start", &["--ms", "5000"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["sleepy"]).await;
    let err = client.enable_plugin(id_req("sleepy")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("not ready within 500ms"),
        "{}",
        err.message()
    );
    let plugin = get(&mut client, "sleepy").await;
    assert_eq!(state_of(&plugin), PluginState::Backoff);
    assert!(plugin.enabled && plugin.next_restart_at.is_some());
}

#[tokio::test]
async fn unknown_and_invalid_ids_are_clear_errors() {
    let mut d = Daemon::new(&[]);
    d.start().await;
    let mut client = d.client().await;
    let err = client
        .get_plugin(pb::GetPluginRequest {
            plugin_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{}", err.message());
    let err = client.enable_plugin(id_req("../etc")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("plugin_id"), "{}", err.message());
    let req = pb::RestartPluginRequest {
        plugin_id: "nope".into(),
    };
    assert_eq!(
        client.restart_plugin(req).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}

#[tokio::test]
async fn enable_is_bounded_by_the_callers_deadline() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("sleepy", "slow-start", &["--ms", "3000"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["sleepy"]).await;
    let mut req = tonic::Request::new(id_req("sleepy"));
    req.set_timeout(Duration::from_millis(300));
    let began = Instant::now();
    let err = client.enable_plugin(req).await.unwrap_err();
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        began.elapsed()
    );
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    // The start goes on: the plugin still becomes ready.
    events
        .wait_state("sleepy", PluginState::Running, SECS10)
        .await;
}

#[tokio::test]
async fn a_v1_plugin_whose_socket_stops_listening_turns_unhealthy() {
    let mut d = Daemon::new(&["--health-interval", "50ms"]);
    d.install_fixture("deaf", "close-listener", &["--ms", "300"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["deaf"]).await;
    let plugin = enable(&mut client, "deaf").await;
    assert!(plugin.healthy);
    let change = events
        .wait_for("health change", SECS10, |e| {
            e.kind == pb::EventKind::HealthChanged as i32
        })
        .await;
    assert!(
        !change.healthy && change.reason.contains("not listening"),
        "{change:?}"
    );
    let plugin = get(&mut client, "deaf").await;
    assert_eq!(
        (state_of(&plugin), plugin.healthy),
        (PluginState::Running, false)
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let req = tonic_health::pb::HealthCheckRequest {
        service: "toru.plugin.deaf".into(),
    };
    let status = health.check(req).await.unwrap().into_inner().status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
}

#[tokio::test]
async fn a_protocol_2_plugin_closing_its_connection_is_a_failed_run() {
    let mut d = Daemon::new(&["--backoff-base", "1h"]);
    d.install_fixture("dropper", "v2-drop", &["--ms", "200"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["dropper"]).await;
    let plugin = enable(&mut client, "dropper").await;
    assert_eq!(plugin.protocol_version, 2);
    let pid = plugin.pid;
    let crashed = events
        .wait_state("dropper", PluginState::Crashed, SECS10)
        .await;
    assert!(
        crashed.reason.contains("closed its connection")
            && crashed
                .reason
                .contains("while its process was still running"),
        "{}",
        crashed.reason
    );
    assert_eq!(
        crashed.exit.unwrap().status,
        Some(pb::exit_info::Status::Signal(9)),
        "the daemon kills it"
    );
    assert!(process_gone(pid));
    events
        .wait_state("dropper", PluginState::Backoff, SECS10)
        .await;
}

#[tokio::test]
async fn a_stable_run_resets_the_failure_count() {
    let mut d = Daemon::new(&["--backoff-base", "10ms", "--stable-window", "500ms"]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["hello"]).await;
    let pid = enable(&mut client, "hello").await.pid;
    signal(pid, libc::SIGKILL);
    events
        .wait_state("hello", PluginState::Crashed, SECS10)
        .await;
    events
        .wait_state("hello", PluginState::Running, SECS10)
        .await;
    let get = || pb::GetPluginRequest {
        plugin_id: "hello".into(),
    };
    let failures = client
        .get_plugin(get())
        .await
        .unwrap()
        .into_inner()
        .plugin
        .unwrap()
        .consecutive_failures;
    assert_eq!(failures, 1);
    let deadline = Instant::now() + SECS10;
    loop {
        let plugin = client
            .get_plugin(get())
            .await
            .unwrap()
            .into_inner()
            .plugin
            .unwrap();
        if plugin.consecutive_failures == 0 {
            assert_eq!(plugin.restart_count, 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failure count was never reset"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_plugin_that_leaves_its_process_group_is_still_stopped() {
    let mut d = Daemon::new(&["--stop-grace", "200ms", "--kill-grace", "200ms"]);
    d.install_fixture("escaper", "escape-group", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["escaper"]).await;
    let pid = enable(&mut client, "escaper").await.pid;
    let req = pb::DisablePluginRequest {
        plugin_id: "escaper".into(),
    };
    let plugin = tokio::time::timeout(SECS10, client.disable_plugin(req))
        .await
        .expect("DisablePlugin hung on a plugin outside its group")
        .unwrap()
        .into_inner()
        .plugin
        .unwrap();
    assert_eq!(
        plugin.last_exit.unwrap().status,
        Some(pb::exit_info::Status::Signal(9))
    );
    assert!(process_gone(pid));
}

#[tokio::test]
async fn leftovers_of_a_sigkilled_daemon_are_killed_at_the_next_start() {
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    d.install_fixture_behind_shell("wrapped", "normal");
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    let ready = events
        .wait_state("wrapped", PluginState::Running, SECS10)
        .await;
    let shell: u32 = ready.details["pid"].parse().unwrap();
    let python = children(shell);
    assert_eq!(python.len(), 1, "the shell runs python as a child");
    d.kill9().await;
    wait_until(
        "the shell to die with the daemon",
        Duration::from_secs(5),
        || process_gone(shell),
    )
    .await;
    assert!(
        !process_gone(python[0]),
        "python outlives the daemon's death (parent-death signal is per process)"
    );
    d.start().await;
    wait_until("the leftover to be killed", Duration::from_secs(5), || {
        process_gone(python[0])
    })
    .await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, None).await;
    let state = match client
        .get_plugin(pb::GetPluginRequest {
            plugin_id: "wrapped".into(),
        })
        .await
    {
        Ok(resp) => resp.into_inner().plugin.unwrap().state,
        Err(_) => 0,
    };
    if state != PluginState::Running as i32 {
        events
            .wait_state("wrapped", PluginState::Running, SECS10)
            .await;
    }
}

#[tokio::test]
async fn disabling_a_protocol_2_plugin_while_it_starts_uses_its_connection() {
    let mut d = Daemon::new(&["--stop-grace", "5s"]);
    d.install_fixture("slow", "v2-slow-ready", &["--ms", "3000"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["slow"]).await;
    let mut enabling = client.clone();
    let enable = tokio::spawn(async move {
        enabling
            .enable_plugin(pb::EnablePluginRequest {
                plugin_id: "slow".into(),
            })
            .await
    });
    events
        .wait_state("slow", PluginState::Starting, SECS10)
        .await;
    wait_until("init to arrive", SECS10, || {
        d.log_text("slow").contains("received lifecycle init")
    })
    .await;
    let began = Instant::now();
    let plugin = disable(&mut client, "slow").await;
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "waited {:?}: shutdown did not reach it",
        began.elapsed()
    );
    assert_eq!(
        plugin.last_exit.unwrap().status,
        Some(pb::exit_info::Status::Code(0))
    );
    assert!(enable.await.unwrap().is_err());
}

#[tokio::test]
async fn a_socket_path_over_the_unix_limit_is_a_clear_error() {
    let mut d = Daemon::new(&[]);
    let long = d.root.path().join("d".repeat(100));
    d.args.extend([
        "--data-dir".to_string(),
        long.to_string_lossy().into_owned(),
    ]);
    d.data_dir = long;
    d.install_fixture("fits", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["fits"])
        .await;
    let err = client
        .enable_plugin(pb::EnablePluginRequest {
            plugin_id: "fits".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("Unix socket limit") && err.message().contains("--data-dir"),
        "{}",
        err.message()
    );
    let plugin = get(&mut client, "fits").await;
    assert_eq!(state_of(&plugin), PluginState::Disabled);
}

#[tokio::test]
async fn a_disable_during_the_start_ends_it_at_once() {
    // A v1 plugin that takes 3 s to bind its socket, and a stop grace of 5 s.
    let mut d = Daemon::new(&["--stop-grace", "5s"]);
    d.install_fixture("sleepy", "slow-start", &["--ms", "3000"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["sleepy"]).await;
    let mut enabling = client.clone();
    let enable = tokio::spawn(async move { enabling.enable_plugin(id_req("sleepy")).await });
    let spawned = events
        .wait_state("sleepy", PluginState::Starting, SECS10)
        .await;
    let pid: u32 = spawned.details["pid"].parse().unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let began = Instant::now();
    let plugin = disable(&mut client, "sleepy").await;
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "a disable during the start took {:?}",
        began.elapsed()
    );
    assert_eq!(state_of(&plugin), PluginState::Stopped);
    assert!(process_gone(pid), "pid {pid} outlived the disable");
    let err = enable.await.unwrap().unwrap_err();
    assert!(err.message().contains("disabled"), "{err:?}");
}

#[tokio::test]
async fn a_plugin_ignoring_sigterm_during_its_start_is_killed_promptly() {
    let mut d = Daemon::new(&["--stop-grace", "5s", "--kill-grace", "5s"]);
    d.install_fixture("stubborn", "stubborn-start", &["--ms", "5000"]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["stubborn"]).await;
    let mut enabling = client.clone();
    let enable = tokio::spawn(async move { enabling.enable_plugin(id_req("stubborn")).await });
    let spawned = events
        .wait_state("stubborn", PluginState::Starting, SECS10)
        .await;
    let pid: u32 = spawned.details["pid"].parse().unwrap();
    wait_until("it to ignore SIGTERM", SECS10, || {
        d.log_text("stubborn").contains("ignoring SIGTERM")
    })
    .await;
    let began = Instant::now();
    let plugin = disable(&mut client, "stubborn").await;
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "a disable during a stubborn start took {:?}",
        began.elapsed()
    );
    assert!(process_gone(pid), "pid {pid} outlived the disable");
    assert_eq!(
        plugin.last_exit.unwrap().status,
        Some(pb::exit_info::Status::Signal(9))
    );
    assert!(enable.await.unwrap().is_err());
}

/// What a completed call left: running for enable and restart, stopped for disable.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Enable,
    Disable,
    Restart,
}

/// One call with an optional deadline; `Ok(())` when it was answered with success.
async fn call(
    client: &mut Client,
    op: Op,
    deadline: Option<Duration>,
) -> Result<(), tonic::Status> {
    fn with<T>(msg: T, deadline: Option<Duration>) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(limit) = deadline {
            req.set_timeout(limit);
        }
        req
    }
    let id = "flappy".to_string();
    match op {
        Op::Enable => client
            .enable_plugin(with(pb::EnablePluginRequest { plugin_id: id }, deadline))
            .await
            .map(drop),
        Op::Disable => client
            .disable_plugin(with(pb::DisablePluginRequest { plugin_id: id }, deadline))
            .await
            .map(drop),
        Op::Restart => client
            .restart_plugin(with(pb::RestartPluginRequest { plugin_id: id }, deadline))
            .await
            .map(drop),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_clients_that_give_up_leave_no_queued_flapping_and_the_last_call_wins() {
    const CLIENTS: usize = 20;
    let ops = [Op::Enable, Op::Disable, Op::Restart];
    // A plugin slow to become ready, so that calls pile up behind starts and stops.
    let (d, mut client) = start_discovered(
        &[],
        |d| {
            d.install_fixture("flappy", "slow-start", &["--ms", "300"]);
        },
        &["flappy"],
    )
    .await;
    // 20 clients racing for 2 s, every call with a short deadline; then all of them gone.
    let race_end = Instant::now() + Duration::from_secs(2);
    let racers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut k = i;
                while Instant::now() < race_end {
                    let deadline = Duration::from_millis(50 + (k as u64 * 37) % 200);
                    let _ = call(&mut client, ops[k % 3], Some(deadline)).await;
                    k += 7;
                }
            })
        })
        .collect();
    for racer in racers {
        racer.await.unwrap();
    }
    // Then every client makes one call and waits for its answer: they complete promptly (no
    // backlog of abandoned calls is carried out first), and the last one to succeed decides.
    let settled = Instant::now();
    let finals: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let op = ops[i % 3];
                let result = call(&mut client, op, None).await;
                (op, result.is_ok(), Instant::now())
            })
        })
        .collect();
    let mut last: Option<(Op, Instant)> = None;
    for f in finals {
        let (op, ok, at) = f.await.unwrap();
        if ok && last.is_none_or(|(_, t)| at >= t) {
            last = Some((op, at));
        }
    }
    let took = settled.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "the final calls took {took:?}: abandoned calls were carried out first"
    );
    let (op, _) = last.expect("some final call succeeded");
    // No transition after that: the plugin stays as the last successful call left it.
    let mut events = Events::watch(&mut client, None).await;
    let quiet = events.next_within(Duration::from_millis(1500)).await;
    assert!(
        quiet.is_none(),
        "a transition after the last call: {quiet:?}"
    );
    let plugin = get(&mut client, "flappy").await;
    let want = match op {
        Op::Disable => PluginState::Stopped,
        Op::Enable | Op::Restart => PluginState::Running,
    };
    assert_eq!(
        (state_of(&plugin), plugin.enabled),
        (want, want == PluginState::Running),
        "the last successful call was {op:?}"
    );
    drop(d);
}

#[tokio::test]
async fn a_plugin_enabled_by_enable_new_plugins_stays_enabled_without_the_flag() {
    let mut d = Daemon::new(&["--enable-new-plugins"]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    let first_run = Events::watch(&mut client, Some(0))
        .await
        .wait_state("hello", PluginState::Running, SECS10)
        .await;
    let state = std::fs::read_to_string(d.data_dir.join("state.json")).unwrap();
    assert!(state.contains("\"hello\": true"), "{state}");
    d.stop().await;

    d.args.retain(|a| a != "--enable-new-plugins");
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_for("hello to run again without the flag", SECS10, |e| {
            e.plugin_id == "hello"
                && e.to_state == PluginState::Running as i32
                && e.seq > first_run.seq
        })
        .await;
    assert!(get(&mut client, "hello").await.enabled);
}

#[tokio::test]
async fn a_disable_while_a_start_is_prepared_spawns_nothing() {
    let mut d = Daemon::new(&[]);
    // Slow to answer --metadata (and to start): the re-check before the start takes a while.
    let file = d.plugins_dir.join("prep.binary");
    let script =
        format!("#!/bin/sh\nsleep 1\nexec python3 {FIXTURE} --id prep --mode normal \"$@\"\n");
    write_executable(&file, &script);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["prep"])
        .await;
    // Rewritten: the start probes it again before spawning anything.
    write_executable(&file, &script);
    let mut enabling = client.clone();
    let enable = tokio::spawn(async move { enabling.enable_plugin(id_req("prep")).await });
    let probing = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
            std::fs::read(p.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("prep.binary") && c.contains("--metadata")
            })
        })
    };
    wait_until("the re-check's --metadata to run", SECS10, probing).await;
    let plugin = disable(&mut client, "prep").await;
    assert_eq!(state_of(&plugin), PluginState::Stopped);
    let err = enable.await.unwrap().unwrap_err();
    assert!(err.message().contains("disabled"), "{err:?}");
    let spawned = std::cell::Cell::new(false);
    Events::watch(&mut client, Some(0))
        .await
        .wait_for("the disable's event", SECS10, |e| {
            if e.plugin_id == "prep" && e.reason == "spawned" {
                spawned.set(true);
            }
            e.plugin_id == "prep" && e.reason == "disabled by operator"
        })
        .await;
    assert!(
        !spawned.get(),
        "a disable taken during the re-check still spawned the plugin"
    );
}
