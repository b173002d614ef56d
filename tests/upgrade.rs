//! Upgrading the daemon in place (`UpgradeDaemon`): the daemon re-executes a new binary,
//! which takes over every plugin (same pids), its output (no line lost or duplicated), its
//! connection and the listeners; a binary that fails its check changes nothing.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::time::Instant;
use tonic::transport::Channel;
use torud_api::pb;
use torud_api::pb::config_service_client::ConfigServiceClient;
use torud_api::pb::log_service_client::LogServiceClient;

/// A copy of the daemon's binary at a path of the test's: the "new" binary.
fn new_binary(d: &Daemon, name: &str) -> String {
    let path = d.root.path().join(name);
    std::fs::copy(env!("CARGO_BIN_EXE_torud"), &path).unwrap();
    path.display().to_string()
}

async fn upgrade(
    channel: &Channel,
    binary: &str,
) -> Result<pb::UpgradeDaemonResponse, tonic::Status> {
    ConfigServiceClient::new(channel.clone())
        .upgrade_daemon(pb::UpgradeDaemonRequest {
            binary: binary.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Whether a status is one a client resumes after: the daemon upgrading (UNAVAILABLE) or
/// the connection going away under a call (CANCELLED, UNKNOWN).
/// A request that raced the old image's GOAWAY is refused by the client's HTTP/2 layer
/// (INTERNAL, "GoAway"): it never reached the daemon, and is resumed too.
fn resumable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    ) || (status.code() == tonic::Code::Internal && format!("{status:?}").contains("GoAway"))
}

/// Follows the events from `after`, resuming by seq, until `kind` comes (at most `limit`):
/// every event seen, in order.
async fn events_until(
    channel: &Channel,
    after: u64,
    kind: pb::EventKind,
    limit: Duration,
) -> Vec<pb::Event> {
    let deadline = Instant::now() + limit;
    let mut seen: Vec<pb::Event> = Vec::new();
    let mut after = after;
    loop {
        assert!(
            Instant::now() < deadline,
            "no {kind:?} within {limit:?}; seen: {seen:#?}"
        );
        let mut client = pb::plugin_service_client::PluginServiceClient::new(channel.clone());
        let req = pb::WatchEventsRequest {
            after_seq: Some(after),
            plugin_ids: vec![],
        };
        let mut stream = match client.watch_events(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if resumable(&s) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(s) => panic!("WatchEvents: {s}"),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.message()).await {
                Ok(Ok(Some(resp))) => {
                    let Some(e) = resp.event else { continue };
                    after = e.seq;
                    let done = e.kind == kind as i32;
                    seen.push(e);
                    if done {
                        return seen;
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(s)) if resumable(&s) => break,
                Ok(Err(s)) => panic!("WatchEvents: {s}"),
                Err(_) => panic!("no {kind:?} within {limit:?}; seen: {seen:#?}"),
            }
        }
    }
}

async fn pids(client: &mut Client, ids: &[&str]) -> HashMap<String, u32> {
    let mut pids = HashMap::new();
    for id in ids {
        let p = get(client, id).await;
        assert_eq!(state_of(&p), pb::PluginState::Running, "{p:?}");
        pids.insert(id.to_string(), p.pid);
    }
    pids
}

/// Calls the echo path of a fixture plugin and checks the body comes back.
async fn echo(client: &mut Client, id: &str, body: &[u8]) {
    let req = pb::CallPluginRequest {
        plugin_id: id.into(),
        method: "POST".into(),
        path: "/echo".into(),
        headers: vec![],
        body: body.to_vec(),
    };
    let answer = client.call_plugin(req).await.unwrap().into_inner();
    assert_eq!(answer.body, body, "{id}");
}

/// A new binary that passes its check (the real one, `torud`) and then runs as the daemon
/// with `extra` added to its flags: a new image that fails only after the exec.
fn failing_after_exec(d: &Daemon, torud: &str, name: &str, extra: &str) -> String {
    let binary = d.root.path().join(name);
    write_executable(
        &binary,
        &format!(
            "#!/bin/sh\ncase \" $* \" in *\" --check-upgrade \"*) exec {torud} \"$@\";; esac\n\
             exec {torud} \"$@\" {extra}\n"
        ),
    );
    binary.display().to_string()
}

/// Upgrades to `binary`, which passes its check, and waits for the hand-back: the
/// `DAEMON_UPGRADE_FAILED` event of stage `handover`.
async fn handed_back(channel: &Channel, binary: &str) -> pb::Event {
    let began = upgrade(channel, binary).await.expect("the check passes");
    let seen = events_until(
        channel,
        began.upgrading_seq,
        pb::EventKind::DaemonUpgradeFailed,
        Duration::from_secs(30),
    )
    .await;
    let failed = seen.last().unwrap().clone();
    let detail = |k: &str| failed.details.get(k).cloned().unwrap_or_default();
    assert_eq!(detail("stage"), "handover", "{failed:?}");
    assert_eq!(detail("rolled_back"), "true", "{failed:?}");
    failed
}

#[tokio::test]
async fn a_binary_that_fails_its_check_changes_nothing() {
    let (mut d, mut client) = start_enabled(
        &["--upgrade-timeout", "1s"],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
            d.install_fixture("v1", "v1-echo", &[]);
        },
        &["echo", "v1"],
    )
    .await;
    let before = pids(&mut client, &["echo", "v1"]).await;
    let channel = d.channel().await;
    let exits = d.root.path().join("exits.sh");
    write_executable(&exits, "#!/bin/sh\necho 'cannot start' >&2\nexit 3\n");
    let hangs = d.root.path().join("hangs.sh");
    write_executable(&hangs, "#!/bin/sh\nexec sleep 600\n");
    let cases = [
        (exits.display().to_string(), "cannot start"),
        (
            hangs.display().to_string(),
            "did not finish its check within 1s",
        ),
        ("/bin/true".to_owned(), "did not report its verdict"),
        ("relative/torud".to_owned(), "not an absolute path"),
    ];
    for (binary, why) in cases {
        let started = Instant::now();
        let err = upgrade(&channel, &binary).await.unwrap_err();
        assert!(err.message().contains(why), "{binary}: {err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{binary} took {:?}",
            started.elapsed()
        );
        let code = if binary.starts_with('/') {
            tonic::Code::FailedPrecondition
        } else {
            tonic::Code::InvalidArgument
        };
        assert_eq!(err.code(), code, "{binary}: {err:?}");
    }
    // Nothing changed: same processes, still answering, and each failed check is an event.
    assert_eq!(pids(&mut client, &["echo", "v1"]).await, before);
    for id in ["echo", "v1"] {
        echo(&mut client, id, b"still here").await;
    }
    let mut events = Events::watch(&mut client, Some(0)).await;
    for _ in 0..3 {
        let e = events
            .wait_for("a failed upgrade", SECS10, |e| {
                e.kind == pb::EventKind::DaemonUpgradeFailed as i32
            })
            .await;
        assert_eq!(e.details.get("stage").map(String::as_str), Some("check"));
        assert_eq!(
            e.details.get("rolled_back").map(String::as_str),
            Some("true")
        );
    }
    assert!(d.stop().await.success());
    for pid in before.values() {
        assert!(process_gone(*pid), "plugin {pid} outlived the daemon");
    }
}

#[tokio::test]
async fn a_new_image_that_cannot_take_over_hands_back_to_the_running_binary() {
    let (mut d, mut client) = start_enabled(
        &[],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
            d.install_fixture("v1", "v1-echo", &[]);
        },
        &["echo", "v1"],
    )
    .await;
    let before = pids(&mut client, &["echo", "v1"]).await;
    let daemon = d.pid();
    let channel = d.channel().await;
    // Passes its check, then fails to start for real (its data directory cannot be made),
    // after the exec: the point where only the new image itself can hand back.
    let torud = new_binary(&d, "torud-real");
    let binary = failing_after_exec(
        &d,
        &torud,
        "fails-after-exec.sh",
        "--data-dir /proc/torud-cannot-be-here",
    );
    let failed = handed_back(&channel, &binary).await;
    assert!(failed.reason.contains("data directory"), "{failed:?}");
    // The previous binary took over again: same daemon, same plugins, still answering.
    assert_eq!(d.pid(), daemon);
    assert_eq!(pids(&mut client, &["echo", "v1"]).await, before);
    for id in ["echo", "v1"] {
        echo(&mut client, id, b"back").await;
    }
    // And a good upgrade after it goes through.
    let began = upgrade(&channel, &torud).await.unwrap();
    events_until(
        &channel,
        began.upgrading_seq,
        pb::EventKind::DaemonUpgraded,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(pids(&mut client, &["echo", "v1"]).await, before);
    assert!(d.stop().await.success());
    for pid in before.values() {
        assert!(process_gone(*pid), "plugin {pid} outlived the daemon");
    }
}

#[tokio::test]
async fn a_new_image_that_hangs_before_it_serves_hands_back_after_the_timeout() {
    let (mut d, mut client) = start_enabled(
        &["--upgrade-timeout", "2s"],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let before = pids(&mut client, &["echo"]).await;
    let daemon = d.pid();
    let channel = d.channel().await;
    // Passes its check, then hangs for real: its config file is a FIFO nobody writes.
    let torud = new_binary(&d, "torud-real");
    let fifo = d.root.path().join("config.fifo");
    let path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
    let config = format!("--config {}", fifo.display());
    let binary = failing_after_exec(&d, &torud, "hangs-after-exec.sh", &config);
    let failed = handed_back(&channel, &binary).await;
    assert!(
        failed.reason.contains("did not serve within 2s"),
        "{failed:?}"
    );
    assert_eq!(d.pid(), daemon);
    assert_eq!(pids(&mut client, &["echo"]).await, before);
    echo(&mut client, "echo", b"back").await;
    assert!(d.stop().await.success());
    for pid in before.values() {
        assert!(process_gone(*pid), "plugin {pid} outlived the daemon");
    }
}

/// What the load saw: calls answered, calls refused while the daemon handed over, and
/// anything else (a failure of the test).
#[derive(Default)]
struct Load {
    answered: AtomicU64,
    refused: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
    /// The longest time between two answers seen by any caller.
    longest_gap_ms: AtomicU64,
}

/// One caller: calls the plugin in a loop until `stop`, each call within 10 s.
async fn caller(channel: Channel, load: Arc<Load>, stop: Arc<AtomicBool>, n: usize) {
    let mut client = pb::plugin_service_client::PluginServiceClient::new(channel);
    let mut last = Instant::now();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let body = format!("caller {n} call {i}").into_bytes();
        let req = pb::CallPluginRequest {
            plugin_id: "numbered".into(),
            method: "POST".into(),
            path: "/echo".into(),
            headers: vec![],
            body: body.clone(),
        };
        let answer = tokio::time::timeout(Duration::from_secs(10), client.call_plugin(req)).await;
        match answer {
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                if answer.body != body {
                    load.failures
                        .lock()
                        .unwrap()
                        .push(format!("caller {n}: answer {answer:?} to {body:?}"));
                }
                load.answered.fetch_add(1, Ordering::Relaxed);
                let gap = last.elapsed().as_millis() as u64;
                load.longest_gap_ms.fetch_max(gap, Ordering::Relaxed);
                last = Instant::now();
            }
            Ok(Err(status)) if resumable(&status) => {
                load.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(Err(status)) => load
                .failures
                .lock()
                .unwrap()
                .push(format!("caller {n}: {status:?}")),
            Err(_) => load
                .failures
                .lock()
                .unwrap()
                .push(format!("caller {n}: a call hung for 10 s")),
        }
    }
}

/// What a log follower saw of the numbered plugin.
#[derive(Default, Debug)]
struct LogTally {
    /// The last seq received, for the gapless check.
    last_seq: u64,
    /// The last "numbered N" line's N (the checking follower only).
    last_number: Option<u64>,
    /// "numbered done N", once seen.
    done: Option<u64>,
    records: u64,
    resumes: u64,
    problems: Vec<String>,
}

/// Follows the numbered plugin's log from its start, resuming by cursor after each
/// handover, until "numbered done" comes or `stop` and nothing more arrives. With `check`,
/// checks every line's number is the last one's plus one.
async fn log_follower(channel: Channel, check: bool, deadline: Instant) -> LogTally {
    let mut tally = LogTally::default();
    let mut cursor: Option<String> = None;
    let mut client = LogServiceClient::new(channel);
    'resume: while Instant::now() < deadline {
        let start = match &cursor {
            Some(c) => pb::stream_logs_request::Start::AfterCursors(pb::Cursors {
                cursors: vec![c.clone()],
            }),
            None => pb::stream_logs_request::Start::AfterCursors(pb::Cursors {
                cursors: vec!["numbered:0".into()],
            }),
        };
        let req = pb::StreamLogsRequest {
            filter: Some(pb::LogFilter {
                plugin_ids: vec!["numbered".into()],
                ..Default::default()
            }),
            start: Some(start),
            follow: true,
        };
        let mut stream = match client.stream_logs(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if resumable(&s) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(s) => {
                tally.problems.push(format!("StreamLogs: {s}"));
                return tally;
            }
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let batch = match tokio::time::timeout(left, stream.message()).await {
                Ok(Ok(Some(batch))) => batch,
                Ok(Ok(None)) => {
                    tally.problems.push("the stream ended with OK".into());
                    return tally;
                }
                Ok(Err(s)) if resumable(&s) => {
                    tally.resumes += 1;
                    continue 'resume;
                }
                Ok(Err(s)) => {
                    tally.problems.push(format!("StreamLogs: {s}"));
                    return tally;
                }
                Err(_) => return tally,
            };
            if let Some(gap) = batch.gap {
                tally.problems.push(format!("a gap: {gap:?}"));
            }
            for r in batch.records {
                if r.seq != tally.last_seq + 1 {
                    tally
                        .problems
                        .push(format!("seq {} after {}", r.seq, tally.last_seq));
                }
                tally.last_seq = r.seq;
                tally.records += 1;
                cursor = Some(r.cursor.clone());
                if r.stream != pb::LogStream::Stdout as i32 {
                    continue;
                }
                if let Some(last) = r.message.strip_prefix("numbered done ") {
                    tally.done = last.parse().ok();
                    return tally;
                }
                if !check {
                    continue;
                }
                let Some(n) = r
                    .message
                    .strip_prefix("numbered ")
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    tally.problems.push(format!("line {:?}", r.message));
                    continue;
                };
                let want = tally.last_number.map_or(0, |l| l + 1);
                if n != want && tally.problems.len() < 20 {
                    tally
                        .problems
                        .push(format!("line number {n} where {want} was due"));
                }
                tally.last_number = Some(n);
            }
        }
    }
    tally
}

/// Follows every event from the start, resuming by seq, until a `PLUGIN_REMOVED` of the
/// plugin "end" (which the test causes last) or the deadline: the seqs must be gapless.
async fn event_follower(channel: Channel, deadline: Instant) -> (u64, u64, Vec<String>) {
    let mut problems = Vec::new();
    let mut after = 0u64;
    let mut count = 0u64;
    let mut resumes = 0u64;
    let mut client = pb::plugin_service_client::PluginServiceClient::new(channel);
    'resume: while Instant::now() < deadline {
        let req = pb::WatchEventsRequest {
            after_seq: Some(after),
            plugin_ids: vec![],
        };
        let mut stream = match client.watch_events(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if resumable(&s) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(s) => {
                problems.push(format!("WatchEvents: {s}"));
                break;
            }
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.message()).await {
                Ok(Ok(Some(resp))) => {
                    if let Some(gap) = resp.gap {
                        problems.push(format!("a gap: {gap:?}"));
                    }
                    let Some(e) = resp.event else { continue };
                    if e.seq != after + 1 {
                        problems.push(format!("event {} after {after}", e.seq));
                    }
                    after = e.seq;
                    count += 1;
                    if e.kind == pb::EventKind::StateChanged as i32
                        && e.plugin_id == "numbered"
                        && e.to_state == pb::PluginState::Stopped as i32
                    {
                        return (count, resumes, problems);
                    }
                }
                Ok(Ok(None)) => {
                    problems.push("the stream ended with OK".into());
                    break 'resume;
                }
                Ok(Err(s)) if resumable(&s) => {
                    resumes += 1;
                    continue 'resume;
                }
                Ok(Err(s)) => {
                    problems.push(format!("WatchEvents: {s}"));
                    break 'resume;
                }
                Err(_) => {
                    problems.push("no end event before the deadline".into());
                    break 'resume;
                }
            }
        }
    }
    (count, resumes, problems)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_upgrades_under_load_restart_nothing_and_lose_nothing() {
    const UPGRADES: usize = 20;
    let (mut d, mut client) = start_enabled(
        &[
            "--log-segment-bytes",
            "67108864",
            "--log-segments",
            "16",
            "--max-in-flight",
            "256",
        ],
        |d| {
            d.install_fixture("numbered", "v2-numbered", &[]);
            d.install_fixture("v1", "v1-echo", &[]);
            d.install_hello("hello");
        },
        &["numbered", "v1", "hello"],
    )
    .await;
    let ids = ["numbered", "v1", "hello"];
    let before = pids(&mut client, &ids).await;
    let daemon = d.pid();
    let binary = new_binary(&d, "torud-next");
    let channel = d.channel().await;
    let deadline = Instant::now() + Duration::from_secs(240);

    // The load: 64 callers, 5 log followers (one checking every line's number) and 5
    // event followers.
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..64)
        .map(|n| tokio::spawn(caller(channel.clone(), load.clone(), stop.clone(), n)))
        .collect();
    let log_followers: Vec<_> = (0..5)
        .map(|n| tokio::spawn(log_follower(channel.clone(), n == 0, deadline)))
        .collect();
    let event_followers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(event_follower(channel.clone(), deadline)))
        .collect();
    wait_until("calls to be answered", SECS10, || {
        load.answered.load(Ordering::Relaxed) > 100
    })
    .await;

    let mut fds = Vec::new();
    let mut rss = Vec::new();
    let mut durations = Vec::new();
    for round in 0..UPGRADES {
        let answered = load.answered.load(Ordering::Relaxed);
        let began = upgrade(&channel, &binary)
            .await
            .unwrap_or_else(|e| panic!("upgrade {round}: {e:?}"));
        assert_eq!(began.binary, binary);
        let seen = events_until(
            &channel,
            began.upgrading_seq,
            pb::EventKind::DaemonUpgraded,
            Duration::from_secs(30),
        )
        .await;
        let upgraded = seen.last().unwrap();
        durations.push(
            upgraded
                .details
                .get("duration_ms")
                .and_then(|d| d.parse::<u64>().ok())
                .unwrap(),
        );
        assert!(
            !seen
                .iter()
                .any(|e| e.kind == pb::EventKind::DaemonUpgradeFailed as i32),
            "upgrade {round}: {seen:#?}"
        );
        assert_eq!(d.pid(), daemon, "the daemon's pid changed");
        assert_eq!(pids(&mut client, &ids).await, before, "upgrade {round}");
        wait_until("calls answered after the upgrade", SECS10, || {
            load.answered.load(Ordering::Relaxed) > answered + 64
        })
        .await;
        fds.push(daemon_fds(daemon));
        rss.push(rss_kib(daemon));
    }

    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    // The plugin stops logging; its last line says how many it wrote.
    std::fs::write(d.data_dir.join("plugins/numbered/stop"), "").unwrap();
    let mut logs = Vec::new();
    for f in log_followers {
        logs.push(f.await.unwrap());
    }
    // Disabling the plugin ends the event followers.
    disable(&mut client, "numbered").await;
    let mut events = Vec::new();
    for f in event_followers {
        events.push(f.await.unwrap());
    }

    let failures = load.failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "calls failed: {failures:#?}");
    let checking = &logs[0];
    let done = checking.done.expect("the plugin's last line arrived");
    assert_eq!(
        checking.last_number,
        Some(done),
        "the last numbered line seen"
    );
    for (n, tally) in logs.iter().enumerate() {
        assert!(
            tally.problems.is_empty(),
            "log follower {n}: {:#?}",
            tally.problems
        );
        assert_eq!(tally.done, Some(done), "log follower {n}");
        assert!(
            tally.resumes >= UPGRADES as u64,
            "log follower {n}: {tally:?}"
        );
    }
    for (n, (count, resumes, problems)) in events.iter().enumerate() {
        assert!(problems.is_empty(), "event follower {n}: {problems:#?}");
        assert!(*resumes >= UPGRADES as u64, "event follower {n}: {resumes}");
        assert!(*count > UPGRADES as u64 * 2, "event follower {n}: {count}");
    }
    // No descriptor growth from one upgrade to the next, nor memory growth beyond noise.
    let (first_fds, last_fds) = (fds[1], *fds.last().unwrap());
    assert!(last_fds <= first_fds + 4, "descriptors: {fds:?}");
    let (first_rss, last_rss) = (rss[1], *rss.last().unwrap());
    assert!(
        last_rss <= first_rss + 16 * 1024,
        "resident memory (KiB): {rss:?}"
    );
    eprintln!(
        "{UPGRADES} upgrades: {} lines, {} calls answered, {} refused during handovers, longest gap between answers {} ms, handover ms {durations:?}, fds {fds:?}, rss KiB {rss:?}",
        done + 1,
        load.answered.load(Ordering::Relaxed),
        load.refused.load(Ordering::Relaxed),
        load.longest_gap_ms.load(Ordering::Relaxed),
    );
    assert!(d.stop().await.success());
    for pid in before.values() {
        assert!(process_gone(*pid), "plugin {pid} outlived the daemon");
    }
}

#[tokio::test]
async fn without_root_a_sandboxed_plugin_survives_an_upgrade() {
    // Without root, each plugin runs in its sandbox, started with a copy of the daemon's
    // memory: such children come from the spawner thread too, so the exec keeps them.
    let mut d = Daemon::new(&[]);
    d.hand_to(65534);
    d.install_fixture("echo", "v2-echo", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["echo"])
        .await;
    enable(&mut client, "echo").await;
    let before = pids(&mut client, &["echo"]).await;
    let channel = d.channel().await;
    let binary = new_binary(&d, "torud-next");
    let began = upgrade(&channel, &binary).await.unwrap();
    events_until(
        &channel,
        began.upgrading_seq,
        pb::EventKind::DaemonUpgraded,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(pids(&mut client, &["echo"]).await, before);
    echo(&mut client, "echo", b"sandboxed").await;
    assert!(d.stop().await.success());
    for pid in before.values() {
        assert!(process_gone(*pid), "plugin {pid} outlived the daemon");
    }
}

#[tokio::test]
async fn a_check_under_way_dies_with_a_killed_daemon() {
    let (mut d, _client) = start_enabled(&["--upgrade-timeout", "60s"], |_| {}, &[]).await;
    let daemon = d.pid();
    let channel = d.channel().await;
    let hangs = d.root.path().join("hangs.sh");
    write_executable(&hangs, "#!/bin/sh\nexec sleep 600\n");
    let binary = hangs.display().to_string();
    let asked = tokio::spawn(async move { upgrade(&channel, &binary).await });
    let mut check = 0;
    // Children of any of the daemon's threads (the check is started from a tokio worker).
    let all_children = || -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{daemon}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    };
    wait_until("the check to run", SECS10, || {
        check = all_children()
            .into_iter()
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.starts_with("sleep"))
            })
            .unwrap_or(0);
        check != 0
    })
    .await;
    d.kill9().await;
    wait_until("the check to die with the daemon", SECS10, || {
        process_gone(check)
    })
    .await;
    assert!(asked.await.unwrap().is_err());
}

#[tokio::test]
async fn over_tcp_only_the_daemons_own_path_may_be_named() {
    let (d, _client) = start_enabled(&[], |_| {}, &[]).await;
    let binary = new_binary(&d, "torud-next");
    let mut config = ConfigServiceClient::with_interceptor(
        d.tcp_channel().await,
        Bearer::new(&d.token("admin")).unwrap(),
    );
    let err = config
        .upgrade_daemon(pb::UpgradeDaemonRequest { binary })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("control socket"), "{err:?}");
    // The read token may not upgrade at all.
    let mut read = ConfigServiceClient::with_interceptor(
        d.tcp_channel().await,
        Bearer::new(&d.token("read")).unwrap(),
    );
    let err = read
        .upgrade_daemon(pb::UpgradeDaemonRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn a_plugin_left_crashed_stays_crashed_across_an_upgrade() {
    let (d, mut client) = start_discovered(
        &["--restart", "never"],
        |d| {
            d.install_fixture("crasher", "crash", &["--ms", "200"]);
        },
        &["crasher"],
    )
    .await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    enable(&mut client, "crasher").await;
    events
        .wait_state("crasher", pb::PluginState::Crashed, SECS10)
        .await;
    let channel = d.channel().await;
    let binary = new_binary(&d, "torud-next");
    // Two upgrades: a start the first new image began would show between them (the
    // second waits for a start under way before it hands over).
    let mut seen = Vec::new();
    for _ in 0..2 {
        let began = upgrade(&channel, &binary).await.unwrap();
        seen.extend(
            events_until(
                &channel,
                began.upgrading_seq,
                pb::EventKind::DaemonUpgraded,
                Duration::from_secs(30),
            )
            .await,
        );
    }
    let started: Vec<_> = seen
        .iter()
        .filter(|e| e.plugin_id == "crasher" && e.to_state == pb::PluginState::Starting as i32)
        .collect();
    assert!(started.is_empty(), "restarted by an upgrade: {started:#?}");
    let p = get(&mut client, "crasher").await;
    assert_eq!(state_of(&p), pb::PluginState::Crashed, "{p:?}");
    assert!(p.enabled, "{p:?}");
}

#[tokio::test]
async fn sigusr2_upgrades_to_the_daemons_own_path() {
    let (d, mut client) = start_enabled(
        &[],
        |d| {
            d.install_fixture("echo", "v2-echo", &[]);
        },
        &["echo"],
    )
    .await;
    let before = pids(&mut client, &["echo"]).await;
    let channel = d.channel().await;
    let last = Events::watch(&mut client, Some(0))
        .await
        .wait_state("echo", pb::PluginState::Running, SECS10)
        .await
        .seq;
    signal(d.pid(), libc::SIGUSR2);
    let seen = events_until(
        &channel,
        last,
        pb::EventKind::DaemonUpgraded,
        Duration::from_secs(30),
    )
    .await;
    let upgrading = seen
        .iter()
        .find(|e| e.kind == pb::EventKind::DaemonUpgrading as i32)
        .expect("DAEMON_UPGRADING before DAEMON_UPGRADED");
    let own = std::fs::canonicalize(env!("CARGO_BIN_EXE_torud")).unwrap();
    assert_eq!(
        upgrading
            .details
            .get("binary")
            .map(std::path::PathBuf::from),
        Some(own),
        "{upgrading:?}"
    );
    assert_eq!(pids(&mut client, &["echo"]).await, before);
    echo(&mut client, "echo", b"after SIGUSR2").await;
}
