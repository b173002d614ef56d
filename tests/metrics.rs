//! The Prometheus endpoint, through the real daemon: what `/metrics` says about plugins,
//! forwarded requests and crashes; who may scrape it; and the real Prometheus server
//! (Debian's `prometheus`, which `tests/run.sh` installs) scraping it, a PromQL query over
//! its HTTP API seeing a crash counted after a `kill -9`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use torud_api::pb;

/// Scrapes until `series` has `value`, failing after `limit`.
async fn wait_for_sample(d: &Daemon, series: &str, value: f64, limit: Duration) -> String {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let text = scrape(d).await;
        if sample(&text, series) == Some(value) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} is not {value} after {limit:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_count_plugins_forwarded_requests_and_crashes_by_reason() {
    let (d, mut client) = start_enabled(
        &["--metrics-listen", "127.0.0.1:0"],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    let text = wait_for_sample(
        &d,
        r#"torud_plugin_up{plugin="hello"}"#,
        1.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        sample(&text, r#"torud_plugins{state="running"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"torud_plugin_state{plugin="hello",state="running"}"#
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            r#"torud_plugin_last_start_timestamp_seconds{plugin="hello"}"#
        )
        .unwrap()
            > 1.7e9
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(sample(&text, "process_open_fds").unwrap() > 0.0);
    assert_eq!(
        sample(&text, r#"torud_build_info{version="0.1.0"}"#),
        Some(1.0)
    );

    // Two calls and a KV write and read answered; a read for an unknown plugin is not a
    // series (its id came from a request).
    for _ in 0..2 {
        client
            .call_plugin(pb::CallPluginRequest {
                plugin_id: "hello".into(),
                method: "GET".into(),
                path: "/".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut kv = d.kv_client().await;
    kv.set_value(pb::SetValueRequest {
        plugin_id: "hello".into(),
        key: "k".into(),
        value: "v".into(),
    })
    .await
    .unwrap();
    kv.get_value(pb::GetValueRequest {
        plugin_id: "hello".into(),
        key: "k".into(),
    })
    .await
    .unwrap();
    let unknown = kv
        .get_value(pb::GetValueRequest {
            plugin_id: "nosuchplugin".into(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let text = scrape(&d).await;
    let calls = r#"torud_forwarded_requests_total{plugin="hello",op="call",code="OK"}"#;
    assert_eq!(sample(&text, calls), Some(2.0), "{text}");
    let kv_set = r#"torud_forwarded_requests_total{plugin="hello",op="kv_set",code="OK"}"#;
    assert_eq!(sample(&text, kv_set), Some(1.0));
    let latency = r#"torud_forwarded_request_duration_seconds_count{plugin="hello",op="call"}"#;
    assert_eq!(sample(&text, latency), Some(2.0));
    assert!(!text.contains("nosuchplugin"), "{text}");
    assert_eq!(
        sample(&text, r#"torud_plugin_storage_keys{plugin="hello"}"#),
        Some(1.0)
    );
    assert!(sample(&text, r#"torud_plugin_log_store_bytes{plugin="hello"}"#).unwrap() > 0.0);

    // kill -9: one crash by signal, then a restart.
    let pid = get(&mut client, "hello").await.pid;
    let signal_crashes = r#"torud_plugin_crashes_total{plugin="hello",reason="signal"}"#;
    assert_eq!(sample(&text, signal_crashes), Some(0.0));
    signal(pid, libc::SIGKILL);
    wait_for_sample(&d, signal_crashes, 1.0, Duration::from_secs(10)).await;
    let text = wait_for_sample(
        &d,
        r#"torud_plugin_restarts_total{plugin="hello"}"#,
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let exit_crashes = r#"torud_plugin_crashes_total{plugin="hello",reason="exit_code"}"#;
    assert_eq!(sample(&text, exit_crashes), Some(0.0));
}

#[tokio::test]
async fn open_subscriptions_are_counted_until_they_end() {
    let (d, mut client) = start_enabled(
        &["--metrics-listen", "127.0.0.1:0"],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    let events = Events::watch(&mut client, None).await;
    let mut logs = pb::log_service_client::LogServiceClient::new(d.channel().await);
    let follow = logs
        .stream_logs(pb::StreamLogsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_for_sample(
        &d,
        r#"torud_subscriptions{kind="events"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    wait_for_sample(
        &d,
        r#"torud_subscriptions{kind="logs"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    drop(events);
    drop(follow);
    wait_for_sample(
        &d,
        r#"torud_subscriptions{kind="events"}"#,
        0.0,
        Duration::from_secs(5),
    )
    .await;
    wait_for_sample(
        &d,
        r#"torud_subscriptions{kind="logs"}"#,
        0.0,
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test]
async fn off_loopback_a_scrape_needs_a_token() {
    let mut d = Daemon::new(&[
        "--metrics-listen",
        "0.0.0.0:0",
        "--insecure-plaintext-non-loopback",
    ]);
    d.start().await;
    let port = d
        .metrics_addr
        .as_deref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let addr = format!("127.0.0.1:{port}");
    let (status, body) = http_get(&addr, "/metrics", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    let (status, _) = http_get(&addr, "/metrics", Some("not-a-token")).await;
    assert_eq!(status, 401);
    let (status, body) = http_get(&addr, "/metrics", Some(&d.token("read"))).await;
    assert_eq!(status, 200);
    assert!(body.contains("torud_build_info"), "{body}");
}

#[tokio::test]
async fn off_loopback_plaintext_metrics_are_refused_without_the_flag() {
    let d = Daemon::new(&["--metrics-listen", "0.0.0.0:0"]);
    let out = std::process::Command::new(TORUD)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--plugins-dir"])
        .arg(&d.plugins_dir)
        .arg("--data-dir")
        .arg(&d.data_dir)
        .args(&d.args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve plaintext on 0.0.0.0:0"),
        "{stderr}"
    );
}

/// The Prometheus server binary: `prometheus` on the PATH (Debian's package).
fn prometheus_binary() -> String {
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(
        !path.is_empty(),
        "the Prometheus server is not installed: `apt-get install prometheus` (tests/run.sh \
         installs it)"
    );
    path
}

/// A free TCP port on the loopback address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asks Prometheus's HTTP API for `query`; the value of its single result, if any.
async fn promql(prometheus: &str, query: &str) -> Option<f64> {
    let mut encoded = String::new();
    for b in query.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    // Refused while the server is still starting.
    let stream = tokio::net::TcpStream::connect(prometheus).await.ok()?;
    let path = format!("/api/v1/query?query={encoded}");
    let (status, body) = get_on(stream, prometheus, &path, None).await;
    if status != 200 {
        return None;
    }
    // The body may be chunked: the JSON object is between the first '{' and the last '}'.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let answer: serde_json::Value = serde_json::from_str(json).ok()?;
    let result = answer["data"]["result"].as_array()?;
    let value = result.first()?["value"][1].as_str()?;
    value.parse().ok()
}

async fn wait_for_promql(prometheus: &str, query: &str, value: f64, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let got = promql(prometheus, query).await;
        if got == Some(value) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus answers {got:?} to {query}, not {value}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write_prometheus_config(dir: &Path, target: &str) -> std::path::PathBuf {
    let path = dir.join("prometheus.yml");
    let text = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - \
         job_name: torud\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn the_prometheus_server_scrapes_the_daemon_and_sees_a_kill_9_counted() {
    let binary = prometheus_binary();
    let (d, mut client) = start_enabled(
        &["--metrics-listen", "127.0.0.1:0"],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_prometheus_config(dir.path(), d.metrics_addr.as_deref().unwrap());
    let prometheus = format!("127.0.0.1:{}", free_port());
    let _server = tokio::process::Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address={prometheus}"))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_promql(
        &prometheus,
        r#"up{job="torud"}"#,
        1.0,
        Duration::from_secs(60),
    )
    .await;
    wait_for_promql(
        &prometheus,
        r#"torud_plugin_up{plugin="hello"}"#,
        1.0,
        Duration::from_secs(30),
    )
    .await;
    let crashes = r#"torud_plugin_crashes_total{plugin="hello",reason="signal"}"#;
    wait_for_promql(&prometheus, crashes, 0.0, Duration::from_secs(30)).await;
    let pid = get(&mut client, "hello").await.pid;
    signal(pid, libc::SIGKILL);
    wait_for_promql(&prometheus, crashes, 1.0, Duration::from_secs(30)).await;
    wait_for_promql(
        &prometheus,
        r#"torud_plugins{state="running"}"#,
        1.0,
        Duration::from_secs(30),
    )
    .await;
}
