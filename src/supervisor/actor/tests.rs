//! The actor's timers with a fake process ([`super::fake`]) under paused time: the restart
//! backoff, the crash budget, the stable window that resets it, the stop's escalation, the
//! restart policies, a plugin's own timings over the daemon-wide ones, and its health as
//! the supervisor's scheduler judges it (`health.rs`; its own tests cover the scheduler).
//! Paused time advances only when every task waits on a timer, so the instants these tests
//! read are exact. Real plugins are covered by `tests/lifecycle.rs` and `tests/faults.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use toru_plugin_sdk::Metadata;

use super::fake::{FakeHandle, FakeSpawner, OnInit, OnTerm};
use super::{Actor, Command, STARTING_STOP_GRACE};
use crate::config::values::{AtLeast, Span};
use crate::config::{Config, PluginSettings, RestartPolicy, Timing};
use crate::logs::capture::PluginLog;
use crate::model::{EventKind, ExitStatus, PluginSpec, PluginState, PluginStatus};
use crate::plugin::discovery::FileIdentity;
use crate::plugin::isolation::{Isolation, UserChoice};
use crate::store::events::EventLog;
use crate::store::state::EnabledStore;
use crate::store::storage::Storage;
use crate::supervisor::{Context, SupervisorError};

const ID: &str = "fake";
const SECOND: Duration = Duration::from_secs(1);
/// A crash, as far as the actor can tell.
const CRASH: ExitStatus = ExitStatus::Code(1);
/// Longest (paused, so instant) wait for anything: far beyond every timer in [`timing`],
/// so a broken actor fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(600);

/// `future`'s output, or a panic naming `what` when it takes longer than [`PATIENCE`].
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: nothing after {PATIENCE:?}"),
    }
}

/// Timing for these tests: the defaults but for the crash budget, which each test sets.
fn timing(max_failures: u32) -> Timing {
    Timing {
        backoff_base: SECOND,
        backoff_max: 8 * SECOND,
        max_failures,
        stable_window: 60 * SECOND,
        stop_grace: 5 * SECOND,
        kill_grace: 2 * SECOND,
        ..Timing::default()
    }
}

/// One actor over a fake process, in a data directory of its own.
struct Bench {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<PluginStatus>,
    spawned: mpsc::UnboundedReceiver<FakeHandle>,
    cancel: CancellationToken,
    actor: JoinHandle<()>,
    ctx: Arc<Context>,
    _dir: tempfile::TempDir,
}

impl Bench {
    /// An actor for a stopped, disabled plugin (protocol 2) whose processes react to
    /// SIGTERM and `init` as told.
    fn new(timing: Timing, on_term: OnTerm, on_init: OnInit) -> Self {
        Bench::with_own(timing, PluginSettings::default(), on_term, on_init)
    }

    /// [`Bench::new`], the plugin with `own` settings (its `[plugins.<id>]` section).
    fn with_own(timing: Timing, own: PluginSettings, on_term: OnTerm, on_init: OnInit) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let plugins_dir = dir.path().join("plugins");
        let mut config = Config::new(plugins_dir.clone(), dir.path().join("data"));
        config.timing = timing;
        config.plugins.insert(ID.into(), own);
        // The fake serves its socket as this process's user: the plugin must run as it.
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        config.plugin_users.insert(ID.into(), UserChoice::Uid(uid));
        for dir in [
            config.run_dir(),
            config.events_dir(),
            plugins_dir.clone(),
            config.data_dir.join("logs"),
        ] {
            std::fs::create_dir_all(&dir).expect("data directory");
        }
        let binary = plugins_dir.join(format!("{ID}.binary"));
        std::fs::write(&binary, "never executed").expect("plugin file");
        let identity = FileIdentity::of(&binary).expect("plugin file's identity");
        let ctx = Arc::new(Context {
            events: EventLog::open(&config.events_dir()).expect("event log"),
            state: EnabledStore::load(&config.state_path()).expect("state"),
            storage: Storage::open(&config.storage_path(), config.storage_quotas).expect("storage"),
            isolation: Isolation::prepare(&config).expect("isolation"),
            config: arc_swap::ArcSwap::from_pointee(config),
            started: Default::default(),
            health: Default::default(),
        });
        let log = PluginLog::open(&ctx.config().log_dir(ID), 1 << 20, 2).expect("plugin log");
        let (status_tx, status) = watch::channel(stopped(binary.clone()));
        let (link_tx, _) = watch::channel(None);
        let (commands, commands_rx) = mpsc::channel(8);
        let cancel = CancellationToken::new();
        let (spawner, spawned) = FakeSpawner::new(on_term, on_init);
        // The file is the one discovery probed: a start need not probe it again.
        let verified = Some((binary, identity));
        let actor = Actor::new(
            ctx.clone(),
            status_tx,
            link_tx,
            log,
            commands_rx,
            cancel.clone(),
            verified,
        )
        .with_spawner(spawner);
        Bench {
            commands,
            status,
            spawned,
            cancel,
            actor: tokio::spawn(actor.run()),
            ctx,
            _dir: dir,
        }
    }

    /// Sends a command that is answered with the plugin's status; the answer arrives later.
    async fn ask(&self, command: fn(super::Reply) -> Command) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .expect("actor running");
        Answer(answer)
    }

    /// The next process the actor spawns.
    async fn next_spawn(&mut self) -> FakeHandle {
        within("a spawn", self.spawned.recv())
            .await
            .expect("actor running")
    }

    /// Waits until the published status satisfies `done`.
    async fn until(&mut self, what: &str, done: impl FnMut(&PluginStatus) -> bool) -> PluginStatus {
        within(what, self.status.wait_for(done))
            .await
            .unwrap_or_else(|_| panic!("the actor ended before {what}"))
            .clone()
    }

    /// Waits until `process` is the running one.
    async fn until_running(&mut self, process: &FakeHandle) {
        let pid = process.pid();
        self.until("running", |s| {
            s.state == PluginState::Running && s.pid == Some(pid)
        })
        .await;
    }

    /// Starts the plugin, then crashes each of its runs as soon as it is ready, `runs` times;
    /// returns the processes.
    async fn crash_runs(&mut self, runs: usize) -> Vec<FakeHandle> {
        let mut processes = Vec::new();
        for _ in 0..runs {
            let process = self.next_spawn().await;
            self.until_running(&process).await;
            process.exit(CRASH);
            processes.push(process);
        }
        processes
    }

    /// Asserts that nothing is spawned however long it waits.
    async fn never_spawns_again(&mut self, what: &str) {
        tokio::time::sleep(3600 * SECOND).await;
        assert!(self.spawned.try_recv().is_err(), "{what} was restarted");
    }

    /// The reason of every state change the actor has recorded, in order, with its new state.
    async fn transitions(&self) -> Vec<(PluginState, String)> {
        let events = &self.ctx.events;
        let mut follower = events.follow(Some(0));
        let mut seen = Vec::new();
        for _ in 0..events.last_seq() {
            let event = follower.next().await.expect("event").expect("readable");
            if let Some(to) = event.body.to_state {
                seen.push((to, event.body.reason.clone()));
            }
        }
        seen
    }

    /// Every health change the actor has recorded, in order: healthy or not, and why.
    async fn health_changes(&self) -> Vec<(bool, String)> {
        let events = &self.ctx.events;
        let mut follower = events.follow(Some(0));
        let mut seen = Vec::new();
        for _ in 0..events.last_seq() {
            let event = follower.next().await.expect("event").expect("readable");
            if event.body.kind == EventKind::HealthChanged {
                seen.push((event.body.healthy, event.body.reason.clone()));
            }
        }
        seen
    }

    /// Shuts the actor down and removes what the test made outside its directory.
    async fn end(self) {
        self.cancel.cancel();
        within("the actor's end", self.actor)
            .await
            .expect("actor did not panic");
        if let Some(cgroups) = self.ctx.isolation.cgroups() {
            cgroups.remove();
        }
    }
}

/// The answer to come to a command.
struct Answer(oneshot::Receiver<Result<PluginStatus, SupervisorError>>);

impl Answer {
    /// The status the command answered with; panics on an error.
    async fn ok(self, what: &str) -> PluginStatus {
        match within(what, self.0).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("{what}: {e}"),
            Err(_) => panic!("{what}: the actor dropped the command"),
        }
    }
}

/// A plugin section with this restart policy.
fn restart(policy: RestartPolicy) -> PluginSettings {
    PluginSettings {
        restart: Some(policy),
        ..PluginSettings::default()
    }
}

/// The status of a plugin that was just discovered, disabled.
fn stopped(binary_path: PathBuf) -> PluginStatus {
    let metadata = Metadata {
        id: ID.into(),
        name: "Fake".into(),
        version: "1.0.0".into(),
        author: None,
        icon: "box".into(),
        route: "/fake".into(),
        description: None,
        protocol_version: 2,
    };
    PluginStatus::new(
        PluginSpec {
            metadata,
            binary_path,
        },
        false,
    )
}

/// The time from each spawn to the next.
fn gaps(processes: &[FakeHandle]) -> Vec<Duration> {
    processes
        .windows(2)
        .map(|pair| pair[1].spawned_at - pair[0].spawned_at)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn restarts_back_off_doubling_up_to_the_cap() {
    let mut bench = Bench::new(timing(10), OnTerm::Exit, OnInit::Ready);
    let enabled = bench.ask(Command::Enable).await;
    let processes = bench.crash_runs(6).await;
    let started = enabled.ok("the first start").await;
    assert_eq!(started.state, PluginState::Running);
    assert_eq!(
        gaps(&processes),
        [1, 2, 4, 8, 8].map(|s| s * SECOND),
        "a run that crashes at once is restarted after 1 s, 2 s, 4 s, … up to backoff_max"
    );
    let status = bench
        .until("the sixth crash", |s| s.consecutive_failures == 6)
        .await;
    assert_eq!(status.state, PluginState::Backoff);
    assert_eq!(status.restart_count, 5);
    assert_eq!(status.last_exit.map(|e| e.status), Some(CRASH));
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn too_many_crashes_in_a_row_disable_the_plugin() {
    let mut bench = Bench::new(timing(3), OnTerm::Exit, OnInit::Ready);
    let _enabled = bench.ask(Command::Enable).await;
    bench.crash_runs(3).await;
    let status = bench
        .until("the crash budget to run out", |s| {
            s.state == PluginState::Disabled
        })
        .await;
    assert!(!status.enabled, "a crash loop turns the plugin off");
    assert_eq!(status.consecutive_failures, 3);
    let reason = status.last_error.unwrap_or_default();
    assert!(
        reason.starts_with("crash loop: 3 consecutive failed runs"),
        "{reason}"
    );
    // Nothing restarts it, however long it waits.
    tokio::time::sleep(3600 * SECOND).await;
    assert!(
        bench.spawned.try_recv().is_err(),
        "a disabled plugin was restarted"
    );
    assert_eq!(
        bench.ctx.state.get(ID),
        Some(false),
        "the disable was not saved"
    );
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_run_outlasting_the_stable_window_resets_backoff_and_budget() {
    let mut bench = Bench::new(timing(3), OnTerm::Exit, OnInit::Ready);
    let _enabled = bench.ask(Command::Enable).await;
    let early = bench.crash_runs(2).await;
    assert_eq!(gaps(&early), [SECOND]);
    // The third run stays up: two more failures would have disabled it.
    let stable = bench.next_spawn().await;
    assert_eq!(stable.spawned_at - early[1].spawned_at, 2 * SECOND);
    bench.until_running(&stable).await;
    bench
        .until("the stable window", |s| s.consecutive_failures == 0)
        .await;
    assert_eq!(
        stable.spawned_at.elapsed(),
        60 * SECOND,
        "the count is reset when the run has lasted the stable window, not before"
    );
    let crashed_at = Instant::now();
    stable.exit(CRASH);
    // Counted from zero again: the first delay, and one more crash still within the budget.
    let late = bench.crash_runs(2).await;
    assert_eq!(late[0].spawned_at - crashed_at, SECOND);
    assert_eq!(gaps(&late), [2 * SECOND]);
    let status = bench
        .until("the budget to run out again", |s| {
            s.state == PluginState::Disabled
        })
        .await;
    assert_eq!(status.consecutive_failures, 3);
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_escalates_to_sigterm_then_sigkill_after_each_grace() {
    let mut bench = Bench::new(timing(3), OnTerm::Ignore, OnInit::Ready);
    let enabled = bench.ask(Command::Enable).await;
    let process = bench.next_spawn().await;
    enabled.ok("the start").await;
    let asked = Instant::now();
    let disabled = bench.ask(Command::Disable).await;
    let stopped = disabled.ok("the disable").await;
    assert_eq!(stopped.state, PluginState::Stopped);
    assert_eq!(
        process.signals_after(asked),
        [(libc::SIGTERM, 5 * SECOND), (libc::SIGKILL, 7 * SECOND)],
        "ignored: the shutdown message for stop_grace, then SIGTERM for kill_grace"
    );
    let exit = stopped.last_exit.expect("the stop records the exit");
    assert_eq!(exit.status, ExitStatus::Signal(libc::SIGKILL));
    assert_eq!(
        exit.stderr_tail,
        [format!("fake plugin {} ended", process.pid())]
    );
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_ends_at_sigterm_when_the_plugin_obeys_it() {
    let mut bench = Bench::new(timing(3), OnTerm::Exit, OnInit::Ready);
    let enabled = bench.ask(Command::Enable).await;
    let process = bench.next_spawn().await;
    enabled.ok("the start").await;
    let asked = Instant::now();
    let disabled = bench.ask(Command::Disable).await;
    let stopped = disabled.ok("the disable").await;
    assert_eq!(process.signals_after(asked), [(libc::SIGTERM, 5 * SECOND)]);
    let exit = stopped.last_exit.map(|e| e.status);
    assert_eq!(exit, Some(ExitStatus::Signal(libc::SIGTERM)));
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_the_start_skips_the_stop_grace() {
    let mut bench = Bench::new(timing(3), OnTerm::Ignore, OnInit::Ignore);
    let enabled = bench.ask(Command::Enable).await;
    let process = bench.next_spawn().await;
    // Connected and sent `init`: the stop has the connection to ask on.
    within("init", process.initialized()).await;
    let asked = Instant::now();
    let stopped = bench.ask(Command::Disable).await.ok("the disable").await;
    assert_eq!(stopped.state, PluginState::Stopped);
    let grace = STARTING_STOP_GRACE;
    assert_eq!(
        process.signals_after(asked),
        [(libc::SIGTERM, grace), (libc::SIGKILL, 2 * grace)],
        "a plugin that is not ready gets a short wait after the shutdown message and SIGTERM"
    );
    let Err(e) = within("the enable's answer", enabled.0)
        .await
        .expect("answered")
    else {
        panic!("the enable succeeded though the start was ended");
    };
    assert!(e.to_string().contains("disabled"), "{e}");
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn on_failure_leaves_a_clean_exit_stopped() {
    let own = restart(RestartPolicy::OnFailure);
    let mut bench = Bench::with_own(timing(3), own, OnTerm::Exit, OnInit::Ready);
    bench.ask(Command::Enable).await.ok("the start").await;
    let process = bench.next_spawn().await;
    process.exit(ExitStatus::Code(0));
    let status = bench
        .until("the clean exit", |s| s.state == PluginState::Stopped)
        .await;
    assert!(status.enabled, "a clean exit does not disable it");
    assert_eq!(
        status.last_exit.map(|e| e.status),
        Some(ExitStatus::Code(0))
    );
    assert_eq!((status.last_error, status.next_restart_at), (None, None));
    assert_eq!(status.consecutive_failures, 0, "a clean exit is no failure");
    let last = bench.transitions().await.pop().expect("a state change");
    assert_eq!(
        last,
        (
            PluginState::Stopped,
            "exited cleanly; restart policy on-failure".to_owned()
        )
    );
    bench
        .never_spawns_again("a plugin that exited cleanly")
        .await;
    // An operator's restart starts it again, though it is idle.
    let restarted = bench.ask(Command::Restart).await;
    let again = bench.next_spawn().await;
    assert_eq!(restarted.ok("the restart").await.pid, Some(again.pid()));
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn on_failure_restarts_a_crash_after_the_backoff() {
    let own = restart(RestartPolicy::OnFailure);
    let mut bench = Bench::with_own(timing(3), own, OnTerm::Exit, OnInit::Ready);
    let _enabled = bench.ask(Command::Enable).await;
    let processes = bench.crash_runs(1).await;
    let status = bench
        .until("the backoff", |s| s.state == PluginState::Backoff)
        .await;
    assert!(status.next_restart_at.is_some());
    let again = bench.next_spawn().await;
    assert_eq!(again.spawned_at - processes[0].spawned_at, SECOND);
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn never_leaves_a_crash_crashed_until_an_operator_restarts_it() {
    let own = restart(RestartPolicy::Never);
    let mut bench = Bench::with_own(timing(1), own, OnTerm::Exit, OnInit::Ready);
    let _enabled = bench.ask(Command::Enable).await;
    bench.crash_runs(1).await;
    let status = bench
        .until("the crash", |s| s.state == PluginState::Crashed)
        .await;
    assert!(status.enabled, "not restarted, but still enabled");
    assert_eq!(status.next_restart_at, None);
    assert_eq!(status.last_exit.map(|e| e.status), Some(CRASH));
    let reason = status.last_error.unwrap_or_default();
    assert_eq!(reason, format!("unexpected exit: {CRASH}"));
    let last = bench.transitions().await.pop().expect("a state change");
    assert_eq!(
        last,
        (
            PluginState::Crashed,
            format!("{reason}; not restarted: restart policy never")
        ),
        "no backoff follows, and the budget of one failure did not disable it"
    );
    bench
        .never_spawns_again("a crashed plugin under never")
        .await;
    let restarted = bench.ask(Command::Restart).await;
    let again = bench.next_spawn().await;
    assert_eq!(restarted.ok("the restart").await.pid, Some(again.pid()));
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn never_answers_a_failed_start_with_the_error() {
    // The plugin's own start timeout, not the daemon-wide 10 s.
    let own = PluginSettings {
        start_timeout: Some(Span(2 * SECOND)),
        ..restart(RestartPolicy::Never)
    };
    let mut bench = Bench::with_own(timing(3), own, OnTerm::Exit, OnInit::Ignore);
    let enabled = bench.ask(Command::Enable).await;
    let process = bench.next_spawn().await;
    let Err(e) = within("the enable's answer", enabled.0)
        .await
        .expect("answered")
    else {
        panic!("the enable succeeded though the plugin never answered init");
    };
    assert_eq!(process.spawned_at.elapsed(), 2 * SECOND);
    let SupervisorError::StartFailed { then, .. } = &e else {
        panic!("not a failed start: {e}");
    };
    assert_eq!(*then, crate::supervisor::AfterFailure::NotRestarted);
    assert!(e.to_string().contains("restart policy never"), "{e}");
    let status = bench.status.borrow().clone();
    assert_eq!(
        (status.state, status.next_restart_at),
        (PluginState::Crashed, None)
    );
    bench.never_spawns_again("a failed start under never").await;
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn always_restarts_a_clean_exit() {
    let own = restart(RestartPolicy::Always);
    let mut bench = Bench::with_own(timing(3), own, OnTerm::Exit, OnInit::Ready);
    let _enabled = bench.ask(Command::Enable).await;
    let first = bench.next_spawn().await;
    bench.until_running(&first).await;
    first.exit(ExitStatus::Code(0));
    let again = bench.next_spawn().await;
    assert_eq!(again.spawned_at - first.spawned_at, SECOND);
    bench.until_running(&again).await;
    assert_eq!(bench.status.borrow().consecutive_failures, 1);
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_plugins_own_backoff_and_crash_budget_win() {
    // Daemon-wide: 1 s doubling, ten failures. Its own: 3 s, capped at 5 s, two failures.
    let own = PluginSettings {
        backoff_base: Some(Span(3 * SECOND)),
        backoff_max: Some(Span(5 * SECOND)),
        max_failures: Some(AtLeast(3)),
        ..PluginSettings::default()
    };
    let mut bench = Bench::with_own(timing(10), own, OnTerm::Exit, OnInit::Ready);
    let _enabled = bench.ask(Command::Enable).await;
    let processes = bench.crash_runs(3).await;
    assert_eq!(gaps(&processes), [3 * SECOND, 5 * SECOND]);
    let status = bench
        .until("its own budget to run out", |s| {
            s.state == PluginState::Disabled
        })
        .await;
    assert_eq!(status.consecutive_failures, 3);
    bench
        .never_spawns_again("a plugin out of its own budget")
        .await;
    bench.end().await;
}

#[tokio::test(start_paused = true)]
async fn unanswered_heartbeats_turn_a_running_plugin_unhealthy_and_answers_heal_it() {
    let interval = timing(10).health_interval;
    let mut bench = Bench::new(timing(10), OnTerm::Exit, OnInit::Ready);
    let enabled = bench.ask(Command::Enable).await;
    let process = bench.next_spawn().await;
    enabled.ok("the start").await;
    assert_eq!(bench.ctx.health.registered(interval), 1);

    process.mute_pings(true);
    let muted = Instant::now();
    let status = bench.until("unhealthy", |s| !s.healthy).await;
    assert_eq!(status.state, PluginState::Running, "still running");
    // The heartbeat sent at the next tick is judged at the one after.
    assert!(
        muted.elapsed() <= 2 * interval,
        "after {:?}",
        muted.elapsed()
    );

    process.mute_pings(false);
    let unmuted = Instant::now();
    bench.until("healthy again", |s| s.healthy).await;
    assert!(
        unmuted.elapsed() <= interval,
        "after {:?}",
        unmuted.elapsed()
    );
    let events = bench.health_changes().await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        !events[0].0
            && events[0]
                .1
                .starts_with("heartbeat failed: no answer within")
    );
    assert_eq!(events[1], (true, "heartbeat answered again".to_owned()));

    let disabled = bench.ask(Command::Disable).await;
    disabled.ok("the disable").await;
    assert_eq!(
        bench.ctx.health.registered(interval),
        0,
        "a stopped plugin is no longer checked"
    );
    bench.end().await;
}
