//! `torud-bench logs`: how fast plugin output is captured, stored and delivered.
//!
//! A writer (this binary's hidden `log-writer`, run as a v1 plugin) writes numbered lines
//! `L <n> <send time in ns>` to stderr, one `write` per line or buffered. The daemon
//! captures, stores and delivers them to one `StreamLogs` follower; the baseline, in the
//! same run, is the same writer feeding a bare pipe reader. Reported: lines/s both ways,
//! and capture-to-subscriber latency at a paced rate beside the bare reader's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic::transport::Channel;
use torud::pb;
use torud::pb::log_service_client::LogServiceClient;
use torud::pb::plugin_service_client::PluginServiceClient;

use crate::{num_cpus, sibling, summarize, summary_json, BenchResult, Daemon};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The writer: `lines` lines to stderr, then (as a plugin) serve until shutdown.
pub(crate) fn writer(
    lines: usize,
    mode: &str,
    rate: usize,
    id: &str,
    metadata: bool,
) -> BenchResult<()> {
    if metadata {
        println!(
            "{}",
            json!({"id": id, "name": "log writer", "version": "1", "icon": "w", "route": format!("/{id}")})
        );
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    match mode {
        "buffered" => {
            let mut buf = Vec::with_capacity(1 << 20);
            for n in 0..lines {
                writeln!(buf, "L {n} {}", now_ns())?;
                if buf.len() >= 64 * 1024 {
                    err.write_all(&buf)?;
                    buf.clear();
                }
            }
            err.write_all(&buf)?;
        }
        "paced" => {
            let began = std::time::Instant::now();
            for n in 0..lines {
                // Sleep (not spin) until the line is due, so the writer leaves the CPU to
                // the reader; lines come in 1 ms bursts at the requested rate.
                let due = Duration::from_secs_f64(n as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(began.elapsed()) {
                    if wait >= Duration::from_millis(1) {
                        std::thread::sleep(wait);
                    }
                }
                err.write_all(format!("L {n} {}\n", now_ns()).as_bytes())?;
            }
        }
        _ => {
            for n in 0..lines {
                err.write_all(format!("L {n} {}\n", now_ns()).as_bytes())?;
            }
        }
    }
    drop(err);
    if let Some(socket) = std::env::var_os(toru_plugin_sdk::ENV_PLUGIN_SOCKET) {
        serve_until_shutdown(Path::new(&socket))?;
    }
    Ok(())
}

/// A minimal v1 plugin loop: one message per connection, exit on shutdown.
fn serve_until_shutdown(socket: &Path) -> BenchResult<()> {
    use std::io::Read;
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    for stream in listener.incoming() {
        let mut stream = stream?;
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            continue;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if stream.read_exact(&mut body).is_err() {
            continue;
        }
        if String::from_utf8_lossy(&body).contains("\"shutdown\"") {
            return Ok(());
        }
    }
    Ok(())
}

/// Parses `L <n> <ns>`.
fn parse(line: &str) -> Option<(usize, u128)> {
    let mut parts = line.strip_prefix("L ")?.split(' ');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// What a run measured: lines/s from the first line sent to the last received, and each
/// line's send-to-receive latency.
struct Run {
    lines_per_s: f64,
    latencies: Vec<Duration>,
}

fn finish(first_sent: u128, received: Vec<(u128, u128)>) -> Run {
    let last = received.iter().map(|(_, r)| *r).max().unwrap_or(first_sent);
    let secs = (last.saturating_sub(first_sent)) as f64 / 1e9;
    Run {
        lines_per_s: received.len() as f64 / secs.max(1e-9),
        latencies: received
            .iter()
            .map(|(s, r)| Duration::from_nanos(r.saturating_sub(*s) as u64))
            .collect(),
    }
}

/// Baseline: the writer's stderr read by a bare pipe reader.
async fn bare(lines: usize, mode: &str, rate: usize) -> BenchResult<Run> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["log-writer", "--mode", mode])
        .arg(format!("--lines={lines}"))
        .arg(format!("--rate={rate}"))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut reader =
        BufReader::with_capacity(64 * 1024, child.stderr.take().ok_or("no stderr")?).lines();
    let mut received = Vec::with_capacity(lines);
    let mut first_sent = None;
    while let Some(line) = reader.next_line().await? {
        if let Some((_, sent)) = parse(&line) {
            first_sent.get_or_insert(sent);
            received.push((sent, now_ns()));
        }
    }
    child.wait().await?;
    Ok(finish(first_sent.unwrap_or(0), received))
}

/// Through the daemon: enable the writer plugin and follow its log.
async fn through(channel: &Channel, id: &str, lines: usize) -> BenchResult<Run> {
    let mut logs = LogServiceClient::new(channel.clone());
    let mut plugins = PluginServiceClient::new(channel.clone());
    let req = pb::StreamLogsRequest {
        filter: Some(pb::LogFilter {
            plugin_ids: vec![id.into()],
            min_level: 0,
            contains: String::new(),
        }),
        start: None,
        follow: true,
    };
    let mut stream = logs.stream_logs(req).await?.into_inner();
    // The writer binds its socket only after writing, so EnablePlugin returns late: read the
    // stream meanwhile.
    let mut enabling = plugins.clone();
    let enable_id = id.to_owned();
    let enabled = tokio::spawn(async move {
        enabling
            .enable_plugin(pb::EnablePluginRequest {
                plugin_id: enable_id,
            })
            .await
    });
    let mut received = Vec::with_capacity(lines);
    let mut first_sent = None;
    let mut last_stored = 0u128;
    while received.len() < lines {
        let resp = tokio::time::timeout(Duration::from_secs(120), stream.message())
            .await??
            .ok_or("stream ended")?;
        if resp.gap.is_some() {
            return Err("the daemon reported lost lines".into());
        }
        let at = now_ns();
        if let Some(t) = resp.records.last().and_then(|r| r.time) {
            last_stored = last_stored.max(t.seconds as u128 * 1_000_000_000 + t.nanos as u128);
        }
        for r in resp.records {
            if let Some((_, sent)) = parse(&r.message) {
                first_sent.get_or_insert(sent);
                received.push((sent, at));
            }
        }
    }
    enabled.await??;
    plugins
        .disable_plugin(pb::DisablePluginRequest {
            plugin_id: id.into(),
        })
        .await?;
    let first = first_sent.unwrap_or(0);
    eprintln!(
        "{id}: stored at {:.0} lines/s",
        lines as f64 / ((last_stored.saturating_sub(first)) as f64 / 1e9)
    );
    Ok(finish(first, received))
}

pub(crate) async fn run(lines: usize, rate: usize, json_path: Option<PathBuf>) -> BenchResult<()> {
    let torud = sibling("torud")?;
    let me = std::env::current_exe()?;
    let runs = [
        ("w-line", "per-line", lines),
        ("w-buf", "buffered", lines),
        ("w-paced", "paced", rate),
    ];
    let segment = format!("{}", 64 * 1024 * 1024);
    let extra = [
        "--log-segment-bytes",
        segment.as_str(),
        "--log-segments",
        "20",
    ];
    let daemon = Daemon::start_with(&torud, &extra, |dir| {
        for (id, mode, n) in runs {
            let script = format!(
                "#!/bin/sh\nexec {} log-writer --id {id} --mode {mode} --lines={n} --rate={rate} \"$@\"\n",
                me.display()
            );
            let path = dir.join(format!("{id}.binary"));
            std::fs::write(&path, script)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    })
    .await?;
    let channel = Channel::from_shared(format!("http://{}", daemon.addr))?
        .connect()
        .await?;
    let mut plugins = PluginServiceClient::new(channel.clone());
    loop {
        let list = plugins
            .list_plugins(pb::ListPluginsRequest::default())
            .await?
            .into_inner();
        if list.plugins.len() == runs.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let base_line = bare(lines, "per-line", rate).await?;
    let daemon_line = through(&channel, "w-line", lines).await?;
    let base_buf = bare(lines, "buffered", rate).await?;
    let daemon_buf = through(&channel, "w-buf", lines).await?;
    let mut base_paced = bare(rate, "paced", rate).await?;
    let mut daemon_paced = through(&channel, "w-paced", rate).await?;
    let (lat_b, lat_d) = (
        summarize(&mut base_paced.latencies),
        summarize(&mut daemon_paced.latencies),
    );

    let unbuffered_ratio = daemon_line.lines_per_s / base_line.lines_per_s;
    println!("torud-bench logs: {lines} lines per throughput run, {rate} lines/s paced for 1 s, {} cores", num_cpus());
    println!("{:<34} {:>14} {:>14}", "", "daemon", "bare pipe");
    println!(
        "{:<34} {:>14.0} {:>14.0}",
        "one write per line, lines/s", daemon_line.lines_per_s, base_line.lines_per_s
    );
    println!(
        "{:<34} {:>14.0} {:>14.0}",
        "buffered, lines/s", daemon_buf.lines_per_s, base_buf.lines_per_s
    );
    println!(
        "{:<34} {:>14.3} {:>14.3}",
        "latency p50 ms (paced)", lat_d.p50, lat_b.p50
    );
    println!(
        "{:<34} {:>14.3} {:>14.3}",
        "latency p99 ms (paced)", lat_d.p99, lat_b.p99
    );
    println!("unbuffered ratio: {unbuffered_ratio:.3} (target ≥ 0.9)");
    println!(
        "buffered lines/s: {:.0} (target ≥ 1,000,000)",
        daemon_buf.lines_per_s
    );
    println!("latency p99:      {:.3} ms (target ≤ 10 ms)", lat_d.p99);
    println!("query p99:        not measured yet");
    if let Some(path) = json_path {
        let doc = json!({
            "benchmark": "logs",
            "lines": lines,
            "paced_rate": rate,
            "cores": num_cpus(),
            "per_line": { "daemon_lines_per_s": daemon_line.lines_per_s, "baseline_lines_per_s": base_line.lines_per_s },
            "buffered": { "daemon_lines_per_s": daemon_buf.lines_per_s, "baseline_lines_per_s": base_buf.lines_per_s },
            "latency": { "daemon": summary_json(lat_d), "baseline": summary_json(lat_b) },
            "unbuffered_ratio": unbuffered_ratio,
            "buffered_lines_per_s": daemon_buf.lines_per_s,
            "latency_p99_ms": lat_d.p99,
            "query_p99_ms": null,
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
