//! `torud-bench upgrade`: the daemon upgraded in place (`UpgradeDaemon` to the same binary)
//! under load, beside a cold restart of the daemon with its plugins in the same run.
//!
//! N plugins run: the example plugin (`hello`) and N-1 `scale-plugin`s speaking protocol
//! 2; callers issue forwarded `GetValue`s to `hello` over TCP all along. For each upgrade: the handover time as a client sees it (from the
//! `UpgradeDaemon` call to the `DAEMON_UPGRADED` event) and as the daemon reports it, and
//! the longest gap any caller saw between two answers. For each cold restart (SIGTERM, start
//! again on the same address and data directory): the time until every plugin is RUNNING
//! again, and the longest gap in answers. Plugin restarts are counted by pid on both sides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Child;
use torud_api::pb;
use torud_api::pb::config_service_client::ConfigServiceClient;
use torud_api::pb::kv_service_client::KvServiceClient;
use torud_api::pb::plugin_service_client::PluginServiceClient;

use crate::{authed, connect, sibling, spawn_torud, summarize, summary_json, Authed, BenchResult};

/// Callers issuing forwarded calls all along.
const CALLERS: usize = 16;

/// A daemon process of this benchmark, on a fixed address and data directory.
struct Process {
    child: Child,
}

async fn start(torud: &Path, dir: &Path, addr: &str) -> BenchResult<Process> {
    let args: Vec<std::ffi::OsString> = vec![
        "--enable-new-plugins".into(),
        "--listen".into(),
        addr.into(),
        "--plugins-dir".into(),
        dir.join("plugins").into_os_string(),
        "--data-dir".into(),
        dir.join("data").into_os_string(),
    ];
    let (child, _) = spawn_torud(torud, &args).await?;
    Ok(Process { child })
}

impl Process {
    async fn stop(mut self) -> BenchResult<()> {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await??;
        Ok(())
    }
}

/// What the callers saw: answers, and the time of each caller's last one.
struct Load {
    answered: AtomicU64,
    last: Vec<Mutex<Instant>>,
    /// The longest gap any caller saw, in microseconds, since the last reset.
    longest_us: AtomicU64,
    stop: AtomicBool,
}

impl Load {
    fn reset(&self) {
        let now = Instant::now();
        for last in &self.last {
            *last.lock().expect("not poisoned") = now;
        }
        self.longest_us.store(0, Ordering::SeqCst);
    }

    /// The longest gap since the reset, counting callers still waiting now.
    fn longest(&self) -> Duration {
        let waiting = self
            .last
            .iter()
            .map(|l| l.lock().expect("not poisoned").elapsed())
            .max()
            .unwrap_or_default();
        Duration::from_micros(self.longest_us.load(Ordering::SeqCst)).max(waiting)
    }
}

async fn caller(addr: String, n: usize, load: Arc<Load>) {
    let mut client: Option<KvServiceClient<Authed>> = None;
    while !load.stop.load(Ordering::Relaxed) {
        if client.is_none() {
            let connected = connect(&addr).await.ok();
            match connected {
                Some(channel) => client = Some(KvServiceClient::new(authed(channel))),
                None => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
            }
        }
        let kv = client.as_mut().expect("connected above");
        let req = pb::GetValueRequest {
            plugin_id: "hello".into(),
            key: "bench".into(),
        };
        match tokio::time::timeout(Duration::from_secs(10), kv.get_value(req)).await {
            Ok(Ok(_)) => {
                load.answered.fetch_add(1, Ordering::Relaxed);
                let mut last = load.last[n].lock().expect("not poisoned");
                let gap = last.elapsed();
                load.longest_us
                    .fetch_max(gap.as_micros() as u64, Ordering::SeqCst);
                *last = Instant::now();
            }
            _ => {
                // Refused during a handover, or the daemon restarting: try again.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// Every plugin's pid once all `plugins` are RUNNING (waits at most `limit`).
async fn all_running(
    addr: &str,
    plugins: usize,
    limit: Duration,
) -> BenchResult<HashMap<String, u32>> {
    let deadline = Instant::now() + limit;
    loop {
        if Instant::now() > deadline {
            return Err(
                format!("the {plugins} plugins were not all running within {limit:?}").into(),
            );
        }
        let listed = async {
            let mut client = PluginServiceClient::new(authed(connect(addr).await?));
            let list = client
                .list_plugins(pb::ListPluginsRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            BenchResult::Ok(list.plugins)
        }
        .await;
        if let Ok(list) = listed {
            let running: HashMap<String, u32> = list
                .iter()
                .filter(|p| p.state == pb::PluginState::Running as i32)
                .map(|p| (p.id.clone(), p.pid))
                .collect();
            if running.len() == plugins {
                return Ok(running);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Calls `UpgradeDaemon` and follows the events to `DAEMON_UPGRADED`: the time the client
/// saw, and the duration the daemon reports.
async fn upgrade_once(addr: &str) -> BenchResult<(Duration, Duration)> {
    let began = Instant::now();
    let mut config = ConfigServiceClient::new(authed(connect(addr).await?));
    let answer = config
        // Over TCP only the daemon's own path may be upgraded to (no `binary`).
        .upgrade_daemon(pb::UpgradeDaemonRequest::default())
        .await?
        .into_inner();
    let mut after = answer.upgrading_seq;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Ok(channel) = connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let mut client = PluginServiceClient::new(authed(channel));
        let req = pb::WatchEventsRequest {
            after_seq: Some(after),
            plugin_ids: vec![],
        };
        let Ok(stream) = client.watch_events(req).await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        while let Ok(Some(resp)) = stream.message().await {
            let Some(e) = resp.event else { continue };
            after = e.seq;
            if e.kind == pb::EventKind::DaemonUpgraded as i32 {
                let reported = e
                    .details
                    .get("duration_ms")
                    .and_then(|d| d.parse::<u64>().ok())
                    .unwrap_or_default();
                return Ok((began.elapsed(), Duration::from_millis(reported)));
            }
            if e.kind == pb::EventKind::DaemonUpgradeFailed as i32 {
                return Err(format!("the upgrade failed: {}", e.reason).into());
            }
        }
    }
    Err("no DAEMON_UPGRADED event within 60 s".into())
}

pub(crate) async fn run(
    plugins: usize,
    upgrades: usize,
    restarts: usize,
    json_path: Option<PathBuf>,
) -> BenchResult<()> {
    let torud = sibling("torud")?;
    let hello = sibling("hello-plugin")?;
    let scale = sibling("scale-plugin")?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("plugins"))?;
    std::fs::copy(&hello, dir.path().join("plugins/hello.binary"))?;
    for i in 1..plugins {
        let wrapper = format!(
            "#!/bin/sh\nexec {} --id idle-{i} --protocol 2 \"$@\"\n",
            scale.display()
        );
        let path = dir.path().join(format!("plugins/idle-{i}.binary"));
        std::fs::write(&path, wrapper)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut daemon = start(&torud, dir.path(), &addr).await?;
    let mut pids = all_running(&addr, plugins, Duration::from_secs(60)).await?;

    let load = Arc::new(Load {
        answered: AtomicU64::new(0),
        last: (0..CALLERS).map(|_| Mutex::new(Instant::now())).collect(),
        longest_us: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let callers: Vec<_> = (0..CALLERS)
        .map(|n| tokio::spawn(caller(addr.clone(), n, load.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut client_seen = Vec::new();
    let mut reported = Vec::new();
    let mut upgrade_gaps = Vec::new();
    let mut upgrade_restarts = 0usize;
    let mut restart_times = Vec::new();
    let mut restart_gaps = Vec::new();
    let mut restart_restarts = 0usize;
    // Cold restarts spread among the upgrades, so both sides see the same machine.
    let every = (upgrades / restarts.max(1)).max(1);
    let mut cold_done = 0usize;
    for round in 0..upgrades {
        load.reset();
        let (seen, took) = upgrade_once(&addr).await?;
        let after = all_running(&addr, plugins, Duration::from_secs(60)).await?;
        // Let every caller get an answer from the new image before reading the gap.
        settle(&load).await;
        upgrade_gaps.push(load.longest());
        client_seen.push(seen);
        reported.push(took);
        upgrade_restarts += after
            .iter()
            .filter(|(id, pid)| pids.get(*id) != Some(pid))
            .count();
        pids = after;
        if cold_done < restarts && (round + 1) % every == 0 {
            load.reset();
            let began = Instant::now();
            daemon.stop().await?;
            daemon = start(&torud, dir.path(), &addr).await?;
            let after = all_running(&addr, plugins, Duration::from_secs(60)).await?;
            restart_times.push(began.elapsed());
            settle(&load).await;
            restart_gaps.push(load.longest());
            restart_restarts += after
                .iter()
                .filter(|(id, pid)| pids.get(*id) != Some(pid))
                .count();
            pids = after;
            cold_done += 1;
        }
    }
    load.stop.store(true, Ordering::Relaxed);
    for c in callers {
        let _ = c.await;
    }
    let answered = load.answered.load(Ordering::Relaxed);
    daemon.stop().await?;

    let seen = summarize(&mut client_seen);
    let took = summarize(&mut reported);
    let up_gap = summarize(&mut upgrade_gaps);
    let cold = summarize(&mut restart_times);
    let cold_gap = summarize(&mut restart_gaps);
    println!("upgrade in place vs cold restart: {plugins} plugins, {CALLERS} callers of forwarded GetValue over TCP ({answered} answered)");
    println!(
        "  upgrade ({upgrades}x): handover as the client sees it p50 {:.1} ms p99 {:.1} ms; as the daemon reports it p50 {:.1} ms p99 {:.1} ms",
        seen.p50, seen.p99, took.p50, took.p99
    );
    println!(
        "    longest gap between two answers: p50 {:.1} ms p99 {:.1} ms (max {:.1} ms); plugin restarts {upgrade_restarts}",
        up_gap.p50, up_gap.p99, max_ms(&upgrade_gaps)
    );
    println!(
        "  cold restart ({}x): SIGTERM to every plugin running again p50 {:.1} ms p99 {:.1} ms",
        restart_times.len(),
        cold.p50,
        cold.p99
    );
    println!(
        "    longest gap between two answers: p50 {:.1} ms p99 {:.1} ms (max {:.1} ms); plugin restarts {restart_restarts}",
        cold_gap.p50, cold_gap.p99, max_ms(&restart_gaps)
    );
    println!(
        "  ratio (upgrade / cold restart): longest gap p50 {:.2}",
        up_gap.p50 / cold_gap.p50
    );
    if let Some(path) = json_path {
        let doc = json!({
            "bench": "upgrade",
            "plugins": plugins,
            "callers": CALLERS,
            "answered": answered,
            "upgrade": {
                "rounds": upgrades,
                "client_seen": summary_json(seen),
                "daemon_reported": summary_json(took),
                "longest_gap": summary_json(up_gap),
                "longest_gap_max_ms": max_ms(&upgrade_gaps),
                "plugin_restarts": upgrade_restarts,
            },
            "cold_restart": {
                "rounds": restart_times.len(),
                "time_to_all_running": summary_json(cold),
                "longest_gap": summary_json(cold_gap),
                "longest_gap_max_ms": max_ms(&restart_gaps),
                "plugin_restarts": restart_restarts,
            },
            "ratio_longest_gap_p50": up_gap.p50 / cold_gap.p50,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

/// Waits until every caller has had an answer since the last reset (at most 10 s).
async fn settle(load: &Load) {
    let since = Instant::now();
    let all_answered = || {
        load.last
            .iter()
            .all(|l| l.lock().expect("not poisoned").elapsed() < since.elapsed())
    };
    while !all_answered() && since.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn max_ms(samples: &[Duration]) -> f64 {
    samples
        .iter()
        .max()
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}
