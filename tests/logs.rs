//! Plugin logs through the real daemon: a burst comes back complete and in order, a cursor
//! resumes exactly across a daemon restart, rotation shows as a gap, followers see new
//! records, and filters apply.

mod common;

use std::time::Duration;

use common::*;
use tonic::transport::Channel;
use torud_api::pb;
use torud_api::pb::log_service_client::LogServiceClient;
use torud_api::pb::PluginState;

type Logs = LogServiceClient<Channel>;

/// One plugin's records whose message contains `contains`, at every level.
fn filter(id: &str, contains: &str) -> pb::LogFilter {
    pb::LogFilter {
        plugin_ids: vec![id.into()],
        min_level: 0,
        contains: contains.into(),
    }
}

fn request(
    id: &str,
    start: Option<pb::stream_logs_request::Start>,
    follow: bool,
    contains: &str,
) -> pb::StreamLogsRequest {
    pb::StreamLogsRequest {
        filter: Some(filter(id, contains)),
        start,
        follow,
    }
}

fn tail(n: u32) -> Option<pb::stream_logs_request::Start> {
    Some(pb::stream_logs_request::Start::Tail(n))
}

/// Every response of a stream that ends by itself.
async fn collect(logs: &mut Logs, req: pb::StreamLogsRequest) -> Vec<pb::StreamLogsResponse> {
    let mut stream = logs.stream_logs(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(resp) = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        out.push(resp);
    }
    out
}

/// The first record of a following stream, within a deadline.
async fn first_record(logs: &mut Logs, req: pb::StreamLogsRequest) -> pb::LogRecord {
    let mut stream = logs.stream_logs(req).await.unwrap().into_inner();
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("no record within 30 s")
            .unwrap()
            .expect("stream ended");
        if let Some(r) = resp.records.into_iter().next() {
            return r;
        }
    }
}

async fn burst_daemon(lines: usize, args: &[&str]) -> (Daemon, Logs) {
    let mut d = Daemon::new(args);
    d.install_fixture("burst", "burst", &["--lines", &lines.to_string()]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["burst"])
        .await;
    enable(&mut client, "burst").await;
    let mut logs = LogServiceClient::new(d.channel().await);
    first_record(
        &mut logs,
        request("burst", tail(u32::MAX), true, "burst done"),
    )
    .await;
    (d, logs)
}

#[tokio::test]
async fn a_burst_comes_back_complete_and_a_cursor_resumes_exactly_across_a_restart() {
    let (mut d, mut logs) = burst_daemon(100_000, &[]).await;
    let responses = collect(&mut logs, request("burst", tail(u32::MAX), false, "line ")).await;
    assert!(responses.iter().all(|r| r.gap.is_none()));
    assert!(responses.len() > 1, "records come in batches");
    let records: Vec<pb::LogRecord> = responses.into_iter().flat_map(|r| r.records).collect();
    assert_eq!(records.len(), 100_000);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.message, format!("line {i}"));
        assert_eq!(r.stream, pb::LogStream::Stderr as i32);
    }
    // Strictly increasing; the supervisor's notes may sit between the lines.
    assert!(records.windows(2).all(|w| w[1].seq > w[0].seq));
    let cursor = records[50_000].cursor.clone();

    // Disabled, so that it does not burst again after the restart.
    disable(&mut d.client().await, "burst").await;
    assert_eq!(d.stop().await.code(), Some(0));
    d.start().await;
    let mut client = d.client().await;
    rescan(&mut client).await;
    let mut logs = LogServiceClient::new(d.channel().await);
    let start = Some(pb::stream_logs_request::Start::AfterCursors(pb::Cursors {
        cursors: vec![cursor],
    }));
    let rest: Vec<pb::LogRecord> = collect(&mut logs, request("burst", start, false, "line "))
        .await
        .into_iter()
        .flat_map(|r| r.records)
        .collect();
    let messages: Vec<&str> = rest.iter().map(|r| r.message.as_str()).collect();
    let want: Vec<String> = (50_001..100_000).map(|i| format!("line {i}")).collect();
    assert_eq!(
        messages,
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn records_rotated_away_are_reported_as_a_gap() {
    let (_d, mut logs) = burst_daemon(
        5000,
        &["--log-segment-bytes", "65536", "--log-segments", "2"],
    )
    .await;
    let start = Some(pb::stream_logs_request::Start::AfterCursors(pb::Cursors {
        cursors: vec!["burst:1".into()],
    }));
    let responses = collect(&mut logs, request("burst", start, false, "")).await;
    let gap = responses[0]
        .gap
        .clone()
        .expect("the first response is a gap");
    assert_eq!((gap.plugin_id.as_str(), gap.from_seq), ("burst", 2));
    let first = &responses[1].records[0];
    assert_eq!(first.seq, gap.to_seq + 1);
    let kept: Vec<u64> = responses[1..]
        .iter()
        .flat_map(|r| &r.records)
        .map(|r| r.seq)
        .collect();
    assert!(
        kept.windows(2).all(|w| w[1] == w[0] + 1),
        "no other gap, no duplicate"
    );
    assert!(responses[1..].iter().all(|r| r.gap.is_none()));
}

#[tokio::test]
async fn a_follower_sees_new_records_and_filters_apply() {
    let mut d = Daemon::new(&["--backoff-base", "50ms"]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["hello"])
        .await;
    let pid = enable(&mut client, "hello").await.pid;
    let mut logs = LogServiceClient::new(d.channel().await);

    // From now on (by time, so that it does not matter when the stream subscribes).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let since = prost_types::Timestamp {
        seconds: now.as_secs() as i64,
        nanos: now.subsec_nanos() as i32,
    };
    let mut following = logs.clone();
    let follower = tokio::spawn(async move {
        let mut req = request(
            "hello",
            Some(pb::stream_logs_request::Start::Since(since)),
            true,
            "",
        );
        req.filter.as_mut().unwrap().min_level = pb::LogLevel::Error as i32;
        first_record(&mut following, req).await
    });
    let mut events = Events::watch(&mut client, None).await;
    signal(pid, libc::SIGKILL);
    events
        .wait_state("hello", PluginState::Running, SECS10)
        .await;
    let record = follower.await.unwrap();
    assert_eq!(record.stream, pb::LogStream::Supervisor as i32);
    assert_eq!(record.level, pb::LogLevel::Error as i32);
    assert!(
        record
            .message
            .starts_with("crashed: unexpected exit: killed by signal 9"),
        "{}",
        record.message
    );

    let structured = collect(
        &mut logs,
        request("hello", tail(100), false, "initialised by the host"),
    )
    .await;
    let r = structured
        .iter()
        .flat_map(|r| &r.records)
        .next()
        .expect("the SDK's structured line");
    assert_eq!(
        (r.stream, r.level),
        (pb::LogStream::Stderr as i32, pb::LogLevel::Info as i32)
    );
    assert!(!r.plugin_time.is_empty());
}

fn query(
    id: &str,
    contains: &str,
    page_size: i32,
    page_token: String,
    newest_first: bool,
) -> pb::QueryLogsRequest {
    pb::QueryLogsRequest {
        filter: Some(filter(id, contains)),
        page_size,
        page_token,
        newest_first,
        ..Default::default()
    }
}

#[tokio::test]
async fn query_logs_pages_both_ways_and_validates_its_input() {
    let (_d, mut logs) = burst_daemon(3000, &[]).await;
    let mut token = String::new();
    let mut lines = Vec::new();
    loop {
        let page = logs
            .query_logs(query("burst", "line ", 1000, token, false))
            .await
            .unwrap()
            .into_inner();
        assert!(page.records.len() <= 1000);
        lines.extend(page.records.into_iter().map(|r| r.message));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let want: Vec<String> = (0..3000).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want);

    let newest = logs
        .query_logs(query("burst", "line ", 10, String::new(), true))
        .await
        .unwrap()
        .into_inner();
    let messages: Vec<&str> = newest.records.iter().map(|r| r.message.as_str()).collect();
    let want: Vec<String> = (2990..3000).rev().map(|i| format!("line {i}")).collect();
    assert_eq!(
        messages,
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let next = logs
        .query_logs(query("burst", "line ", 10, newest.next_page_token, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.records[0].message, "line 2989");

    let mut bounded = query("burst", "", 1000, String::new(), false);
    bounded.after_seq = 100;
    bounded.before_seq = 111;
    let seqs: Vec<u64> = logs
        .query_logs(bounded)
        .await
        .unwrap()
        .into_inner()
        .records
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, (101..=110).collect::<Vec<_>>());

    for bad in [
        query("burst", "", -1, String::new(), false),
        query("burst", "", 1001, String::new(), false),
        query("burst", "", 10, "zz".into(), false),
        query("../x", "", 10, String::new(), false),
    ] {
        let err = logs.query_logs(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
}

/// Every "line N" record of a following stream until `count` of them arrived, reading
/// slowly when `slow`.
async fn follow_lines(
    mut logs: Logs,
    req: pb::StreamLogsRequest,
    count: usize,
    slow: bool,
) -> Vec<String> {
    let mut stream = logs.stream_logs(req).await.unwrap().into_inner();
    let mut lines = Vec::new();
    let mut batches = 0;
    while lines.len() < count {
        let resp = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("stalled")
            .unwrap()
            .expect("stream ended");
        assert!(resp.gap.is_none(), "nothing may be lost");
        lines.extend(resp.records.into_iter().map(|r| r.message));
        batches += 1;
        if slow && batches < 40 {
            // A deliberately slow reader: the burst outruns it.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    lines
}

fn since_now() -> Option<pb::stream_logs_request::Start> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    Some(pb::stream_logs_request::Start::Since(
        prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        },
    ))
}

#[tokio::test]
async fn slow_readers_and_a_hundred_followers_all_get_every_line() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("burst", "burst", &["--lines", "20000"]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["burst"])
        .await;
    let logs = LogServiceClient::new(d.channel().await);
    let start = since_now();
    let followers: Vec<_> = (0..100)
        .map(|i| {
            let req = request("burst", start.clone(), true, "line ");
            tokio::spawn(follow_lines(logs.clone(), req, 20_000, i == 0))
        })
        .collect();
    enable(&mut client, "burst").await;
    let want: Vec<String> = (0..20_000).map(|i| format!("line {i}")).collect();
    for follower in followers {
        assert_eq!(follower.await.unwrap(), want);
    }
}

#[tokio::test]
async fn awkward_output_is_stored_without_loss() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("weird", "weird", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["weird"])
        .await;
    enable(&mut client, "weird").await;
    let mut logs = LogServiceClient::new(d.channel().await);
    let req = request("weird", tail(u32::MAX), false, "");
    let mut req_done = req.clone();
    req_done.follow = true;
    req_done.filter.as_mut().unwrap().contains = "weird done".into();
    first_record(&mut logs, req_done).await;
    let records: Vec<pb::LogRecord> = collect(&mut logs, req)
        .await
        .into_iter()
        .flat_map(|r| r.records)
        .collect();
    let stdout: Vec<&pb::LogRecord> = records
        .iter()
        .filter(|r| r.stream == pb::LogStream::Stdout as i32)
        .collect();
    // A line over 64 KiB is split into continued pieces; joined, nothing is missing.
    let mut lines = Vec::new();
    let mut current = String::new();
    for r in &stdout {
        current.push_str(&r.message);
        if !r.continued {
            lines.push(std::mem::take(&mut current));
        }
    }
    assert_eq!(
        lines.len(),
        7,
        "{:?}",
        lines.iter().map(|l| l.len()).collect::<Vec<_>>()
    );
    assert_eq!(lines[0], "a".repeat(1024 * 1024));
    assert_eq!(lines[1], "bad \u{fffd}\u{fffd} utf8");
    assert_eq!(lines[2], "nul \0 inside");
    assert_eq!(lines[3], "b".repeat(10 * 1024 * 1024));
    assert_eq!(lines[4], r#"{"level": 3, "message": "wrong level type"}"#);
    assert_eq!(
        lines[5],
        r#"{"level": "warn", "message": {"nested": true}}"#
    );
    // Pieces are cut between characters, never inside one.
    assert!(
        lines[6] == "\u{20ac}".repeat(50_000),
        "a long line of 3-byte characters came back changed"
    );
    // 64 KiB pieces: 16 for the 1 MiB line, 160 for the 10 MiB one, 3 for the 150 KB
    // one, the last of each final.
    assert_eq!(stdout.iter().filter(|r| r.continued).count(), 15 + 159 + 2);
}

#[tokio::test]
async fn a_follower_receives_each_new_line_within_50_ms() {
    let mut d = Daemon::new(&[]);
    d.install_fixture("fx", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["fx"])
        .await;
    enable(&mut client, "fx").await;
    let mut logs = LogServiceClient::new(d.channel().await);
    let mut kv = d.kv_client().await;
    let mut stream = logs
        .stream_logs(request("fx", None, true, "received kv"))
        .await
        .unwrap()
        .into_inner();
    // The stream is open once the daemon answers its headers; each KV request then makes the
    // plugin write one "received kv …" line to stderr.
    for i in 0..10 {
        let sent = std::time::Instant::now();
        let req = pb::GetValueRequest {
            plugin_id: "fx".into(),
            key: format!("k{i}"),
        };
        let _ = kv.get_value(req).await;
        let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("no line within 5 s")
            .unwrap()
            .expect("stream ended");
        let took = sent.elapsed();
        assert_eq!(resp.records.len(), 1, "{resp:?}");
        assert!(
            took < Duration::from_millis(50),
            "line {i} took {took:?} from request to follower"
        );
    }
}

/// A daemon with one enabled plugin in a log-writing `mode` that has written its `lines`
/// and its "`mode` done" line.
async fn writer_daemon(mode: &str, lines: usize) -> (Daemon, Logs) {
    let mut d = Daemon::new(&[]);
    d.install_fixture("big", mode, &["--lines", &lines.to_string()]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["big"])
        .await;
    enable(&mut client, "big").await;
    let mut logs = LogServiceClient::new(d.channel().await);
    let done = format!("{mode} done");
    first_record(&mut logs, request("big", tail(u32::MAX), true, &done)).await;
    (d, logs)
}

#[tokio::test]
async fn query_logs_pages_of_64_kib_lines_fit_the_message_limit() {
    let (_d, mut logs) = writer_daemon("long-lines", 300).await;
    for newest_first in [false, true] {
        let mut token = String::new();
        let mut heads = Vec::new();
        let mut pages = 0;
        loop {
            // The default page size (100 records) would be 6.4 MiB of these.
            let page = logs
                .query_logs(query("big", ":xxx", 0, token, newest_first))
                .await
                .unwrap_or_else(|e| panic!("page {pages}: {e:?}"))
                .into_inner();
            pages += 1;
            assert!(!page.records.is_empty() || page.next_page_token.is_empty());
            heads.extend(page.records.iter().map(|r| {
                assert_eq!(r.message.len(), 64 * 1024 - 1);
                r.message
                    .split_once(':')
                    .unwrap()
                    .0
                    .parse::<usize>()
                    .unwrap()
            }));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        if newest_first {
            heads.reverse();
        }
        assert_eq!(
            heads,
            (0..300).collect::<Vec<_>>(),
            "every record once, in order"
        );
        assert!(pages > 3, "pages are cut short by size: {pages}");
    }
}

#[tokio::test]
async fn stream_logs_batches_of_long_records_fit_the_message_limit() {
    let (_d, mut logs) = writer_daemon("long-time", 200).await;
    let responses = collect(&mut logs, request("big", tail(u32::MAX), false, "stamp ")).await;
    let messages: Vec<String> = responses
        .into_iter()
        .flat_map(|r| r.records)
        .map(|r| r.message)
        .collect();
    let want: Vec<String> = (0..200).map(|i| format!("stamp {i}")).collect();
    assert_eq!(messages, want);
}
