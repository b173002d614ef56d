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
use torud_api::pb;
use torud_api::pb::log_service_client::LogServiceClient;
use torud_api::pb::plugin_service_client::PluginServiceClient;

use crate::{
    authed, connect, num_cpus, sibling, summarize, summary_json, BenchResult, Daemon, Summary,
};

/// Padding of a history line, so that 1 GB of history takes millions, not tens of
/// millions, of lines to write.
const HISTORY_PAD: &str = "history history history history history history history history \
history history history history history history history history history history history";
/// About how many bytes one history line takes on disk.
const HISTORY_LINE_BYTES: usize = 300;
/// Queries per kind in the query benchmark.
const QUERIES: usize = 200;

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
        "history" => {
            // Long lines, buffered: fills the store quickly for the query benchmark.
            let mut buf = Vec::with_capacity(1 << 20);
            for n in 0..lines {
                writeln!(buf, "L {n} {} {HISTORY_PAD}", now_ns())?;
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
    let mut logs = LogServiceClient::new(authed(channel.clone()));
    let mut plugins = PluginServiceClient::new(authed(channel.clone()));
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
    while received.len() < lines {
        let resp = tokio::time::timeout(Duration::from_secs(120), stream.message())
            .await??
            .ok_or("stream ended")?;
        if resp.gap.is_some() {
            return Err("the daemon reported lost lines".into());
        }
        let at = now_ns();
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
    Ok(finish(first, received))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// What the query benchmark measured.
struct Queries {
    /// Records in the history.
    records: u64,
    /// Bytes of history on disk.
    bytes: u64,
    far_seq: Summary,
    far_time: Summary,
    near: Summary,
}

/// Fills `id`'s log with about `bytes` of history, then times pages of 100 records at its
/// far (oldest) end, found by seq and by time, beside pages at its near end (newest first,
/// no seeking) as the baseline.
async fn queries(channel: &Channel, id: &str, lines: usize, data: &Path) -> BenchResult<Queries> {
    let mut logs = LogServiceClient::new(authed(channel.clone()));
    let mut plugins = PluginServiceClient::new(authed(channel.clone()));
    plugins
        .enable_plugin(pb::EnablePluginRequest {
            plugin_id: id.into(),
        })
        .await?;
    let filter = || {
        Some(pb::LogFilter {
            plugin_ids: vec![id.into()],
            min_level: 0,
            contains: String::new(),
        })
    };
    // Wait (polling: this is a benchmark's set-up, not a measurement) for the last line.
    let want = format!("L {} ", lines - 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let last_seq = loop {
        let page = logs
            .query_logs(pb::QueryLogsRequest {
                filter: filter(),
                page_size: 10,
                newest_first: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        if let Some(r) = page.records.iter().find(|r| r.message.starts_with(&want)) {
            break r.seq;
        }
        if std::time::Instant::now() > deadline {
            return Err("the history was not stored within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let bytes = dir_bytes(&data.join("logs").join(id))?;
    let first = logs
        .query_logs(pb::QueryLogsRequest {
            filter: filter(),
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .records
        .first()
        .map_or(1, |r| r.seq);
    // The oldest 1% of the history.
    let span = ((last_seq - first) / 100).max(1);
    let mut rng = now_ns() as u64 | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut far_seq, mut far_time, mut near) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..QUERIES {
        let after = first + next() % span;
        let began = std::time::Instant::now();
        let page = logs
            .query_logs(pb::QueryLogsRequest {
                filter: filter(),
                after_seq: after,
                page_size: 100,
                ..Default::default()
            })
            .await?
            .into_inner();
        far_seq.push(began.elapsed());
        if page.records.len() != 100 || page.records[0].seq != after + 1 {
            return Err(format!("a far page after seq {after} came back wrong").into());
        }
        let since = page.records[0].time;
        let began = std::time::Instant::now();
        let page = logs
            .query_logs(pb::QueryLogsRequest {
                filter: filter(),
                since,
                page_size: 100,
                ..Default::default()
            })
            .await?
            .into_inner();
        far_time.push(began.elapsed());
        if page.records.len() != 100 || page.records[0].seq > after + 1 {
            return Err(
                format!("a far page since seq {}'s time came back wrong", after + 1).into(),
            );
        }
        let began = std::time::Instant::now();
        let page = logs
            .query_logs(pb::QueryLogsRequest {
                filter: filter(),
                page_size: 100,
                newest_first: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        near.push(began.elapsed());
        if page.records.len() != 100 {
            return Err("a near page came back short".into());
        }
    }
    plugins
        .disable_plugin(pb::DisablePluginRequest {
            plugin_id: id.into(),
        })
        .await?;
    Ok(Queries {
        records: last_seq - first + 1,
        bytes,
        far_seq: summarize(&mut far_seq),
        far_time: summarize(&mut far_time),
        near: summarize(&mut near),
    })
}

fn dir_bytes(dir: &Path) -> BenchResult<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}

pub(crate) async fn run(
    lines: usize,
    rate: usize,
    rounds: usize,
    history_mb: usize,
    json_path: Option<PathBuf>,
) -> BenchResult<()> {
    let torud = sibling("torud")?;
    let me = std::env::current_exe()?;
    let history_lines = (history_mb * 1024 * 1024 / HISTORY_LINE_BYTES).max(200);
    let runs = [
        ("w-line", "per-line", lines),
        ("w-buf", "buffered", lines),
        ("w-paced", "paced", rate),
        ("w-hist", "history", history_lines),
    ];
    // Segments large enough to keep the whole history (and the throughput runs' lines).
    let segment_bytes = 64 * 1024 * 1024;
    let segments = (history_mb * 1024 * 1024 / segment_bytes + 4).max(20);
    let (segment, segments) = (segment_bytes.to_string(), segments.to_string());
    let extra = [
        "--log-segment-bytes",
        segment.as_str(),
        "--log-segments",
        segments.as_str(),
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
    let channel = connect(&daemon.addr).await?;
    let mut plugins = PluginServiceClient::new(authed(channel.clone()));
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

    // Throughput: alternating rounds, medians (one round swings with the machine's noise).
    let (mut base_line, mut daemon_line, mut base_buf, mut daemon_buf) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        base_line.push(bare(lines, "per-line", rate).await?.lines_per_s);
        daemon_line.push(through(&channel, "w-line", lines).await?.lines_per_s);
        base_buf.push(bare(lines, "buffered", rate).await?.lines_per_s);
        daemon_buf.push(through(&channel, "w-buf", lines).await?.lines_per_s);
    }
    let ratios: Vec<f64> = daemon_line
        .iter()
        .zip(&base_line)
        .map(|(d, b)| d / b)
        .collect();
    let (base_line_m, daemon_line_m) = (median(base_line.clone()), median(daemon_line.clone()));
    let (base_buf_m, daemon_buf_m) = (median(base_buf.clone()), median(daemon_buf.clone()));
    let unbuffered_ratio = median(ratios.clone());
    let mut base_paced = bare(rate, "paced", rate).await?;
    let mut daemon_paced = through(&channel, "w-paced", rate).await?;
    let (lat_b, lat_d) = (
        summarize(&mut base_paced.latencies),
        summarize(&mut daemon_paced.latencies),
    );
    let q = queries(&channel, "w-hist", history_lines, &daemon.dir()).await?;
    let query_p99 = q.far_seq.p99.max(q.far_time.p99);

    println!(
        "torud-bench logs: {lines} lines per throughput run (median of {rounds}), {rate} lines/s paced for 1 s, {} cores",
        num_cpus()
    );
    println!("{:<34} {:>14} {:>14}", "", "daemon", "bare pipe");
    println!(
        "{:<34} {:>14.0} {:>14.0}",
        "one write per line, lines/s", daemon_line_m, base_line_m
    );
    println!(
        "{:<34} {:>14.0} {:>14.0}",
        "buffered, lines/s", daemon_buf_m, base_buf_m
    );
    println!(
        "{:<34} {:>14.3} {:>14.3}",
        "latency p50 ms (paced)", lat_d.p50, lat_b.p50
    );
    println!(
        "{:<34} {:>14.3} {:>14.3}",
        "latency p99 ms (paced)", lat_d.p99, lat_b.p99
    );
    println!(
        "query, {} records / {:.0} MB of history: {QUERIES} pages of 100 each way",
        q.records,
        q.bytes as f64 / 1e6
    );
    println!("{:<34} {:>14} {:>14}", "", "p50 ms", "p99 ms");
    for (name, s) in [
        ("far end, after a seq", q.far_seq),
        ("far end, since a time", q.far_time),
        ("near end, newest first (baseline)", q.near),
    ] {
        println!("{name:<34} {:>14.3} {:>14.3}", s.p50, s.p99);
    }
    println!("unbuffered ratio: {unbuffered_ratio:.3} (target ≥ 0.9; rounds {ratios:.3?})");
    println!("buffered lines/s: {daemon_buf_m:.0} (target ≥ 1,000,000)");
    println!("latency p99:      {:.3} ms (target ≤ 10 ms)", lat_d.p99);
    println!("query p99:        {query_p99:.3} ms (target ≤ 5 ms)");
    if let Some(path) = json_path {
        let doc = json!({
            "benchmark": "logs",
            "lines": lines,
            "rounds": rounds,
            "paced_rate": rate,
            "cores": num_cpus(),
            "per_line": { "daemon_lines_per_s": daemon_line, "baseline_lines_per_s": base_line, "ratios": ratios },
            "buffered": { "daemon_lines_per_s": daemon_buf, "baseline_lines_per_s": base_buf },
            "latency": { "daemon": summary_json(lat_d), "baseline": summary_json(lat_b) },
            "query": {
                "history_records": q.records,
                "history_bytes": q.bytes,
                "far_after_seq": summary_json(q.far_seq),
                "far_since_time": summary_json(q.far_time),
                "near_newest_first_baseline": summary_json(q.near),
            },
            "unbuffered_ratio": unbuffered_ratio,
            "buffered_lines_per_s": daemon_buf_m,
            "latency_p99_ms": lat_d.p99,
            "query_p99_ms": query_p99,
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
