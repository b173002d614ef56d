//! Forwarding through the real daemon: KV and calls, multiplexing, timeouts, connection
//! faults, isolation between plugins, and both families of v1 plugins.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::future::join_all;
use tonic::transport::Channel;
use tonic::Code;
use torud_api::pb;
use torud_api::pb::kv_service_client::KvServiceClient;
use torud_api::pb::PluginState;

type Kv = KvServiceClient<Channel>;

async fn get(kv: &mut Kv, id: &str, key: &str) -> Result<pb::GetValueResponse, tonic::Status> {
    let req = pb::GetValueRequest {
        plugin_id: id.into(),
        key: key.into(),
    };
    kv.get_value(req).await.map(|r| r.into_inner())
}

async fn set(kv: &mut Kv, id: &str, key: &str, value: &str) {
    let req = pb::SetValueRequest {
        plugin_id: id.into(),
        key: key.into(),
        value: value.into(),
    };
    kv.set_value(req).await.unwrap();
}

async fn delete(kv: &mut Kv, id: &str, key: &str) -> bool {
    let req = pb::DeleteValueRequest {
        plugin_id: id.into(),
        key: key.into(),
    };
    kv.delete_value(req).await.unwrap().into_inner().existed
}

/// A daemon with the given plugins installed (by `install`) and enabled.
async fn running(
    args: &[&str],
    install: impl FnOnce(&Daemon),
    ids: &[&str],
) -> (Daemon, Client, Kv) {
    let mut d = Daemon::new(args);
    install(&d);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(ids)
        .await;
    for id in ids {
        enable(&mut client, id).await;
    }
    let kv = d.kv_client().await;
    (d, client, kv)
}

type Stalled = tokio::task::JoinHandle<Result<pb::GetValueResponse, tonic::Status>>;

/// Holds `n` never-answered requests in flight on `echo` (sending again any that lost the
/// race for a slot) until a probe is refused; returns them and the refusal.
async fn fill_cap(kv: &Kv, n: usize) -> (Vec<Stalled>, tonic::Status) {
    let stall = || {
        let mut kv = kv.clone();
        tokio::spawn(async move { get(&mut kv, "echo", "stall").await })
    };
    let mut stalled: Vec<Stalled> = (0..n).map(|_| stall()).collect();
    let mut probe = kv.clone();
    let deadline = Instant::now() + SECS10;
    loop {
        for task in stalled.iter_mut().filter(|t| t.is_finished()) {
            *task = stall();
        }
        match get(&mut probe, "echo", "echo:x").await {
            Err(e)
                if e.code() == Code::ResourceExhausted
                    && stalled.iter().all(|t| !t.is_finished()) =>
            {
                return (stalled, e)
            }
            other => assert!(
                Instant::now() < deadline,
                "the cap was never reached: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn kv_round_trip_tells_absent_from_empty() {
    let (_d, _c, mut kv) = running(
        &[],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    let absent = get(&mut kv, "hello", "k").await.unwrap();
    assert!(!absent.found);
    set(&mut kv, "hello", "k", "").await;
    let empty = get(&mut kv, "hello", "k").await.unwrap();
    assert!(empty.found && empty.value.is_empty());
    set(&mut kv, "hello", "k", "v1").await;
    assert_eq!(get(&mut kv, "hello", "k").await.unwrap().value, "v1");
    assert!(delete(&mut kv, "hello", "k").await);
    assert!(!get(&mut kv, "hello", "k").await.unwrap().found);
    assert!(!delete(&mut kv, "hello", "k").await);
}

#[tokio::test]
async fn calls_keep_binary_bodies_and_repeated_headers() {
    let (_d, mut client, _kv) = running(
        &[],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let body = vec![0u8, 159, 146, 150, 255, b'\n', 0];
    let headers = vec![
        pb::Header {
            name: "x-a".into(),
            value: "1".into(),
        },
        pb::Header {
            name: "x-b".into(),
            value: "2".into(),
        },
        pb::Header {
            name: "x-a".into(),
            value: "3".into(),
        },
    ];
    let req = pb::CallPluginRequest {
        plugin_id: "echo".into(),
        method: "POST".into(),
        path: "/items?limit=5&q=a%20b".into(),
        headers: headers.clone(),
        body: body.clone(),
    };
    let answer = client.call_plugin(req).await.unwrap().into_inner();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, body);
    assert_eq!(answer.headers, headers);
}

#[tokio::test]
async fn a_thousand_concurrent_requests_are_all_answered_correctly_even_out_of_order() {
    let (_d, _c, kv) = running(
        &[],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let calls = (0..1000).map(|i| {
        let mut kv = kv.clone();
        // Later requests sleep less, so answers come back out of order.
        let key = if i % 10 == 0 {
            format!("sleep:{}:{i}", 200 - i / 5)
        } else {
            format!("echo:{i}")
        };
        async move {
            let got = get(&mut kv, "echo", &key).await.unwrap();
            (key, got)
        }
    });
    for (key, got) in join_all(calls).await {
        assert!(got.found);
        assert_eq!(got.value, key);
    }
}

#[tokio::test]
async fn a_timeout_is_deadline_exceeded_and_the_plugin_serves_the_next_request() {
    let (_d, mut client, mut kv) = running(
        &["--kv-timeout", "300ms"],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let pid = common::get(&mut client, "echo").await.pid;
    let began = Instant::now();
    let err = get(&mut kv, "echo", "stall").await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(began.elapsed() < Duration::from_secs(2));
    assert_eq!(
        get(&mut kv, "echo", "echo:next").await.unwrap().value,
        "echo:next"
    );
    // A caller's shorter deadline wins.
    let mut req = tonic::Request::new(pb::GetValueRequest {
        plugin_id: "echo".into(),
        key: "stall".into(),
    });
    req.set_timeout(Duration::from_millis(100));
    let began = Instant::now();
    assert!(kv.get_value(req).await.is_err());
    assert!(began.elapsed() < Duration::from_millis(280));
    let plugin = common::get(&mut client, "echo").await;
    assert_eq!((plugin.pid, state_of(&plugin)), (pid, PluginState::Running));
}

#[tokio::test]
async fn the_in_flight_cap_is_resource_exhausted_and_abandoned_requests_free_their_slot() {
    let (_d, _c, kv) = running(
        &["--max-in-flight", "2", "--kv-timeout", "30s"],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let (stalled, err) = fill_cap(&kv, 2).await;
    let mut probe = kv.clone();
    assert!(err.message().contains("2 requests"), "{}", err.message());
    for task in stalled {
        task.abort();
    }
    // The callers went away: their slots are free again.
    let deadline = Instant::now() + SECS10;
    while get(&mut probe, "echo", "echo:y").await.is_err() {
        assert!(Instant::now() < deadline, "slots were not freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_dropped_connection_fails_every_pending_request_at_once() {
    let (_d, mut client, kv) = running(
        &["--kv-timeout", "30s", "--backoff-base", "50ms"],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let mut events = Events::watch(&mut client, None).await;
    let pending: Vec<_> = (0..5)
        .map(|_| {
            let mut kv = kv.clone();
            tokio::spawn(async move { get(&mut kv, "echo", "stall").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let began = Instant::now();
    let mut kv2 = kv.clone();
    let _ = get(&mut kv2, "echo", "drop").await;
    for task in pending {
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "pending requests waited {:?}",
        began.elapsed()
    );
    let crashed = events
        .wait_state("echo", PluginState::Crashed, SECS10)
        .await;
    assert!(
        crashed.reason.contains("closed its connection"),
        "{}",
        crashed.reason
    );
    events
        .wait_state("echo", PluginState::Running, SECS10)
        .await;
}

#[tokio::test]
async fn bad_frames_reset_the_connection_with_a_recorded_reason() {
    for (key, why) in [
        (
            "huge",
            "frame of 4294967295 bytes, over the 16777216-byte limit",
        ),
        ("garbage", "not a JSON envelope"),
    ] {
        let (_d, mut client, mut kv) = running(
            &["--backoff-base", "50ms"],
            |d| {
                d.install_fixture("echo", "v2-echo", &[]);
            },
            &["echo"],
        )
        .await;
        let mut events = Events::watch(&mut client, None).await;
        let err = get(&mut kv, "echo", key).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{key}: {err:?}");
        assert!(err.message().contains(why), "{key}: {}", err.message());
        let crashed = events
            .wait_state("echo", PluginState::Crashed, SECS10)
            .await;
        assert!(crashed.reason.contains(why), "{key}: {}", crashed.reason);
        events
            .wait_state("echo", PluginState::Running, SECS10)
            .await;
        assert_eq!(
            get(&mut kv, "echo", "echo:after").await.unwrap().value,
            "echo:after"
        );
    }
}

#[tokio::test]
async fn an_answer_to_an_unknown_request_id_is_dropped_harmlessly() {
    let (_d, mut client, mut kv) = running(
        &[],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let pid = common::get(&mut client, "echo").await.pid;
    assert_eq!(
        get(&mut kv, "echo", "stranger").await.unwrap().value,
        "stranger"
    );
    assert_eq!(
        get(&mut kv, "echo", "echo:1").await.unwrap().value,
        "echo:1"
    );
    assert_eq!(common::get(&mut client, "echo").await.pid, pid);
}

#[tokio::test]
async fn a_stuck_plugin_does_not_delay_another() {
    let (_d, _c, kv) = running(
        &["--kv-timeout", "20s"],
        |d| {
            d.install_fixture("stuck", "v2-echo", &[]);
            d.install_fixture("fine", "v2-echo", &[]);
        },
        &["stuck", "fine"],
    )
    .await;
    let stuck: Vec<_> = (0..50)
        .map(|_| {
            let mut kv = kv.clone();
            tokio::spawn(async move { get(&mut kv, "stuck", "stall").await })
        })
        .collect();
    let mut other = kv.clone();
    let began = Instant::now();
    for i in 0..100 {
        let key = format!("echo:{i}");
        assert_eq!(get(&mut other, "fine", &key).await.unwrap().value, key);
    }
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?}",
        began.elapsed()
    );
    assert!(
        stuck.iter().all(|t| !t.is_finished()),
        "plugin A's requests are still stuck"
    );
    for t in stuck {
        t.abort();
    }
}

#[tokio::test]
async fn the_python_v1_example_handles_kv_and_calls() {
    let (_d, mut client, mut kv) = running(
        &[],
        |d| {
            d.install_py_echo_v1();
        },
        &["py-echo"],
    )
    .await;
    assert!(!get(&mut kv, "py-echo", "a").await.unwrap().found);
    set(&mut kv, "py-echo", "a", "1").await;
    assert_eq!(get(&mut kv, "py-echo", "a").await.unwrap().value, "1");
    assert!(delete(&mut kv, "py-echo", "a").await);
    let req = pb::CallPluginRequest {
        plugin_id: "py-echo".into(),
        method: "PUT".into(),
        path: "/x?y=1".into(),
        headers: vec![pb::Header {
            name: "a".into(),
            value: "b".into(),
        }],
        body: b"hello".to_vec(),
    };
    let answer = client.call_plugin(req).await.unwrap().into_inner();
    assert_eq!(answer.status, 200);
    let echoed: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        echoed,
        serde_json::json!({"method": "PUT", "path": "/x?y=1", "body": "hello"})
    );
    let binary = pb::CallPluginRequest {
        plugin_id: "py-echo".into(),
        method: "POST".into(),
        path: "/".into(),
        headers: vec![],
        body: vec![0xff, 0xfe],
    };
    let err = client.call_plugin(binary).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("protocol 1"), "{}", err.message());
}

#[tokio::test]
async fn a_toru_crate_style_plugin_answers_calls_and_its_unanswered_kv_times_out_cleanly() {
    let (_d, mut client, mut kv) = running(
        &["--kv-timeout", "300ms"],
        |d| {
            d.install_crate_plugin();
        },
        &["toru-crate"],
    )
    .await;
    let call = || pb::CallPluginRequest {
        plugin_id: "toru-crate".into(),
        method: "GET".into(),
        path: "/crate/hi".into(),
        headers: vec![pb::Header {
            name: "accept".into(),
            value: "*/*".into(),
        }],
        body: b"ping".to_vec(),
    };
    let answer = client.call_plugin(call()).await.unwrap().into_inner();
    assert_eq!(answer.status, 200);
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "GET /crate/hi headers=1 body=ping"
    );
    assert_eq!(
        answer.headers,
        [pb::Header {
            name: "x-plugin".into(),
            value: "toru-crate".into()
        }]
    );
    let err = get(&mut kv, "toru-crate", "k").await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let again = client.call_plugin(call()).await.unwrap().into_inner();
    assert_eq!(
        again.status, 200,
        "the plugin is unharmed by the dropped kv request"
    );
    assert_eq!(
        state_of(&common::get(&mut client, "toru-crate").await),
        PluginState::Running
    );
}

#[tokio::test]
async fn requests_to_plugins_that_cannot_answer_say_why() {
    let mut d = Daemon::new(&["--backoff-base", "1h", "--start-timeout", "300ms"]);
    d.install_fixture("off", "normal", &[]);
    d.install_fixture("sleepy", "slow-start", &["--ms", "5000"]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["off", "sleepy"])
        .await;
    let mut kv = d.kv_client().await;
    let err = get(&mut kv, "off", "k").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(client
        .enable_plugin(pb::EnablePluginRequest {
            plugin_id: "sleepy".into()
        })
        .await
        .is_err());
    let err = get(&mut kv, "sleepy", "k").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("state backoff") && err.message().contains("next restart at"),
        "{}",
        err.message()
    );
    let err = get(&mut kv, "nope", "k").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = get(&mut kv, "off", "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = get(&mut kv, "off", &"k".repeat(513)).await.unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("key"),
        "{err:?}"
    );
    let req = pb::SetValueRequest {
        plugin_id: "off".into(),
        key: "k".into(),
        value: "v".repeat(1024 * 1024 + 1),
    };
    let err = kv.set_value(req).await.unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("value"),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_abandoned_request_is_cancelled_at_the_plugin() {
    let (d, _c, mut kv) = running(
        &[],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let mut req = tonic::Request::new(pb::GetValueRequest {
        plugin_id: "echo".into(),
        key: "stall".into(),
    });
    req.set_timeout(Duration::from_millis(100));
    assert!(kv.get_value(req).await.is_err());
    wait_until("the plugin to log the cancel", SECS10, || {
        d.log_text("echo").contains("received cancel")
    })
    .await;
}

#[tokio::test]
async fn a_protocol_2_plugin_that_stops_answering_pings_turns_unhealthy() {
    let (_d, mut client, mut kv) = running(
        &["--health-interval", "100ms"],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let mut events = Events::watch(&mut client, None).await;
    assert_eq!(get(&mut kv, "echo", "mute").await.unwrap().value, "muted");
    let change = events
        .wait_for("health change", SECS10, |e| {
            e.kind == pb::EventKind::HealthChanged as i32
        })
        .await;
    assert!(
        !change.healthy && change.reason.contains("heartbeat"),
        "{change:?}"
    );
    let plugin = common::get(&mut client, "echo").await;
    assert_eq!(
        (state_of(&plugin), plugin.healthy),
        (PluginState::Running, false)
    );
}

#[tokio::test]
async fn a_burst_of_v1_requests_waits_for_the_plugin_instead_of_failing() {
    let (_d, _c, kv) = running(
        &[],
        |d| {
            d.install_py_echo_v1();
        },
        &["py-echo"],
    )
    .await;
    // py-echo listens with a backlog of 16 and answers one connection at a time.
    let calls = (0..100).map(|i| {
        let mut kv = kv.clone();
        async move { get(&mut kv, "py-echo", &format!("k{i}")).await }
    });
    for result in join_all(calls).await {
        assert!(!result.unwrap().found);
    }
}

#[tokio::test]
async fn sdk_plugins_receive_binary_bodies_as_bytes() {
    let (_d, mut client, _kv) = running(
        &[],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    let req = pb::CallPluginRequest {
        plugin_id: "hello".into(),
        method: "POST".into(),
        path: "/bin".into(),
        headers: vec![],
        body: vec![0xff, 0xfe],
    };
    let answer = client.call_plugin(req).await.unwrap().into_inner();
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "hello from POST /bin (2 body bytes)"
    );
}

#[tokio::test]
async fn heartbeats_are_not_refused_by_a_full_in_flight_cap() {
    let (d, mut client, kv) = running(
        &[
            "--max-in-flight",
            "2",
            "--kv-timeout",
            "30s",
            "--health-interval",
            "50ms",
        ],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let (stalled, _) = fill_cap(&kv, 2).await;
    let pongs = || d.log_text("echo").matches("\"pong\"").count();
    let before = pongs();
    wait_until("three heartbeats while the cap is full", SECS10, || {
        pongs() >= before + 3
    })
    .await;
    assert!(common::get(&mut client, "echo").await.healthy);
    for t in stalled {
        t.abort();
    }
}

/// Calls `id` at `path` (GET, no headers or body).
async fn call_path(
    client: &mut Client,
    id: &str,
    path: &str,
) -> Result<pb::CallPluginResponse, tonic::Status> {
    let req = pb::CallPluginRequest {
        plugin_id: id.into(),
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        body: vec![],
    };
    client.call_plugin(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn answers_that_break_the_request_rules_fail_that_call_and_the_plugin_keeps_serving() {
    let (_d, mut client, _kv) = running(
        &[],
        |d| {
            d.install_fixture("v1", "v1-echo", &[]);
            d.install_fixture("v2", "v2-echo", &[]);
        },
        &["v1", "v2"],
    )
    .await;
    let cases = [
        ("/answer/status-99999", "status 99999 is not an HTTP status"),
        ("/answer/status-99", "status 99 is not an HTTP status"),
        ("/answer/status-600", "status 600 is not an HTTP status"),
        (
            "/answer/empty-name",
            r#"headers[0].name: "" is not a header name"#,
        ),
        (
            "/answer/bad-name",
            r#"headers[0].name: "bad name" is not a header name"#,
        ),
        (
            "/answer/crlf-name",
            r#"headers[0].name: "x-a\r\nInjected" is not a header name"#,
        ),
        (
            "/answer/crlf-value",
            r#"headers[0].value: the value of "x-a" contains a line break or NUL"#,
        ),
        (
            "/answer/nul-value",
            r#"headers[0].value: the value of "x-a" contains a line break or NUL"#,
        ),
    ];
    for id in ["v1", "v2"] {
        let pid = common::get(&mut client, id).await.pid;
        for (path, message) in cases {
            let err = call_path(&mut client, id, path).await.unwrap_err();
            assert_eq!(err.code(), Code::Unknown, "{id} {path}: {err:?}");
            let expected = format!("plugin {id:?}: the plugin's answer is invalid: {message}");
            assert!(
                err.message().starts_with(&expected),
                "{id} {path}: {}",
                err.message()
            );
        }
        let ok = call_path(&mut client, id, "/fine").await.unwrap();
        assert_eq!(ok.status, 200, "{id}");
        let after = common::get(&mut client, id).await;
        assert_eq!((after.pid, after.restart_count), (pid, 0), "{id} restarted");
        assert_eq!(state_of(&after), PluginState::Running);
    }
}

#[tokio::test]
async fn a_plugin_can_neither_forge_nor_flood_the_daemons_log() {
    let (d, mut client, mut kv) = running(
        &[],
        |d| {
            d.install_fixture("echo", "v2-echo", &["--lines", "10000"]);
        },
        &["echo"],
    )
    .await;
    // One answer whose request_id forges a log line, then 10,000 nobody asked for.
    let forged = get(&mut kv, "echo", "forge").await.unwrap();
    assert_eq!(forged.value, "forged");
    assert_eq!(
        get(&mut kv, "echo", "echo:after").await.unwrap().value,
        "echo:after"
    );
    disable(&mut client, "echo").await;
    let reported = "9991 more answers with unknown request ids from this plugin were not logged";
    wait_until("the count of suppressed warnings", SECS10, || {
        d.daemon_stderr().contains(reported)
    })
    .await;

    let log = d.daemon_stderr();
    let forged_lines: Vec<&str> = log.lines().filter(|l| l.starts_with("2099")).collect();
    assert!(forged_lines.is_empty(), "forged lines: {forged_lines:?}");
    assert!(
        log.contains(r#"x\n2099-01-01T00:00:00Z ERROR torud::auth: FORGED"#),
        "the forged id is logged escaped"
    );
    let warnings = log
        .lines()
        .filter(|l| l.contains("dropped a message with an unknown request_id"))
        .count();
    assert_eq!(
        warnings,
        torud::plugin::throttle::DEFAULT_LIMIT as usize,
        "{log}"
    );
    assert_eq!(log.matches(reported).count(), 1);
    assert!(
        log.contains("further answers with unknown request ids from this plugin are counted, not logged, for up to 1m"),
        "{log}"
    );
}
