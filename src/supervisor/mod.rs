//! The supervisor: discovers plugins, runs one actor (`actor.rs`) per plugin, and routes commands to
//! them. [`Supervisor`] is a cheap cloneable handle; the API layer holds one.
//!
//! Architecture invariant: the plugin table is a `std` lock taken only to look up, insert or
//! remove a handle, never across `.await` and never across file I/O: a new plugin's log is
//! opened and its events written before or after the insert, not under it (a unit test
//! checks). A slow or stuck plugin only ever blocks its own actor. Only rescans are
//! serialised (by their own async mutex), and only a rescan adds or removes plugins, so an
//! id a rescan finds absent stays absent until it inserts it.

mod actor;
pub mod handover;
mod health;
mod reload;

use std::collections::{btree_map, BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use toru_plugin_sdk::trace::TraceParent;
use toru_plugin_sdk::wire::{HttpAnswer, HttpCall};
use toru_plugin_sdk::KvOp;

use crate::config::{create_dir_with_mode, Config, ProcessSettings};
use crate::logs::capture::PluginLog;
use crate::model::{EventDraft, EventKind, PluginSpec, PluginState, PluginStatus};
use crate::plugin::discovery::{self, FileIdentity, ProbeOptions, Skipped};
use crate::plugin::link::{Link, LinkError};
use crate::store::events::{EventLog, EventLogError};
use crate::store::state::{EnabledStore, StateError};
use actor::{Actor, Command};
pub use actor::{HandedOver, HandedOverRun};
pub use reload::{ReloadOutcome, RestartFailure, StaleProcess};

/// How long a rescan holds a probed file back while files before it by name are still
/// being probed (one of them may declare the same id and come first). A probe that hangs
/// delays the others by this much at most.
const DUPLICATE_HOLD: Duration = Duration::from_secs(1);

/// Commands queued per plugin before senders wait.
const COMMAND_QUEUE: usize = 64;

/// Errors of supervisor operations, as callers see them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SupervisorError {
    /// The id cannot be a plugin id.
    #[error("invalid plugin id {0:?}: ids are 1 to 64 ASCII letters, digits and '-'")]
    InvalidId(String),
    /// No plugin has this id.
    #[error("no plugin with id {0:?}: ListPlugins shows the known plugins, RescanPlugins picks up new files")]
    NotFound(String),
    /// The operation needs an enabled plugin.
    #[error("plugin {0:?} is not enabled: enable it first")]
    NotEnabled(String),
    /// A start did not reach ready.
    #[error(
        "plugin {id:?} failed to start: {reason}{}",
        then.note()
    )]
    StartFailed {
        /// The plugin.
        id: String,
        /// Why.
        reason: String,
        /// What follows: a retry, or nothing until an operator acts.
        then: AfterFailure,
    },
    /// The start was abandoned.
    #[error("plugin {0:?} did not become ready: {1}")]
    Interrupted(String, Interruption),
    /// The enabled state could not be saved. Shared so that every waiter gets the error.
    #[error("could not save the enabled state: {0}")]
    State(Arc<StateError>),
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The plugins directory could not be read.
    #[error("cannot read the plugins directory {path}: {reason}")]
    PluginsDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The plugin is enabled but not running now.
    #[error("plugin {id:?} is not running (state {}){}", state.as_str(), retry_at(next_restart_at))]
    NotRunning {
        /// The plugin.
        id: String,
        /// Its state.
        state: PluginState,
        /// Its next restart, in backoff.
        next_restart_at: Option<OffsetDateTime>,
    },
    /// A forwarded request failed.
    #[error("plugin {0:?}: {1}")]
    Bridge(String, LinkError),
    /// A bug: the background write of the enabled state panicked or was cancelled.
    #[error("internal error: state writer: {0}")]
    StateWriter(Arc<tokio::task::JoinError>),
}

/// Why a start was abandoned before the plugin became ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Interruption {
    /// An operator disabled the plugin while it was starting.
    #[error("it was disabled")]
    Disabled,
}

fn retry_at(at: &Option<OffsetDateTime>) -> String {
    at.and_then(|at| {
        at.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .map(|at| format!("; next restart at {at}"))
    .unwrap_or_default()
}

/// What follows a failed start (or a crash), as a caller waiting on the start is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// It stays enabled and is started again at this time.
    RetryAt(OffsetDateTime),
    /// It was disabled: a crash loop, or something an operator must fix.
    Disabled,
    /// It stays enabled but crashed, and is not started again: its restart policy is
    /// `never`.
    NotRestarted,
}

impl AfterFailure {
    /// The end of the error's message: what happens next and what to do.
    fn note(&self) -> String {
        match self {
            AfterFailure::RetryAt(at) => format!(
                "; it stays enabled and is retried at {}",
                at.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
            AfterFailure::Disabled => "; it was disabled: fix it, then enable it again".to_owned(),
            AfterFailure::NotRestarted => {
                "; it stays enabled but is not restarted (restart policy never): fix it, then \
                 restart it"
                    .to_owned()
            }
        }
    }
}

impl From<StateError> for SupervisorError {
    fn from(e: StateError) -> Self {
        SupervisorError::State(Arc::new(e))
    }
}

/// Errors starting the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A directory could not be made.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The event log could not be opened.
    #[error(transparent)]
    Events(#[from] EventLogError),
    /// The state file could not be loaded.
    #[error(transparent)]
    State(#[from] StateError),
    /// The plugins' storage could not be opened.
    #[error(transparent)]
    Storage(#[from] crate::store::storage::OpenError),
    /// Plugin isolation could not be prepared.
    #[error(transparent)]
    Isolation(#[from] crate::plugin::isolation::IsolationError),
}

/// What a rescan changed.
#[derive(Debug, Default, Clone)]
pub struct RescanReport {
    /// Ids seen for the first time.
    pub added: Vec<String>,
    /// Ids whose files are gone.
    pub removed: Vec<String>,
    /// Ids whose metadata changed.
    pub updated: Vec<String>,
    /// Files not loaded.
    pub skipped: Vec<Skipped>,
}

/// What one rescan has found so far.
struct Tally<'a> {
    /// The rescan lock, held for the whole scan: whoever has the tally is the only one
    /// adding plugins to the table or removing them.
    _serial: tokio::sync::MutexGuard<'a, ()>,
    /// Files the previous scan skipped (their events are not repeated).
    previous_skips: Vec<Skipped>,
    report: RescanReport,
    /// The file providing each id found.
    seen: HashMap<String, PathBuf>,
    /// Files not loaded; a known plugin whose file is among them keeps running.
    failed: HashSet<PathBuf>,
    /// New specs for known plugins, sent to their actors once the table's lock is released:
    /// waiting for room in a queue racing callers filled, never dropped.
    updates: Vec<(mpsc::Sender<Command>, PluginSpec)>,
}

/// State shared by all actors.
pub(crate) struct Context {
    /// The configuration in force; a reload swaps it whole, and each use takes the one in
    /// force at that moment ([`Context::config`]).
    pub config: arc_swap::ArcSwap<Config>,
    pub events: EventLog,
    pub state: EnabledStore,
    /// The plugins' durable storage; each plugin's link gets its own namespace.
    pub storage: crate::store::storage::Storage,
    /// Who plugins run as, their directories, their cgroups.
    pub isolation: crate::plugin::isolation::Isolation,
    /// What each plugin's latest process was started with ([`Context::record_start`]), for
    /// reloads to compare with; locked only to insert or copy.
    pub started: Mutex<HashMap<String, Arc<ProcessSettings>>>,
    /// The health checks of running plugins: one task per interval for all of them.
    pub health: health::HealthChecks,
}

impl Context {
    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Records that plugin `id`'s process was just spawned with `config` (the one snapshot
    /// its start read, checks and spawn alike): it keeps those [`ProcessSettings`] until it
    /// ends, whatever a reload changes.
    pub fn record_start(&self, id: &str, config: &Config) {
        let settings = Arc::new(ProcessSettings::of(config, id));
        let mut started = self.started.lock().expect("start records poisoned");
        started.insert(id.to_owned(), settings);
    }

    /// What plugin `id`'s latest process was started with, if it ever started.
    pub fn started_with(&self, id: &str) -> Option<Arc<ProcessSettings>> {
        let started = self.started.lock().expect("start records poisoned");
        started.get(id).cloned()
    }

    /// Whether plugin `id` is meant to run: its saved decision, or for a plugin with none
    /// yet, `--enable-new-plugins`.
    pub fn meant_to_run(&self, id: &str) -> bool {
        self.state
            .get(id)
            .unwrap_or_else(|| self.config.load().enable_when_new_of(id))
    }
}

#[derive(Clone)]
struct PluginHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<PluginStatus>,
    /// The running plugin's link; requests take it from here without asking the actor.
    link: watch::Receiver<Option<Link>>,
    /// The plugin's log, for readers.
    log: PluginLog,
}

/// Handle to the supervisor; clones share it.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Arc<Context>,
    /// Plugin handles by id; locked only to look up, insert or remove, never across file
    /// I/O or `.await` (list and lookups must not wait for a disk).
    plugins: RwLock<BTreeMap<String, PluginHandle>>,
    /// Files the last scan skipped; locked only to copy or replace.
    skipped: Mutex<Vec<Skipped>>,
    /// Serialises rescans (held across the directory probe; nothing else takes it). Held
    /// by each scan's [`Tally`].
    rescan: tokio::sync::Mutex<()>,
    /// `true` once the first scan of the plugins directory has ended (every probe answered
    /// or timed out); the control plane holds plugin-naming calls until then.
    discovered: watch::Sender<bool>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// The configuration in force as it was given (directories as written, before they were
    /// made absolute), which the next reload is compared with. Held for a whole reload, so
    /// reloads apply one after another.
    given: Mutex<Config>,
}

impl Supervisor {
    /// Prepares the data directory, opens the event log and state, and starts the first
    /// scan in the background (plugins are added and started as their probes finish).
    /// `config` is the configuration to run with (directories absolute), `given` the same as
    /// it was loaded (directories as written), which a reload compares with
    /// ([`Supervisor::reload`]).
    pub fn start(config: Config, given: Config) -> Result<Self, StartupError> {
        let supervisor = Supervisor::open(config, given, true)?;
        let first = supervisor.clone();
        supervisor.inner.tracker.spawn(async move {
            if let Some(cgroups) = first.inner.ctx.isolation.cgroups() {
                let swept = cgroups.sweep().await;
                if swept > 0 {
                    tracing::warn!(
                        cgroups = swept,
                        "killed plugin processes left over from an earlier run"
                    );
                }
            }
            if let Err(e) = first.rescan().await {
                tracing::error!(error = %e, "initial plugin scan failed");
            }
            first.inner.discovered.send_replace(true);
        });
        Ok(supervisor)
    }

    /// Takes over from the daemon's earlier image ([`Supervisor::hand_over`]): the plugins
    /// it knew, each with its status, and the running ones adopted (same process, same
    /// connection, capture resumed) rather than started. Nothing is scanned and nothing left
    /// over is killed: the table is the earlier image's, complete at once.
    pub fn resume(
        config: Config,
        given: Config,
        plugins: Vec<HandedOver>,
        skipped: Vec<Skipped>,
    ) -> Result<Self, StartupError> {
        let supervisor = Supervisor::open(config, given, false)?;
        *supervisor
            .inner
            .skipped
            .lock()
            .expect("skipped list poisoned") = skipped;
        for handed in plugins {
            supervisor.adopt(handed);
        }
        supervisor.inner.discovered.send_replace(true);
        Ok(supervisor)
    }

    /// The stores and directories, and the supervisor's own tasks; no plugin yet.
    /// `clean_up` kills what an earlier run left behind (not after a handover).
    fn open(config: Config, given: Config, clean_up: bool) -> Result<Self, StartupError> {
        let shared = crate::plugin::isolation::shared_dir_mode();
        let dirs = [
            (config.data_dir.clone(), shared),
            (config.run_dir(), shared),
            (config.data_dir.join("plugins"), shared),
            (config.events_dir(), 0o700),
            // Each plugin's log folder, `logs/<id>/`, is made when its log is opened.
            (config.data_dir.join("logs"), 0o700),
        ];
        for (path, mode) in dirs {
            create_dir_with_mode(&path, mode)
                .map_err(|source| StartupError::Dir { path, source })?;
        }
        if clean_up {
            let leftovers = crate::plugin::process::kill_leftovers(&config.run_dir());
            if !leftovers.is_empty() {
                tracing::warn!(pids = ?leftovers, "killed plugin processes left over from an earlier run");
            }
        }
        let events = EventLog::open(&config.events_dir())?;
        let state = EnabledStore::load(&config.state_path())?;
        let storage =
            crate::store::storage::Storage::open(&config.storage_path(), config.storage_quotas)?;
        let isolation = crate::plugin::isolation::Isolation::prepare(&config)?;
        let supervisor = Supervisor {
            inner: Arc::new(Inner {
                ctx: Arc::new(Context {
                    config: arc_swap::ArcSwap::from_pointee(config),
                    events,
                    state,
                    storage,
                    isolation,
                    started: Mutex::new(HashMap::new()),
                    health: Default::default(),
                }),
                plugins: RwLock::new(BTreeMap::new()),
                skipped: Mutex::new(Vec::new()),
                rescan: tokio::sync::Mutex::new(()),
                discovered: watch::Sender::new(false),
                tracker: TaskTracker::new(),
                cancel: CancellationToken::new(),
                given: Mutex::new(given),
            }),
        };
        supervisor.inner.tracker.spawn(report_event_storage_health(
            supervisor.inner.ctx.events.clone(),
            supervisor.inner.cancel.clone(),
        ));
        Ok(supervisor)
    }

    /// Adds a plugin handed over by the daemon's earlier image, with its status, taking
    /// over its run if it had one.
    fn adopt(&self, handed: HandedOver) {
        let HandedOver {
            status,
            verified,
            run,
        } = handed;
        let id = status.id().to_owned();
        let log = match self.open_log(&id) {
            Ok(log) => log,
            Err(e) => {
                tracing::error!(plugin = %id, error = %e, "cannot open the plugin's log; its process is stopped");
                // Dropping the run's descriptors leaves the process to be stopped by hand;
                // kill its group now, named by its pidfd.
                if let Some(run) = run {
                    crate::plugin::process::kill_detached(&run.process);
                }
                return;
            }
        };
        let (handle, actor) = self.prepare_status(status, log, verified);
        self.install(&id, handle, actor.adopting(run), "handed over");
    }

    /// Lets go of every plugin for the daemon's next image, stopping none: each actor
    /// detaches its running process and connection (finishing a start under way first;
    /// waiting at most `drain` for calls in flight on a connection) and ends. Then the
    /// supervisor's own tasks end and the event log is synced. The supervisor is done.
    pub async fn hand_over(&self, drain: Duration) -> Vec<HandedOver> {
        // No scan adds or removes plugins from here on.
        let _serial = self.inner.rescan.lock().await;
        let commands: Vec<mpsc::Sender<Command>> = self
            .inner
            .plugins
            .read()
            .expect("plugin table poisoned")
            .values()
            .map(|h| h.commands.clone())
            .collect();
        let mut replies = Vec::with_capacity(commands.len());
        for commands in commands {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::HandOver(tx, drain)).await.is_ok() {
                replies.push(rx);
            }
        }
        let handed: Vec<HandedOver> = futures::future::join_all(replies)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        for (_, handle) in self
            .inner
            .plugins
            .read()
            .expect("plugin table poisoned")
            .iter()
        {
            handle.log.records().retry_unsaved();
        }
        if let Err(e) = self.inner.ctx.events.sync() {
            tracing::warn!(error = %e, "could not sync the event log");
        }
        handed
    }

    /// Whether the first scan of the plugins directory has ended: `true` from then on.
    pub fn discovery(&self) -> watch::Receiver<bool> {
        self.inner.discovered.subscribe()
    }

    /// Waits until the daemon is ready: the first scan has ended and every plugin meant to
    /// run when it ended (enabled in `state.json`, or new under `--enable-new-plugins`)
    /// has started or failed: running, backing off, crashed, disabled, or stopped with a
    /// reason, by an operator, or by its restart policy after a clean exit. Plugins enabled later by a caller are not waited for. Each
    /// start is bounded by the start timeout, so this ends.
    pub async fn settled(&self) {
        let _ = self.discovery().wait_for(|done| *done).await;
        let ctx = &self.inner.ctx;
        // Decided by the saved decision, not the status's flag: a new plugin's status says
        // enabled only once `--enable-new-plugins`' decision is saved, just before it starts.
        let watchers: Vec<watch::Receiver<PluginStatus>> = self
            .inner
            .plugins
            .read()
            .expect("plugin table poisoned")
            .iter()
            .filter(|(id, _)| ctx.meant_to_run(id))
            .map(|(_, h)| h.status.clone())
            .collect();
        for mut status in watchers {
            // Stopped with an exit: it ran and ended cleanly (its restart policy kept it
            // stopped), not yet to start.
            let unsettled = |s: &PluginStatus| {
                let not_run = s.state == PluginState::Stopped && s.last_exit.is_none();
                (not_run || s.state == PluginState::Starting)
                    && s.last_error.is_none()
                    && ctx.meant_to_run(s.id())
            };
            // An actor that ended (shutdown) counts as settled.
            let _ = status.wait_for(|s| !unsettled(s)).await;
        }
    }

    /// One line saying what plugin isolation is in force.
    pub fn isolation_summary(&self) -> String {
        self.inner.ctx.isolation.describe()
    }

    /// The event log.
    pub fn events(&self) -> &EventLog {
        &self.inner.ctx.events
    }

    /// A token cancelled when the supervisor shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Every known plugin, ordered by id.
    pub fn list(&self) -> Vec<PluginStatus> {
        let plugins = self.inner.plugins.read().expect("plugin table poisoned");
        plugins
            .values()
            .map(|h| h.status.borrow().clone())
            .collect()
    }

    /// Up to `limit` plugins after the id `after` (from the first when `None`), ordered by
    /// id, each seen through `view` in place: a page of a thousand costs one copy of each,
    /// the caller's, and a later page skips the ones before it without copying them.
    /// `view` runs under the table's read lock and the plugin's status lock: keep it short
    /// (a conversion, no I/O).
    pub fn page<T>(
        &self,
        after: Option<&str>,
        limit: usize,
        view: impl Fn(&PluginStatus) -> T,
    ) -> Vec<T> {
        use std::ops::Bound;
        let plugins = self.inner.plugins.read().expect("plugin table poisoned");
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        plugins
            .range::<str, _>((from, Bound::Unbounded))
            .take(limit)
            .map(|(_, h)| view(&h.status.borrow()))
            .collect()
    }

    /// Every known plugin's status and log, ordered by id: what a metrics scrape reads. The
    /// table is locked only to copy them.
    pub fn census(&self) -> Vec<(PluginStatus, PluginLog)> {
        let plugins = self.inner.plugins.read().expect("plugin table poisoned");
        plugins
            .values()
            .map(|h| (h.status.borrow().clone(), h.log.clone()))
            .collect()
    }

    /// Keys and bytes plugin `id`'s storage holds (a read transaction: call it off the
    /// runtime's workers).
    pub fn storage_usage(
        &self,
        id: &str,
    ) -> Result<(u64, u64), toru_plugin_sdk::storage_wire::StorageError> {
        self.inner.ctx.storage.namespace(id).usage()
    }

    /// Whether plugin `id` is known.
    pub fn knows(&self, id: &str) -> bool {
        let plugins = self.inner.plugins.read().expect("plugin table poisoned");
        plugins.contains_key(id)
    }

    /// Files skipped by the last scan.
    pub fn skipped(&self) -> Vec<Skipped> {
        self.inner
            .skipped
            .lock()
            .expect("skipped list poisoned")
            .clone()
    }

    /// One plugin.
    pub fn get(&self, id: &str) -> Result<PluginStatus, SupervisorError> {
        Ok(self.handle(id)?.status.borrow().clone())
    }

    /// A receiver of one plugin's status, updated on every change.
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<PluginStatus>, SupervisorError> {
        Ok(self.handle(id)?.status)
    }

    /// Enables and starts a plugin; returns once it is ready or has failed.
    pub async fn enable(&self, id: &str) -> Result<PluginStatus, SupervisorError> {
        self.command(id, Command::Enable).await
    }

    /// Disables and stops a plugin; returns once its process is gone.
    pub async fn disable(&self, id: &str) -> Result<PluginStatus, SupervisorError> {
        self.command(id, Command::Disable).await
    }

    /// Restarts an enabled plugin; returns once it is ready again or has failed.
    pub async fn restart(&self, id: &str) -> Result<PluginStatus, SupervisorError> {
        self.command(id, Command::Restart).await
    }

    /// A plugin's log, for readers and followers.
    pub fn plugin_log(&self, id: &str) -> Result<PluginLog, SupervisorError> {
        Ok(self.handle(id)?.log)
    }

    /// The link of a running plugin, or why there is none.
    fn link(&self, id: &str) -> Result<Link, SupervisorError> {
        let handle = self.handle(id)?;
        if let Some(link) = handle.link.borrow().clone() {
            return Ok(link);
        }
        let status = handle.status.borrow().clone();
        if !status.enabled {
            return Err(SupervisorError::NotEnabled(id.to_owned()));
        }
        Err(SupervisorError::NotRunning {
            id: id.to_owned(),
            state: status.state,
            next_restart_at: status.next_restart_at,
        })
    }

    fn bridge_limit(&self, default: Duration, caller: Option<Duration>) -> Duration {
        caller.map_or(default, |c| c.min(default))
    }

    /// Forwards a KV operation to a plugin; the plugin's answer (the value read, written,
    /// or deleted; `None` for an absent key). `deadline` is the caller's; `trace` is passed
    /// to a protocol-2 plugin.
    pub async fn kv(
        &self,
        id: &str,
        op: &KvOp,
        deadline: Option<Duration>,
        trace: Option<&TraceParent>,
    ) -> Result<Option<String>, SupervisorError> {
        let link = self.link(id)?;
        let limit = self.bridge_limit(self.inner.ctx.config.load().kv_timeout_of(id), deadline);
        link.kv_traced(op, limit, trace)
            .await
            .map_err(|e| SupervisorError::Bridge(id.to_owned(), e))
    }

    /// Forwards an HTTP-style call (`trace` as for [`Supervisor::kv`]).
    pub async fn call(
        &self,
        id: &str,
        call: &HttpCall,
        deadline: Option<Duration>,
        trace: Option<&TraceParent>,
    ) -> Result<HttpAnswer, SupervisorError> {
        let link = self.link(id)?;
        let limit = self.bridge_limit(self.inner.ctx.config.load().call_timeout_of(id), deadline);
        link.call_traced(call, limit, trace)
            .await
            .map_err(|e| SupervisorError::Bridge(id.to_owned(), e))
    }

    /// The configuration's bridge limits.
    pub fn bridge_config(&self) -> crate::config::BridgeConfig {
        self.inner.ctx.config().bridge.clone()
    }

    fn handle(&self, id: &str) -> Result<PluginHandle, SupervisorError> {
        if !toru_plugin_sdk::metadata::is_valid_id(id) {
            return Err(SupervisorError::InvalidId(id.to_owned()));
        }
        let plugins = self.inner.plugins.read().expect("plugin table poisoned");
        plugins
            .get(id)
            .cloned()
            .ok_or_else(|| SupervisorError::NotFound(id.to_owned()))
    }

    async fn command(
        &self,
        id: &str,
        make: impl FnOnce(actor::Reply) -> Command,
    ) -> Result<PluginStatus, SupervisorError> {
        if self.inner.cancel.is_cancelled() {
            return Err(SupervisorError::ShuttingDown);
        }
        let handle = self.handle(id)?;
        let (tx, rx) = oneshot::channel();
        let gone = || {
            if self.inner.cancel.is_cancelled() {
                SupervisorError::ShuttingDown
            } else {
                SupervisorError::NotFound(id.to_owned())
            }
        };
        handle.commands.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Reads the plugins directory again: adds new plugins (starting the enabled ones as soon
    /// as each is probed), updates changed metadata, stops and forgets plugins whose file is
    /// gone. A known plugin whose file is still there but fails its probe (bad metadata, a
    /// timeout under load, a binary half-copied) is reported as skipped and keeps running
    /// with its previous metadata. Of several files declaring one id, the first by file name
    /// (byte order) provides it, at every scan; the others are skipped naming it.
    pub async fn rescan(&self) -> Result<RescanReport, SupervisorError> {
        let serial = self.inner.rescan.lock().await;
        if self.inner.cancel.is_cancelled() {
            return Err(SupervisorError::ShuttingDown);
        }
        let ctx = &self.inner.ctx;
        let dir = ctx.config().plugins_dir.clone();
        let opts = ProbeOptions::from_config(&ctx.config(), &ctx.isolation);
        let (candidates, probes) =
            discovery::scan(&dir, opts).map_err(|e| SupervisorError::PluginsDir {
                path: dir.clone(),
                reason: e.to_string(),
            })?;
        let mut tally = Tally {
            _serial: serial,
            previous_skips: self.skipped(),
            report: RescanReport::default(),
            seen: HashMap::new(),
            failed: HashSet::new(),
            updates: Vec::new(),
        };
        self.take_probes(candidates, probes, &mut tally).await;
        // The rescan lock (in the tally) stays held until the removals below are done.
        let Tally {
            _serial,
            mut report,
            seen,
            failed,
            updates,
            ..
        } = tally;
        for (commands, spec) in updates {
            let _ = commands.send(Command::Update(spec)).await;
        }
        let gone: Vec<(String, PluginHandle)> = {
            let mut plugins = self.inner.plugins.write().expect("plugin table poisoned");
            let ids: Vec<String> = plugins
                .iter()
                .filter(|(id, h)| {
                    !seen.contains_key(*id) && !failed.contains(&h.status.borrow().spec.binary_path)
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| plugins.remove(&id).map(|h| (id, h)))
                .collect()
        };
        for (id, handle) in gone {
            let (tx, rx) = oneshot::channel();
            if handle.commands.send(Command::Remove(tx)).await.is_ok() {
                let _ = rx.await;
            }
            self.append_event(
                EventDraft::new(&id, EventKind::PluginRemoved)
                    .reason("its file is gone from the plugins directory"),
            );
            report.removed.push(id);
        }
        report.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        *self.inner.skipped.lock().expect("skipped list poisoned") = report.skipped.clone();
        Ok(report)
    }

    /// Takes every probe's outcome as it ends, adding or updating plugins and reporting
    /// skipped files. Probes end in any order; specs are taken in file-name order, each once
    /// no earlier file is still being probed (or once [`DUPLICATE_HOLD`] is over), so the
    /// first file by name declaring an id gets it, whatever the timing.
    async fn take_probes(
        &self,
        candidates: Vec<PathBuf>,
        mut probes: mpsc::UnboundedReceiver<discovery::Scanned>,
        tally: &mut Tally<'_>,
    ) {
        let mut pending: BTreeSet<PathBuf> = candidates.into_iter().collect();
        let mut held: BTreeMap<PathBuf, (PluginSpec, Option<FileIdentity>)> = BTreeMap::new();
        let hold_until = tokio::time::Instant::now() + DUPLICATE_HOLD;
        let mut holding = true;
        loop {
            let next = if holding && !held.is_empty() {
                tokio::select! {
                    outcome = probes.recv() => Some(outcome),
                    _ = tokio::time::sleep_until(hold_until) => {
                        holding = false;
                        None
                    }
                }
            } else {
                Some(probes.recv().await)
            };
            match next {
                Some(None) => break,
                Some(Some((Ok(spec), identity))) => {
                    pending.remove(&spec.binary_path);
                    held.insert(spec.binary_path.clone(), (spec, identity));
                }
                Some(Some((Err(skipped), _))) => {
                    pending.remove(&skipped.path);
                    self.note_skipped(skipped, tally);
                }
                None => {}
            }
            while let Some((path, _)) = held.first_key_value() {
                if holding && pending.first().is_some_and(|first| first < path) {
                    break;
                }
                let (_, probed) = held.pop_first().expect("looked at");
                self.take_spec(probed, tally);
            }
        }
        for (_, probed) in held {
            self.take_spec(probed, tally);
        }
    }

    /// Takes a probed spec: the first file by name declaring an id provides it; a later one
    /// is skipped naming it, and an earlier one arriving late (after the hold) takes the id
    /// over from it.
    fn take_spec(
        &self,
        (spec, identity): (PluginSpec, Option<FileIdentity>),
        tally: &mut Tally<'_>,
    ) {
        let id = spec.metadata.id.clone();
        let duplicate = |path: PathBuf, first: &std::path::Path| Skipped {
            reason: format!(
                "duplicate id {id:?}: {} provides it (of the files declaring one id, the \
                 first by name does); give one of them another id",
                first.display()
            ),
            path,
        };
        match tally.seen.get(&id).cloned() {
            Some(first) if first < spec.binary_path => {
                self.note_skipped(duplicate(spec.binary_path, &first), tally);
            }
            Some(later) => {
                self.note_skipped(duplicate(later, &spec.binary_path), tally);
                tally.seen.insert(id, spec.binary_path.clone());
                self.add_or_update(spec, identity, tally);
            }
            None => {
                tally.seen.insert(id, spec.binary_path.clone());
                self.add_or_update(spec, identity, tally);
            }
        }
    }

    /// Reports a file not loaded: in the skipped list at once, in the report, and as an
    /// event unless the previous scan skipped it for the same reason.
    fn note_skipped(&self, skipped: Skipped, tally: &mut Tally<'_>) {
        tracing::warn!(path = ?skipped.path, reason = ?skipped.reason, "plugin skipped");
        tally.failed.insert(skipped.path.clone());
        // Visible in ListPlugins before its event is out; stale entries of the previous scan
        // are dropped when this scan ends.
        {
            let mut list = self.inner.skipped.lock().expect("skipped list poisoned");
            list.retain(|s| s.path != skipped.path);
            list.push(skipped.clone());
        }
        if !tally.previous_skips.contains(&skipped) {
            let draft = EventDraft::new("", EventKind::PluginSkipped)
                .reason(skipped.reason.clone())
                .detail("path", skipped.path.display());
            self.append_event(draft);
        }
        tally.report.skipped.push(skipped);
    }

    /// Adds a newly discovered plugin (its actor starts it if enabled), or queues a known
    /// one's new spec in `tally.updates`. `identity` is its file's before the probe that
    /// gave `spec`.
    fn add_or_update(
        &self,
        spec: PluginSpec,
        identity: Option<FileIdentity>,
        tally: &mut Tally<'_>,
    ) {
        let known = {
            let plugins = self.inner.plugins.read().expect("plugin table poisoned");
            plugins
                .get(&spec.metadata.id)
                .map(|h| (h.commands.clone(), h.status.borrow().spec.clone()))
        };
        match known {
            Some((commands, old)) => self.update(commands, &old, spec, tally),
            None => self.add(spec, identity, tally),
        }
    }

    /// Queues a known plugin's new spec in `tally.updates` (its actor applies it) and
    /// records the change, when `spec` differs from its `old` one.
    fn update(
        &self,
        commands: mpsc::Sender<Command>,
        old: &PluginSpec,
        spec: PluginSpec,
        tally: &mut Tally<'_>,
    ) {
        if *old == spec {
            return;
        }
        let id = spec.metadata.id.clone();
        let reason = if old.binary_path != spec.binary_path {
            format!(
                "now provided by {} (restarted if running)",
                spec.binary_path.display()
            )
        } else {
            "metadata changed; applies from the next start".to_owned()
        };
        self.append_event(
            EventDraft::new(&id, EventKind::PluginUpdated)
                .reason(reason)
                .detail("version", &spec.metadata.version),
        );
        tally.updates.push((commands, spec));
        tally.report.updated.push(id);
    }

    /// Adds a newly discovered plugin, in steps that keep file I/O off the table's lock:
    /// open its log, prepare its handle and actor, announce it, insert the handle, start
    /// the actor. Announced just before the insert, so whoever lists the plugin finds its
    /// `PluginAdded` event (a follower of events may see the event a moment before the
    /// plugin is in the table); the actor starts after both, so its own events follow.
    fn add(&self, spec: PluginSpec, identity: Option<FileIdentity>, tally: &mut Tally<'_>) {
        let ctx = &self.inner.ctx;
        let id = spec.metadata.id.clone();
        let log = match self.open_log(&id) {
            Ok(log) => log,
            Err(e) => {
                tracing::error!(plugin = %id, error = %e, "cannot open the plugin's log");
                tally.report.skipped.push(Skipped {
                    path: spec.binary_path.clone(),
                    reason: format!("cannot open its log: {e}"),
                });
                return;
            }
        };
        let added = EventDraft::new(&id, EventKind::PluginAdded)
            .reason("discovered in the plugins directory")
            .detail("path", spec.binary_path.display())
            .detail("version", &spec.metadata.version);
        let enabled = ctx.meant_to_run(&id);
        // The probe that found it checked its id: the first start need not probe again.
        let verified = identity.map(|identity| (spec.binary_path.clone(), identity));
        let (handle, actor) = self.prepare(spec, enabled, log, verified);
        // The event first, as before the table had its own step: whoever lists the plugin
        // can already find its PluginAdded event.
        self.append_event(added);
        if self.install(&id, handle, actor, "added") {
            tally.report.added.push(id);
        }
    }

    /// Puts a prepared plugin in the table and starts its actor and the watch on its log's
    /// health; false (nothing started) when the id is there already. Only rescans and a
    /// resume insert, one after another: a second insert is a bug, not a race.
    fn install(&self, id: &str, handle: PluginHandle, actor: Actor, how: &str) -> bool {
        let log_health = report_log_health(
            id.to_owned(),
            handle.log.records().health(),
            handle.status.clone(),
            self.inner.ctx.events.clone(),
        );
        if !self.insert(id, handle) {
            tracing::error!(plugin = %id, "internal error: the plugin was {how} twice; keeping the first");
            return false;
        }
        tokio::spawn(log_health);
        self.inner.tracker.spawn(actor.run());
        true
    }

    /// Opens (or creates) a plugin's log: reads, and may repair, its files. Never called
    /// with the plugin table locked.
    fn open_log(&self, id: &str) -> Result<PluginLog, crate::logs::seqlog::SeqLogError> {
        before_io();
        let config = self.inner.ctx.config();
        let own = config.plugin(id);
        PluginLog::open(&config.log_dir(id), own.log_segment_bytes, own.log_segments)
    }

    /// Writes an event (a file append). Never called with the plugin table locked.
    fn append_event(&self, draft: EventDraft) {
        before_io();
        self.inner.ctx.events.append(draft);
    }

    /// A new plugin's handle and its actor (not running yet), stopped, with no I/O.
    fn prepare(
        &self,
        spec: PluginSpec,
        enabled: bool,
        log: PluginLog,
        verified: Option<(PathBuf, FileIdentity)>,
    ) -> (PluginHandle, Actor) {
        self.prepare_status(PluginStatus::new(spec, enabled), log, verified)
    }

    /// A plugin's handle and its actor (not running yet), with `status`, with no I/O.
    fn prepare_status(
        &self,
        status: PluginStatus,
        log: PluginLog,
        verified: Option<(PathBuf, FileIdentity)>,
    ) -> (PluginHandle, Actor) {
        let (status_tx, status_rx) = watch::channel(status);
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (link_tx, link_rx) = watch::channel(None);
        let actor = Actor::new(
            self.inner.ctx.clone(),
            status_tx,
            link_tx,
            log.clone(),
            cmd_rx,
            self.inner.cancel.child_token(),
            verified,
        );
        let handle = PluginHandle {
            commands: cmd_tx,
            status: status_rx,
            link: link_rx,
            log,
        };
        (handle, actor)
    }

    /// Puts a new plugin's handle in the table: the one step of adding that takes the
    /// table's lock, and it does no I/O. False when the id is already there.
    fn insert(&self, id: &str, handle: PluginHandle) -> bool {
        let mut plugins = self.inner.plugins.write().expect("plugin table poisoned");
        match plugins.entry(id.to_owned()) {
            btree_map::Entry::Vacant(slot) => {
                slot.insert(handle);
                true
            }
            btree_map::Entry::Occupied(_) => false,
        }
    }

    /// Stops every plugin (in parallel, each by escalation) and waits for all actors.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        if let Some(cgroups) = self.inner.ctx.isolation.cgroups() {
            cgroups.remove();
        }
        if let Err(e) = self.inner.ctx.events.sync() {
            tracing::warn!(error = %e, "could not sync the event log");
        }
    }
}

/// How often events kept in memory are written again while the event log is degraded.
const EVENT_STORAGE_RETRY: Duration = Duration::from_secs(1);

/// Turns the event log's health changes into events: degraded when events cannot be
/// written, resumed (saying whether any was lost) when they can again. While degraded it
/// retries writing the events kept in memory, so recovery does not wait for the next event.
async fn report_event_storage_health(events: EventLog, cancel: CancellationToken) {
    let mut health = events.health();
    loop {
        // The current value, not only changes: a failure that came while the last spell was
        // being closed starts the next one.
        let Some(error) = health.borrow_and_update().clone() else {
            tokio::select! {
                changed = health.changed() => if changed.is_err() { return },
                _ = cancel.cancelled() => return,
            }
            continue;
        };
        events.append(
            EventDraft::new("", EventKind::EventStorageDegraded).reason(format!(
                "cannot write the event log: {error}; events are still delivered live, and up \
                 to {} are kept in memory and written when it can be written again",
                crate::store::events::UNSAVED_EVENTS
            )),
        );
        let mut retry = tokio::time::interval(EVENT_STORAGE_RETRY);
        while !events.retry_unsaved() {
            tokio::select! {
                _ = retry.tick() => {}
                _ = cancel.cancelled() => return,
            }
        }
        let reason = match events.take_lost() {
            0 => "the event log is written again; every event kept in memory meanwhile was \
                  written"
                .to_owned(),
            lost => format!(
                "the event log is written again; {lost} events did not fit in memory and are \
                 lost (a replay reports them as a gap)"
            ),
        };
        events.append(EventDraft::new("", EventKind::EventStorageResumed).reason(reason));
    }
}

/// Turns a plugin log's health changes into events, until the log is dropped.
async fn report_log_health(
    id: String,
    mut health: tokio::sync::watch::Receiver<Option<String>>,
    status: watch::Receiver<PluginStatus>,
    events: EventLog,
) {
    while health.changed().await.is_ok() {
        let now = health.borrow_and_update().clone();
        let mut draft = match now {
            Some(error) => EventDraft::new(&id, EventKind::LoggingDegraded).reason(format!(
                "cannot write the plugin's log: {error}; the plugin keeps running and its \
                 output still reaches live subscribers, but is not stored until this clears"
            )),
            None => EventDraft::new(&id, EventKind::LoggingResumed)
                .reason("the plugin's log is written again"),
        };
        // Events carry the plugin's health as it is; logging says nothing about it.
        draft.healthy = status.borrow().healthy;
        events.append(draft);
    }
}

/// Marks a point where the supervisor is about to do file I/O (a check runs there in
/// tests: the plugin table must not be locked).
fn before_io() {
    #[cfg(test)]
    tests::BEFORE_IO.with_borrow(|hook| {
        if let Some(hook) = hook {
            hook();
        }
    });
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use toru_plugin_sdk::metadata::Metadata;

    use super::*;

    thread_local! {
        /// Run by [`before_io`] on this thread, when a test sets it.
        pub(super) static BEFORE_IO: RefCell<Option<Box<dyn Fn()>>> = const { RefCell::new(None) };
    }

    fn spec(dir: &std::path::Path, version: &str) -> PluginSpec {
        PluginSpec {
            metadata: Metadata::new("one", "One", version, "/one"),
            binary_path: dir.join("one.binary"),
        }
    }

    #[tokio::test]
    async fn adding_and_updating_do_their_file_io_with_the_table_unlocked() {
        let dir = tempfile::tempdir().unwrap();
        let plugins_dir = dir.path().join("plugins-dir");
        std::fs::create_dir(&plugins_dir).unwrap();
        let config = Config::new(plugins_dir.clone(), dir.path().join("data"));
        let supervisor = Supervisor::start(config.clone(), config).unwrap();
        // Waits for the first (empty) scan, then stands in for a rescan.
        let serial = supervisor.inner.rescan.lock().await;
        let mut tally = Tally {
            _serial: serial,
            previous_skips: Vec::new(),
            report: RescanReport::default(),
            seen: HashMap::new(),
            failed: HashSet::new(),
            updates: Vec::new(),
        };
        // Each I/O point records whether a reader could take the table's lock then.
        let free_at_io = Arc::new(Mutex::new(Vec::new()));
        let (probe, seen) = (supervisor.clone(), free_at_io.clone());
        BEFORE_IO.set(Some(Box::new(move || {
            let free = probe.inner.plugins.try_write().is_ok();
            seen.lock().unwrap().push(free);
        })));
        supervisor.add_or_update(spec(&plugins_dir, "1.0"), None, &mut tally);
        supervisor.add_or_update(spec(&plugins_dir, "1.1"), None, &mut tally);
        BEFORE_IO.set(None);

        assert_eq!(
            (
                tally.report.added.as_slice(),
                tally.report.updated.as_slice()
            ),
            (["one".to_owned()].as_slice(), ["one".to_owned()].as_slice())
        );
        assert_eq!(supervisor.get("one").unwrap().spec.metadata.version, "1.0");
        let free_at_io = free_at_io.lock().unwrap().clone();
        assert!(
            free_at_io.iter().all(|free| *free),
            "file I/O ran with the plugin table locked: {free_at_io:?}"
        );
        // Opening the log, the added event, the updated event.
        assert_eq!(free_at_io.len(), 3, "every I/O point was reached");
        drop(tally);
        supervisor.shutdown().await;
    }
}
