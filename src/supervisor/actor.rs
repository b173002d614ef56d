//! One actor per plugin: a task that owns the plugin's process, its connection and its
//! state, and moves through the state machine (stopped, starting, running, stopping,
//! backoff, crashed, disabled) by `select!`ing over a closed set of inputs: a command, the
//! child's exit, a frame or the end of the connection, a timer, and daemon shutdown.
//!
//! Architecture invariant: nothing else touches a plugin's process or connection. Other
//! code sends [`Command`]s and reads the [`PluginStatus`] the actor publishes on a `watch`
//! channel; every transition is also appended to the event log.
//!
//! Each state's loop hands the commands it takes to one place, [`Actor::on_command`], which
//! says what a command means in that [`Phase`]; [`Actor::leave`] then carries the verdict
//! out, stopping the process first when there is one.
//!
//! What follows when a running plugin's process ends on its own is its restart policy's
//! (`restart`, daemon-wide or in its `[plugins.<id>]` section; read when the process ends,
//! so a reload applies to the next exit):
//! - `always` (the default): any exit, clean or not, is a failed run: CRASHED, then BACKOFF
//!   and a restart after the backoff delay.
//! - `on-failure`: an exit with code 0 leaves the plugin STOPPED, still enabled and not
//!   restarted (the event says why); a crash (non-zero code, signal, lost connection) or a
//!   failed start is a failed run, as under `always`.
//! - `never`: nothing is restarted. A clean exit leaves it STOPPED; a crash or failed start
//!   leaves it CRASHED with the reason, with no backoff and no next restart. It stays
//!   enabled: an operator's restart or enable starts it again, and so does the daemon's own
//!   start.
//!
//! A failed start is a failed run whatever its exit code: it never became ready. The crash
//! budget (`max-failures` failed runs in a row disable the plugin) counts toward restarts
//! only, so it never applies under `never`. Timings (start timeout, stable window, backoff,
//! crash budget) are the plugin's own ([`crate::config::Config::plugin`]), read at the
//! moment of use.
//!
//! The actor reaches its process through [`Spawner`] and [`Process`], so its timers
//! (backoff, crash budget, stable window, stop escalation) are unit-tested with a fake
//! process under `tokio::time::pause()` (`actor/tests.rs`, the fake in `actor/fake.rs`), besides the
//! integration tests with real plugins. The connection stays real: the fake serves the
//! plugin's socket in-process with the SDK's codec, so the handshake runs unchanged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::health::Check;
use super::{AfterFailure, Context, Interruption, SupervisorError};
use crate::config::{Config, PluginConfig, RestartPolicy};
use crate::logs::capture::PluginLog;
use crate::model::{
    CrashReason, EventDraft, EventKind, ExitInfo, ExitStatus, LogLevel, PluginSpec, PluginState,
    PluginStatus,
};
use crate::plugin::discovery::{self, FileIdentity, ProbeOptions, Recheck};
use crate::plugin::handshake::{send_shutdown, Handshake, Launch};
use crate::plugin::link::{DetachedConnection, Link, LinkLimits};
use crate::plugin::process::{
    plugin_command, Confinement, Descendants, DetachedProcess, OsSpawner, Process, Spawner,
};
use crate::store::state::StateError;

/// Reply channel of a command that returns the plugin's status.
pub(super) type Reply = oneshot::Sender<Result<PluginStatus, SupervisorError>>;

/// What other code may ask of an actor.
pub(super) enum Command {
    /// Enable (persisted) and start; reply once ready or failed.
    Enable(Reply),
    /// Disable (persisted) and stop; reply once the process is gone.
    Disable(Reply),
    /// Stop and start again; reply once ready or failed.
    Restart(Reply),
    /// New metadata from a rescan; applies from the next start.
    Update(PluginSpec),
    /// The file is gone: stop and end the actor.
    Remove(oneshot::Sender<()>),
    /// The daemon hands over to its next image: let go of the plugin without stopping it,
    /// send what the next image needs, and end the actor. A start under way is finished
    /// first; connections wait at most the duration for calls in flight.
    HandOver(oneshot::Sender<HandedOver>, Duration),
}

/// A plugin as its actor let go of it in a handover.
#[derive(Debug)]
pub struct HandedOver {
    /// Its status at that moment.
    pub status: PluginStatus,
    /// Its executable and that file's identity when it last declared this id.
    pub verified: Option<(PathBuf, FileIdentity)>,
    /// Its running process, if it was running.
    pub run: Option<HandedOverRun>,
}

/// A running plugin let go of in a handover.
#[derive(Debug)]
pub struct HandedOverRun {
    /// The process.
    pub process: DetachedProcess,
    /// The protocol it speaks.
    pub protocol: u32,
    /// A protocol-2 plugin's connection.
    pub connection: Option<DetachedConnection>,
}

impl Command {
    /// Whether an operator's command lost its caller (the call was cancelled or timed out).
    /// Such a command is dropped when taken, not carried out: operations queued by callers
    /// long gone must not keep a plugin flapping. The supervisor's own (`Update`, `Remove`:
    /// the file is gone, whoever asked) are always carried out.
    fn abandoned(&self) -> bool {
        match self {
            Command::Enable(reply) | Command::Disable(reply) | Command::Restart(reply) => {
                reply.is_closed()
            }
            Command::Remove(_) | Command::Update(_) | Command::HandOver(..) => false,
        }
    }
}

/// The next command whose caller still waits; `None` when the supervisor is gone.
async fn next_command(commands: &mut mpsc::Receiver<Command>) -> Option<Command> {
    loop {
        let command = commands.recv().await?;
        if !command.abandoned() {
            return Some(command);
        }
    }
}

/// Longest wait, when a stop ends a start, for each step (the shutdown message on the
/// connection of a protocol-2 plugin that got `init`, then SIGTERM) before the next: a plugin
/// that never became ready is not owed the stop grace.
const STARTING_STOP_GRACE: Duration = Duration::from_millis(500);
/// Longest wait for a dead plugin's output pipes to reach their end.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
/// After the connection ends, how long to wait for the process to exit on its own before
/// calling it a lost connection.
const EXIT_AFTER_EOF: Duration = Duration::from_millis(100);
/// Longest wait for a SIGKILLed process to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Unix socket paths longer than this do not fit in `sockaddr_un`.
const MAX_SOCKET_PATH: usize = 107;

enum Next<P> {
    Idle,
    Start,
    Backoff(Instant),
    Run(Box<Run<P>>),
    Exit,
}

struct Run<P> {
    process: P,
    /// The way requests reach the plugin; `None` until it is ready.
    link: Option<Link>,
    since: Instant,
    /// Whether it became ready; a stop during the start does not wait out the stop grace.
    ready: bool,
}

impl<P> Run<P> {
    /// A process whose start is being ended: with its protocol-2 link if it got that far.
    fn unready(process: P, early_link: &std::sync::Mutex<Option<Link>>) -> Self {
        Run {
            process,
            link: take_link(early_link),
            since: Instant::now(),
            ready: false,
        }
    }
}

/// What the actor is doing when a command arrives; decides what the command means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Stopped, disabled or crashed for good: nothing runs, nothing is scheduled.
    Idle,
    /// Waiting to restart after a failed run.
    Backoff,
    /// Preparing a start, or started and not yet ready.
    Starting,
    /// Ready and serving.
    Running,
}

/// A command's verdict when the actor leaves its phase for it.
enum Leave {
    /// Start: an enable when idle, an enable or restart during a backoff.
    Start,
    /// Stop the process for this reason, then start again.
    Restart(&'static str),
    /// A saved disable: stop (if anything runs), answer it and the waiters, stay stopped.
    Disable(Reply),
    /// Stop (if anything runs) for this reason and end the actor; `done` is told once
    /// stopped.
    Exit {
        reason: &'static str,
        done: Option<oneshot::Sender<()>>,
    },
    /// Let go of what runs, without stopping it, for the daemon's next image; end the actor.
    HandOver(oneshot::Sender<HandedOver>, Duration),
}

impl Leave {
    /// Ends the actor without anyone to tell.
    fn exit(reason: &'static str) -> Self {
        Leave::Exit { reason, done: None }
    }
}

/// Why a start does not go ahead.
enum Refusal {
    /// Something an operator must fix: the plugin is disabled.
    Disable(String),
    /// Something that may pass: counted as a failed run and retried after a backoff.
    Retry(String),
}

impl From<Recheck> for Refusal {
    fn from(recheck: Recheck) -> Self {
        match recheck {
            Recheck::OtherId(reason) => Refusal::Disable(reason),
            Recheck::Failed(reason) => Refusal::Retry(reason),
        }
    }
}

/// What a start has made ready before spawning.
struct Prepared {
    /// The configuration this start reads, all of it from one moment: what it checks,
    /// spawns and records as the process's settings agree even if a reload lands meanwhile.
    config: Arc<Config>,
    /// The plugin's settings, as checked (its working directory) for this start.
    settings: PluginConfig,
    /// The plugin's environment and `init`.
    launch: Launch,
    confinement: Confinement,
    descendants: Descendants,
}

/// One plugin's actor; `S` starts its processes (real ones but in unit tests).
pub(super) struct Actor<S: Spawner = OsSpawner> {
    ctx: Arc<Context>,
    spawner: S,
    id: String,
    status: watch::Sender<PluginStatus>,
    /// The running plugin's link, published for the request path; `None` unless RUNNING.
    link: watch::Sender<Option<Link>>,
    /// The plugin's log: its output, and the supervisor's notes about it.
    log: PluginLog,
    commands: mpsc::Receiver<Command>,
    cancel: CancellationToken,
    /// Enable and restart callers waiting for the current start to end.
    waiters: Vec<Reply>,
    /// A write of the enabled state still in flight; awaited before answering waiters.
    persisting: Option<JoinHandle<Result<(), StateError>>>,
    /// The executable and its identity when it last declared this plugin's id; a start
    /// probes it again when either differs.
    verified: Option<(PathBuf, FileIdentity)>,
    /// A handover asked for during a start, carried out once the start ends.
    handover: Option<(oneshot::Sender<HandedOver>, Duration)>,
    /// A run an earlier image of the daemon handed over, taken over first.
    adopted: Option<HandedOverRun>,
    /// Handed over by an earlier image: it goes on where that one was (a plugin it left
    /// stopped or crashed stays so), rather than starting as a newly found plugin.
    resumed: bool,
}

impl Actor {
    /// An actor for the plugin whose status `status` holds, spawning real processes.
    pub(super) fn new(
        ctx: Arc<Context>,
        status: watch::Sender<PluginStatus>,
        link: watch::Sender<Option<Link>>,
        log: PluginLog,
        commands: mpsc::Receiver<Command>,
        cancel: CancellationToken,
        verified: Option<(PathBuf, FileIdentity)>,
    ) -> Self {
        let id = status.borrow().id().to_owned();
        Actor {
            ctx,
            spawner: OsSpawner,
            id,
            status,
            link,
            log,
            commands,
            cancel,
            waiters: Vec::new(),
            persisting: None,
            verified,
            handover: None,
            adopted: None,
            resumed: false,
        }
    }

    /// The same actor, going on where the daemon's earlier image left the plugin: taking
    /// over `run` first when it was running.
    pub(super) fn adopting(mut self, run: Option<HandedOverRun>) -> Self {
        self.adopted = run;
        self.resumed = true;
        self
    }
}

impl<S: Spawner> Actor<S> {
    /// The same actor, starting its processes with `spawner` instead (a fake, in tests).
    #[cfg(test)]
    pub(super) fn with_spawner<T: Spawner>(self, spawner: T) -> Actor<T> {
        Actor {
            ctx: self.ctx,
            spawner,
            id: self.id,
            status: self.status,
            link: self.link,
            log: self.log,
            commands: self.commands,
            cancel: self.cancel,
            waiters: self.waiters,
            persisting: self.persisting,
            verified: self.verified,
            handover: self.handover,
            adopted: self.adopted,
            resumed: self.resumed,
        }
    }

    /// Runs the state machine until the plugin is removed or the daemon shuts down.
    pub(super) async fn run(mut self) {
        let mut next = if let Some(run) = self.adopted.take() {
            self.adopt(run).await
        } else if self.status.borrow().state == PluginState::Backoff {
            // Handed over during a backoff: the retry comes when it was due.
            let due = self.status.borrow().next_restart_at;
            let wait = due.map_or(Duration::ZERO, |at| {
                (at - OffsetDateTime::now_utc())
                    .try_into()
                    .unwrap_or(Duration::ZERO)
            });
            Next::Backoff(Instant::now() + wait)
        } else if self.resumed {
            // Stopped or crashed in the earlier image: left so until an operator acts.
            Next::Idle
        } else if self.status.borrow().enabled {
            self.keep_default_enable().await
        } else {
            Next::Idle
        };
        loop {
            if let Some((reply, drain)) = self.handover.take() {
                next = match next {
                    Next::Run(run) => self.leave(Some(*run), Leave::HandOver(reply, drain)).await,
                    _ => self.leave(None, Leave::HandOver(reply, drain)).await,
                };
            }
            next = match next {
                Next::Idle => self.idle().await,
                Next::Start => self.start().await,
                Next::Backoff(at) => self.backoff(at).await,
                Next::Run(run) => self.running(*run).await,
                Next::Exit => break,
            };
        }
        let reason = if self.cancel.is_cancelled() {
            SupervisorError::ShuttingDown
        } else {
            SupervisorError::NotFound(self.id.clone())
        };
        self.answer_waiters(Err(reason)).await;
    }

    fn snapshot(&self) -> PluginStatus {
        self.status.borrow().clone()
    }

    /// Moves to `to`, publishes the new status and appends the event.
    fn transition(
        &self,
        to: PluginState,
        reason: impl Into<String>,
        exit: Option<ExitInfo>,
        edit: impl FnOnce(&mut PluginStatus),
    ) {
        let mut draft = EventDraft::new(&self.id, EventKind::StateChanged).reason(reason);
        self.status.send_modify(|s| {
            draft.from_state = Some(s.state);
            s.state = to;
            s.healthy = to == PluginState::Running;
            if to != PluginState::Backoff {
                s.next_restart_at = None;
            }
            if !matches!(
                to,
                PluginState::Starting | PluginState::Running | PluginState::Stopping
            ) {
                s.pid = None;
                s.started_at = None;
            }
            if let Some(exit) = &exit {
                s.last_exit = Some(exit.clone());
            }
            edit(s);
            draft.to_state = Some(to);
            draft.healthy = s.healthy;
            draft.next_restart_at = s.next_restart_at;
            if let Some(pid) = s.pid {
                draft.details.insert("pid".into(), pid.to_string());
            }
        });
        draft.exit = exit;
        tracing::info!(plugin = %self.id, from = ?draft.from_state.map(PluginState::as_str),
            to = to.as_str(), reason = ?draft.reason, "plugin state");
        let level = match to {
            PluginState::Crashed | PluginState::Disabled => LogLevel::Error,
            PluginState::Backoff => LogLevel::Warn,
            _ => LogLevel::Info,
        };
        let pid = self.status.borrow().pid.unwrap_or(0);
        self.log
            .note(level, format!("{}: {}", to.as_str(), draft.reason), pid);
        self.ctx.events.append(draft);
    }

    fn set_health(&self, healthy: bool, reason: &str) {
        if self.status.borrow().healthy == healthy {
            return;
        }
        self.status.send_modify(|s| s.healthy = healthy);
        let mut draft = EventDraft::new(&self.id, EventKind::HealthChanged).reason(reason);
        draft.healthy = healthy;
        self.ctx.events.append(draft);
    }

    /// A plugin enabled by `--enable-new-plugins` (no saved decision yet) has that decision
    /// saved like an operator's, before it starts, so it stays enabled without the flag. When
    /// it cannot be saved the plugin is not started: what runs is what a restart would run.
    async fn keep_default_enable(&mut self) -> Next<S::Process> {
        if self.ctx.state.get(&self.id).is_some() {
            return Next::Start;
        }
        self.status.send_modify(|s| s.enabled = false);
        match self.save_enabled(true).await {
            Ok(()) => Next::Start,
            Err(e) => {
                let reason = format!("not started by --enable-new-plugins: {e}");
                tracing::error!(plugin = %self.id, "{reason}");
                self.status.send_modify(|s| s.last_error = Some(reason));
                Next::Idle
            }
        }
    }

    /// Saves the enabled flag durably, then records it in the status. An operator's enable
    /// or disable calls this before acting, so a failed save leaves the plugin as it was and
    /// the answer, the running plugin and `state.json` agree.
    async fn save_enabled(&mut self, enabled: bool) -> Result<(), SupervisorError> {
        if let Some(previous) = self.persisting.take() {
            let _ = previous.await;
        }
        self.ctx.state.set(&self.id, enabled).await?;
        self.status.send_modify(|s| s.enabled = enabled);
        Ok(())
    }

    /// Takes the commands that came while a start was being prepared (the id re-check, the
    /// pin's hash, the cgroup), before anything is spawned: a disable, a removal or the
    /// daemon's shutdown ends the start here, with no process to stop. The others are kept
    /// as during a start.
    async fn stop_before_spawn(&mut self) -> Option<Next<S::Process>> {
        if self.cancel.is_cancelled() {
            return Some(Next::Exit);
        }
        while let Ok(command) = self.commands.try_recv() {
            if command.abandoned() {
                continue;
            }
            if let Some(leave) = self.on_command(Phase::Starting, Some(command)).await {
                return Some(self.leave(None, leave).await);
            }
        }
        None
    }

    /// What a command means in `phase`: carried out here when the actor stays where it is,
    /// or returned as the verdict [`Actor::leave`] carries out. `None` is the supervisor
    /// gone.
    async fn on_command(&mut self, phase: Phase, command: Option<Command>) -> Option<Leave> {
        let Some(command) = command else {
            return Some(Leave::exit("supervisor gone"));
        };
        match command {
            Command::Update(spec) => {
                self.update_spec(spec);
                (phase == Phase::Running && self.runs_another_file())
                    .then_some(Leave::Restart("another file now provides this plugin"))
            }
            Command::Enable(reply) => match phase {
                Phase::Idle => {
                    if let Err(e) = self.save_enabled(true).await {
                        let _ = reply.send(Err(e));
                        return None;
                    }
                    self.status.send_modify(|s| s.consecutive_failures = 0);
                    self.waiters.push(reply);
                    Some(Leave::Start)
                }
                Phase::Backoff => {
                    self.waiters.push(reply);
                    Some(Leave::Start)
                }
                Phase::Starting => {
                    self.waiters.push(reply);
                    None
                }
                Phase::Running => {
                    self.reply(reply).await;
                    None
                }
            },
            Command::Restart(reply) => {
                if phase == Phase::Idle && !self.status.borrow().enabled {
                    let _ = reply.send(Err(SupervisorError::NotEnabled(self.id.clone())));
                    return None;
                }
                self.waiters.push(reply);
                match phase {
                    // Enabled and idle: its restart policy left it stopped or crashed.
                    Phase::Idle => {
                        self.status.send_modify(|s| s.consecutive_failures = 0);
                        Some(Leave::Start)
                    }
                    Phase::Backoff => Some(Leave::Start),
                    Phase::Running => Some(Leave::Restart("restart requested")),
                    Phase::Starting => None,
                }
            }
            Command::Disable(reply) => {
                let reply = self.save_disable(reply).await?;
                if phase != Phase::Idle {
                    return Some(Leave::Disable(reply));
                }
                if self.status.borrow().state != PluginState::Stopped {
                    self.transition(PluginState::Stopped, "disabled by operator", None, |_| {});
                }
                self.reply(reply).await;
                None
            }
            Command::Remove(done) => Some(Leave::Exit {
                reason: "plugin file removed",
                done: Some(done),
            }),
            Command::HandOver(reply, drain) => {
                if phase == Phase::Starting {
                    // Handed over once the start has ended, ready or not.
                    self.handover = Some((reply, drain));
                    return None;
                }
                Some(Leave::HandOver(reply, drain))
            }
        }
    }

    /// Carries out a command's verdict, stopping `run` first when there is one, and says
    /// where the actor goes next.
    async fn leave(&mut self, run: Option<Run<S::Process>>, leave: Leave) -> Next<S::Process> {
        match leave {
            Leave::Start => Next::Start,
            Leave::Restart(reason) => {
                if let Some(run) = run {
                    self.stop(run, reason).await;
                }
                Next::Start
            }
            Leave::Disable(reply) => {
                match run {
                    Some(run) => self.stop(run, "disabled by operator").await,
                    None => {
                        self.transition(PluginState::Stopped, "disabled by operator", None, |_| {})
                    }
                }
                self.reply(reply).await;
                self.answer_waiters(Err(SupervisorError::Interrupted(
                    self.id.clone(),
                    Interruption::Disabled,
                )))
                .await;
                Next::Idle
            }
            Leave::Exit { reason, done } => {
                if let Some(run) = run {
                    self.stop(run, reason).await;
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
                Next::Exit
            }
            Leave::HandOver(reply, drain) => {
                self.hand_over(run, reply, drain).await;
                Next::Exit
            }
        }
    }

    /// Lets go of the plugin for the daemon's next image: its link unpublished, its process
    /// and connection detached (not stopped), and what the next image needs sent on `reply`.
    /// A run that cannot be detached (it just exited) is stopped as a run ends, and handed
    /// over as not running.
    async fn hand_over(
        &mut self,
        run: Option<Run<S::Process>>,
        reply: oneshot::Sender<HandedOver>,
        drain: Duration,
    ) {
        self.link.send_replace(None);
        let mut handed = None;
        if let Some(mut run) = run {
            let protocol = run.link.as_ref().map_or(1, Link::protocol);
            let connection = match run.link.take() {
                Some(link) => link.detach(drain).await,
                None => None,
            };
            let connected = protocol < 2 || connection.is_some();
            match run.process.detach().await {
                Some(process) if connected && run.ready => {
                    handed = Some(HandedOverRun {
                        process,
                        protocol,
                        connection,
                    })
                }
                detached => {
                    // Dropped: stopped, as a run ends. (A detached process is dropped with
                    // its pidfd: adopt it to stop it.)
                    if let Some(process) = detached {
                        if let Ok(process) = self.spawner.adopt(process, self.log.clone(), 0) {
                            let mut run = Run {
                                process,
                                link: None,
                                since: Instant::now(),
                                ready: false,
                            };
                            run.process.kill_and_wait(REAP_TIMEOUT).await;
                            let _ = run.process.finish(DRAIN_TIMEOUT).await;
                        }
                    }
                    self.transition(
                        PluginState::Stopped,
                        "stopped for the daemon's upgrade (it could not be handed over)",
                        None,
                        |_| {},
                    );
                }
            }
        }
        let _ = reply.send(HandedOver {
            status: self.snapshot(),
            verified: self.verified.clone(),
            run: handed,
        });
    }

    /// Takes over a plugin an earlier image of the daemon ran (its status is already this
    /// actor's): adopts its process and connection and goes on RUNNING. A part that cannot
    /// be adopted ends the run as a failed one.
    async fn adopt(&mut self, run: HandedOverRun) -> Next<S::Process> {
        let cfg = self.ctx.config();
        let max_line = cfg.max_log_line;
        let process = match self.spawner.adopt(run.process, self.log.clone(), max_line) {
            Ok(process) => process,
            Err(e) => {
                let reason = format!("could not take over its process after the upgrade: {e}");
                return self
                    .failed_run(None, None, reason, CrashReason::ConnectionLost)
                    .await;
            }
        };
        let limits = LinkLimits::from(&cfg.bridge);
        let link = match run.connection {
            Some(connection) => {
                let storage = Some(self.ctx.storage.namespace(&self.id));
                Link::adopt(connection, run.protocol, limits, storage)
            }
            None if run.protocol < 2 => Ok(Link::per_request(cfg.socket_path(&self.id), limits)),
            None => Err(std::io::Error::other("its connection was not handed over")),
        };
        let link = match link {
            Ok(link) => link,
            Err(e) => {
                let reason = format!("could not take over its connection after the upgrade: {e}");
                return self
                    .failed_run(Some(process), None, reason, CrashReason::ConnectionLost)
                    .await;
            }
        };
        self.ctx.record_start(&self.id, &cfg);
        self.link.send_replace(Some(link.clone()));
        Next::Run(Box::new(Run {
            process,
            link: Some(link),
            since: Instant::now(),
            ready: true,
        }))
    }

    /// Saves an operator's disable before acting on it. When it cannot be saved, the caller
    /// is answered with the error and nothing is given back: the plugin stays as it was.
    async fn save_disable(&mut self, reply: Reply) -> Option<Reply> {
        match self.save_enabled(false).await {
            Ok(()) => Some(reply),
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
        }
    }

    /// Records the enabled flag now and persists it in the background; the write is
    /// awaited before any waiter is answered. Only for a disable the daemon decides (the
    /// plugin cannot run either way); an operator's goes through [`Actor::save_enabled`].
    fn set_enabled(&mut self, enabled: bool) {
        self.status.send_modify(|s| s.enabled = enabled);
        let state = self.ctx.state.clone();
        let id = self.id.clone();
        let previous = self.persisting.take();
        self.persisting = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            state.set(&id, enabled).await
        }));
    }

    async fn persisted(&mut self) -> Result<(), SupervisorError> {
        match self.persisting.take() {
            Some(write) => match write.await {
                Ok(result) => result.map_err(SupervisorError::from),
                Err(e) => Err(SupervisorError::StateWriter(Arc::new(e))),
            },
            None => Ok(()),
        }
    }

    async fn reply(&mut self, reply: Reply) {
        let result = self.persisted().await.map(|()| self.snapshot());
        let _ = reply.send(result);
    }

    async fn answer_waiters(&mut self, result: Result<PluginStatus, SupervisorError>) {
        let persisted = self.persisted().await;
        let result = persisted.and(result);
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    fn update_spec(&self, spec: PluginSpec) {
        self.status.send_modify(|s| s.spec = spec);
    }

    async fn idle(&mut self) -> Next<S::Process> {
        loop {
            let leave = tokio::select! {
                cmd = next_command(&mut self.commands) => self.on_command(Phase::Idle, cmd).await,
                _ = self.cancel.cancelled() => Some(Leave::exit("daemon shutting down")),
            };
            if let Some(leave) = leave {
                return self.leave(None, leave).await;
            }
        }
    }

    async fn backoff(&mut self, at: Instant) -> Next<S::Process> {
        loop {
            let leave = tokio::select! {
                _ = sleep_until(at) => Some(Leave::Start),
                cmd = next_command(&mut self.commands) => self.on_command(Phase::Backoff, cmd).await,
                _ = self.cancel.cancelled() => Some(Leave::exit("daemon shutting down")),
            };
            let Some(leave) = leave else { continue };
            if matches!(leave, Leave::Start) {
                self.status.send_modify(|s| s.restart_count += 1);
            }
            return self.leave(None, leave).await;
        }
    }

    /// Starts the plugin: prepares (checks, directories, cgroup), spawns, and waits for it
    /// to become ready.
    async fn start(&mut self) -> Next<S::Process> {
        if self.cancel.is_cancelled() {
            return Next::Exit;
        }
        let spec = self.status.borrow().spec.clone();
        let prepared = match self.prepare(&spec).await {
            Ok(prepared) => prepared,
            Err(refusal) => return self.refuse(refusal).await,
        };
        if let Some(next) = self.stop_before_spawn().await {
            return next;
        }
        let config = prepared.config;
        let process = match self.spawn(
            &spec,
            &config,
            &prepared.settings,
            &prepared.launch,
            prepared.confinement,
            prepared.descendants,
        ) {
            Ok(process) => process,
            Err(reason) => {
                return self
                    .failed_run(None, None, reason, CrashReason::StartFailed)
                    .await
            }
        };
        self.ctx.record_start(&self.id, &config);
        let pid = process.pid();
        self.transition(PluginState::Starting, "spawned", None, |s| {
            s.pid = Some(pid);
            s.started_at = Some(OffsetDateTime::now_utc());
        });
        self.await_ready(&spec, process, prepared.launch, &config)
            .await
    }

    /// A start that does not go ahead: the plugin is disabled, or the failure counts as a
    /// failed run.
    async fn refuse(&mut self, refusal: Refusal) -> Next<S::Process> {
        match refusal {
            Refusal::Disable(reason) => self.disable_for(reason).await,
            Refusal::Retry(reason) => {
                self.failed_run(None, None, reason, CrashReason::StartFailed)
                    .await
            }
        }
    }

    /// Everything a start needs before spawning: checks that the socket path fits, that the
    /// file still declares this id, who the plugin runs as (its directories made and its
    /// executable reachable), its pin, its environment, cgroup and sandbox.
    async fn prepare(&mut self, spec: &PluginSpec) -> Result<Prepared, Refusal> {
        let cfg = self.ctx.config();
        let settings = cfg.plugin(&self.id);
        let socket = self.socket_path()?;
        self.recheck_id(spec).await?;
        let who = self.identity(spec).await?;
        if let Some(dir) = &settings.launch.working_dir {
            self.check_working_dir(&cfg, dir, &who)?;
        }
        let _ = std::fs::remove_file(&socket);
        // A HOME of the plugin's own settings wins over its user's.
        let own_home = settings.launch.env.contains_key("HOME");
        let launch = Launch {
            id: self.id.clone(),
            instance_id: uuid::Uuid::new_v4().to_string(),
            socket: socket.clone(),
            data_dir: cfg.plugin_data_dir(&self.id),
            log_path: cfg.log_dir(&self.id),
            home: who.home.clone().filter(|_| !own_home),
        };
        self.check_pin(spec).await?;
        let (descendants, cgroup_procs) = self.cgroup(&socket).await?;
        let sandbox = self
            .ctx
            .isolation
            .sandbox(&cfg, &self.id)
            .transpose()
            .map_err(|e| {
                Refusal::Retry(format!(
                    "cannot prepare its private view of the data directory: {e}"
                ))
            })?;
        let confinement = Confinement {
            credentials: who.credentials(),
            cgroup_procs,
            sandbox,
        };
        Ok(Prepared {
            config: cfg,
            settings,
            launch,
            confinement,
            descendants,
        })
    }

    /// Checks that the plugin's working directory exists, is a directory its user can
    /// enter, and is no part of the data directory but its own. (The child enters it as its
    /// user, in its sandbox, and fails to spawn if it cannot: this says why beforehand.)
    fn check_working_dir(
        &self,
        cfg: &crate::config::Config,
        dir: &std::path::Path,
        who: &crate::plugin::isolation::Identity,
    ) -> Result<(), Refusal> {
        let key = format!("plugins.{}.working-dir", self.id);
        let shown = dir.display();
        let meta = match std::fs::metadata(dir) {
            Ok(meta) => meta,
            // It may be made (mounted, provisioned) later: retried after a backoff.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Refusal::Retry(format!(
                    "its working directory {shown} does not exist; create it, or change {key}"
                )))
            }
            Err(e) => {
                return Err(Refusal::Disable(format!(
                    "its working directory {shown} cannot be used ({e}); change {key}"
                )))
            }
        };
        if !meta.is_dir() {
            return Err(Refusal::Disable(format!(
                "its working directory {shown} is not a directory; change {key}"
            )));
        }
        if let Some(reason) = foreign_part_of_data_dir(cfg, &self.id, dir) {
            return Err(Refusal::Disable(format!(
                "its working directory {shown} {reason}; change {key}"
            )));
        }
        let fix = format!(", or change {key}");
        match crate::plugin::isolation::cannot_enter(dir, who.credentials(), &fix) {
            Some(reason) => Err(Refusal::Disable(format!("its working directory: {reason}"))),
            None => Ok(()),
        }
    }

    /// The plugin's socket path, if it fits in `sockaddr_un`.
    fn socket_path(&self) -> Result<PathBuf, Refusal> {
        let socket = self.ctx.config().socket_path(&self.id);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Refusal::Disable(format!(
                "socket path {} is {} bytes, over the {MAX_SOCKET_PATH}-byte Unix socket limit; use a shorter --data-dir",
                socket.display(),
                socket.as_os_str().len()
            )));
        }
        Ok(socket)
    }

    /// Who the plugin runs as, with its directories made and its executable checked to be
    /// within that user's reach. A new plugin's uid is saved (synced) to `users.json` first
    /// (a group commit, waited for on the runtime); then, on a blocking thread, the
    /// directories are made on disk.
    async fn identity(
        &self,
        spec: &PluginSpec,
    ) -> Result<crate::plugin::isolation::Identity, Refusal> {
        // Its uid saved first, waiting on the runtime: new plugins starting together share
        // the users.json writes.
        match self.ctx.isolation.save_uid(&self.id).await {
            Ok(()) => {}
            Err(e @ crate::plugin::isolation::IsolationError::UsersFile { .. }) => {
                return Err(Refusal::Retry(e.to_string()))
            }
            Err(e) => return Err(Refusal::Disable(e.to_string())),
        }
        // A few at a time: the directories are made on blocking threads, and a thousand
        // starts would otherwise hold a thousand of them.
        static IDENTITIES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
        let _permit = IDENTITIES.acquire().await.expect("never closed");
        let (ctx, id, binary) = (self.ctx.clone(), self.id.clone(), spec.binary_path.clone());
        tokio::task::spawn_blocking(move || identity_of(&ctx, &id, &binary))
            .await
            .map_err(|e| Refusal::Retry(format!("finding who it runs as failed: {e}")))?
    }

    /// Checks the executable against its pinned SHA-256, when one is pinned.
    async fn check_pin(&self, spec: &PluginSpec) -> Result<(), Refusal> {
        let config = self.ctx.config();
        let Some(expected) = config.pins.get(&self.id) else {
            return Ok(());
        };
        let path = spec.binary_path.clone();
        let found = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match found {
            Ok(found) if &found == expected => Ok(()),
            Ok(found) => Err(Refusal::Disable(format!(
                "binary pinning: {} has sha256 {found}, but {expected} is pinned for {}; \
                 refusing to start it",
                spec.binary_path.display(),
                self.id
            ))),
            Err(e) => Err(Refusal::Disable(format!(
                "binary pinning: cannot read {}: {e}",
                spec.binary_path.display()
            ))),
        }
    }

    /// How what the plugin starts is found when it stops: its own cgroup (and the
    /// descriptor the child joins it by), or, without cgroups, its socket marker.
    async fn cgroup(
        &self,
        socket: &std::path::Path,
    ) -> Result<(Descendants, Option<std::os::fd::OwnedFd>), Refusal> {
        let Some(root) = self.ctx.isolation.cgroups() else {
            return Ok((Descendants::Marker(socket.to_path_buf()), None));
        };
        match root.plugin(&self.id).await {
            Ok(mut cgroup) => {
                let procs = cgroup.take_procs();
                Ok((Descendants::Cgroup(cgroup), procs))
            }
            Err(e) => Err(Refusal::Retry(format!(
                "cannot create its cgroup in {}: {e}",
                root.dir().display()
            ))),
        }
    }

    /// Spawns the prepared plugin.
    fn spawn(
        &self,
        spec: &PluginSpec,
        cfg: &Config,
        settings: &PluginConfig,
        launch: &Launch,
        confinement: Confinement,
        descendants: Descendants,
    ) -> Result<S::Process, String> {
        let cmd = plugin_command(
            &spec.binary_path,
            &cfg.plugin_env_allowlist,
            &settings.launch,
            &launch.env(),
            &settings.limits,
            confinement,
        );
        let binary = spec.binary_path.display();
        self.spawner
            .spawn(cmd, self.log.clone(), cfg.max_log_line, descendants)
            .map_err(|e| match &settings.launch.working_dir {
                Some(dir) => format!(
                    "cannot spawn {binary} in its working directory {}: {e}",
                    dir.display()
                ),
                None => format!("cannot spawn {binary}: {e}"),
            })
    }

    /// Connects to the spawned plugin and sends `init`, until it is ready, fails, exits, or a
    /// command or the daemon's shutdown ends the start.
    async fn await_ready(
        &mut self,
        spec: &PluginSpec,
        mut process: S::Process,
        launch: Launch,
        cfg: &Config,
    ) -> Next<S::Process> {
        let start_timeout = cfg.plugin(&self.id).timing.start_timeout;
        let handshake = Handshake {
            init: launch.init_params(),
            socket: launch.socket,
            protocol: spec.metadata.protocol_version,
            limits: LinkLimits::from(&cfg.bridge),
            storage: Some(self.ctx.storage.namespace(&self.id)),
        };
        // The protocol-2 link exists before it is ready; a stop during the start uses it.
        let early_link = std::sync::Mutex::new(None);
        let ready = async {
            handshake
                .run(start_timeout, |link| {
                    *early_link.lock().expect("early link poisoned") = Some(link.clone());
                })
                .await
                .map_err(|e| {
                    let why = if e.timed_out() {
                        CrashReason::StartTimeout
                    } else {
                        CrashReason::StartFailed
                    };
                    (e.to_string(), why)
                })
        };
        tokio::pin!(ready);
        loop {
            let leave = tokio::select! {
                result = &mut ready => match result {
                    Ok(link) => return self.became_ready(process, link).await,
                    Err((reason, why)) => {
                        let link = take_link(&early_link);
                        return self.failed_run(Some(process), link, reason, why).await;
                    }
                },
                status = process.wait() => {
                    let reason = format!("{status} before it was ready");
                    let link = take_link(&early_link);
                    let why = CrashReason::of_exit(status);
                    return self.failed_run(Some(process), link, reason, why).await;
                }
                cmd = next_command(&mut self.commands) => self.on_command(Phase::Starting, cmd).await,
                _ = self.cancel.cancelled() => Some(Leave::exit("daemon shutting down")),
            };
            if let Some(leave) = leave {
                let run = Run::unready(process, &early_link);
                return self.leave(Some(run), leave).await;
            }
        }
    }

    /// Publishes a ready plugin's link, moves to RUNNING and answers the waiters.
    async fn became_ready(&mut self, process: S::Process, link: Link) -> Next<S::Process> {
        // The socket is in run/<id>/, 0700 and the plugin's own.
        self.link.send_replace(Some(link.clone()));
        self.transition(PluginState::Running, "ready", None, |_| {});
        let snapshot = self.snapshot();
        self.answer_waiters(Ok(snapshot)).await;
        Next::Run(Box::new(Run {
            process,
            link: Some(link),
            since: Instant::now(),
            ready: true,
        }))
    }

    async fn running(&mut self, mut run: Run<S::Process>) -> Next<S::Process> {
        if self.runs_another_file() {
            self.stop(run, "another file now provides this plugin")
                .await;
            return Next::Start;
        }
        let timing = self.ctx.config().plugin(&self.id).timing;
        let stable_at = run.since + timing.stable_window;
        let mut stable = self.status.borrow().consecutive_failures == 0;
        let link = run.link.clone().expect("a running plugin has a link");
        let persistent = link.protocol() >= 2;
        let check = if persistent {
            Check::Heartbeat(link.clone())
        } else {
            Check::Socket(self.ctx.config().socket_path(&self.id))
        };
        // Checked by the supervisor's scheduler with every plugin of this interval; heard
        // from only when the verdict changes. Unregistered (dropped) as the plugin leaves
        // RUNNING, before any stop, so a stopping plugin gets no heartbeat.
        let mut health = self.ctx.health.register(timing.health_interval, check);
        let closed = async {
            if persistent {
                link.closed().await
            } else {
                std::future::pending().await
            }
        };
        tokio::pin!(closed);
        loop {
            tokio::select! {
                status = run.process.wait() => {
                    drop(health);
                    return self.exited(run, status).await;
                }
                why = &mut closed => {
                    drop(health);
                    return match timeout(EXIT_AFTER_EOF, run.process.wait()).await {
                        Ok(status) => self.exited(run, status).await,
                        Err(_) => {
                            let reason = format!("its connection was reset ({why}) while its process was still running");
                            let why = CrashReason::ConnectionLost;
                            self.failed_run(Some(run.process), run.link, reason, why).await
                        }
                    };
                }
                _ = sleep_until(stable_at), if !stable => {
                    stable = true;
                    self.status.send_modify(|s| s.consecutive_failures = 0);
                }
                verdict = health.changed() => self.set_health(verdict.healthy, &verdict.reason),
                cmd = next_command(&mut self.commands) => {
                    if let Some(leave) = self.on_command(Phase::Running, cmd).await {
                        drop(health);
                        return self.leave(Some(run), leave).await;
                    }
                }
                _ = self.cancel.cancelled() => {
                    drop(health);
                    return self.leave(Some(run), Leave::exit("daemon shutting down")).await;
                }
            }
        }
    }

    /// Stops a process by escalation (`shutdown` message, grace, SIGTERM to the group,
    /// grace, SIGKILL), through STOPPING to STOPPED. A process that never became ready gets
    /// no grace ([`Actor::end_start`]).
    async fn stop(&mut self, mut run: Run<S::Process>, reason: &str) {
        self.link.send_replace(None);
        self.transition(PluginState::Stopping, reason, None, |_| {});
        let timing = self.ctx.config().timing.clone();
        let socket = self.ctx.config().socket_path(&self.id);
        let running = run.process.exit_status().is_none();
        if running && !run.ready {
            self.end_start(&mut run).await;
        } else if running {
            let deadline = Instant::now() + timing.stop_grace;
            let asked = timeout_at(deadline, send_shutdown(run.link.as_ref(), &socket)).await;
            if !matches!(asked, Ok(Ok(()))) {
                tracing::debug!(plugin = %self.id, "shutdown message not delivered");
            }
            if timeout_at(deadline, run.process.wait()).await.is_err() {
                tracing::warn!(plugin = %self.id, "no exit after the shutdown message; sending SIGTERM");
                run.process.signal_group(libc::SIGTERM);
                if timeout(timing.kill_grace, run.process.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(plugin = %self.id, "no exit after SIGTERM; sending SIGKILL");
                }
            }
        }
        let status = run.process.kill_and_wait(REAP_TIMEOUT).await;
        if let Some(link) = run.link.take() {
            link.close("the plugin was stopped");
        }
        let stderr_tail = run.process.finish(DRAIN_TIMEOUT).await;
        let _ = std::fs::remove_file(&socket);
        let exit = ExitInfo {
            status,
            time: OffsetDateTime::now_utc(),
            stderr_tail,
        };
        self.transition(PluginState::Stopped, reason, Some(exit), |_| {});
    }

    /// Ends a start that has not reached ready, promptly: a protocol-2 plugin that got
    /// `init` is asked on its connection to shut down, then the group gets SIGTERM, each with
    /// a short wait ([`STARTING_STOP_GRACE`]); the caller then SIGKILLs what is left.
    async fn end_start(&mut self, run: &mut Run<S::Process>) {
        let timing = self.ctx.config().timing.clone();
        if let Some(link) = run.link.as_ref().filter(|l| l.protocol() >= 2) {
            let deadline = Instant::now() + STARTING_STOP_GRACE.min(timing.stop_grace);
            let socket = self.ctx.config().socket_path(&self.id);
            let _ = timeout_at(deadline, send_shutdown(Some(link), &socket)).await;
            if timeout_at(deadline, run.process.wait()).await.is_ok() {
                return;
            }
        }
        run.process.signal_group(libc::SIGTERM);
        let grace = STARTING_STOP_GRACE.min(timing.kill_grace);
        if timeout(grace, run.process.wait()).await.is_err() {
            tracing::warn!(plugin = %self.id, "no exit after SIGTERM during its start; sending SIGKILL");
        }
    }

    /// A running plugin's process ended on its own with `status`: a clean exit (code 0)
    /// leaves it STOPPED unless its restart policy is `always`; anything else is a failed run.
    async fn exited(&mut self, run: Run<S::Process>, status: ExitStatus) -> Next<S::Process> {
        let policy = self.ctx.config().plugin(&self.id).restart;
        if status != ExitStatus::Code(0) || policy == RestartPolicy::Always {
            let reason = format!("unexpected exit: {status}");
            let why = CrashReason::of_exit(status);
            return self
                .failed_run(Some(run.process), run.link, reason, why)
                .await;
        }
        let reason = format!("exited cleanly; restart policy {policy}");
        let exit = self.reap(Some(run.process), run.link, &reason).await;
        self.transition(PluginState::Stopped, reason, exit, |_| {});
        Next::Idle
    }

    /// Records a failed run (crash, failed start) and decides what follows, by the plugin's
    /// restart policy: CRASHED for good under `never`; else a backoff, or disabled after
    /// too many failures in a row. `why` is counted in the plugin's status.
    async fn failed_run(
        &mut self,
        process: Option<S::Process>,
        link: Option<Link>,
        reason: String,
        why: CrashReason,
    ) -> Next<S::Process> {
        let exit = self.reap(process, link, &reason).await;
        let failures = self.status.borrow().consecutive_failures + 1;
        let settings = self.ctx.config().plugin(&self.id);
        let restarted = settings.restart != RestartPolicy::Never;
        let event = if restarted {
            reason.clone()
        } else {
            format!("{reason}; not restarted: restart policy never")
        };
        self.transition(PluginState::Crashed, event, exit, |s| {
            s.crashes[why as usize] += 1;
            s.consecutive_failures = failures;
            s.last_error = Some(reason.clone());
        });
        if !restarted {
            let id = self.id.clone();
            self.answer_waiters(Err(SupervisorError::StartFailed {
                id,
                reason,
                then: AfterFailure::NotRestarted,
            }))
            .await;
            return Next::Idle;
        }
        let timing = settings.timing;
        if failures >= timing.max_failures {
            let why = format!("crash loop: {failures} consecutive failed runs; last: {reason}");
            return self.disable_for(why).await;
        }
        let delay = timing.backoff(failures);
        let at = Instant::now() + delay;
        let wall = OffsetDateTime::now_utc() + delay;
        self.transition(
            PluginState::Backoff,
            format!("restarting in {}", humantime::format_duration(delay)),
            None,
            |s| s.next_restart_at = Some(wall),
        );
        let id = self.id.clone();
        self.answer_waiters(Err(SupervisorError::StartFailed {
            id,
            reason,
            then: AfterFailure::RetryAt(wall),
        }))
        .await;
        Next::Backoff(at)
    }

    /// Clears up after a run that is over: withdraws and closes its link (`why` for the
    /// requests still on it), reaps the process and kills what it started, removes its
    /// socket. Returns how the process ended, if there was one.
    async fn reap(
        &mut self,
        process: Option<S::Process>,
        link: Option<Link>,
        why: &str,
    ) -> Option<ExitInfo> {
        self.link.send_replace(None);
        if let Some(link) = link {
            link.close(why);
        }
        let exit = match process {
            Some(mut process) => {
                let status = process.kill_and_wait(REAP_TIMEOUT).await;
                let stderr_tail = process.finish(DRAIN_TIMEOUT).await;
                Some(ExitInfo {
                    status,
                    time: OffsetDateTime::now_utc(),
                    stderr_tail,
                })
            }
            None => None,
        };
        let _ = std::fs::remove_file(self.ctx.config().socket_path(&self.id));
        exit
    }

    /// Whether the running process was started from another file than the one that now
    /// provides the plugin (a rescan moved the id to the first file by name declaring it).
    fn runs_another_file(&self) -> bool {
        let spec_path = &self.status.borrow().spec.binary_path;
        self.verified
            .as_ref()
            .is_some_and(|(started, _)| started != spec_path)
    }

    /// Checks that the executable still declares this plugin's id, probing it again unless
    /// it is the same file, unchanged, as at the last check.
    async fn recheck_id(&mut self, spec: &PluginSpec) -> Result<(), Recheck> {
        let path = &spec.binary_path;
        if let Some((checked, identity)) = &self.verified {
            if checked == path && FileIdentity::of(path).ok().as_ref() == Some(identity) {
                return Ok(());
            }
        }
        let cfg = self.ctx.config();
        let opts = ProbeOptions::from_config(&cfg, &self.ctx.isolation);
        let identity = discovery::recheck(&cfg.plugins_dir, path, &self.id, opts).await?;
        self.verified = Some((path.clone(), identity));
        Ok(())
    }

    /// Turns the plugin off for a reason an operator must act on.
    async fn disable_for(&mut self, reason: String) -> Next<S::Process> {
        self.set_enabled(false);
        self.transition(PluginState::Disabled, reason.clone(), None, |s| {
            s.last_error = Some(reason.clone());
        });
        let id = self.id.clone();
        self.answer_waiters(Err(SupervisorError::StartFailed {
            id,
            reason,
            then: AfterFailure::Disabled,
        }))
        .await;
        Next::Idle
    }
}

/// The protocol-2 link of a start still in progress, if it got that far.
fn take_link(slot: &std::sync::Mutex<Option<Link>>) -> Option<Link> {
    slot.lock().expect("early link poisoned").take()
}

/// Why `dir` may not be plugin `id`'s working directory when it lies in the data directory
/// (which a sandbox hides, and whose parts are the daemon's or other plugins'): only the
/// plugin's own directories there may be. `None` when it is one of them, or outside.
fn foreign_part_of_data_dir(
    cfg: &crate::config::Config,
    id: &str,
    dir: &std::path::Path,
) -> Option<String> {
    let real = |path: &std::path::Path| std::fs::canonicalize(path).ok();
    let (dir, data_dir) = (real(dir)?, real(&cfg.data_dir)?);
    if !dir.starts_with(&data_dir) {
        return None;
    }
    let own = [cfg.plugin_data_dir(id), cfg.plugin_run_dir(id)];
    if own
        .iter()
        .filter_map(|d| real(d))
        .any(|d| dir.starts_with(d))
    {
        return None;
    }
    Some(format!(
        "is inside the data directory {}, where only its own {} may be",
        data_dir.display(),
        cfg.plugin_data_dir(id).display()
    ))
}

/// The SHA-256 of a file, lowercase hex.
fn sha256_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Who plugin `id` runs as (a new plugin's uid saved first), with its directories made and
/// its executable `binary` checked to be within that user's reach. Blocking.
fn identity_of(
    ctx: &Context,
    id: &str,
    binary: &Path,
) -> Result<crate::plugin::isolation::Identity, Refusal> {
    let cfg = ctx.config();
    let isolation = &ctx.isolation;
    let who = match isolation.identity(&cfg, id) {
        Ok(who) => who,
        // Writing users.json can fail for a while (a full disk): back off and try again.
        Err(e @ crate::plugin::isolation::IsolationError::UsersFile { .. }) => {
            return Err(Refusal::Retry(e.to_string()))
        }
        Err(e) => return Err(Refusal::Disable(e.to_string())),
    };
    if let Err(e) = isolation.prepare_plugin_dirs(&cfg, id, &who) {
        return Err(Refusal::Retry(format!(
            "cannot prepare its directories: {e}"
        )));
    }
    let other_user = format!(", or run it as another user with --plugin-user {id}=USER");
    if let Some(reason) =
        crate::plugin::isolation::unreachable(binary, who.credentials(), &other_user)
    {
        return Err(Refusal::Disable(reason));
    }
    Ok(who)
}

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
