//! `torud-bench forward`: a forwarded `GetValue` (gRPC client → daemon → Unix socket → the
//! Rust example plugin → back), at concurrency 1 (latency) and with many calls in flight
//! over one channel (throughput).
//!
//! The baseline, measured in the same run with the same client, is the ideal composition:
//! a bare tonic server in a process of its own that forwards each call over one multiplexed
//! Unix-socket connection to the same plugin binary, building and reading the same JSON
//! frames, with none of the daemon's machinery (supervision, limits, events).
//!
//! Each round also times a bare Unix-socket round trip, the front hop alone and the plugin
//! hop alone, and (with `--peer`) runs HashiCorp go-plugin's KV peer (`peer.rs`), whose
//! p50 plus one bare round trip and 0.8× whose throughput are the daemon's target. With
//! `--plugin memory` the plugin is `kv-plugin` (`memkv.rs`), which keeps values in memory
//! as the peer's plugin does.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tonic::{Request, Response, Status};
use toru_plugin_sdk::wire::InitParams;
use toru_plugin_sdk::{Envelope, FrameCodec, KvOp, MessageType};
use torud::plugin::connection::connect_with_retry;
use torud_api::pb;
use torud_api::pb::kv_service_client::KvServiceClient;
use torud_api::pb::kv_service_server::{KvService, KvServiceServer};
use torud_api::pb::plugin_service_client::PluginServiceClient;

use crate::peer::{uds_round_trips, Peer, PeerLoad, PeerRound};
use crate::{
    authed, connect, num_cpus, sibling, summarize, summary_json, wait_for_hello, Authed,
    BenchResult, Daemon,
};

const KEY: &str = "bench-key";

/// The plugin the forwarded calls reach.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum PluginKind {
    /// The example plugin: values in the daemon's durable storage.
    Storage,
    /// `torud-bench kv-plugin`: values in the plugin's memory, like the go-plugin peer's.
    Memory,
}

/// How the bench's client reaches the daemon and the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Via {
    /// The TCP listener on loopback, with the admin token.
    Tcp,
    /// The daemon's Unix control socket (and a Unix socket for the baseline).
    ControlSocket,
}

impl Via {
    fn describe(self) -> &'static str {
        match self {
            Via::Tcp => "TCP loopback",
            Via::ControlSocket => "the Unix control socket",
        }
    }
}

/// What `torud-bench forward` runs.
pub(crate) struct Options {
    /// The plugin behind `hello`.
    pub(crate) plugin: PluginKind,
    /// How the client reaches the daemon and the baseline.
    pub(crate) via: Via,
    /// Sequential calls timed per side (spread over the rounds).
    pub(crate) calls: usize,
    /// Seconds of each throughput run.
    pub(crate) seconds: f64,
    /// Rounds; each side (and the peer) runs once per round, in turn.
    pub(crate) rounds: usize,
    /// Calls in flight in the throughput runs.
    pub(crate) in_flight: usize,
    /// Where to write the figures as JSON.
    pub(crate) json: Option<PathBuf>,
    /// The go-plugin peer's Go module, to build and run beside torud.
    pub(crate) peer: Option<PathBuf>,
}

/// Bytes of the value the benchmark key holds (on every side, the peer's too).
const VALUE_SIZE: usize = 32;

/// The samples of every side, gathered round by round.
#[derive(Default)]
struct Samples {
    /// Sequential latency: daemon, baseline.
    latency: [Vec<Duration>; 2],
    /// Throughput runs: daemon, baseline.
    rates: [Vec<f64>; 2],
    /// The peer's rounds (empty without `--peer`).
    peer: Vec<PeerRound>,
    /// Bare Unix-socket round trips.
    uds: Vec<Duration>,
    /// The daemon's front hop alone: a `GetValue` for a plugin that does not exist
    /// (client, TCP, h2, auth, readiness, the plugin table; NOT_FOUND).
    front: Vec<Duration>,
    /// The plugin hop alone: the same KV request on a connection of the bench's own to
    /// the plugin's socket (one UDS round trip, the plugin's decode, task and encode).
    plugin: Vec<Duration>,
}

pub(crate) async fn run(options: Options) -> BenchResult<()> {
    let Options {
        calls,
        seconds,
        rounds,
        in_flight,
        ref peer,
        ..
    } = options;
    // Built first: the Go toolchain's work must not overlap the measurement.
    let peer = match peer {
        Some(dir) => Some(Peer::build(dir).await?),
        None => None,
    };
    let torud = sibling("torud")?;
    let scripts = tempfile::tempdir()?;
    let plugin = match options.plugin {
        PluginKind::Storage => sibling("hello-plugin")?,
        PluginKind::Memory => memory_plugin(scripts.path())?,
    };
    let daemon = Daemon::start(&torud, &plugin, &["--enable-new-plugins"]).await?;
    let channel = connect(&daemon.addr).await?;
    let mut plugins = PluginServiceClient::new(authed(channel));
    let running = |e: &pb::Event| e.to_state == pb::PluginState::Running as i32;
    wait_for_hello(&mut plugins, "running", running).await?;
    let baseline = BaselineProcess::start(&plugin, options.via, scripts.path()).await?;
    let daemon_at = match options.via {
        Via::Tcp => daemon.addr.clone(),
        Via::ControlSocket => format!(
            "unix://{}",
            daemon.dir().join(torud::config::CONTROL_SOCKET).display()
        ),
    };
    let sides = [
        kv_client(&daemon_at).await?,
        kv_client(&baseline.addr).await?,
    ];
    for client in &sides {
        let mut client = client.clone();
        let req = pb::SetValueRequest {
            plugin_id: "hello".into(),
            key: KEY.into(),
            value: "v".repeat(VALUE_SIZE),
        };
        client.set_value(req).await?;
        for _ in 0..500 {
            get(&mut client).await?;
        }
    }

    let per_round = calls.div_ceil(rounds);
    let mut samples = Samples::default();
    for round in 1..=rounds {
        let timed = (per_round * round).min(calls);
        latency_round(&sides, &mut samples.latency, timed).await?;
        for (side, client) in sides.iter().enumerate() {
            samples.rates[side].push(throughput(client, seconds, in_flight).await?);
        }
        if let Some(peer) = &peer {
            let load = PeerLoad {
                calls: per_round,
                seconds,
                in_flight,
                value_size: VALUE_SIZE,
            };
            samples.peer.push(peer.round(&load).await?);
        }
        samples
            .uds
            .extend(uds_round_trips(request_frame_size(), per_round).await?);
        samples.front.extend(front_hop(&sides[0], per_round).await?);
        let socket = daemon.dir().join("run").join("hello").join("plugin.sock");
        samples.plugin.extend(plugin_hop(&socket, per_round).await?);
    }
    drop(baseline);
    drop(daemon);
    report(&options, samples)
}

/// An executable in `dir` that runs this binary's `kv-plugin`.
fn memory_plugin(dir: &std::path::Path) -> BenchResult<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("memkv.binary");
    let me = std::env::current_exe()?;
    let script = format!("#!/bin/sh\nexec '{}' kv-plugin \"$@\"\n", me.display());
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Sequential calls, alternating chunks between the sides so both see the same machine,
/// until each side has `timed` samples.
async fn latency_round(
    sides: &[KvServiceClient<Authed>; 2],
    latency: &mut [Vec<Duration>; 2],
    timed: usize,
) -> BenchResult<()> {
    while latency[0].len() < timed {
        for (side, client) in sides.iter().enumerate() {
            let mut client = client.clone();
            for _ in 0..250.min(timed - latency[side].len()) {
                let began = Instant::now();
                get(&mut client).await?;
                latency[side].push(began.elapsed());
            }
        }
    }
    Ok(())
}

/// `count` sequential `GetValue` calls naming a plugin that does not exist, timed.
async fn front_hop(client: &KvServiceClient<Authed>, count: usize) -> BenchResult<Vec<Duration>> {
    let mut client = client.clone();
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let req = pb::GetValueRequest {
            plugin_id: "absent".into(),
            key: KEY.into(),
        };
        let began = Instant::now();
        let status = client.get_value(req).await.err();
        samples.push(began.elapsed());
        if status.map(|s| s.code()) != Some(tonic::Code::NotFound) {
            return Err("a GetValue for an absent plugin did not answer NOT_FOUND".into());
        }
    }
    Ok(samples)
}

/// `count` sequential KV `get` requests (after as many untimed) on a connection of the
/// bench's own to the plugin's socket, timed; the plugin's storage requests, if any, are
/// answered at once.
async fn plugin_hop(socket: &std::path::Path, count: usize) -> BenchResult<Vec<Duration>> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (read, write) = stream.into_split();
    let mut out = FramedWrite::new(write, FrameCodec::default());
    let mut frames = FramedRead::new(read, FrameCodec::default());
    let op = KvOp::Get { key: KEY.into() };
    let mut samples = Vec::with_capacity(count);
    for i in 0..count * 2 {
        let request = Envelope::kv_request(torud::plugin::link::new_request_id(), &op);
        let began = Instant::now();
        out.send(request.to_vec()).await?;
        loop {
            let frame = frames
                .next()
                .await
                .ok_or("the plugin closed the connection")??;
            let answer = Envelope::from_slice(&frame)?;
            if answer.kind != MessageType::Storage {
                break;
            }
            // The example plugin reads its value from the host's storage: answered here
            // at once, as if from a cache.
            use toru_plugin_sdk::storage_wire::{answer_envelope, StorageAnswer};
            let value = StorageAnswer::Value(Some("v".repeat(VALUE_SIZE)));
            let id = answer.request_id.unwrap_or_default();
            out.send(answer_envelope(id, &Ok(value)).to_vec()).await?;
        }
        if i >= count {
            samples.push(began.elapsed());
        }
    }
    Ok(samples)
}

/// Bytes of the frame the daemon writes to the plugin for one `GetValue` (length prefix
/// included): the message size of the bare round trip.
fn request_frame_size() -> usize {
    let op = KvOp::Get { key: KEY.into() };
    let id = torud::plugin::link::new_request_id();
    4 + Envelope::kv_request(id, &op).to_vec().len()
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prints the figures and writes the JSON.
fn report(options: &Options, samples: Samples) -> BenchResult<()> {
    let Samples {
        latency: [mut lat_d, mut lat_b],
        rates,
        peer,
        mut uds,
        mut front,
        mut plugin,
    } = samples;
    let (front, plugin_hop) = (summarize(&mut front), summarize(&mut plugin));
    let (ld, lb, rtt) = (
        summarize(&mut lat_d),
        summarize(&mut lat_b),
        summarize(&mut uds),
    );
    let (td, tb) = (
        median(rates[0].iter().copied()),
        median(rates[1].iter().copied()),
    );
    let p50_ratio = ld.p50 / lb.p50;
    let throughput_ratio = td / tb;
    let Options {
        calls,
        seconds,
        rounds,
        in_flight,
        ..
    } = *options;
    let plugin = match options.plugin {
        PluginKind::Storage => "the example plugin, values in the daemon's storage",
        PluginKind::Memory => "kv-plugin, values in its memory",
    };
    println!(
        "torud-bench forward: {calls} sequential GetValue per side, then {rounds} × {seconds} s with {in_flight} in flight (median), {} cores; plugin: {plugin}; client over {}",
        num_cpus(),
        options.via.describe()
    );
    println!(
        "{:<22} {:>10} {:>10} {:>12}",
        "", "p50 ms", "p99 ms", "calls/s"
    );
    let row = |name: &str, p50: f64, p99: f64, rate: Option<f64>| {
        let rate = rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.0}"));
        println!("{name:<22} {p50:>10.3} {p99:>10.3} {rate:>12}");
    };
    row("daemon", ld.p50, ld.p99, Some(td));
    row("baseline (bare)", lb.p50, lb.p99, Some(tb));
    let peer_summary = (!peer.is_empty()).then(|| PeerSummary::of(&peer, ld.p50, td, rtt.p50));
    if let Some(p) = &peer_summary {
        row("go-plugin (peer)", p.p50, p.p99, Some(p.rate));
    }
    row("bare UDS round trip", rtt.p50, rtt.p99, None);
    row("front hop alone", front.p50, front.p99, None);
    row("plugin hop alone", plugin_hop.p50, plugin_hop.p99, None);
    println!("p50 ratio:        {p50_ratio:.3} (target ≤ 1.15)");
    println!("throughput ratio: {throughput_ratio:.3} (target ≥ 0.85)");
    if let Some(p) = &peer_summary {
        println!(
            "against go-plugin: p50 {:.3} ms vs ≤ {:.3} ms (peer p50 + one bare UDS round trip): {}; throughput ratio {:.3} (target ≥ {PEER_THROUGHPUT_TARGET}): {}",
            ld.p50,
            p.p50_limit,
            verdict(p.p50_met),
            p.throughput_ratio,
            verdict(p.throughput_met),
        );
    }
    if let Some(path) = &options.json {
        let mut doc = json!({
            "benchmark": "forward",
            "calls": calls,
            "seconds": seconds,
            "rounds": rounds,
            "in_flight": in_flight,
            "cores": num_cpus(),
            "plugin": format!("{:?}", options.plugin).to_lowercase(),
            "via": match options.via { Via::Tcp => "tcp", Via::ControlSocket => "control-socket" },
            "latency": { "daemon": summary_json(ld), "baseline": summary_json(lb) },
            "throughput_calls_per_s": { "daemon": td, "baseline": tb, "daemon_runs": rates[0], "baseline_runs": rates[1] },
            "p50_ratio": p50_ratio,
            "throughput_ratio": throughput_ratio,
            "uds_rtt": summary_json(rtt),
            "uds_message_bytes": request_frame_size(),
            "hops": { "front": summary_json(front), "plugin": summary_json(plugin_hop) },
            "targets": { "p50_ratio": 1.15, "throughput_ratio": 0.85 },
        });
        if let Some(p) = &peer_summary {
            doc["peer"] = json!({
                "name": "hashicorp/go-plugin gRPC KV",
                "p50_ms": p.p50,
                "p99_ms": p.p99,
                "throughput_calls_per_s": p.rate,
                "rounds": peer.iter().map(|r| json!({
                    "p50_us": r.p50_us, "p99_us": r.p99_us, "throughput_calls_per_s": r.calls_per_s,
                })).collect::<Vec<_>>(),
            });
            doc["peer_p50_ratio"] = json!(p.p50_ratio);
            doc["peer_throughput_ratio"] = json!(p.throughput_ratio);
            doc["peer_target"] = json!({
                "p50_limit_ms": p.p50_limit,
                "p50_met": p.p50_met,
                "throughput_ratio": PEER_THROUGHPUT_TARGET,
                "throughput_met": p.throughput_met,
                "met": p.p50_met && p.throughput_met,
            });
        }
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The throughput against go-plugin's the target asks for.
const PEER_THROUGHPUT_TARGET: f64 = 0.8;

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// The peer's figures (medians of its rounds) and the daemon's against them.
struct PeerSummary {
    p50: f64,
    p99: f64,
    rate: f64,
    p50_ratio: f64,
    throughput_ratio: f64,
    /// The peer's p50 plus one bare UDS round trip: the most the daemon's p50 may be.
    p50_limit: f64,
    p50_met: bool,
    throughput_met: bool,
}

impl PeerSummary {
    /// From the peer's rounds and the daemon's p50 (ms), throughput, and the bare round
    /// trip's p50 (ms).
    fn of(rounds: &[PeerRound], daemon_p50: f64, daemon_rate: f64, rtt_p50: f64) -> Self {
        let p50 = median(rounds.iter().map(|r| r.p50_us / 1000.0));
        let p99 = median(rounds.iter().map(|r| r.p99_us / 1000.0));
        let rate = median(rounds.iter().map(|r| r.calls_per_s));
        let p50_limit = p50 + rtt_p50;
        let throughput_ratio = daemon_rate / rate;
        PeerSummary {
            p50,
            p99,
            rate,
            p50_ratio: daemon_p50 / p50,
            throughput_ratio,
            p50_limit,
            p50_met: daemon_p50 <= p50_limit,
            throughput_met: throughput_ratio >= PEER_THROUGHPUT_TARGET,
        }
    }
}

/// A KV client of `addr`: `host:port`, or `unix://PATH` for a Unix socket (where the token
/// it sends is ignored: the control socket checks its peer instead).
async fn kv_client(addr: &str) -> BenchResult<KvServiceClient<Authed>> {
    let channel = connect(addr).await?;
    Ok(KvServiceClient::new(authed(channel)))
}

async fn get(client: &mut KvServiceClient<Authed>) -> BenchResult<()> {
    let req = pb::GetValueRequest {
        plugin_id: "hello".into(),
        key: KEY.into(),
    };
    let resp = client.get_value(req).await?.into_inner();
    if !resp.found {
        return Err("the benchmark key is missing".into());
    }
    Ok(())
}

async fn throughput(
    client: &KvServiceClient<Authed>,
    seconds: f64,
    in_flight: usize,
) -> BenchResult<f64> {
    let began = Instant::now();
    let stop_at = began + Duration::from_secs_f64(seconds);
    let workers = (0..in_flight).map(|_| {
        let mut client = client.clone();
        async move {
            let mut done = 0u64;
            while Instant::now() < stop_at {
                get(&mut client).await.map_err(|e| e.to_string())?;
                done += 1;
            }
            Ok::<u64, String>(done)
        }
    });
    let mut total = 0;
    for done in join_all(workers).await {
        total += done?;
    }
    Ok(total as f64 / began.elapsed().as_secs_f64())
}

/// The baseline server, run as a child process (`torud-bench baseline-server PLUGIN`).
struct BaselineProcess {
    _child: Child,
    addr: String,
}

impl BaselineProcess {
    /// Starts it listening on a free TCP port, or (`via` the control socket) on a Unix
    /// socket in `dir`.
    async fn start(plugin: &std::path::Path, via: Via, dir: &std::path::Path) -> BenchResult<Self> {
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("baseline-server").arg(plugin);
        if via == Via::ControlSocket {
            command.arg("--unix").arg(dir.join("baseline.sock"));
        }
        let mut child = command.stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let line = lines.next_line().await?.ok_or("baseline server exited")?;
        let addr = line
            .strip_prefix("listening on ")
            .ok_or("unexpected first line")?
            .to_owned();
        Ok(BaselineProcess {
            _child: child,
            addr,
        })
    }
}

/// The ideal forwarder: one connection, a pending table, a batching writer, a reader.
struct Forwarder {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>,
    next_id: AtomicU64,
}

impl Forwarder {
    async fn request(&self, make: impl FnOnce(String) -> Envelope) -> Result<Envelope, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.clone(), tx);
        self.tx
            .send(make(id).to_vec())
            .await
            .map_err(|_| Status::unavailable("plugin gone"))?;
        rx.await.map_err(|_| Status::unavailable("plugin gone"))
    }

    async fn kv(&self, op: KvOp) -> Result<Option<String>, Status> {
        let answer = self.request(|id| Envelope::kv_request(id, &op)).await?;
        let fields = answer
            .answer(toru_plugin_sdk::AnswerKind::Kv)
            .ok_or_else(|| Status::unknown("bad answer"))?;
        Ok(fields
            .get("value")
            .and_then(|v| v.as_str())
            .map(str::to_owned))
    }
}

#[tonic::async_trait]
impl KvService for Forwarder {
    async fn get_value(
        &self,
        r: Request<pb::GetValueRequest>,
    ) -> Result<Response<pb::GetValueResponse>, Status> {
        let value = self
            .kv(KvOp::Get {
                key: r.into_inner().key,
            })
            .await?;
        Ok(Response::new(pb::GetValueResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn set_value(
        &self,
        r: Request<pb::SetValueRequest>,
    ) -> Result<Response<pb::SetValueResponse>, Status> {
        let req = r.into_inner();
        self.kv(KvOp::Set {
            key: req.key,
            value: req.value,
        })
        .await?;
        Ok(Response::new(pb::SetValueResponse {}))
    }

    async fn delete_value(
        &self,
        r: Request<pb::DeleteValueRequest>,
    ) -> Result<Response<pb::DeleteValueResponse>, Status> {
        let old = self
            .kv(KvOp::Delete {
                key: r.into_inner().key,
            })
            .await?;
        Ok(Response::new(pb::DeleteValueResponse {
            existed: old.is_some(),
        }))
    }
}

/// Runs the baseline: spawns the plugin, connects, sends init, serves KvService on a free
/// port, or on the Unix socket `unix` (printing `listening on ADDR` or `listening on
/// unix://PATH`) until killed.
pub(crate) async fn baseline_server(plugin: PathBuf, unix: Option<PathBuf>) -> BenchResult<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("plugin.sock");
    // Spawned like the daemon spawns plugins, so it dies with this process (parent-death
    // signal) when the benchmark kills it.
    let _child = torud::plugin::process::plugin_command(
        &plugin,
        &[],
        &torud::config::Launch::default(),
        &[],
        &torud::config::PluginLimits::default(),
        torud::plugin::process::Confinement::default(),
    )
    .env(toru_plugin_sdk::ENV_PLUGIN_SOCKET, &socket)
    .stdout(torud::plugin::spawn::Stdio::null())
    .stderr(torud::plugin::spawn::Stdio::null())
    .kill_on_drop(true)
    .spawn()?;
    let stream = connect_with_retry(&socket, Duration::from_secs(10)).await?;
    let (read, write) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4096);
    tokio::spawn(async move {
        let mut out = FramedWrite::new(write, FrameCodec::default());
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(frame) = next {
                if out.feed(frame).await.is_err() {
                    return;
                }
                next = rx.try_recv().ok();
            }
            if SinkExt::<Vec<u8>>::flush(&mut out).await.is_err() {
                return;
            }
        }
    });
    let pending: Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>> = Arc::default();
    let table = pending.clone();
    // SDK plugins keep KV in the host's storage: the baseline serves it from the same
    // store the daemon uses, so both sides do the same storage work.
    let storage = torud::store::storage::Storage::open(
        &dir.path().join("storage.redb"),
        torud::store::storage::Quotas::default(),
    )?
    .namespace("hello");
    let answers = tx.clone();
    tokio::spawn(async move {
        let mut frames = FramedRead::new(read, FrameCodec::default());
        while let Some(Ok(frame)) = frames.next().await {
            let Ok(answer) = Envelope::from_slice(&frame) else {
                return;
            };
            let id = answer.request_id.clone().unwrap_or_default();
            if answer.kind == MessageType::Storage {
                let (storage, answers) = (storage.clone(), answers.clone());
                tokio::spawn(async move {
                    use toru_plugin_sdk::storage_wire::{answer_envelope, StorageOp};
                    let result = match StorageOp::from_payload(&answer.payload) {
                        Ok(op) => storage.apply(op).await,
                        Err(e) => Err(e),
                    };
                    let _ = answers.send(answer_envelope(id, &result).to_vec()).await;
                });
                continue;
            }
            let waiter = table.lock().unwrap().remove(&id);
            if let Some(waiter) = waiter {
                let _ = waiter.send(answer);
            }
        }
    });
    let forwarder = Forwarder {
        tx,
        pending,
        next_id: AtomicU64::new(1),
    };
    let init = InitParams {
        instance_id: "baseline".into(),
        plugin_socket: socket.to_string_lossy().into_owned(),
        log_path: String::new(),
        host_protocol_version: toru_plugin_sdk::PROTOCOL_VERSION,
    };
    let ready = forwarder.request(|id| Envelope::init(id, &init)).await?;
    if ready.kind != MessageType::Ready {
        return Err("the plugin did not answer init with ready".into());
    }
    let server = tonic::transport::Server::builder().add_service(KvServiceServer::new(forwarder));
    if let Some(path) = unix {
        let listener = tokio::net::UnixListener::bind(&path)?;
        println!("listening on unix://{}", path.display());
        server
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await?;
    } else {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on {}", listener.local_addr()?);
        server
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await?;
    }
    Ok(())
}
