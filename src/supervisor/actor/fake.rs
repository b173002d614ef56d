//! A fake plugin process for the actor's unit tests: the test decides when it exits and
//! with what status, and reads back the signals it was sent and when.
//!
//! The process is fake, its connection is not: at spawn the fake binds the socket named in
//! the command's `TORU_PLUGIN_SOCKET` and serves it in-process with the SDK's frame codec
//! and envelopes, answering `init` with `ready` (unless told not to, to hold it in its
//! start) and `ping` with `pong` (unless muted), and ignoring `shutdown`, so a stop has to escalate. The actor's handshake and heartbeat run as they
//! do with a real plugin; nothing about readiness had to move behind the trait. It never
//! touches a real process: its pids are out of the kernel's range.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::plugin::spawn::Command;
use futures::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use toru_plugin_sdk::{Envelope, FrameCodec, MessageType, DEFAULT_MAX_FRAME_LEN};

use crate::logs::capture::PluginLog;
use crate::model::ExitStatus;
use crate::plugin::process::{Descendants, Process, Spawner};

/// Above `/proc/sys/kernel/pid_max`'s largest value: a fake pid names no real process.
const FIRST_FAKE_PID: u32 = 5_000_000;

/// What a fake process does on SIGTERM (SIGKILL always ends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnTerm {
    /// Exits, killed by the signal.
    Exit,
    /// Goes on running.
    Ignore,
}

/// What a fake process does with `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnInit {
    /// Answers `ready`: the start succeeds at once.
    Ready,
    /// Never answers: the process stays in its start.
    Ignore,
}

/// Spawns [`FakeProcess`]es, handing the test a [`FakeHandle`] to each.
pub(super) struct FakeSpawner {
    spawned: mpsc::UnboundedSender<FakeHandle>,
    next_pid: AtomicU32,
    on_term: OnTerm,
    on_init: OnInit,
}

impl FakeSpawner {
    /// A spawner whose processes react to SIGTERM and `init` as told, and the receiver of
    /// the handles to the processes it spawns, in order.
    pub(super) fn new(
        on_term: OnTerm,
        on_init: OnInit,
    ) -> (Self, mpsc::UnboundedReceiver<FakeHandle>) {
        let (spawned, handles) = mpsc::unbounded_channel();
        let spawner = FakeSpawner {
            spawned,
            next_pid: AtomicU32::new(FIRST_FAKE_PID),
            on_term,
            on_init,
        };
        (spawner, handles)
    }
}

impl Spawner for FakeSpawner {
    type Process = FakeProcess;

    fn spawn(
        &self,
        cmd: Command,
        _log: PluginLog,
        _max_line: usize,
        descendants: Descendants,
    ) -> std::io::Result<FakeProcess> {
        let socket = cmd
            .as_std()
            .get_envs()
            .find(|(name, _)| *name == toru_plugin_sdk::ENV_PLUGIN_SOCKET)
            .and_then(|(_, value)| value)
            .ok_or_else(|| std::io::Error::other("the command names no plugin socket"))?;
        let listener = UnixListener::bind(socket)?;
        let (exit, _) = watch::channel(None);
        let (init, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            pid: self.next_pid.fetch_add(1, Ordering::Relaxed),
            exit,
            init,
            signals: Mutex::new(Vec::new()),
            on_term: self.on_term,
            pings_muted: AtomicBool::new(false),
        });
        let handle = FakeHandle {
            spawned_at: Instant::now(),
            shared: shared.clone(),
        };
        let _ = self.spawned.send(handle);
        Ok(FakeProcess {
            shared: shared.clone(),
            exit: None,
            plugin: tokio::spawn(serve(listener, self.on_init, shared.clone())),
            descendants: Some(descendants),
        })
    }

    fn adopt(
        &self,
        _detached: crate::plugin::process::DetachedProcess,
        _log: PluginLog,
        _max_line: usize,
    ) -> std::io::Result<Self::Process> {
        Err(std::io::Error::other("fake processes are not handed over"))
    }
}

/// What a fake process and its test handle share.
struct Shared {
    pid: u32,
    /// Set once, when the process "exits".
    exit: watch::Sender<Option<ExitStatus>>,
    /// Set when it has received `init`.
    init: watch::Sender<bool>,
    /// Every signal sent, with when.
    signals: Mutex<Vec<(i32, Instant)>>,
    on_term: OnTerm,
    /// Set while it leaves `ping` unanswered.
    pings_muted: AtomicBool,
}

impl Shared {
    /// Makes the process exit with `status`, unless it already has.
    fn exit(&self, status: ExitStatus) {
        self.exit.send_if_modified(|exit| {
            let first = exit.is_none();
            if first {
                *exit = Some(status);
            }
            first
        });
    }
}

/// The test's side of a fake process.
pub(super) struct FakeHandle {
    /// When it was spawned (tokio's clock, so paused time reads exactly).
    pub(super) spawned_at: Instant,
    shared: Arc<Shared>,
}

impl FakeHandle {
    /// Its pid, as the actor publishes it.
    pub(super) fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// Waits until it has received `init`.
    pub(super) async fn initialized(&self) {
        let mut init = self.shared.init.subscribe();
        let _ = init.wait_for(|&received| received).await;
    }

    /// Makes it leave every `ping` unanswered (`true`), or answer them again.
    pub(super) fn mute_pings(&self, muted: bool) {
        self.shared.pings_muted.store(muted, Ordering::SeqCst);
    }

    /// Makes it exit with `status` (a crash, to the actor, while it runs).
    pub(super) fn exit(&self, status: ExitStatus) {
        self.shared.exit(status);
    }

    /// The signals it was sent, each with how long after `start` (none before it).
    pub(super) fn signals_after(&self, start: Instant) -> Vec<(i32, Duration)> {
        let signals = self.shared.signals.lock().expect("signals poisoned");
        signals.iter().map(|&(sig, at)| (sig, at - start)).collect()
    }
}

/// A plugin process that exists only in the test.
pub(super) struct FakeProcess {
    shared: Arc<Shared>,
    /// The status once reaped (waited for), as a real process's.
    exit: Option<ExitStatus>,
    /// Serves its socket.
    plugin: JoinHandle<()>,
    /// Held like a real process's, released when it finishes.
    descendants: Option<Descendants>,
}

impl Process for FakeProcess {
    fn pid(&self) -> u32 {
        self.shared.pid
    }

    async fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let mut exits = self.shared.exit.subscribe();
        let status = match exits.wait_for(Option::is_some).await {
            Ok(exit) => exit.expect("waited for an exit"),
            Err(_) => unreachable!("the sender lives in `shared`"),
        };
        self.exit = Some(status);
        status
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    fn signal_group(&self, sig: i32) {
        let mut signals = self.shared.signals.lock().expect("signals poisoned");
        signals.push((sig, Instant::now()));
        if sig == libc::SIGKILL || (sig == libc::SIGTERM && self.shared.on_term == OnTerm::Exit) {
            self.shared.exit(ExitStatus::Signal(sig));
        }
    }

    async fn kill_and_wait(&mut self, _limit: Duration) -> ExitStatus {
        if self.exit.is_none() {
            self.signal_group(libc::SIGKILL);
        }
        self.wait().await
    }

    async fn finish(&mut self, _drain_timeout: Duration) -> Vec<String> {
        self.plugin.abort();
        self.descendants = None;
        vec![format!("fake plugin {} ended", self.shared.pid)]
    }

    async fn detach(self) -> Option<crate::plugin::process::DetachedProcess> {
        None
    }
}

impl Drop for FakeProcess {
    fn drop(&mut self) {
        self.plugin.abort();
    }
}

/// Accepts connections on the plugin's socket and serves them one after the other (a
/// protocol-2 host keeps one open); ends, closing them, when the process finishes.
async fn serve(listener: UnixListener, on_init: OnInit, shared: Arc<Shared>) {
    while let Ok((stream, _)) = listener.accept().await {
        serve_connection(stream, on_init, &shared).await;
    }
}

/// Answers `init` with `ready` (as `on_init` says) and `ping` with `pong` (unless muted);
/// reads and ignores everything else.
async fn serve_connection(stream: UnixStream, on_init: OnInit, shared: &Shared) {
    let mut framed = Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME_LEN));
    while let Some(Ok(frame)) = framed.next().await {
        let Ok(message) = Envelope::from_slice(&frame) else {
            continue;
        };
        let request_id = message.request_id.clone().unwrap_or_default();
        if message.lifecycle_action() == Some("init") {
            shared.init.send_replace(true);
        }
        let answer = match (message.kind, message.lifecycle_action()) {
            (MessageType::Lifecycle, Some("init")) if on_init == OnInit::Ready => {
                MessageType::Ready
            }
            (MessageType::Ping, _) if !shared.pings_muted.load(Ordering::SeqCst) => {
                MessageType::Pong
            }
            _ => continue,
        };
        let reply = Envelope::bare(answer, request_id).to_vec();
        if framed.send(reply).await.is_err() {
            return;
        }
    }
}
