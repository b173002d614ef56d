//! The daemon's configuration as the rest of the code sees it: paths, timings and limits,
//! daemon-wide and per plugin ([`Config::plugin`]).
//!
//! Where it comes from: [`settings`] is one layer of it (flags, environment variables or
//! the config file, which share one struct); [`mod@file`] reads and checks the config file;
//! [`Loader`] stacks the layers (flag > environment > file > default) and does it again on
//! a reload. [`values`] holds the checked value types they share. [`reload`] says what a
//! reload can apply and what needs a restart (of the daemon, or of a plugin).
//!
//! Every default is written once, here ([`Config::default`] and the `Default` of each
//! part) or in the module that owns the limit (and named here).

pub mod file;
pub mod reload;
pub mod settings;
pub mod values;

pub use file::{ConfigError, Loaded, Loader, Source, DEFAULT_CONFIG_FILE};
pub use reload::ProcessSettings;
pub use settings::{PluginSettings, Settings};
pub use values::RestartPolicy;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The data directory's files a local client reads are part of the API.
pub use torud_api::{ADMIN_TOKEN_FILE, CONTROL_SOCKET, READ_TOKEN_FILE};

/// The shortest health-check interval honoured; a shorter `health-interval` is raised to
/// it, so that checks never spin.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

/// The daemon's log filter when none is given or the one given cannot be read.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// Default for the largest `--metadata` output read from a plugin (`--max-metadata-bytes`).
pub const DEFAULT_MAX_METADATA_BYTES: usize = 64 * 1024;

/// The OpenTelemetry export: an OTLP/gRPC receiver and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// `http://` or `https://` URL of the receiver.
    pub endpoint: String,
    /// Headers sent with every export.
    pub headers: Vec<values::OtlpHeader>,
    /// CA certificates (PEM) the receiver's certificate must chain to; `None`: the system's.
    pub ca: Option<PathBuf>,
}

/// The shortest `--otlp-metrics-interval` honoured (a shorter one is raised to it).
pub const MIN_OTLP_METRICS_INTERVAL: Duration = Duration::from_millis(100);

/// Default of `--otlp-metrics-interval`.
pub const DEFAULT_OTLP_METRICS_INTERVAL: Duration = Duration::from_secs(15);
/// How long each step of an upgrade may take unless configured.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `torud serve` can be told.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// TCP address of the gRPC control plane (port 0 picks a free port).
    pub listen: SocketAddr,
    /// HTTP address of the Prometheus `/metrics` endpoint; `None`: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Origins of web pages allowed to call the API from a browser (CORS); empty: none but
    /// the daemon's own.
    pub cors_origins: Vec<String>,
    /// How often the metrics are sent to the OTLP receiver, when there is one.
    pub otlp_metrics_interval: Duration,
    /// Longest wait for each step of an upgrade (the new binary's check; calls in flight).
    pub upgrade_timeout: Duration,
    /// Where plugin logs, events and call spans are exported over OTLP; `None`: nowhere.
    pub otlp: Option<OtlpConfig>,
    /// Directory scanned for `*.binary` plugin executables.
    pub plugins_dir: PathBuf,
    /// Directory for state, events, logs, sockets and plugin data.
    pub data_dir: PathBuf,
    /// Enable plugins seen for the first time (no saved enabled/disabled state).
    pub enable_new_plugins: bool,
    /// Timings of supervision.
    pub timing: Timing,
    /// Timeouts and limits of requests forwarded to plugins.
    pub bridge: BridgeConfig,
    /// Size of one segment of a plugin's log.
    pub log_segment_bytes: u64,
    /// Segments of a plugin's log kept; older ones are deleted.
    pub log_segments: usize,
    /// Environment variables passed through to plugins (beyond the `TORU_*` ones).
    pub plugin_env_allowlist: Vec<String>,
    /// Who may call, and over what.
    pub security: SecurityConfig,
    /// Limits of the gRPC server.
    pub grpc: GrpcLimits,
    /// Longest line of plugin output kept as one log record; longer lines are split.
    pub max_log_line: usize,
    /// Most bytes a `--metadata` run may print.
    pub max_metadata_bytes: usize,
    /// Resource limits every plugin process starts with.
    pub plugin_limits: PluginLimits,
    /// Expected SHA-256 (lowercase hex) of plugin binaries, by plugin id: a plugin whose
    /// binary differs is refused at start.
    pub pins: std::collections::BTreeMap<String, String>,
    /// Per-plugin quotas of the durable storage.
    pub storage_quotas: crate::store::storage::Quotas,
    /// Uids (and equal gids) for plugins' dynamic users when the daemon is root.
    pub plugin_uid_range: crate::plugin::isolation::users::UidRange,
    /// Users chosen for particular plugins (`--plugin-user ID=USER|UID`), by plugin id.
    pub plugin_users:
        std::collections::BTreeMap<String, crate::plugin::isolation::users::UserChoice>,
    /// What to do when a plugin's process ends on its own.
    pub restart: RestartPolicy,
    /// Settings of particular plugins (`[plugins.<id>]`), by plugin id; see
    /// [`Config::plugin`].
    pub plugins: BTreeMap<String, PluginSettings>,
    /// Filter of the daemon's own logs (`tracing_subscriber`'s `EnvFilter` syntax).
    pub log_filter: String,
}

pub use crate::plugin::process::{Launch, PluginLimits};

/// Where a role's token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The token itself (from the environment).
    Value(String),
    /// A file holding it (surrounding whitespace ignored).
    File(PathBuf),
    /// Generated into this file on first start, read back afterwards.
    Generated(PathBuf),
}

/// Authentication and transport security of the control plane.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityConfig {
    /// Where the admin token comes from.
    pub admin_token: TokenSource,
    /// Where the read-only token comes from.
    pub read_token: TokenSource,
    /// TLS for the TCP listener.
    pub tls: Option<TlsFiles>,
    /// Serve plaintext on a non-loopback address anyway.
    pub insecure_plaintext_non_loopback: bool,
}

/// PEM files of the TCP listener's TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; `None` asks for none.
    pub client_ca: Option<PathBuf>,
}

/// Limits of the gRPC server.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcLimits {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// Concurrent streams (calls) per client connection.
    pub max_concurrent_streams: u32,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 1024,
        }
    }
}

/// How long the supervisor waits for things, and how it backs off.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Longest a plugin may take to answer `--metadata`.
    pub metadata_timeout: Duration,
    /// Longest a plugin may take from spawn to ready.
    pub start_timeout: Duration,
    /// First restart delay after a failure; doubles per consecutive failure.
    pub backoff_base: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
    /// Consecutive failed runs after which the plugin is disabled ("crash loop").
    pub max_failures: u32,
    /// A run that stays up this long resets the consecutive failure count.
    pub stable_window: Duration,
    /// Wait after the `shutdown` message before SIGTERM.
    pub stop_grace: Duration,
    /// Wait after SIGTERM before SIGKILL.
    pub kill_grace: Duration,
    /// How often the socket of a running v1 plugin is checked.
    pub health_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            metadata_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(16),
            max_failures: 10,
            stable_window: Duration::from_secs(60),
            stop_grace: Duration::from_secs(5),
            kill_grace: Duration::from_secs(2),
            health_interval: Duration::from_secs(5),
        }
    }
}

impl Timing {
    /// Restart delay after `failures` consecutive failures (1 → base, 2 → 2×base, …, capped).
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.backoff_base
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }
}

/// Timeouts and limits of forwarded requests.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeConfig {
    /// Longest a KV operation may wait for its answer (the caller's deadline may be shorter).
    pub kv_timeout: Duration,
    /// Longest a call may wait for its answer (the caller's deadline may be shorter).
    pub call_timeout: Duration,
    /// Largest frame accepted from (and sent to) a plugin.
    pub max_frame: usize,
    /// Requests in flight to one plugin at once.
    pub max_in_flight: usize,
    /// Longest KV key, in bytes.
    pub max_key: usize,
    /// Longest KV value, in bytes.
    pub max_value: usize,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            kv_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            max_frame: toru_plugin_sdk::DEFAULT_MAX_FRAME_LEN,
            max_in_flight: 1024,
            max_key: 512,
            max_value: 1024 * 1024,
        }
    }
}

/// Environment variables plugins get by default, beyond the `TORU_*` ones. Nothing else of
/// the daemon's environment (tokens, keys) reaches a plugin.
pub const DEFAULT_PLUGIN_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYENV_ROOT",
    "PYENV_VERSION",
    "VIRTUAL_ENV",
    "RUST_BACKTRACE",
];

impl Default for Config {
    /// `torud serve`'s defaults: `./plugins` and `./data`, relative to the working
    /// directory.
    fn default() -> Self {
        Config::new(PathBuf::from("./plugins"), PathBuf::from("./data"))
    }
}

impl Config {
    /// A configuration with the defaults of every flag of `torud serve`, for these
    /// directories.
    pub fn new(plugins_dir: PathBuf, data_dir: PathBuf) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            cors_origins: Vec::new(),
            otlp_metrics_interval: DEFAULT_OTLP_METRICS_INTERVAL,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            otlp: None,
            plugins_dir,
            enable_new_plugins: false,
            timing: Timing::default(),
            bridge: BridgeConfig::default(),
            log_segment_bytes: 10 * 1024 * 1024,
            log_segments: 5,
            plugin_env_allowlist: DEFAULT_PLUGIN_ENV.iter().map(|s| s.to_string()).collect(),
            security: SecurityConfig {
                admin_token: TokenSource::Generated(data_dir.join(ADMIN_TOKEN_FILE)),
                read_token: TokenSource::Generated(data_dir.join(READ_TOKEN_FILE)),
                tls: None,
                insecure_plaintext_non_loopback: false,
            },
            grpc: GrpcLimits::default(),
            max_log_line: crate::logs::capture::DEFAULT_MAX_LINE,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            plugin_limits: PluginLimits::default(),
            pins: Default::default(),
            storage_quotas: crate::store::storage::Quotas::default(),
            plugin_uid_range: crate::plugin::isolation::users::UidRange::default(),
            plugin_users: Default::default(),
            restart: RestartPolicy::default(),
            plugins: BTreeMap::new(),
            log_filter: DEFAULT_LOG_FILTER.to_owned(),
            data_dir,
        }
    }

    /// Longest a forwarded call to plugin `id` waits for it (per request: no copying).
    pub fn call_timeout_of(&self, id: &str) -> Duration {
        let own = self.plugins.get(id).and_then(|s| s.call_timeout);
        own.map_or(self.bridge.call_timeout, |s| s.0)
    }

    /// Longest a forwarded KV operation on plugin `id` waits for it.
    pub fn kv_timeout_of(&self, id: &str) -> Duration {
        let own = self.plugins.get(id).and_then(|s| s.kv_timeout);
        own.map_or(self.bridge.kv_timeout, |s| s.0)
    }

    /// Whether plugin `id` is enabled when first seen (no saved decision yet), without
    /// resolving the rest of its settings.
    pub fn enable_when_new_of(&self, id: &str) -> bool {
        let own = self.plugins.get(id).and_then(|s| s.enable_when_new);
        own.unwrap_or(self.enable_new_plugins)
    }

    /// The settings that apply to plugin `id`: its own section's, else the daemon-wide
    /// ones.
    pub fn plugin(&self, id: &str) -> PluginConfig {
        let own = self.plugins.get(id).cloned().unwrap_or_default();
        let span = |own: Option<values::Span>, wide: Duration| own.map_or(wide, |s| s.0);
        let limit = |own: Option<u64>, wide: Option<u64>| match own {
            Some(0) => None,
            Some(n) => Some(n),
            None => wide,
        };
        let t = &self.timing;
        PluginConfig {
            timing: Timing {
                start_timeout: span(own.start_timeout, t.start_timeout),
                backoff_base: span(own.backoff_base, t.backoff_base),
                backoff_max: span(own.backoff_max, t.backoff_max),
                max_failures: own.max_failures.map_or(t.max_failures, |n| n.as_u32()),
                stable_window: span(own.stable_window, t.stable_window),
                ..t.clone()
            },
            kv_timeout: self.kv_timeout_of(id),
            call_timeout: self.call_timeout_of(id),
            restart: own.restart.unwrap_or(self.restart),
            limits: PluginLimits {
                address_space: limit(own.max_address_space, self.plugin_limits.address_space),
                open_files: limit(own.max_open_files, self.plugin_limits.open_files),
                processes: limit(own.max_processes, self.plugin_limits.processes),
            },
            launch: Launch {
                args: own.args.into_iter().flatten().map(|a| a.0).collect(),
                env: own
                    .env
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(name, value)| (name.0, value))
                    .collect(),
                working_dir: own.working_dir.map(|p| p.0),
            },
            enable_when_new: self.enable_when_new_of(id),
            log_segment_bytes: own
                .log_segment_bytes
                .map_or(self.log_segment_bytes, |n| n.0),
            log_segments: own.log_segments.map_or(self.log_segments, |n| n.as_usize()),
        }
    }

    /// Moves the data directory to `dir` (the same one made absolute, say), with the token
    /// files generated there.
    pub fn relocate_data_dir(&mut self, dir: PathBuf) {
        for (source, file) in [
            (&mut self.security.admin_token, ADMIN_TOKEN_FILE),
            (&mut self.security.read_token, READ_TOKEN_FILE),
        ] {
            if *source == TokenSource::Generated(self.data_dir.join(file)) {
                *source = TokenSource::Generated(dir.join(file));
            }
        }
        self.data_dir = dir;
    }

    /// The control socket (trusted by file permission, no token).
    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join(CONTROL_SOCKET)
    }

    /// Directory holding one directory per plugin for its socket.
    pub fn run_dir(&self) -> PathBuf {
        self.data_dir.join("run")
    }

    /// The directory, owned by the plugin's user, where it binds its socket.
    pub fn plugin_run_dir(&self, id: &str) -> PathBuf {
        self.run_dir().join(id)
    }

    /// The socket a plugin listens on.
    pub fn socket_path(&self, id: &str) -> PathBuf {
        self.plugin_run_dir(id).join("plugin.sock")
    }

    /// The writable directory private to one plugin (`TORU_DATA_DIR`).
    pub fn plugin_data_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("plugins").join(id)
    }

    /// The directory of one plugin's log (`log.<first seq>.jsonl` segments and indexes).
    pub fn log_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("logs").join(id)
    }

    /// The persisted enabled/disabled state.
    pub fn state_path(&self) -> PathBuf {
        self.data_dir.join("state.json")
    }

    /// The plugins' durable key-value storage (one redb database).
    pub fn storage_path(&self) -> PathBuf {
        self.data_dir.join("storage.redb")
    }

    /// The directory of the persisted event log (`events.<first seq>.jsonl` segments).
    pub fn events_dir(&self) -> PathBuf {
        self.data_dir.join("events")
    }
}

/// The settings that apply to one plugin ([`Config::plugin`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// Its timings (start timeout, backoff, crash budget, stable window are its own).
    pub timing: Timing,
    /// Longest a forwarded KV operation waits for it.
    pub kv_timeout: Duration,
    /// Longest a forwarded call waits for it.
    pub call_timeout: Duration,
    /// What to do when its process ends on its own.
    pub restart: RestartPolicy,
    /// Its resource limits.
    pub limits: PluginLimits,
    /// How its process is started, beyond what every plugin gets.
    pub launch: Launch,
    /// Whether it is enabled when first seen.
    pub enable_when_new: bool,
    /// Size of one segment of its log.
    pub log_segment_bytes: u64,
    /// Segments of its log kept.
    pub log_segments: usize,
}

/// Makes a directory (and parents) and sets its mode.
pub fn create_dir_with_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let t = Timing::default();
        let secs: Vec<u64> = (1..=7).map(|f| t.backoff(f).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 16, 16]);
        assert_eq!(t.backoff(u32::MAX), Duration::from_secs(16));
    }
}
