//! Domain types shared by the supervisor, the event log and the API adapter: plugin states,
//! exit records, plugin status snapshots and events. Plain Rust with serde for the on-disk
//! formats; the protobuf forms live only in `api/`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use toru_plugin_sdk::Metadata;

/// The supervisor's state machine for one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginState {
    /// Not enabled; no process.
    Stopped,
    /// Spawned, waiting for the socket and init.
    Starting,
    /// Ready.
    Running,
    /// Being stopped.
    Stopping,
    /// Waiting to restart.
    Backoff,
    /// Ended unexpectedly; a restart (or a crash-loop disable) follows.
    Crashed,
    /// Turned off by the supervisor, with a reason.
    Disabled,
}

impl PluginState {
    /// Every state, in declaration order.
    pub const ALL: [PluginState; 7] = [
        PluginState::Stopped,
        PluginState::Starting,
        PluginState::Running,
        PluginState::Stopping,
        PluginState::Backoff,
        PluginState::Crashed,
        PluginState::Disabled,
    ];

    /// Lower-case name, as in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginState::Stopped => "stopped",
            PluginState::Starting => "starting",
            PluginState::Running => "running",
            PluginState::Stopping => "stopping",
            PluginState::Backoff => "backoff",
            PluginState::Crashed => "crashed",
            PluginState::Disabled => "disabled",
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// Why a run of a plugin failed, as counted for metrics: a closed set, so a label built from
/// it stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashReason {
    /// Its process exited with a code (non-zero, or any code under restart policy `always`).
    ExitCode,
    /// Its process was killed by a signal.
    Signal,
    /// It did not become ready within its start timeout.
    StartTimeout,
    /// Its connection was lost while its process kept running.
    ConnectionLost,
    /// Its start failed otherwise (refused `init`, a check before the spawn, a spawn error).
    StartFailed,
}

impl CrashReason {
    /// Every reason, in declaration order (the index of each is `reason as usize`).
    pub const ALL: [CrashReason; 5] = [
        CrashReason::ExitCode,
        CrashReason::Signal,
        CrashReason::StartTimeout,
        CrashReason::ConnectionLost,
        CrashReason::StartFailed,
    ];

    /// Snake-case name, as in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CrashReason::ExitCode => "exit_code",
            CrashReason::Signal => "signal",
            CrashReason::StartTimeout => "start_timeout",
            CrashReason::ConnectionLost => "connection_lost",
            CrashReason::StartFailed => "start_failed",
        }
    }

    /// The reason of a process's end.
    pub fn of_exit(status: ExitStatus) -> Self {
        match status {
            ExitStatus::Code(_) => CrashReason::ExitCode,
            ExitStatus::Signal(_) => CrashReason::Signal,
        }
    }
}

impl ExitStatus {
    /// From the standard library's exit status.
    pub fn from_std(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(sig)) => ExitStatus::Signal(sig),
            (None, None) => ExitStatus::Code(-1),
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(*s)),
        }
    }
}

/// Conventional name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// The record of one process ending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code or signal.
    pub status: ExitStatus,
    /// When the supervisor saw it.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The last stderr lines, oldest first.
    pub stderr_tail: Vec<String>,
}

/// What the supervisor knows of a plugin's executable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginSpec {
    /// Validated metadata.
    pub metadata: Metadata,
    /// Path of the executable.
    pub binary_path: PathBuf,
}

/// A snapshot of one plugin, as published by its actor (serialized only to hand it over to
/// the daemon's next image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginStatus {
    /// Metadata and executable.
    pub spec: PluginSpec,
    /// Whether it should run.
    pub enabled: bool,
    /// Current state.
    pub state: PluginState,
    /// Running and reachable.
    pub healthy: bool,
    /// Pid of the current process.
    pub pid: Option<u32>,
    /// Spawn time of the current process.
    pub started_at: Option<OffsetDateTime>,
    /// Restarts after failures since the daemon started.
    pub restart_count: u32,
    /// Failed runs in a row.
    pub consecutive_failures: u32,
    /// Next restart, in BACKOFF.
    pub next_restart_at: Option<OffsetDateTime>,
    /// How the last process ended.
    pub last_exit: Option<ExitInfo>,
    /// Why it last failed or was disabled.
    pub last_error: Option<String>,
    /// Failed runs since the daemon started, by [`CrashReason`] (indexed `reason as usize`).
    pub crashes: [u64; CrashReason::ALL.len()],
}

impl PluginStatus {
    /// A plugin just known: stopped, never started, healthy only once it runs.
    pub fn new(spec: PluginSpec, enabled: bool) -> Self {
        PluginStatus {
            spec,
            enabled,
            state: PluginState::Stopped,
            healthy: false,
            pid: None,
            started_at: None,
            restart_count: 0,
            consecutive_failures: 0,
            next_restart_at: None,
            last_exit: None,
            last_error: None,
            crashes: [0; CrashReason::ALL.len()],
        }
    }

    /// The plugin's id.
    pub fn id(&self) -> &str {
        &self.spec.metadata.id
    }
}

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A state transition.
    StateChanged,
    /// Health changed without a state change.
    HealthChanged,
    /// A plugin was discovered.
    PluginAdded,
    /// A plugin's file disappeared.
    PluginRemoved,
    /// A file was not loaded.
    PluginSkipped,
    /// A known plugin's metadata changed.
    PluginUpdated,
    /// The plugin's log could not be written.
    LoggingDegraded,
    /// The plugin's log is written again.
    LoggingResumed,
    /// The daemon's event log could not be written.
    EventStorageDegraded,
    /// The daemon's event log is written again.
    EventStorageResumed,
    /// The configuration was reloaded (`plugin_id` empty); the details name the plugins
    /// and the daemon settings that need a restart to pick it up.
    ConfigReloaded,
    /// The daemon is handing over to a new image (`plugin_id` empty).
    DaemonUpgrading,
    /// The daemon's new image took over and serves.
    DaemonUpgraded,
    /// An upgrade did not happen; the daemon that ran goes on.
    DaemonUpgradeFailed,
}

/// An event before the log numbers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventDraft {
    /// The plugin it is about ("" when none).
    pub plugin_id: String,
    /// What happened.
    pub kind: EventKind,
    /// State before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_state: Option<PluginState>,
    /// State after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_state: Option<PluginState>,
    /// Human-readable reason.
    #[serde(default)]
    pub reason: String,
    /// Structured details.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
    /// Exit record, on transitions after a process ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    /// Next restart time, on transitions to BACKOFF.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub next_restart_at: Option<OffsetDateTime>,
    /// Health after the event.
    #[serde(default)]
    pub healthy: bool,
}

impl EventDraft {
    /// A draft of `kind` about `plugin_id` with everything else empty.
    pub fn new(plugin_id: &str, kind: EventKind) -> Self {
        EventDraft {
            plugin_id: plugin_id.to_owned(),
            kind,
            from_state: None,
            to_state: None,
            reason: String::new(),
            details: BTreeMap::new(),
            exit: None,
            next_restart_at: None,
            healthy: false,
        }
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    /// Adds a detail.
    pub fn detail(mut self, key: &str, value: impl ToString) -> Self {
        self.details.insert(key.to_owned(), value.to_string());
        self
    }
}

/// A numbered, persisted event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Daemon-wide sequence number.
    pub seq: u64,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The rest.
    #[serde(flatten)]
    pub body: EventDraft,
}

/// Where a log record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// The plugin's stdout.
    Stdout,
    /// The plugin's stderr.
    Stderr,
    /// The supervisor, about the plugin (spawned, ready, crashed, restarting, disabled).
    Supervisor,
}

/// Severity of a log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// Finest detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation (plain lines without a recognised prefix).
    Info,
    /// Something to look at.
    Warn,
    /// Something failed.
    Error,
}

impl LogLevel {
    /// Reads a level name in any case (`warning` and `err` too).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "trace" => LogLevel::Trace,
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" | "warning" => LogLevel::Warn,
            "error" | "err" => LogLevel::Error,
            _ => return None,
        })
    }
}

/// One line of a plugin's output (or one note of the supervisor's), as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Per-plugin sequence number, increasing across plugin and daemon restarts.
    pub seq: u64,
    /// When the daemon received it.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The stream it came from.
    pub stream: LogStream,
    /// Its level.
    pub level: LogLevel,
    /// The message (the whole line, for plain text).
    pub message: String,
    /// The plugin's own `timestamp`, for structured lines that had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_time: Option<String>,
    /// Other fields of a structured line.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Pid of the run it came from (0 for supervisor notes without a process).
    #[serde(default)]
    pub pid: u32,
    /// True when the line was longer than the limit and continues in the next record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continued: bool,
}
