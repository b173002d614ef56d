//! `torud-bench forward`: a forwarded `GetValue` (gRPC client → daemon → Unix socket → the
//! Rust example plugin → back), at concurrency 1 (latency) and with many calls in flight
//! over one channel (throughput).
//!
//! The baseline, measured in the same run with the same client, is the ideal composition:
//! a bare tonic server in a process of its own that forwards each call over one multiplexed
//! Unix-socket connection to the same plugin binary, building and reading the same JSON
//! frames, with none of the daemon's machinery (supervision, limits, events).

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

use crate::{
    authed, connect, num_cpus, sibling, summarize, summary_json, wait_for_hello, Authed,
    BenchResult, Daemon,
};

const KEY: &str = "bench-key";

pub(crate) async fn run(
    calls: usize,
    seconds: f64,
    rounds: usize,
    in_flight: usize,
    json_path: Option<PathBuf>,
) -> BenchResult<()> {
    let torud = sibling("torud")?;
    let plugin = sibling("hello-plugin")?;
    let daemon = Daemon::start(&torud, &plugin, &["--enable-new-plugins"]).await?;
    let channel = connect(&daemon.addr).await?;
    let mut plugins = PluginServiceClient::new(authed(channel));
    let running = |e: &pb::Event| e.to_state == pb::PluginState::Running as i32;
    wait_for_hello(&mut plugins, "running", running).await?;
    let baseline = BaselineProcess::start(&plugin).await?;
    let sides = [
        ("daemon", kv_client(&daemon.addr).await?),
        ("baseline", kv_client(&baseline.addr).await?),
    ];
    for (_, client) in &sides {
        let mut client = client.clone();
        let req = pb::SetValueRequest {
            plugin_id: "hello".into(),
            key: KEY.into(),
            value: "v".repeat(32),
        };
        client.set_value(req).await?;
        for _ in 0..500 {
            get(&mut client).await?;
        }
    }

    // Latency: alternate chunks so both sides see the same machine.
    let mut latency: [Vec<Duration>; 2] = [Vec::with_capacity(calls), Vec::with_capacity(calls)];
    while latency[0].len() < calls {
        for (side, (_, client)) in sides.iter().enumerate() {
            let mut client = client.clone();
            for _ in 0..250.min(calls - latency[side].len()) {
                let began = Instant::now();
                get(&mut client).await?;
                latency[side].push(began.elapsed());
            }
        }
    }
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (side, (_, client)) in sides.iter().enumerate() {
            rates[side].push(throughput(client, seconds, in_flight).await?);
        }
    }
    drop(baseline);
    drop(daemon);

    let [lat_d, lat_b] = latency;
    let (mut lat_d, mut lat_b) = (lat_d, lat_b);
    let (ld, lb) = (summarize(&mut lat_d), summarize(&mut lat_b));
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (td, tb) = (median(&rates[0]), median(&rates[1]));
    let p50_ratio = ld.p50 / lb.p50;
    let throughput_ratio = td / tb;
    println!(
        "torud-bench forward: {calls} sequential GetValue per side, then {rounds} × {seconds} s with {in_flight} in flight (median), {} cores",
        num_cpus()
    );
    println!(
        "{:<22} {:>10} {:>10} {:>12}",
        "", "p50 ms", "p99 ms", "calls/s"
    );
    println!(
        "{:<22} {:>10.3} {:>10.3} {:>12.0}",
        "daemon", ld.p50, ld.p99, td
    );
    println!(
        "{:<22} {:>10.3} {:>10.3} {:>12.0}",
        "baseline (bare)", lb.p50, lb.p99, tb
    );
    println!("p50 ratio:        {p50_ratio:.3} (target ≤ 1.15)");
    println!("throughput ratio: {throughput_ratio:.3} (target ≥ 0.85)");
    if let Some(path) = json_path {
        let doc = json!({
            "benchmark": "forward",
            "calls": calls,
            "seconds": seconds,
            "rounds": rounds,
            "in_flight": in_flight,
            "cores": num_cpus(),
            "latency": { "daemon": summary_json(ld), "baseline": summary_json(lb) },
            "throughput_calls_per_s": { "daemon": td, "baseline": tb, "daemon_runs": rates[0], "baseline_runs": rates[1] },
            "p50_ratio": p50_ratio,
            "throughput_ratio": throughput_ratio,
            "targets": { "p50_ratio": 1.15, "throughput_ratio": 0.85 },
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

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
    async fn start(plugin: &std::path::Path) -> BenchResult<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("baseline-server")
            .arg(plugin)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
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
/// port (printing `listening on ADDR`) until killed.
pub(crate) async fn baseline_server(plugin: PathBuf) -> BenchResult<()> {
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
    .stdout(Stdio::null())
    .stderr(Stdio::null())
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(KvServiceServer::new(forwarder))
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await?;
    Ok(())
}
