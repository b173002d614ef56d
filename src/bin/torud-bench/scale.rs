//! `torud-bench scale --plugins N`: what N plugins on one host cost the daemon, each figure
//! beside an empty daemon's measured in the same run.
//!
//! The plugins are the `scale-plugin` example (one thread, no runtime, a small binary, so a
//! thousand of them start quickly) behind N `#!/bin/sh exec …` wrappers `<id>.binary`,
//! speaking protocol 1 (one message per connection) or 2 (one persistent connection: init →
//! ready, ping → pong, shutdown). The
//! daemon runs with `--enable-new-plugins`. Figures: time from start to all N running;
//! idle CPU (% of one core, from `/proc/<pid>/stat`) over the idle window; RSS above the
//! empty daemon per plugin; `ListPlugins` (all N in one page) and `GetPlugin` p50/p99; time
//! from SIGTERM to the daemon's exit with every plugin gone; open fds and threads at the
//! start and end of the idle window.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use torud_api::pb;
use torud_api::pb::plugin_service_client::PluginServiceClient;

use crate::{authed, connect, num_cpus, sibling, summarize, summary_json, BenchResult, Daemon};
use crate::{Authed, Summary};

/// `ListPlugins` calls timed per daemon.
const LIST_CALLS: usize = 200;
/// `GetPlugin` calls timed per daemon.
const GET_CALLS: usize = 1000;
/// How long the plugins may take to all run, or all stop, before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(120);

/// The targets of issue 14, printed beside the figures.
mod target {
    pub(super) const IDLE_CPU_PERCENT: f64 = 1.0;
    pub(super) const RSS_KIB_PER_PLUGIN: f64 = 100.0;
    pub(super) const LIST_P99_MS: f64 = 5.0;
    pub(super) const GET_P99_MS: f64 = 1.0;
    pub(super) const ALL_RUNNING_S: f64 = 3.0;
    pub(super) const ALL_STOPPED_S: f64 = 1.0;
}

/// What one daemon measured.
struct Figures {
    /// Plugins installed (0 for the empty daemon).
    plugins: usize,
    /// Protocol of the plugins (0 for the empty daemon).
    protocol: u32,
    /// From spawning the daemon to every plugin RUNNING (to listening, for the empty one).
    all_running: Duration,
    idle_cpu_percent: f64,
    /// VmRSS after the idle window, KiB.
    rss_kib: u64,
    /// Anonymous memory (`smaps_rollup`), KiB.
    anon_kib: u64,
    fds: (usize, usize),
    threads: (usize, usize),
    list: Summary,
    get: Summary,
    /// From SIGTERM to the daemon's exit and every plugin process gone.
    all_stopped: Duration,
}

impl Figures {
    fn json(&self, empty: Option<&Figures>) -> serde_json::Value {
        let per_plugin = empty.map(|e| rss_per_plugin(self, e));
        json!({
            "plugins": self.plugins,
            "protocol": self.protocol,
            "all_running_s": self.all_running.as_secs_f64(),
            "idle_cpu_percent": self.idle_cpu_percent,
            "rss_kib": self.rss_kib,
            "anon_kib": self.anon_kib,
            "rss_kib_per_plugin_above_empty": per_plugin,
            "fds": { "start": self.fds.0, "end": self.fds.1 },
            "threads": { "start": self.threads.0, "end": self.threads.1 },
            "list_plugins": summary_json(self.list),
            "get_plugin": summary_json(self.get),
            "all_stopped_s": self.all_stopped.as_secs_f64(),
        })
    }
}

fn rss_per_plugin(f: &Figures, empty: &Figures) -> f64 {
    (f.rss_kib as f64 - empty.rss_kib as f64) / f.plugins.max(1) as f64
}

pub(crate) async fn run(
    plugins: usize,
    protocols: &[u32],
    idle: Duration,
    json_path: Option<PathBuf>,
) -> BenchResult<()> {
    let torud = sibling("torud")?;
    let plugin = sibling("scale-plugin")?;
    let empty = measure(&torud, &plugin, 0, 0, idle).await?;
    let mut runs = Vec::new();
    for &protocol in protocols {
        runs.push(measure(&torud, &plugin, plugins, protocol, idle).await?);
    }
    print(&empty, &runs, idle);
    if let Some(path) = json_path {
        let doc = json!({
            "benchmark": "scale",
            "plugins": plugins,
            "idle_seconds": idle.as_secs_f64(),
            "cores": num_cpus(),
            "empty": empty.json(None),
            "runs": runs.iter().map(|r| r.json(Some(&empty))).collect::<Vec<_>>(),
            "targets": {
                "idle_cpu_percent": target::IDLE_CPU_PERCENT,
                "rss_kib_per_plugin_above_empty": target::RSS_KIB_PER_PLUGIN,
                "list_plugins_p99_ms": target::LIST_P99_MS,
                "get_plugin_p99_ms": target::GET_P99_MS,
                "all_running_s": target::ALL_RUNNING_S,
                "all_stopped_s": target::ALL_STOPPED_S,
            },
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn print(empty: &Figures, runs: &[Figures], idle: Duration) {
    println!(
        "torud-bench scale: {} plugins, idle window {:.0} s, {} cores",
        runs.first().map_or(0, |r| r.plugins),
        idle.as_secs_f64(),
        num_cpus()
    );
    let mut header = format!("{:<30} {:>12}", "figure", "empty");
    for r in runs {
        header += &format!(" {:>12}", format!("protocol {}", r.protocol));
    }
    println!("{header} {:>10}", "target");
    let row = |name: &str, f: &dyn Fn(&Figures) -> String, target: &str| {
        let mut line = format!("{name:<30} {:>12}", f(empty));
        for r in runs {
            line += &format!(" {:>12}", f(r));
        }
        println!("{line} {target:>10}");
    };
    row(
        "start→all running, s",
        &|f| format!("{:.3}", f.all_running.as_secs_f64()),
        &format!("≤ {}", target::ALL_RUNNING_S),
    );
    row(
        "idle CPU, % of a core",
        &|f| format!("{:.2}", f.idle_cpu_percent),
        &format!("≤ {}", target::IDLE_CPU_PERCENT),
    );
    row("RSS, KiB", &|f| f.rss_kib.to_string(), "");
    row("anonymous, KiB", &|f| f.anon_kib.to_string(), "");
    row(
        "RSS above empty per plugin, KiB",
        &|f| {
            if f.plugins == 0 {
                "-".into()
            } else {
                format!("{:.1}", rss_per_plugin(f, empty))
            }
        },
        &format!("≤ {}", target::RSS_KIB_PER_PLUGIN),
    );
    row("ListPlugins p50 ms", &|f| format!("{:.3}", f.list.p50), "");
    row(
        "ListPlugins p99 ms",
        &|f| format!("{:.3}", f.list.p99),
        &format!("≤ {}", target::LIST_P99_MS),
    );
    row("GetPlugin p50 ms", &|f| format!("{:.3}", f.get.p50), "");
    row(
        "GetPlugin p99 ms",
        &|f| format!("{:.3}", f.get.p99),
        &format!("≤ {}", target::GET_P99_MS),
    );
    row(
        "SIGTERM→all stopped, s",
        &|f| format!("{:.3}", f.all_stopped.as_secs_f64()),
        &format!("≤ {}", target::ALL_STOPPED_S),
    );
    row(
        "fds start→end",
        &|f| format!("{}→{}", f.fds.0, f.fds.1),
        "flat",
    );
    row(
        "threads start→end",
        &|f| format!("{}→{}", f.threads.0, f.threads.1),
        "flat",
    );
    println!(
        "(the empty daemon's GetPlugin asks for an id it does not have; its answer is NOT_FOUND; idle window {:.0} s)",
        idle.as_secs_f64()
    );
}

/// Starts a daemon with `plugins` scale plugins of `protocol` and measures it.
async fn measure(
    torud: &Path,
    plugin: &Path,
    plugins: usize,
    protocol: u32,
    idle: Duration,
) -> BenchResult<Figures> {
    let ids: Vec<String> = (0..plugins).map(|i| format!("p{i:05}")).collect();
    let began = Instant::now();
    // Generous timeouts: on a busy machine a thousand probes and starts can take longer
    // than the defaults, and a plugin skipped or failed would spoil the figures.
    let flags = [
        "--enable-new-plugins",
        "--metadata-timeout",
        "60s",
        "--start-timeout",
        "60s",
    ];
    let daemon =
        Daemon::start_with(torud, &flags, |dir| install(dir, plugin, &ids, protocol)).await?;
    let pid = daemon.pid().ok_or("the daemon has no pid")?;
    let channel = connect(&daemon.addr).await?;
    let mut client = PluginServiceClient::new(authed(channel));
    let plugin_pids = wait_all_running(&mut client, plugins).await?;
    let all_running = began.elapsed();

    let (fds_start, threads_start) = (open_fds(pid)?, threads(pid)?);
    let cpu_start = cpu_ticks(pid)?;
    let idle_began = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu = cpu_ticks(pid)? - cpu_start;
    let idle_cpu_percent = cpu as f64 / clock_ticks() / idle_began.elapsed().as_secs_f64() * 100.0;
    let (fds_end, threads_end) = (open_fds(pid)?, threads(pid)?);
    let (rss_kib, anon_kib) = (rss_kib(pid)?, anon_kib(pid)?);

    let list = time_list(&mut client, plugins).await?;
    let get = time_get(&mut client, &ids).await?;

    let all_stopped = terminate(daemon, &plugin_pids).await?;
    Ok(Figures {
        plugins,
        protocol,
        all_running,
        idle_cpu_percent,
        rss_kib,
        anon_kib,
        fds: (fds_start, fds_end),
        threads: (threads_start, threads_end),
        list,
        get,
        all_stopped,
    })
}

/// Writes one `<id>.binary` wrapper per id, running the `scale-plugin` example.
fn install(dir: &Path, plugin: &Path, ids: &[String], protocol: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for id in ids {
        let script = format!(
            "#!/bin/sh\nexec {} --id {id} --protocol {protocol} \"$@\"\n",
            plugin.display()
        );
        let path = dir.join(format!("{id}.binary"));
        std::fs::write(&path, script)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Polls `ListPlugins` until all `n` plugins are RUNNING; returns their pids.
async fn wait_all_running(
    client: &mut PluginServiceClient<Authed>,
    n: usize,
) -> BenchResult<Vec<i32>> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let req = pb::ListPluginsRequest {
            page_size: n.clamp(1, 1000) as i32,
            ..Default::default()
        };
        let page = client.list_plugins(req).await?.into_inner();
        if let Some(skipped) = page.skipped.first() {
            return Err(format!(
                "the daemon skipped {} plugin files, e.g. {}: {}",
                page.skipped.len(),
                skipped.path,
                skipped.reason
            )
            .into());
        }
        let list = page.plugins;
        let running: Vec<i32> = list
            .iter()
            .filter(|p| p.state == pb::PluginState::Running as i32)
            .map(|p| p.pid as i32)
            .collect();
        if running.len() == n {
            return Ok(running);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} plugins were running after {PATIENCE:?}",
                running.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every plugin, in one page.
async fn list_all(
    client: &mut PluginServiceClient<Authed>,
    n: usize,
) -> BenchResult<Vec<pb::Plugin>> {
    let req = pb::ListPluginsRequest {
        page_size: n.clamp(1, 1000) as i32,
        ..Default::default()
    };
    Ok(client.list_plugins(req).await?.into_inner().plugins)
}

async fn time_list(client: &mut PluginServiceClient<Authed>, n: usize) -> BenchResult<Summary> {
    let mut samples = Vec::with_capacity(LIST_CALLS);
    for i in 0..LIST_CALLS + 10 {
        let began = Instant::now();
        let got = list_all(client, n).await?;
        let took = began.elapsed();
        if got.len() != n {
            return Err(format!("ListPlugins returned {} plugins, not {n}", got.len()).into());
        }
        if i >= 10 {
            samples.push(took);
        }
    }
    Ok(summarize(&mut samples))
}

async fn time_get(
    client: &mut PluginServiceClient<Authed>,
    ids: &[String],
) -> BenchResult<Summary> {
    let mut samples = Vec::with_capacity(GET_CALLS);
    for i in 0..GET_CALLS + 10 {
        let id = ids
            .get(i % ids.len().max(1))
            .cloned()
            .unwrap_or_else(|| "absent".into());
        let began = Instant::now();
        let got = client
            .get_plugin(pb::GetPluginRequest { plugin_id: id })
            .await;
        let took = began.elapsed();
        match got {
            Ok(_) => {}
            Err(s) if ids.is_empty() && s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(s.into()),
        }
        if i >= 10 {
            samples.push(took);
        }
    }
    Ok(summarize(&mut samples))
}

/// SIGTERMs the daemon and waits for it to exit and every plugin process to be gone;
/// returns how long that took.
async fn terminate(mut daemon: Daemon, plugin_pids: &[i32]) -> BenchResult<Duration> {
    let pid = daemon.pid().ok_or("the daemon has no pid")?;
    let began = Instant::now();
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    tokio::time::timeout(PATIENCE, daemon.wait())
        .await
        .map_err(|_| "the daemon did not exit after SIGTERM")??;
    let deadline = Instant::now() + PATIENCE;
    while plugin_pids.iter().any(|&p| alive(p)) {
        if Instant::now() > deadline {
            return Err("plugin processes outlived the daemon".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(began.elapsed())
}

/// Whether `pid` is a live process (a zombie has stopped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat)
            .first()
            .is_some_and(|s| *s != "Z" && *s != "X"),
        Err(_) => false,
    }
}

/// The fields of `/proc/<pid>/stat` after the command name: `[0]` is the state (field 3).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> BenchResult<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields = stat_fields(&stat);
    // Fields 14 and 15 (utime, stime) are [11] and [12] counted from field 3.
    let utime: u64 = fields.get(11).ok_or("short stat")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("short stat")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// The daemon's open descriptors: its main thread (the spawner, which `/proc/<pid>/fd`
/// shows) has a table of its own, so another thread's is counted.
fn open_fds(pid: i32) -> BenchResult<usize> {
    let task = format!("/proc/{pid}/task");
    let other = std::fs::read_dir(&task)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|tid| *tid != pid.to_string());
    let dir = match other {
        Some(tid) => format!("{task}/{tid}/fd"),
        None => format!("/proc/{pid}/fd"),
    };
    Ok(std::fs::read_dir(dir)?.count())
}

/// A `Key: value kB` line's value from a `/proc/<pid>/` file.
fn proc_value(pid: i32, file: &str, key: &str) -> BenchResult<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .ok_or_else(|| format!("no {key} in /proc/{pid}/{file}"))?;
    let value = line.trim_start_matches(':').split_whitespace().next();
    Ok(value.ok_or("empty value")?.parse()?)
}

fn threads(pid: i32) -> BenchResult<usize> {
    Ok(proc_value(pid, "status", "Threads")? as usize)
}

fn rss_kib(pid: i32) -> BenchResult<u64> {
    proc_value(pid, "status", "VmRSS")
}

fn anon_kib(pid: i32) -> BenchResult<u64> {
    proc_value(pid, "smaps_rollup", "Anonymous")
}
