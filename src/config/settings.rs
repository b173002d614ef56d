//! One layer of settings, as flags, environment variables or the config file give them:
//! every field optional, `None` meaning "this layer does not say". The same struct is
//! `torud serve`'s flags (clap, each with a `TORUD_*` variable) and the config file's
//! top level (serde, keys named like the flags), so the two cannot drift apart.
//!
//! Layers stack with [`Settings::over`] (flag > environment > file: clap already puts a
//! flag over its variable) and land on [`Config::default`]'s values with
//! [`Settings::apply`]. A plugin's own section (`[plugins.<id>]`, [`PluginSettings`])
//! overrides the daemon-wide values for that plugin alone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use serde::{Deserialize, Serialize};

use super::values::{
    AbsolutePath, Arg, AtLeast, EnvName, ForPlugin, MetricsAddr, OtlpEndpoint, OtlpHeader,
    PluginId, RestartPolicy, Secret, Sha256Hex, Span, UserName, WebOrigin,
};
use super::{Config, GrpcLimits, OtlpConfig, PluginLimits, TlsFiles, TokenSource};
use crate::plugin::isolation::users::UidRange;

/// Settings of `torud serve`: its flags, and the config file's top-level keys.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Address of the gRPC control plane (port 0 picks a free port) [default: 127.0.0.1:50051].
    #[arg(long, env = "TORUD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory scanned for `*.binary` plugin executables, created if missing
    /// [default: ./plugins].
    #[arg(long, env = "TORUD_PLUGINS_DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Directory for state, events, logs, sockets and plugin data, created if missing
    /// [default: ./data].
    #[arg(long, env = "TORUD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Enable plugins that have no saved enabled/disabled state yet (first discovery).
    #[arg(long, env = "TORUD_ENABLE_NEW_PLUGINS", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub enable_new_plugins: Option<bool>,
    /// Longest a plugin may take to answer `--metadata` [default: 5s].
    #[arg(long, env = "TORUD_METADATA_TIMEOUT")]
    pub metadata_timeout: Option<Span>,
    /// Longest a plugin may take from spawn to ready (socket accepting, init sent)
    /// [default: 10s].
    #[arg(long, env = "TORUD_START_TIMEOUT")]
    pub start_timeout: Option<Span>,
    /// What to do when a plugin's process ends on its own [default: always].
    #[arg(long, env = "TORUD_RESTART")]
    pub restart: Option<RestartPolicy>,
    /// First restart delay after a failure; doubles with each consecutive failure
    /// [default: 1s].
    #[arg(long, env = "TORUD_BACKOFF_BASE")]
    pub backoff_base: Option<Span>,
    /// Largest restart delay [default: 16s].
    #[arg(long, env = "TORUD_BACKOFF_MAX")]
    pub backoff_max: Option<Span>,
    /// Consecutive failed runs after which a plugin is disabled ("crash loop") [default: 10].
    #[arg(long, env = "TORUD_MAX_FAILURES")]
    pub max_failures: Option<AtLeast<1>>,
    /// A run that stays up this long resets the consecutive failure count [default: 1m].
    #[arg(long, env = "TORUD_STABLE_WINDOW")]
    pub stable_window: Option<Span>,
    /// Wait after the shutdown message before SIGTERM [default: 5s].
    #[arg(long, env = "TORUD_STOP_GRACE")]
    pub stop_grace: Option<Span>,
    /// Wait after SIGTERM before SIGKILL [default: 2s].
    #[arg(long, env = "TORUD_KILL_GRACE")]
    pub kill_grace: Option<Span>,
    /// How often the socket of a running v1 plugin is checked for health [default: 5s].
    #[arg(long, env = "TORUD_HEALTH_INTERVAL")]
    pub health_interval: Option<Span>,
    /// Longest a forwarded KV operation waits for the plugin (the caller's deadline may be
    /// shorter) [default: 5s].
    #[arg(long, env = "TORUD_KV_TIMEOUT")]
    pub kv_timeout: Option<Span>,
    /// Longest a forwarded call waits for the plugin (the caller's deadline may be shorter)
    /// [default: 30s].
    #[arg(long, env = "TORUD_CALL_TIMEOUT")]
    pub call_timeout: Option<Span>,
    /// Largest frame accepted from a plugin, in bytes; a larger one resets its connection
    /// [default: 16777216] (16 MiB).
    #[arg(long, env = "TORUD_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<AtLeast<1024>>,
    /// Requests in flight to one plugin at once; more get RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long, env = "TORUD_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<AtLeast<1>>,
    /// Size of one segment of a plugin's log, in bytes [default: 10485760] (10 MiB).
    #[arg(long, env = "TORUD_LOG_SEGMENT_BYTES")]
    pub log_segment_bytes: Option<AtLeast<4096>>,
    /// Segments of a plugin's log kept; older ones are deleted [default: 5].
    #[arg(long, env = "TORUD_LOG_SEGMENTS")]
    pub log_segments: Option<AtLeast<1>>,
    /// Extra environment variables passed to plugins (comma-separated names), beyond the
    /// default allowlist and the TORU_* variables.
    #[arg(long, env = "TORUD_PLUGIN_ENV", value_delimiter = ',')]
    pub plugin_env: Option<Vec<EnvName>>,
    /// File holding the admin token (full access over TCP). Or set TORUD_ADMIN_TOKEN to the
    /// token itself. Without either, one is generated into `<data-dir>/admin.token`.
    #[arg(long, env = "TORUD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the read-only token (list, get, query, stream, watch). Or set
    /// TORUD_READ_TOKEN. Without either, one is generated into `<data-dir>/read.token`.
    #[arg(long, env = "TORUD_READ_TOKEN_FILE")]
    pub read_token_file: Option<PathBuf>,
    /// PEM certificate chain for TLS on the TCP listener (with --tls-key).
    #[arg(long, env = "TORUD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the TCP listener (with --tls-cert).
    #[arg(long, env = "TORUD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: when given, TCP clients must present a certificate signed by one.
    #[arg(long, env = "TORUD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address (tokens then cross the network in
    /// the clear). Without TLS, a non-loopback --listen is refused unless this is given.
    #[arg(long, env = "TORUD_INSECURE_PLAINTEXT_NON_LOOPBACK", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub insecure_plaintext_non_loopback: Option<bool>,
    /// Serve Prometheus metrics over HTTP at `/metrics` on this address: `PORT` (loopback) or
    /// `HOST:PORT`. Off when not given. On a non-loopback address a scrape needs the read
    /// (or admin) token as `Authorization: Bearer`, and TLS (the listener's) or
    /// --insecure-plaintext-non-loopback, as the gRPC listener does.
    #[arg(long, env = "TORUD_METRICS_LISTEN")]
    pub metrics_listen: Option<MetricsAddr>,
    /// Let web pages from this origin call the API from a browser (gRPC-Web with CORS):
    /// `https://host[:port]`. Repeat for several. Without any, only pages the daemon serves
    /// itself (same origin) can.
    #[arg(long, env = "TORUD_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origin: Option<Vec<WebOrigin>>,
    /// Export plugin logs, lifecycle events and forwarded calls' spans over OTLP/gRPC to
    /// this receiver (`http://HOST:4317`, or `https://` with TLS). Off when not given.
    #[arg(long, env = "TORUD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<OtlpEndpoint>,
    /// A header sent with every OTLP export, `name=value` (an API key, a tenant). Repeat for
    /// several. Values are never logged or shown.
    #[arg(
        long = "otlp-header",
        env = "TORUD_OTLP_HEADERS",
        value_delimiter = ','
    )]
    pub otlp_header: Option<Vec<OtlpHeader>>,
    /// PEM CA certificates that an `https://` OTLP endpoint's certificate must chain to
    /// (without it: the system's roots).
    #[arg(long, env = "TORUD_OTLP_CA")]
    pub otlp_ca: Option<PathBuf>,
    /// How often the daemon's metrics are sent to the OTLP receiver [default: 15s].
    #[arg(long, env = "TORUD_OTLP_METRICS_INTERVAL")]
    pub otlp_metrics_interval: Option<Span>,
    /// Longest wait for each step of an upgrade: the new binary's check, and calls in flight
    /// before the handover [default: 10s].
    #[arg(long, env = "TORUD_UPGRADE_TIMEOUT")]
    pub upgrade_timeout: Option<Span>,
    /// Largest gRPC request or response message, in bytes [default: 4194304] (4 MiB).
    #[arg(long, env = "TORUD_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<AtLeast<1024>>,
    /// Concurrent gRPC streams (calls, subscriptions) per client connection
    /// [default: 1024].
    #[arg(long, env = "TORUD_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<AtLeast<1>>,
    /// Longest KV key accepted, in bytes [default: 512].
    #[arg(long, env = "TORUD_MAX_KV_KEY_BYTES")]
    pub max_kv_key_bytes: Option<AtLeast<1>>,
    /// Longest KV value accepted, in bytes [default: 1048576] (1 MiB).
    #[arg(long, env = "TORUD_MAX_KV_VALUE_BYTES")]
    pub max_kv_value_bytes: Option<AtLeast<1>>,
    /// Longest line of plugin output kept as one log record; longer lines are split into
    /// continued records [default: 65536] (64 KiB).
    #[arg(long, env = "TORUD_MAX_LOG_LINE_BYTES")]
    pub max_log_line_bytes: Option<AtLeast<16>>,
    /// Most bytes a plugin's `--metadata` may print [default: 65536] (64 KiB).
    #[arg(long, env = "TORUD_MAX_METADATA_BYTES")]
    pub max_metadata_bytes: Option<AtLeast<64>>,
    /// Address-space limit (RLIMIT_AS) of every plugin process, in bytes; 0 inherits the
    /// daemon's [default: 34359738368] (32 GiB).
    #[arg(long, env = "TORUD_PLUGIN_MAX_ADDRESS_SPACE")]
    pub plugin_max_address_space: Option<u64>,
    /// Open-file limit (RLIMIT_NOFILE) of every plugin process; 0 inherits the daemon's
    /// [default: 4096].
    #[arg(long, env = "TORUD_PLUGIN_MAX_OPEN_FILES")]
    pub plugin_max_open_files: Option<u64>,
    /// Process limit (RLIMIT_NPROC, counted per user, not enforced for root) of every
    /// plugin process; 0 inherits the daemon's [default: 0].
    #[arg(long, env = "TORUD_PLUGIN_MAX_PROCESSES")]
    pub plugin_max_processes: Option<u64>,
    /// Pin a plugin's binary: ID=SHA256 (hex). A plugin whose binary has another hash is
    /// refused at start. Repeat for several plugins.
    #[arg(long, env = "TORUD_PINS", value_delimiter = ',')]
    pub pin: Option<Vec<ForPlugin<Sha256Hex>>>,
    /// Keys one plugin may keep in its durable storage [default: 100000].
    #[arg(long, env = "TORUD_STORAGE_MAX_KEYS")]
    pub storage_max_keys: Option<AtLeast<1>>,
    /// Bytes (keys plus values) one plugin may keep in its durable storage
    /// [default: 67108864] (64 MiB).
    #[arg(long, env = "TORUD_STORAGE_MAX_BYTES")]
    pub storage_max_bytes: Option<AtLeast<1>>,
    /// Uids (with equal gids) for plugins' own users when the daemon runs as root:
    /// FIRST-LAST. The first is used by `--metadata` probes; each plugin gets one of the
    /// others, kept in `<data-dir>/users.json` [default: 524288-589823].
    #[arg(long, env = "TORUD_PLUGIN_UID_RANGE")]
    #[serde(default, with = "as_text")]
    pub plugin_uid_range: Option<UidRange>,
    /// Run a plugin as a given user instead of its own dynamic one: ID=USER or ID=UID
    /// (`root` only when named like this, for plugins that manage the system). Repeat for
    /// several plugins.
    #[arg(long, env = "TORUD_PLUGIN_USERS", value_delimiter = ',')]
    pub plugin_user: Option<Vec<ForPlugin<UserName>>>,
    /// Log filter for the daemon's own logs (stderr), e.g. `info` or `torud=debug`
    /// [default: info].
    #[arg(long, env = "TORUD_LOG")]
    pub log: Option<String>,
    /// Settings of particular plugins (`[plugins.<id>]` in the config file only).
    #[arg(skip)]
    pub plugins: Option<BTreeMap<PluginId, PluginSettings>>,
}

/// A plugin's own settings (`[plugins.<id>]`): each overrides the daemon-wide value for
/// this plugin alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PluginSettings {
    /// Environment variables given to this plugin only. Their values are never logged and
    /// never returned by the API.
    pub env: Option<BTreeMap<EnvName, Secret>>,
    /// Arguments the plugin is started with.
    pub args: Option<Vec<Arg>>,
    /// The working directory it starts in (absolute; default: the daemon's own). It is
    /// entered as the plugin's user, in its sandbox; in the data directory only the plugin's
    /// own directory may be.
    pub working_dir: Option<AbsolutePath>,
    /// Whether it is enabled when first seen (no saved state yet); the daemon-wide
    /// `enable-new-plugins` otherwise.
    pub enable_when_new: Option<bool>,
    /// Longest it may take from spawn to ready.
    pub start_timeout: Option<Span>,
    /// Longest a forwarded call waits for it.
    pub call_timeout: Option<Span>,
    /// Longest a forwarded KV operation waits for it.
    pub kv_timeout: Option<Span>,
    /// What to do when its process ends on its own.
    pub restart: Option<RestartPolicy>,
    /// First restart delay after a failure.
    pub backoff_base: Option<Span>,
    /// Largest restart delay.
    pub backoff_max: Option<Span>,
    /// Consecutive failed runs after which it is disabled.
    pub max_failures: Option<AtLeast<1>>,
    /// A run that stays up this long resets its consecutive failure count.
    pub stable_window: Option<Span>,
    /// Its address-space limit (RLIMIT_AS), in bytes; 0 inherits the daemon's.
    pub max_address_space: Option<u64>,
    /// Its open-file limit (RLIMIT_NOFILE); 0 inherits the daemon's.
    pub max_open_files: Option<u64>,
    /// Its process limit (RLIMIT_NPROC); 0 inherits the daemon's.
    pub max_processes: Option<u64>,
    /// The SHA-256 its binary must have.
    pub pin: Option<Sha256Hex>,
    /// The user it runs as instead of its own dynamic one (a name or a uid).
    pub user: Option<UserName>,
    /// Size of one segment of its log, in bytes.
    pub log_segment_bytes: Option<AtLeast<4096>>,
    /// Segments of its log kept.
    pub log_segments: Option<AtLeast<1>>,
}

/// `UidRange` through its text form (`FIRST-LAST`), in the file as on the command line.
mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::plugin::isolation::users::UidRange;

    pub fn serialize<S: Serializer>(range: &Option<UidRange>, s: S) -> Result<S::Ok, S::Error> {
        match range {
            Some(r) => s.serialize_str(&format!("{}-{}", r.first, r.last)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<UidRange>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A setting that cannot take effect as given, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SettingError {
    /// The key (the flag's long name; `plugins.<id>.<key>` for a plugin's section).
    pub key: String,
    /// Why.
    pub reason: String,
}

impl SettingError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        SettingError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Fills each field this layer leaves unsaid from `lower`.
macro_rules! stack {
    ($upper:expr, $lower:expr; $($field:ident),* $(,)?) => {
        Settings { $($field: $upper.$field.or($lower.$field),)* }
    };
}

impl Settings {
    /// This layer over `lower`: each setting this layer gives wins, lists included (a flag
    /// `--pin` replaces the file's `pin` list; plugins' own sections are the file's alone).
    pub fn over(self, lower: Settings) -> Settings {
        stack!(self, lower;
            listen, plugins_dir, data_dir, enable_new_plugins, metadata_timeout, start_timeout,
            restart, backoff_base, backoff_max, max_failures, stable_window, stop_grace,
            kill_grace, health_interval, kv_timeout, call_timeout, max_frame_bytes,
            max_in_flight, log_segment_bytes, log_segments, plugin_env, admin_token_file,
            read_token_file, tls_cert, tls_key, tls_client_ca, insecure_plaintext_non_loopback,
            metrics_listen, cors_origin, otlp_endpoint, otlp_header, otlp_ca, otlp_metrics_interval, upgrade_timeout, max_message_bytes, max_concurrent_streams, max_kv_key_bytes, max_kv_value_bytes,
            max_log_line_bytes, max_metadata_bytes, plugin_max_address_space,
            plugin_max_open_files, plugin_max_processes, pin, storage_max_keys,
            storage_max_bytes, plugin_uid_range, plugin_user, log, plugins,
        )
    }

    /// The configuration these settings describe: `Config::default`'s values with every
    /// setting given applied. Paths are kept as given (the caller makes them absolute);
    /// tokens named by a variable (`TORUD_ADMIN_TOKEN`, `TORUD_READ_TOKEN`) are read from
    /// `env`.
    pub fn apply(self, env: impl Fn(&str) -> Option<String>) -> Result<Config, SettingError> {
        let defaults = Config::default();
        let mut c = Config::new(
            self.plugins_dir.unwrap_or(defaults.plugins_dir),
            self.data_dir.unwrap_or(defaults.data_dir),
        );
        set(&mut c.listen, self.listen);
        c.metrics_listen = self.metrics_listen.map(|a| a.0);
        c.cors_origins = self
            .cors_origin
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.0)
            .collect();
        if let Some(limit) = self.upgrade_timeout {
            c.upgrade_timeout = limit.0;
        }
        if let Some(every) = self.otlp_metrics_interval {
            c.otlp_metrics_interval = every.0.max(super::MIN_OTLP_METRICS_INTERVAL);
        }
        c.otlp = match self.otlp_endpoint {
            Some(endpoint) => Some(OtlpConfig {
                endpoint: endpoint.0,
                headers: self.otlp_header.unwrap_or_default(),
                ca: self.otlp_ca,
            }),
            None if self.otlp_ca.is_some() => {
                return Err(SettingError::new("otlp-ca", "needs otlp-endpoint too"))
            }
            None if self.otlp_header.as_ref().is_some_and(|h| !h.is_empty()) => {
                return Err(SettingError::new("otlp-header", "needs otlp-endpoint too"))
            }
            None => None,
        };
        set(&mut c.enable_new_plugins, self.enable_new_plugins);
        set(&mut c.restart, self.restart);
        let t = &mut c.timing;
        set(&mut t.metadata_timeout, self.metadata_timeout.map(|s| s.0));
        set(&mut t.start_timeout, self.start_timeout.map(|s| s.0));
        set(&mut t.backoff_base, self.backoff_base.map(|s| s.0));
        set(&mut t.backoff_max, self.backoff_max.map(|s| s.0));
        set(&mut t.max_failures, self.max_failures.map(AtLeast::as_u32));
        set(&mut t.stable_window, self.stable_window.map(|s| s.0));
        set(&mut t.stop_grace, self.stop_grace.map(|s| s.0));
        set(&mut t.kill_grace, self.kill_grace.map(|s| s.0));
        set(&mut t.health_interval, self.health_interval.map(|s| s.0));
        t.health_interval = t.health_interval.max(super::MIN_HEALTH_INTERVAL);
        let b = &mut c.bridge;
        set(&mut b.kv_timeout, self.kv_timeout.map(|s| s.0));
        set(&mut b.call_timeout, self.call_timeout.map(|s| s.0));
        set(
            &mut b.max_frame,
            self.max_frame_bytes.map(AtLeast::as_usize),
        );
        set(
            &mut b.max_in_flight,
            self.max_in_flight.map(AtLeast::as_usize),
        );
        set(&mut b.max_key, self.max_kv_key_bytes.map(AtLeast::as_usize));
        set(
            &mut b.max_value,
            self.max_kv_value_bytes.map(AtLeast::as_usize),
        );
        set(
            &mut c.log_segment_bytes,
            self.log_segment_bytes.map(|n| n.0),
        );
        set(
            &mut c.log_segments,
            self.log_segments.map(AtLeast::as_usize),
        );
        set(
            &mut c.max_log_line,
            self.max_log_line_bytes.map(AtLeast::as_usize),
        );
        set(
            &mut c.max_metadata_bytes,
            self.max_metadata_bytes.map(AtLeast::as_usize),
        );
        c.grpc = GrpcLimits {
            max_message_bytes: self
                .max_message_bytes
                .map_or(c.grpc.max_message_bytes, AtLeast::as_usize),
            max_concurrent_streams: self
                .max_concurrent_streams
                .map_or(c.grpc.max_concurrent_streams, AtLeast::as_u32),
        };
        c.plugin_limits = PluginLimits {
            address_space: limit(self.plugin_max_address_space, c.plugin_limits.address_space),
            open_files: limit(self.plugin_max_open_files, c.plugin_limits.open_files),
            processes: limit(self.plugin_max_processes, c.plugin_limits.processes),
        };
        set(
            &mut c.storage_quotas.max_keys,
            self.storage_max_keys.map(|n| n.0),
        );
        set(
            &mut c.storage_quotas.max_bytes,
            self.storage_max_bytes.map(|n| n.0),
        );
        set(&mut c.plugin_uid_range, self.plugin_uid_range);
        set(&mut c.log_filter, self.log);
        c.plugin_env_allowlist
            .extend(self.plugin_env.into_iter().flatten().map(|n| n.0));
        c.security.admin_token = token_source(
            env("TORUD_ADMIN_TOKEN"),
            self.admin_token_file,
            c.security.admin_token,
        );
        c.security.read_token = token_source(
            env("TORUD_READ_TOKEN"),
            self.read_token_file,
            c.security.read_token,
        );
        c.security.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            (Some(_), None) => return Err(SettingError::new("tls-cert", "needs tls-key too")),
            (None, Some(_)) => return Err(SettingError::new("tls-key", "needs tls-cert too")),
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(SettingError::new(
                    "tls-client-ca",
                    "needs tls-cert and tls-key too",
                ))
            }
            (None, None) => None,
        };
        set(
            &mut c.security.insecure_plaintext_non_loopback,
            self.insecure_plaintext_non_loopback,
        );
        let plugins = self.plugins.unwrap_or_default();
        for (id, section) in &plugins {
            if let Some(pin) = &section.pin {
                c.pins.insert(id.0.clone(), pin.0.clone());
            }
            if let Some(user) = &section.user {
                c.plugin_users.insert(id.0.clone(), user.0.clone());
            }
        }
        // A flag's (or the top-level list's) pin and user win over a plugin's section.
        for pin in self.pin.into_iter().flatten() {
            c.pins.insert(pin.id.0, pin.value.0);
        }
        for user in self.plugin_user.into_iter().flatten() {
            c.plugin_users.insert(user.id.0, user.value.0);
        }
        c.plugins = plugins.into_iter().map(|(id, s)| (id.0, s)).collect();
        Ok(c)
    }
}

impl Settings {
    /// The settings that describe `config`, every one given (but `plugins` when no plugin
    /// has a section of its own): what `GetConfig` shows, and a config file that would give
    /// the same configuration. Secrets stay redacted when serialized (a plugin's `env`
    /// values); a token given as a value (an environment variable) is not shown at all, a
    /// token file is named. The pins and users of every plugin are in the top-level `pin`
    /// and `plugin-user` lists (which win over a plugin's section), not in the sections.
    pub fn effective(config: &Config) -> Settings {
        let t = &config.timing;
        let b = &config.bridge;
        let span = |d: std::time::Duration| Some(Span(d));
        fn count<const MIN: u64>(n: usize) -> Option<AtLeast<MIN>> {
            Some(AtLeast(n as u64))
        }
        let token_file = |source: &TokenSource| match source {
            TokenSource::File(path) | TokenSource::Generated(path) => Some(path.clone()),
            TokenSource::Value(_) => None,
        };
        let tls = config.security.tls.as_ref();
        let extra_env = config
            .plugin_env_allowlist
            .iter()
            .filter(|name| !super::DEFAULT_PLUGIN_ENV.contains(&name.as_str()))
            .map(|name| EnvName(name.clone()))
            .collect();
        let for_plugin = |id: &String| PluginId(id.clone());
        let plugins = config
            .plugins
            .iter()
            .map(|(id, section)| {
                let section = PluginSettings {
                    pin: None,
                    user: None,
                    ..section.clone()
                };
                (for_plugin(id), section)
            })
            .collect();
        Settings {
            listen: Some(config.listen),
            metrics_listen: config.metrics_listen.map(MetricsAddr),
            cors_origin: Some(config.cors_origins.iter().cloned().map(WebOrigin).collect()),
            otlp_endpoint: config
                .otlp
                .as_ref()
                .map(|o| OtlpEndpoint(o.endpoint.clone())),
            otlp_header: config.otlp.as_ref().map(|o| o.headers.clone()),
            otlp_ca: config.otlp.as_ref().and_then(|o| o.ca.clone()),
            otlp_metrics_interval: Some(Span(config.otlp_metrics_interval)),
            upgrade_timeout: Some(Span(config.upgrade_timeout)),
            plugins_dir: Some(config.plugins_dir.clone()),
            data_dir: Some(config.data_dir.clone()),
            enable_new_plugins: Some(config.enable_new_plugins),
            metadata_timeout: span(t.metadata_timeout),
            start_timeout: span(t.start_timeout),
            restart: Some(config.restart),
            backoff_base: span(t.backoff_base),
            backoff_max: span(t.backoff_max),
            max_failures: Some(AtLeast(t.max_failures.into())),
            stable_window: span(t.stable_window),
            stop_grace: span(t.stop_grace),
            kill_grace: span(t.kill_grace),
            health_interval: span(t.health_interval),
            kv_timeout: span(b.kv_timeout),
            call_timeout: span(b.call_timeout),
            max_frame_bytes: count(b.max_frame),
            max_in_flight: count(b.max_in_flight),
            log_segment_bytes: Some(AtLeast(config.log_segment_bytes)),
            log_segments: count(config.log_segments),
            plugin_env: Some(extra_env),
            admin_token_file: token_file(&config.security.admin_token),
            read_token_file: token_file(&config.security.read_token),
            tls_cert: tls.map(|t| t.cert.clone()),
            tls_key: tls.map(|t| t.key.clone()),
            tls_client_ca: tls.and_then(|t| t.client_ca.clone()),
            insecure_plaintext_non_loopback: Some(config.security.insecure_plaintext_non_loopback),
            max_message_bytes: count(config.grpc.max_message_bytes),
            max_concurrent_streams: Some(AtLeast(config.grpc.max_concurrent_streams.into())),
            max_kv_key_bytes: count(b.max_key),
            max_kv_value_bytes: count(b.max_value),
            max_log_line_bytes: count(config.max_log_line),
            max_metadata_bytes: count(config.max_metadata_bytes),
            plugin_max_address_space: Some(config.plugin_limits.address_space.unwrap_or(0)),
            plugin_max_open_files: Some(config.plugin_limits.open_files.unwrap_or(0)),
            plugin_max_processes: Some(config.plugin_limits.processes.unwrap_or(0)),
            pin: Some(
                config
                    .pins
                    .iter()
                    .map(|(id, hash)| ForPlugin {
                        id: for_plugin(id),
                        value: Sha256Hex(hash.clone()),
                    })
                    .collect(),
            ),
            storage_max_keys: Some(AtLeast(config.storage_quotas.max_keys)),
            storage_max_bytes: Some(AtLeast(config.storage_quotas.max_bytes)),
            plugin_uid_range: Some(config.plugin_uid_range),
            plugin_user: Some(
                config
                    .plugin_users
                    .iter()
                    .map(|(id, user)| ForPlugin {
                        id: for_plugin(id),
                        value: UserName(user.clone()),
                    })
                    .collect(),
            ),
            log: Some(config.log_filter.clone()),
            // No empty `[plugins]` table when no plugin has a section.
            plugins: (!config.plugins.is_empty()).then_some(plugins),
        }
    }
}

/// Replaces `slot` with `value` when the layer gave one.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

/// An rlimit setting: 0 inherits the daemon's, nothing given keeps the default.
fn limit(given: Option<u64>, default: Option<u64>) -> Option<u64> {
    match given {
        Some(0) => None,
        Some(n) => Some(n),
        None => default,
    }
}

/// Where a token comes from: the variable holding it, else the file named, else the
/// default (generated into the data directory).
fn token_source(value: Option<String>, file: Option<PathBuf>, default: TokenSource) -> TokenSource {
    match (value.filter(|v| !v.is_empty()), file) {
        (Some(value), _) => TokenSource::Value(value),
        (None, Some(file)) => TokenSource::File(file),
        (None, None) => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        super::super::file::parse(Path::new("t.toml"), text)
            .unwrap()
            .apply(|_| None)
            .unwrap()
    }

    /// The effective settings, written as a file and read back, give the same
    /// configuration (tokens aside: a generated token's file is named as a token file).
    #[test]
    fn the_effective_settings_read_back_as_the_same_configuration() {
        let original = config(
            "call-timeout = \"45s\"\nplugin-env = [\"EXTRA\"]\nplugin-max-open-files = 0\n\
             pin = [\"hello=0000000000000000000000000000000000000000000000000000000000000000\"]\n\
             plugin-user = [\"hello=1234\"]\n\
             [plugins.hello]\nargs = [\"-v\"]\nworking-dir = \"/srv\"\nrestart = \"never\"\n\
             log-segments = 2\n",
        );
        let text = toml::to_string(&Settings::effective(&original)).unwrap();
        let back = config(&text);
        assert_eq!(
            Config {
                security: original.security.clone(),
                ..back
            },
            original,
            "{text}"
        );
    }

    #[test]
    fn otlp_settings_make_the_export_and_never_show_a_header() {
        let c = config(
            "otlp-endpoint = \"https://collector:4317\"\n\
             otlp-header = [\"Authorization=Bearer s3cret\", \"x-tenant=a\"]\n\
             otlp-ca = \"/etc/ca.pem\"\n",
        );
        let otlp = c.otlp.clone().unwrap();
        assert_eq!(otlp.endpoint, "https://collector:4317");
        assert_eq!(otlp.headers[0].name, "authorization");
        assert_eq!(otlp.headers[0].value.expose(), "Bearer s3cret");
        assert_eq!(otlp.ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        let text = toml::to_string(&Settings::effective(&c)).unwrap();
        assert!(text.contains("authorization=(redacted)"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn otlp_settings_are_refused_when_they_cannot_work() {
        let refused = |text: &str| {
            super::super::file::parse(Path::new("t.toml"), text)
                .and_then(|s| s.apply(|_| None).map_err(Into::into))
                .unwrap_err()
                .to_string()
        };
        assert!(refused("otlp-ca = \"/ca.pem\"\n").contains("needs otlp-endpoint"));
        assert!(refused("otlp-header = [\"a=b\"]\n").contains("needs otlp-endpoint"));
        assert!(refused("otlp-endpoint = \"collector:4317\"\n").contains("http://"));
        assert!(refused("otlp-endpoint = \"ftp://c:4317\"\n").contains("http://"));
        let header = "otlp-endpoint = \"http://c:4317\"\notlp-header = [\"novalue\"]\n";
        assert!(refused(header).contains("name=value"));
    }

    #[test]
    fn the_effective_settings_never_show_a_secret() {
        let mut original = config("[plugins.hello.env]\nAPI_KEY = \"s3cret\"\n");
        original.security.admin_token = TokenSource::Value("admin-token-value".into());
        let text = toml::to_string(&Settings::effective(&original)).unwrap();
        assert!(text.contains("API_KEY = \"(redacted)\""), "{text}");
        assert!(
            !text.contains("s3cret") && !text.contains("admin-token-value"),
            "{text}"
        );
    }
}
