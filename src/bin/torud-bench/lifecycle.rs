//! `torud-bench lifecycle`, alternating daemon and baseline iterations:
//! - enable→ready: `EnablePlugin` round trip for the Rust example plugin, against spawning
//!   the same binary directly, connecting to its socket (same retry loop), sending init and
//!   waiting for `ready`;
//! - SIGKILL→crashed event: from `kill -9` of the plugin to the CRASHED event on a
//!   `WatchEvents` stream, against SIGKILL→`wait` of a bare child.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio_util::codec::Framed;
use toru_plugin_sdk::wire::InitParams;
use toru_plugin_sdk::{Envelope, FrameCodec};
use torud::plugin::connection::connect_with_retry;
use torud_api::pb;
use torud_api::pb::plugin_service_client::PluginServiceClient;

use crate::{
    authed, connect, num_cpus, sibling, summarize, summary_json, wait_for_hello, BenchResult,
    Daemon,
};

/// Baseline: spawn the plugin directly, connect with the daemon's retry loop, send init and
/// wait for its `ready`.
async fn baseline_ready(plugin: &Path, socket: &Path) -> BenchResult<(Duration, Child)> {
    let _ = std::fs::remove_file(socket);
    let began = Instant::now();
    let child = Command::new(plugin)
        .env(toru_plugin_sdk::ENV_PLUGIN_SOCKET, socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stream = connect_with_retry(socket, Duration::from_secs(10)).await?;
    let mut framed = Framed::new(stream, FrameCodec::default());
    let init = InitParams {
        instance_id: "bench".into(),
        plugin_socket: socket.to_string_lossy().into_owned(),
        log_path: String::new(),
        host_protocol_version: toru_plugin_sdk::PROTOCOL_VERSION,
    };
    framed
        .send(Envelope::init("bench".into(), &init).to_vec())
        .await?;
    // A protocol-2 plugin answers init with `ready`; the daemon waits for it, so must this.
    let answer = tokio::time::timeout(Duration::from_secs(10), framed.next())
        .await?
        .ok_or("the plugin closed its socket before ready")??;
    let answer = Envelope::from_slice(&answer)?;
    if answer.kind != toru_plugin_sdk::MessageType::Ready {
        return Err(format!("the plugin answered init with {:?}, not ready", answer.kind).into());
    }
    let took = began.elapsed();
    drop(framed);
    Ok((took, child))
}

pub(crate) async fn run(iterations: usize, json_path: Option<PathBuf>) -> BenchResult<()> {
    let torud = sibling("torud")?;
    let plugin = sibling("hello-plugin")?;
    let extra = [
        "--backoff-base",
        "1ms",
        "--backoff-max",
        "1ms",
        "--max-failures",
        "1000000",
    ];
    let daemon = Daemon::start(&torud, &plugin, &extra).await?;
    let channel = connect(&daemon.addr).await?;
    let mut client = PluginServiceClient::new(authed(channel));
    wait_for_hello(&mut client, "discovered", |e| {
        e.kind == pb::EventKind::PluginAdded as i32
    })
    .await?;
    let scratch = tempfile::tempdir()?;
    let socket = scratch.path().join("bench.sock");
    let enable_req = || pb::EnablePluginRequest {
        plugin_id: "hello".into(),
    };
    let disable_req = || pb::DisablePluginRequest {
        plugin_id: "hello".into(),
    };

    let warmup = 10;
    let (mut enable_d, mut enable_b) = (Vec::new(), Vec::new());
    for i in 0..iterations + warmup {
        let began = Instant::now();
        let plugin_resp = client.enable_plugin(enable_req()).await?.into_inner();
        let took = began.elapsed();
        if plugin_resp.plugin.map(|p| p.state) != Some(pb::PluginState::Running as i32) {
            return Err("EnablePlugin did not return a running plugin".into());
        }
        client.disable_plugin(disable_req()).await?;
        let (base, mut child) = baseline_ready(&plugin, &socket).await?;
        child.kill().await?;
        if i >= warmup {
            enable_d.push(took);
            enable_b.push(base);
        }
    }

    client.enable_plugin(enable_req()).await?;
    let watch = pb::WatchEventsRequest {
        after_seq: None,
        plugin_ids: vec!["hello".into()],
    };
    let mut events = client.watch_events(watch).await?.into_inner();
    let (mut crash_d, mut crash_b) = (Vec::new(), Vec::new());
    let pid = client
        .get_plugin(pb::GetPluginRequest {
            plugin_id: "hello".into(),
        })
        .await?
        .into_inner()
        .plugin
        .ok_or("no plugin")?
        .pid;
    let mut pid = i32::try_from(pid).map_err(|_| format!("pid {pid} is out of range"))?;
    for i in 0..iterations + warmup {
        let began = Instant::now();
        // SAFETY: plain syscall on a pid the daemon reported for its running plugin.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let took = loop {
            let event = next_event(&mut events).await?;
            if event.to_state == pb::PluginState::Crashed as i32 {
                break began.elapsed();
            }
        };
        loop {
            let event = next_event(&mut events).await?;
            if event.to_state == pb::PluginState::Running as i32 {
                pid = event.details.get("pid").ok_or("no pid")?.parse()?;
                break;
            }
        }
        let (_, mut child) = baseline_ready(&plugin, &socket).await?;
        let bare = child.id().ok_or("no pid")? as i32;
        let began = Instant::now();
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(bare, libc::SIGKILL) };
        child.wait().await?;
        let base = began.elapsed();
        if i >= warmup {
            crash_d.push(took);
            crash_b.push(base);
        }
    }
    drop(daemon);

    let (ed, eb) = (summarize(&mut enable_d), summarize(&mut enable_b));
    let (cd, cb) = (summarize(&mut crash_d), summarize(&mut crash_b));
    println!(
        "torud-bench lifecycle: {iterations} iterations each (after {warmup} warm-up), {} cores",
        num_cpus()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "figure", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, s) in [
        ("enable→ready (daemon)", ed),
        ("enable→ready (baseline)", eb),
        ("SIGKILL→crashed (daemon)", cd),
        ("SIGKILL→wait (baseline)", cb),
    ] {
        println!(
            "{name:<28} {:>10.3} {:>10.3} {:>10.3}",
            s.p50, s.p99, s.mean
        );
    }
    let enable_delta = ed.p50 - eb.p50;
    let crash_delta = cd.p50 - cb.p50;
    println!("enable p50 delta: {enable_delta:+.3} ms (target ≤ 1 ms)");
    println!("crash p50 delta:  {crash_delta:+.3} ms (target ≤ 0.5 ms)");
    if let Some(path) = json_path {
        let doc = json!({
            "benchmark": "lifecycle",
            "iterations": iterations,
            "cores": num_cpus(),
            "enable_ready": { "daemon": summary_json(ed), "baseline": summary_json(eb) },
            "crash_event": { "daemon": summary_json(cd), "baseline": summary_json(cb) },
            "enable_p50_delta_ms": enable_delta,
            "crash_p50_delta_ms": crash_delta,
            "targets": { "enable_p50_delta_ms": 1.0, "crash_p50_delta_ms": 0.5 },
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn next_event(
    events: &mut tonic::Streaming<pb::WatchEventsResponse>,
) -> BenchResult<pb::Event> {
    let resp = events.message().await?.ok_or("event stream ended")?;
    Ok(resp.event.ok_or("empty event")?)
}
