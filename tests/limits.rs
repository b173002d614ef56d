//! Limits, each configured and checked through the real daemon: plugin rlimits, KV key and
//! value sizes, gRPC message size, concurrent streams per connection, log line length,
//! `--metadata` output size, and binary pinning.

mod common;

use std::time::Duration;

use common::*;
use torud_api::pb;
use torud_api::pb::log_service_client::LogServiceClient;

/// The soft and hard values of one line of /proc/<pid>/limits ("Max open files ...").
fn limit(text: &str, name: &str) -> (String, String) {
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} not in {text}"));
    let mut fields = line[name.len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

async fn limits_of_a_plugin(args: &[&str]) -> String {
    let mut d = Daemon::new(args);
    d.install_fixture("lim", "dump-env", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["lim"])
        .await;
    enable(&mut client, "lim").await;
    std::fs::read_to_string(d.data_dir.join("plugins/lim/limits.txt")).unwrap()
}

#[tokio::test]
async fn plugins_start_with_the_configured_rlimits() {
    let defaults = limits_of_a_plugin(&[]).await;
    let open = limit(&defaults, "Max open files");
    assert_eq!(open, ("4096".into(), "4096".into()));
    let space = limit(&defaults, "Max address space");
    assert_eq!(space.0, (32u64 << 30).to_string());

    let set = limits_of_a_plugin(&[
        "--plugin-max-open-files",
        "777",
        "--plugin-max-address-space",
        "8589934592",
        "--plugin-max-processes",
        "5000",
    ])
    .await;
    assert_eq!(limit(&set, "Max open files"), ("777".into(), "777".into()));
    assert_eq!(limit(&set, "Max address space").0, "8589934592");
    assert_eq!(limit(&set, "Max processes"), ("5000".into(), "5000".into()));
}

#[tokio::test]
async fn kv_sizes_and_grpc_messages_are_capped() {
    let (d, _client) = start_enabled(
        &[
            "--max-kv-key-bytes",
            "8",
            "--max-kv-value-bytes",
            "16",
            "--max-message-bytes",
            "4096",
        ],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    let mut kv = d.kv_client().await;
    let set = |key: &str, value: String| pb::SetValueRequest {
        plugin_id: "hello".into(),
        key: key.into(),
        value,
    };
    kv.set_value(set("12345678", "v".repeat(16))).await.unwrap();
    let err = kv
        .set_value(set("123456789", "v".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("key"), "{}", err.message());
    let err = kv.set_value(set("k", "v".repeat(17))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("value"), "{}", err.message());
    // Over the gRPC message limit: refused before any field is read.
    let err = kv
        .set_value(set("k", "v".repeat(10_000)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    // The daemon is fine afterwards.
    kv.set_value(set("k", "ok".into())).await.unwrap();
}

fn follow(id: &str) -> pb::StreamLogsRequest {
    pb::StreamLogsRequest {
        filter: Some(pb::LogFilter {
            plugin_ids: vec![id.into()],
            min_level: 0,
            contains: String::new(),
        }),
        start: None,
        follow: true,
    }
}

#[tokio::test]
async fn concurrent_streams_per_connection_are_capped() {
    let (d, client) = start_discovered(
        &["--max-concurrent-streams", "2"],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    drop(client);
    let channel = d.channel().await;
    let mut logs = LogServiceClient::new(channel.clone());
    let first = logs.stream_logs(follow("hello")).await.unwrap();
    let second = logs.stream_logs(follow("hello")).await.unwrap();
    // A third stream on the same connection waits for a free slot.
    let third = tokio::time::timeout(
        Duration::from_millis(500),
        logs.clone().stream_logs(follow("hello")),
    )
    .await;
    assert!(third.is_err(), "a third concurrent stream was admitted");
    drop(first);
    let third = tokio::time::timeout(SECS10, logs.stream_logs(follow("hello")))
        .await
        .expect("a slot freed up but the third stream still waits");
    third.unwrap();
    drop(second);
}

#[tokio::test]
async fn log_lines_split_at_the_configured_length() {
    let (d, _client) = start_enabled(
        &["--max-log-line-bytes", "262144"],
        |d| {
            d.install_fixture("weird", "weird", &[]);
        },
        &["weird"],
    )
    .await;
    let mut logs = LogServiceClient::new(d.channel().await);
    let mut stream = logs
        .stream_logs(pb::StreamLogsRequest {
            start: Some(pb::stream_logs_request::Start::Tail(u32::MAX)),
            ..follow("weird")
        })
        .await
        .unwrap()
        .into_inner();
    let mut records = Vec::new();
    while !records
        .iter()
        .any(|r: &pb::LogRecord| r.message.contains("weird done"))
    {
        let resp = tokio::time::timeout(SECS10, stream.message())
            .await
            .expect("stalled")
            .unwrap()
            .unwrap();
        records.extend(resp.records);
    }
    let stdout: Vec<&pb::LogRecord> = records
        .iter()
        .filter(|r| r.stream == pb::LogStream::Stdout as i32)
        .collect();
    assert!(stdout.iter().all(|r| r.message.len() <= 262_144));
    // 1 MiB → 4 pieces, 10 MiB → 40, the 150 KB line → 1: 3 + 39 continued.
    assert_eq!(stdout.iter().filter(|r| r.continued).count(), 3 + 39);
}

#[tokio::test]
async fn metadata_output_over_the_limit_is_skipped_with_the_reason() {
    let mut d = Daemon::new(&["--max-metadata-bytes", "64"]);
    d.install_fixture("chatty", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let list = client
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let list = if list.skipped.is_empty() {
        rescan(&mut client).await;
        client
            .list_plugins(pb::ListPluginsRequest::default())
            .await
            .unwrap()
            .into_inner()
    } else {
        list
    };
    assert!(list.plugins.is_empty());
    let reason = &list.skipped[0].reason;
    assert!(
        reason.contains("more than 64 bytes") && reason.contains("--max-metadata-bytes"),
        "{reason}"
    );
}

fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test]
async fn a_pinned_binary_starts_only_with_the_pinned_hash() {
    let d0 = Daemon::new(&[]);
    let path = d0.install_hello("hello");
    let good = sha256_hex(&path);
    let pin = format!("hello={good}");
    // With the right hash it starts (start_enabled asserts it runs).
    let (_running, _client) = start_enabled(
        &["--pin", &pin],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;

    let bad = format!("hello={}", "0".repeat(64));
    let mut d = Daemon::new(&["--pin", &bad]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["hello"]).await;
    let err = client
        .enable_plugin(pb::EnablePluginRequest {
            plugin_id: "hello".into(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("binary pinning") && err.message().contains(&good),
        "{}",
        err.message()
    );
    let event = events
        .wait_for("the pinning refusal", SECS10, |e| {
            e.plugin_id == "hello" && e.reason.contains("binary pinning")
        })
        .await;
    assert_eq!(event.to_state, pb::PluginState::Disabled as i32);
    assert!(process_gone_all(&d), "nothing was started");
}

/// No process of the plugin ran: its log has no stdout or stderr record.
fn process_gone_all(d: &Daemon) -> bool {
    let text = d.log_text("hello");
    !text.contains("\"stream\":\"stderr\"") && !text.contains("\"stream\":\"stdout\"")
}
