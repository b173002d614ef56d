//! `torud-bench`: benchmarks of the daemon, each figure printed beside a baseline measured in
//! the same run, so the ratio means something on a noisy machine.
//!
//! - `torud-bench lifecycle`: enable→ready and SIGKILL→crashed-event latency (see
//!   `lifecycle.rs`).
//! - `torud-bench forward`: a forwarded `GetValue`, latency and throughput (see
//!   `forward.rs`), with `--peer DIR` beside HashiCorp go-plugin's (see `peer.rs`).
//! - `torud-bench logs`: log capture throughput, latency and queries (see `logs.rs`).
//! - `torud-bench scale`: N plugins on one host, beside an empty daemon (see `scale.rs`).
//! - `torud-bench upgrade`: upgrading the daemon in place under load, beside a cold restart
//!   (see `upgrade.rs`).
//!
//! Run from a release build: `cargo build --release --bins --examples`, then
//! `target/release/torud-bench <bench> [--json PATH]`.

mod forward;
mod lifecycle;
mod logs;
mod memkv;
mod peer;
mod scale;
mod upgrade;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use torud_api::Bearer;

#[derive(Parser)]
#[command(
    name = "torud-bench",
    about = "Benchmarks of torud against same-run baselines"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Enable→ready and SIGKILL→crashed-event latency.
    Lifecycle {
        /// Measured iterations of each figure (after 10 warm-up rounds).
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A forwarded GetValue: latency at concurrency 1, throughput with 64 in flight.
    Forward {
        /// Sequential calls measured for latency, per side.
        #[arg(long, default_value_t = 5000)]
        calls: usize,
        /// Seconds of each throughput run.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Throughput runs per side, alternating; the median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Calls in flight for the throughput runs.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The plugin behind `hello`: `storage` (the example plugin, whose KV values live in
        /// the daemon's durable storage: two socket round trips per call) or `memory` (an SDK
        /// plugin keeping them in its own memory, as the go-plugin peer's plugin does).
        #[arg(long, value_enum, default_value_t = forward::PluginKind::Storage)]
        plugin: forward::PluginKind,
        /// The HashiCorp go-plugin KV peer's Go module (e.g. `../shared/peers/goplugin-kv`):
        /// built with `go build` and run between torud's rounds; adds its figures, the
        /// ratios against it and whether the target holds.
        #[arg(long, value_name = "DIR")]
        peer: Option<PathBuf>,
        /// How the client reaches the daemon (and the baseline): `tcp` (its TCP listener,
        /// with the token) or `control-socket` (its Unix control socket, as local clients
        /// such as toructl connect by default; the baseline then listens on a Unix socket
        /// too)
        #[arg(long, value_enum, default_value_t = forward::Via::Tcp)]
        via: forward::Via,
    },
    /// Log capture: lines/s from a one-write-per-line and a buffered writer, and latency at
    /// a paced rate, each beside a bare pipe reader.
    Logs {
        /// Lines per throughput run.
        #[arg(long, default_value_t = 200_000)]
        lines: usize,
        /// Lines per second of the paced latency run (for one second).
        #[arg(long, default_value_t = 100_000)]
        rate: usize,
        /// Throughput rounds (daemon and baseline alternate); medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Megabytes of log history to fill before timing queries at its far end.
        #[arg(long, default_value_t = 1024)]
        history_mb: usize,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// N plugins on one host: time to all running, idle CPU, RSS per plugin, ListPlugins
    /// and GetPlugin latency, time to all stopped, fds and threads, beside an empty daemon.
    Scale {
        /// Plugins to install.
        #[arg(long, default_value_t = 1000)]
        plugins: usize,
        /// The plugins' protocol: 1, 2 or both (one daemon each).
        #[arg(long, default_value = "both")]
        protocol: String,
        /// Seconds of the idle window over which CPU, fds and threads are read.
        #[arg(long, default_value_t = 30.0)]
        idle_seconds: f64,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Upgrading the daemon in place under load (handover time, longest gap in answers,
    /// plugin restarts), beside a cold restart of the daemon with its plugins.
    Upgrade {
        /// Plugins to run: the example plugin and N-1 idle `scale-plugin`s.
        #[arg(long, default_value_t = 10)]
        plugins: usize,
        /// Upgrades measured.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Cold restarts measured (spread among the upgrades).
        #[arg(long, default_value_t = 5)]
        restarts: usize,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// (internal) The writer of `logs`, also runnable as a v1 plugin.
    #[command(hide = true)]
    LogWriter {
        /// Lines to write.
        #[arg(long, default_value_t = 0)]
        lines: usize,
        /// per-line, buffered or paced.
        #[arg(long, default_value = "per-line")]
        mode: String,
        /// Lines per second, for paced.
        #[arg(long, default_value_t = 100_000)]
        rate: usize,
        /// The plugin id to declare.
        #[arg(long, default_value = "writer")]
        id: String,
        /// Print plugin metadata and exit.
        #[arg(long)]
        metadata: bool,
    },
    /// (internal) The in-memory KV plugin of `forward --plugin memory`.
    #[command(hide = true)]
    KvPlugin {
        /// Print plugin metadata and exit.
        #[arg(long)]
        metadata: bool,
    },
    /// (internal) The baseline of `forward`: a bare gRPC server forwarding to the plugin.
    #[command(hide = true)]
    BaselineServer {
        /// The plugin executable to spawn.
        plugin: PathBuf,
        /// Listen on this Unix socket instead of a free TCP port.
        #[arg(long)]
        unix: Option<PathBuf>,
    },
}

pub(crate) type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The admin token the benchmarks' daemons are started with.
const BENCH_TOKEN: &str = "torud-bench-admin-token";

/// A plaintext HTTP/2 channel to `addr`: `host:port`, or `unix://PATH` (tonic dials Unix
/// sockets itself).
pub(crate) async fn connect(addr: &str) -> BenchResult<tonic::transport::Channel> {
    let uri = if addr.starts_with("unix://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(tonic::transport::Endpoint::from_shared(uri)?
        .connect()
        .await?)
}

/// A channel whose calls carry the token.
pub(crate) type Authed = tonic::codegen::InterceptedService<tonic::transport::Channel, Bearer>;

/// Its calls carry the token (TCP calls need one; the baselines ignore it, so both sides
/// carry the same header).
pub(crate) fn authed(channel: tonic::transport::Channel) -> Authed {
    let bearer = Bearer::new(BENCH_TOKEN).expect("the token is ASCII");
    tonic::codegen::InterceptedService::new(channel, bearer)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) mean: f64,
}

pub(crate) fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| {
        ms(samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1])
    };
    let mean = samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64;
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        mean,
    }
}

pub(crate) fn summary_json(s: Summary) -> serde_json::Value {
    json!({ "p50_ms": s.p50, "p99_ms": s.p99, "mean_ms": s.mean })
}

pub(crate) fn sibling(name: &str) -> BenchResult<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("no parent directory")?;
    let path = if name == "torud" {
        dir.join(name)
    } else {
        dir.join("examples").join(name)
    };
    if !path.exists() {
        return Err(format!(
            "{} is missing: build it first with `cargo build --release --bins --examples`",
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// Starts `torud serve --log warn <args>` with the benchmarks' admin token and waits for it
/// to listen: the process (killed when dropped) and the address it listens on.
pub(crate) async fn spawn_torud(
    torud: &Path,
    args: &[std::ffi::OsString],
) -> BenchResult<(Child, String)> {
    let mut child = Command::new(torud)
        .args(["serve", "--log", "warn"])
        .args(args)
        .env("TORUD_ADMIN_TOKEN", BENCH_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let line = lines
        .next_line()
        .await?
        .ok_or("torud exited before listening")?;
    let addr = line
        .strip_prefix("torud listening on ")
        .ok_or_else(|| format!("unexpected first line {line:?}"))?
        .to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

/// The daemon under measurement, as a separate process.
pub(crate) struct Daemon {
    _child: Child,
    pub(crate) addr: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// The daemon's process id, while it runs.
    pub(crate) fn pid(&self) -> Option<i32> {
        self._child.id().and_then(|p| i32::try_from(p).ok())
    }

    /// Waits for the daemon to exit.
    pub(crate) async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self._child.wait().await
    }

    /// The daemon's data directory.
    pub(crate) fn dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// A daemon with the example plugin installed as `hello.binary`.
    async fn start(torud: &Path, plugin: &Path, extra: &[&str]) -> BenchResult<Self> {
        let plugin = plugin.to_owned();
        Self::start_with(torud, extra, move |dir| {
            std::fs::copy(&plugin, dir.join("hello.binary")).map(|_| ())
        })
        .await
    }

    /// A daemon whose plugins directory `install` fills.
    async fn start_with(
        torud: &Path,
        extra: &[&str],
        install: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> BenchResult<Self> {
        let dir = tempfile::tempdir()?;
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins)?;
        install(&plugins)?;
        let mut args: Vec<std::ffi::OsString> =
            ["--listen", "127.0.0.1:0"].iter().map(Into::into).collect();
        args.extend(["--plugins-dir".into(), plugins.into_os_string()]);
        args.extend([
            "--data-dir".into(),
            dir.path().join("data").into_os_string(),
        ]);
        args.extend(extra.iter().map(Into::into));
        let (child, addr) = spawn_torud(torud, &args).await?;
        Ok(Daemon {
            _child: child,
            addr,
            _dir: dir,
        })
    }
}

/// Waits for the first event about the `hello` plugin (replayed from the start) that
/// matches `pred`.
pub(crate) async fn wait_for_hello(
    client: &mut torud_api::pb::plugin_service_client::PluginServiceClient<crate::Authed>,
    what: &str,
    pred: impl Fn(&torud_api::pb::Event) -> bool,
) -> BenchResult<()> {
    let req = torud_api::pb::WatchEventsRequest {
        after_seq: Some(0),
        plugin_ids: vec!["hello".into()],
    };
    let mut events = client.watch_events(req).await?.into_inner();
    while let Some(resp) = events.message().await? {
        if resp.event.as_ref().is_some_and(&pred) {
            return Ok(());
        }
    }
    Err(format!("event stream ended before the plugin was {what}").into())
}

pub(crate) fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Bench::KvPlugin { .. } = cli.bench {
        // The SDK's `serve` runs a runtime of its own.
        return memkv::serve();
    }
    // The log benchmark's subscriber (and its bare-pipe baseline) runs on one thread: on a
    // 2-core machine a multi-threaded client spends its time waking itself across threads,
    // CPU the daemon and the writer being measured need.
    let runtime = match cli.bench {
        Bench::Logs { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.bench {
            Bench::Lifecycle { iterations, json } => lifecycle::run(iterations.max(1), json).await,
            Bench::Forward {
                calls,
                seconds,
                rounds,
                in_flight,
                json,
                plugin,
                peer,
                via,
            } => {
                let options = forward::Options {
                    plugin,
                    via,
                    calls: calls.max(1),
                    seconds,
                    rounds: rounds.max(1),
                    in_flight: in_flight.max(1),
                    json,
                    peer,
                };
                forward::run(options).await
            }
            Bench::BaselineServer { plugin, unix } => forward::baseline_server(plugin, unix).await,
            Bench::KvPlugin { .. } => unreachable!("served before the runtime starts"),
            Bench::Logs {
                lines,
                rate,
                rounds,
                history_mb,
                json,
            } => {
                logs::run(
                    lines.max(1),
                    rate.max(1000),
                    rounds.max(1),
                    history_mb,
                    json,
                )
                .await
            }
            Bench::Scale {
                plugins,
                protocol,
                idle_seconds,
                json,
            } => {
                let protocols = match protocol.as_str() {
                    "1" => vec![1],
                    "2" => vec![2],
                    "both" => vec![1, 2],
                    other => {
                        return Err(format!("--protocol must be 1, 2 or both, not {other}").into())
                    }
                };
                let idle = Duration::from_secs_f64(idle_seconds.max(0.1));
                scale::run(plugins.max(1), &protocols, idle, json).await
            }
            Bench::Upgrade {
                plugins,
                rounds,
                restarts,
                json,
            } => upgrade::run(plugins.max(1), rounds.max(1), restarts.max(1), json).await,
            Bench::LogWriter {
                lines,
                mode,
                rate,
                id,
                metadata,
            } => logs::writer(lines, &mode, rate, &id, metadata),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("torud-bench: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
