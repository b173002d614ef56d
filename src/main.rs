//! The `torud` binary: parses flags (each with a `TORUD_*` environment equivalent), sets up
//! logging and signals, and hands over to [`torud::api::server::run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use torud::api::server::ServeError;
use torud::config::{
    BridgeConfig, Config, GrpcLimits, PluginLimits, SecurityConfig, Timing, TlsFiles, TokenSource,
    ADMIN_TOKEN_FILE, READ_TOKEN_FILE,
};
use torud::plugin::check;

/// The configuration's defaults, which are the flags' defaults.
static DEFAULTS: LazyLock<Config> = LazyLock::new(Config::default);

/// The daemon's log filter when `--log` is not given or cannot be read.
const DEFAULT_LOG_FILTER: &str = "info";

/// The shortest health-check interval honoured; a shorter `--health-interval` is raised to
/// it, so that checks never spin.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

/// Log capture allocates a few small strings per line; mimalloc makes that markedly
/// cheaper than the system allocator (measured with `torud-bench logs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "torud",
    version,
    about = "Runs plugins and fronts them with a gRPC control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up; the size of the serve flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(Flags),
    /// Work with plugin executables.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Check that a plugin executable conforms to the plugin protocol: metadata, start,
    /// init, KV and call round trips, its extensions and shutdown. Exits 0 if it conforms.
    Check {
        /// The plugin executable.
        path: PathBuf,
        /// Longest wait for each step.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// Flags of `torud serve`; a flag given twice takes its last value. Every default is
/// [`Config::default`]'s value ([`DEFAULTS`]), so it is written once.
#[derive(Args)]
#[command(args_override_self = true)]
struct Flags {
    /// Address of the gRPC control plane (port 0 picks a free port).
    #[arg(long, env = "TORUD_LISTEN", default_value_t = DEFAULTS.listen)]
    listen: SocketAddr,
    /// Directory scanned for `*.binary` plugin executables (created if missing).
    #[arg(long, env = "TORUD_PLUGINS_DIR", default_value_os_t = DEFAULTS.plugins_dir.clone())]
    plugins_dir: PathBuf,
    /// Directory for state, events, logs, sockets and plugin data (created if missing).
    #[arg(long, env = "TORUD_DATA_DIR", default_value_os_t = DEFAULTS.data_dir.clone())]
    data_dir: PathBuf,
    /// Enable plugins that have no saved enabled/disabled state yet (first discovery).
    #[arg(long, env = "TORUD_ENABLE_NEW_PLUGINS")]
    enable_new_plugins: bool,
    /// Longest a plugin may take to answer `--metadata`.
    #[arg(long, env = "TORUD_METADATA_TIMEOUT", default_value_t = DEFAULTS.timing.metadata_timeout.into())]
    metadata_timeout: humantime::Duration,
    /// Longest a plugin may take from spawn to ready (socket accepting, init sent).
    #[arg(long, env = "TORUD_START_TIMEOUT", default_value_t = DEFAULTS.timing.start_timeout.into())]
    start_timeout: humantime::Duration,
    /// First restart delay after a failure; doubles with each consecutive failure.
    #[arg(long, env = "TORUD_BACKOFF_BASE", default_value_t = DEFAULTS.timing.backoff_base.into())]
    backoff_base: humantime::Duration,
    /// Largest restart delay.
    #[arg(long, env = "TORUD_BACKOFF_MAX", default_value_t = DEFAULTS.timing.backoff_max.into())]
    backoff_max: humantime::Duration,
    /// Consecutive failed runs after which a plugin is disabled ("crash loop").
    #[arg(long, env = "TORUD_MAX_FAILURES", default_value_t = DEFAULTS.timing.max_failures, value_parser = clap::value_parser!(u32).range(1..))]
    max_failures: u32,
    /// A run that stays up this long resets the consecutive failure count.
    #[arg(long, env = "TORUD_STABLE_WINDOW", default_value_t = DEFAULTS.timing.stable_window.into())]
    stable_window: humantime::Duration,
    /// Wait after the shutdown message before SIGTERM.
    #[arg(long, env = "TORUD_STOP_GRACE", default_value_t = DEFAULTS.timing.stop_grace.into())]
    stop_grace: humantime::Duration,
    /// Wait after SIGTERM before SIGKILL.
    #[arg(long, env = "TORUD_KILL_GRACE", default_value_t = DEFAULTS.timing.kill_grace.into())]
    kill_grace: humantime::Duration,
    /// How often the socket of a running v1 plugin is checked for health.
    #[arg(long, env = "TORUD_HEALTH_INTERVAL", default_value_t = DEFAULTS.timing.health_interval.into())]
    health_interval: humantime::Duration,
    /// Longest a forwarded KV operation waits for the plugin (the caller's deadline may be
    /// shorter).
    #[arg(long, env = "TORUD_KV_TIMEOUT", default_value_t = DEFAULTS.bridge.kv_timeout.into())]
    kv_timeout: humantime::Duration,
    /// Longest a forwarded call waits for the plugin (the caller's deadline may be shorter).
    #[arg(long, env = "TORUD_CALL_TIMEOUT", default_value_t = DEFAULTS.bridge.call_timeout.into())]
    call_timeout: humantime::Duration,
    /// Largest frame accepted from a plugin, in bytes; a larger one resets its connection.
    #[arg(long, env = "TORUD_MAX_FRAME_BYTES", default_value_t = DEFAULTS.bridge.max_frame as u32, value_parser = clap::value_parser!(u32).range(1024..))]
    max_frame_bytes: u32,
    /// Requests in flight to one plugin at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TORUD_MAX_IN_FLIGHT", default_value_t = DEFAULTS.bridge.max_in_flight as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
    /// Size of one segment of a plugin's log, in bytes.
    #[arg(long, env = "TORUD_LOG_SEGMENT_BYTES", default_value_t = DEFAULTS.log_segment_bytes, value_parser = clap::value_parser!(u64).range(4096..))]
    log_segment_bytes: u64,
    /// Segments of a plugin's log kept; older ones are deleted.
    #[arg(long, env = "TORUD_LOG_SEGMENTS", default_value_t = DEFAULTS.log_segments as u32, value_parser = clap::value_parser!(u32).range(1..))]
    log_segments: u32,
    /// Extra environment variables passed to plugins (comma-separated names), beyond the
    /// default allowlist and the TORU_* variables.
    #[arg(long, env = "TORUD_PLUGIN_ENV", value_delimiter = ',')]
    plugin_env: Vec<String>,
    /// File holding the admin token (full access over TCP). Or set TORUD_ADMIN_TOKEN to the
    /// token itself. Without either, one is generated into <data-dir>/admin.token.
    #[arg(long, env = "TORUD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File holding the read-only token (list, get, query, stream, watch). Or set
    /// TORUD_READ_TOKEN. Without either, one is generated into <data-dir>/read.token.
    #[arg(long, env = "TORUD_READ_TOKEN_FILE")]
    read_token_file: Option<PathBuf>,
    /// PEM certificate chain for TLS on the TCP listener (with --tls-key).
    #[arg(long, env = "TORUD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the TCP listener (with --tls-cert).
    #[arg(long, env = "TORUD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: when given, TCP clients must present a certificate signed by one.
    #[arg(long, env = "TORUD_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address (tokens then cross the network in
    /// the clear). Without TLS, a non-loopback --listen is refused unless this is given.
    #[arg(long, env = "TORUD_INSECURE_PLAINTEXT_NON_LOOPBACK")]
    insecure_plaintext_non_loopback: bool,
    /// Largest gRPC request or response message, in bytes.
    #[arg(long, env = "TORUD_MAX_MESSAGE_BYTES", default_value_t = DEFAULTS.grpc.max_message_bytes as u32, value_parser = clap::value_parser!(u32).range(1024..))]
    max_message_bytes: u32,
    /// Concurrent gRPC streams (calls, subscriptions) per client connection.
    #[arg(long, env = "TORUD_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULTS.grpc.max_concurrent_streams, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_streams: u32,
    /// Longest KV key accepted, in bytes.
    #[arg(long, env = "TORUD_MAX_KV_KEY_BYTES", default_value_t = DEFAULTS.bridge.max_key as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_kv_key_bytes: u32,
    /// Longest KV value accepted, in bytes.
    #[arg(long, env = "TORUD_MAX_KV_VALUE_BYTES", default_value_t = DEFAULTS.bridge.max_value as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_kv_value_bytes: u32,
    /// Longest line of plugin output kept as one log record; longer lines are split into
    /// continued records.
    #[arg(long, env = "TORUD_MAX_LOG_LINE_BYTES", default_value_t = DEFAULTS.max_log_line as u32, value_parser = clap::value_parser!(u32).range(16..))]
    max_log_line_bytes: u32,
    /// Most bytes a plugin's `--metadata` may print.
    #[arg(long, env = "TORUD_MAX_METADATA_BYTES", default_value_t = DEFAULTS.max_metadata_bytes as u32, value_parser = clap::value_parser!(u32).range(64..))]
    max_metadata_bytes: u32,
    /// Address-space limit (RLIMIT_AS) of every plugin process, in bytes; 0 inherits the
    /// daemon's.
    #[arg(long, env = "TORUD_PLUGIN_MAX_ADDRESS_SPACE", default_value_t = inherit_as_zero(DEFAULTS.plugin_limits.address_space))]
    plugin_max_address_space: u64,
    /// Open-file limit (RLIMIT_NOFILE) of every plugin process; 0 inherits the daemon's.
    #[arg(long, env = "TORUD_PLUGIN_MAX_OPEN_FILES", default_value_t = inherit_as_zero(DEFAULTS.plugin_limits.open_files))]
    plugin_max_open_files: u64,
    /// Process limit (RLIMIT_NPROC, counted per user, not enforced for root) of every
    /// plugin process; 0 inherits the daemon's.
    #[arg(long, env = "TORUD_PLUGIN_MAX_PROCESSES", default_value_t = inherit_as_zero(DEFAULTS.plugin_limits.processes))]
    plugin_max_processes: u64,
    /// Pin a plugin's binary: ID=SHA256 (hex). A plugin whose binary has another hash is
    /// refused at start. Repeat for several plugins.
    #[arg(long = "pin", env = "TORUD_PINS", value_delimiter = ',', value_parser = parse_pin)]
    pins: Vec<(String, String)>,
    /// Keys one plugin may keep in its durable storage.
    #[arg(long, env = "TORUD_STORAGE_MAX_KEYS", default_value_t = DEFAULTS.storage_quotas.max_keys, value_parser = clap::value_parser!(u64).range(1..))]
    storage_max_keys: u64,
    /// Bytes (keys plus values) one plugin may keep in its durable storage.
    #[arg(long, env = "TORUD_STORAGE_MAX_BYTES", default_value_t = DEFAULTS.storage_quotas.max_bytes, value_parser = clap::value_parser!(u64).range(1..))]
    storage_max_bytes: u64,
    /// Uids (with equal gids) for plugins' own users when the daemon runs as root:
    /// FIRST-LAST. The first is used by `--metadata` probes; each plugin gets one of the
    /// others, kept in <data-dir>/users.json.
    #[arg(long, env = "TORUD_PLUGIN_UID_RANGE", default_value = torud::plugin::isolation::users::DEFAULT_UID_RANGE)]
    plugin_uid_range: torud::plugin::isolation::UidRange,
    /// Run a plugin as a given user instead of its own dynamic one: ID=USER or ID=UID
    /// (`root` only when named like this, for plugins that manage the system). Repeat for
    /// several plugins.
    #[arg(long = "plugin-user", env = "TORUD_PLUGIN_USERS", value_delimiter = ',', value_parser = torud::plugin::isolation::users::parse_plugin_user)]
    plugin_users: Vec<(String, torud::plugin::isolation::UserChoice)>,
    /// Log filter for the daemon's own logs (stderr), e.g. `info` or `torud=debug`.
    #[arg(long, env = "TORUD_LOG", default_value = DEFAULT_LOG_FILTER)]
    log: String,
}

/// Raises the soft open-file limit to the hard one: every plugin holds pipes, sockets and a
/// log file of the daemon's, and every v1 request a connection.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("could not raise the open-file limit");
            }
        }
    }
}

/// `ID=SHA256` → (id, lowercase hex).
fn parse_pin(text: &str) -> Result<(String, String), String> {
    let (id, hash) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not ID=SHA256"))?;
    if !toru_plugin_sdk::metadata::is_valid_id(id) {
        return Err(format!("{id:?} is not a plugin id"));
    }
    let hash = hash.trim().to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("the pin of {id} is not a SHA-256 (64 hex digits)"));
    }
    Ok((id.to_owned(), hash))
}

/// Why `torud serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
enum MainError {
    /// The plugins directory could not be created or resolved.
    #[error("plugins directory {path}: {source}")]
    PluginsDir {
        /// The directory as given.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The data directory could not be created or resolved.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory as given.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Tokio's runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The daemon could not serve.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl Flags {
    /// The configuration these flags describe: [`Config::new`]'s defaults with every flag
    /// applied. Creates the plugins and data directories, so that both are absolute.
    fn into_config(self) -> Result<Config, MainError> {
        let plugins_dir =
            absolute_dir(&self.plugins_dir).map_err(|source| MainError::PluginsDir {
                path: self.plugins_dir.clone(),
                source,
            })?;
        let data_dir = absolute_dir(&self.data_dir).map_err(|source| MainError::DataDir {
            path: self.data_dir.clone(),
            source,
        })?;
        let mut config = Config::new(plugins_dir, data_dir);
        config.listen = self.listen;
        config.enable_new_plugins = self.enable_new_plugins;
        config.timing = self.timing();
        config.bridge = self.bridge();
        config.log_segment_bytes = self.log_segment_bytes;
        config.log_segments = self.log_segments as usize;
        config.max_log_line = self.max_log_line_bytes as usize;
        config.max_metadata_bytes = self.max_metadata_bytes as usize;
        config.grpc = GrpcLimits {
            max_message_bytes: self.max_message_bytes as usize,
            max_concurrent_streams: self.max_concurrent_streams,
        };
        config.plugin_limits = self.plugin_limits();
        config.storage_quotas.max_keys = self.storage_max_keys;
        config.storage_quotas.max_bytes = self.storage_max_bytes;
        config.plugin_uid_range = self.plugin_uid_range;
        config.security = self.security(&config.data_dir);
        config
            .plugin_env_allowlist
            .extend(self.plugin_env.into_iter().filter(|name| !name.is_empty()));
        config.pins = self.pins.into_iter().collect();
        config.plugin_users = self.plugin_users.into_iter().collect();
        Ok(config)
    }

    fn timing(&self) -> Timing {
        Timing {
            metadata_timeout: self.metadata_timeout.into(),
            start_timeout: self.start_timeout.into(),
            backoff_base: self.backoff_base.into(),
            backoff_max: self.backoff_max.into(),
            max_failures: self.max_failures,
            stable_window: self.stable_window.into(),
            stop_grace: self.stop_grace.into(),
            kill_grace: self.kill_grace.into(),
            health_interval: Duration::from(self.health_interval).max(MIN_HEALTH_INTERVAL),
        }
    }

    fn bridge(&self) -> BridgeConfig {
        BridgeConfig {
            kv_timeout: self.kv_timeout.into(),
            call_timeout: self.call_timeout.into(),
            max_frame: self.max_frame_bytes as usize,
            max_in_flight: self.max_in_flight as usize,
            max_key: self.max_kv_key_bytes as usize,
            max_value: self.max_kv_value_bytes as usize,
        }
    }

    /// The rlimits; a flag's 0 inherits the daemon's.
    fn plugin_limits(&self) -> PluginLimits {
        let limit = |v: u64| (v > 0).then_some(v);
        PluginLimits {
            address_space: limit(self.plugin_max_address_space),
            open_files: limit(self.plugin_max_open_files),
            processes: limit(self.plugin_max_processes),
        }
    }

    /// Tokens (a value in the environment before a file, a generated file in `data_dir`
    /// otherwise) and TLS.
    fn security(&self, data_dir: &Path) -> SecurityConfig {
        SecurityConfig {
            admin_token: token_source(
                "TORUD_ADMIN_TOKEN",
                self.admin_token_file.clone(),
                data_dir.join(ADMIN_TOKEN_FILE),
            ),
            read_token: token_source(
                "TORUD_READ_TOKEN",
                self.read_token_file.clone(),
                data_dir.join(READ_TOKEN_FILE),
            ),
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                }),
                _ => None,
            },
            insecure_plaintext_non_loopback: self.insecure_plaintext_non_loopback,
        }
    }
}

/// Where a token comes from: the environment variable `value_env` holding it, else `file`,
/// else a file generated at `generated`.
fn token_source(value_env: &str, file: Option<PathBuf>, generated: PathBuf) -> TokenSource {
    match (
        std::env::var(value_env).ok().filter(|v| !v.is_empty()),
        file,
    ) {
        (Some(value), _) => TokenSource::Value(value),
        (None, Some(file)) => TokenSource::File(file),
        (None, None) => TokenSource::Generated(generated),
    }
}

/// A limit as its flag writes it: 0 for "inherit the daemon's".
fn inherit_as_zero(limit: Option<u64>) -> u64 {
    limit.unwrap_or(0)
}

fn absolute_dir(path: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(path)?;
    path.canonicalize()
}

/// Every file and directory the daemon (or `plugin check`) creates is its own alone,
/// whatever umask it was started with; plugins inherit this umask too.
fn restrict_umask() {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
}

/// The daemon's own logs go to stderr, filtered by `--log` (`info` when it cannot be
/// read).
fn init_logging(filter: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();
}

/// Runs the daemon on a multi-threaded runtime until SIGTERM or SIGINT.
fn serve(config: Config) -> Result<(), MainError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        torud::api::server::run(config, shutdown, |addr| {
            println!("torud listening on {addr}");
        })
        .await
    })?;
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT. Installed before anything listens, so a
/// SIGTERM right after start-up still stops the daemon gracefully.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return Err(ServeError::Signals);
    };
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn main() -> ExitCode {
    restrict_umask();
    let flags = match Cli::parse().command {
        Command::Serve(flags) => flags,
        Command::Plugin(PluginCommand::Check { path, timeout }) => {
            return check::run_cli(check::CheckOptions { path, timeout })
        }
    };
    init_logging(&flags.log);
    let result = flags.into_config().and_then(|config| {
        raise_open_file_limit();
        serve(config)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("torud: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn serve_flags(args: &[&str]) -> Flags {
        let args = ["torud", "serve"].iter().chain(args);
        match Cli::try_parse_from(args).unwrap().command {
            Command::Serve(flags) => flags,
            Command::Plugin(_) => unreachable!("serve was parsed"),
        }
    }

    #[test]
    fn the_flags_are_well_formed() {
        Cli::command().debug_assert();
    }

    /// Each default goes through its flag's text and parser; what comes out must be the
    /// configuration's default again.
    #[test]
    fn without_flags_the_configuration_is_the_default() {
        let flags = serve_flags(&[]);
        let want = Config::default();
        assert_eq!(flags.listen, want.listen);
        assert_eq!(flags.plugins_dir, want.plugins_dir);
        assert_eq!(flags.data_dir, want.data_dir);
        assert_eq!(
            format!("{:?}", flags.timing()),
            format!("{:?}", want.timing)
        );
        assert_eq!(
            format!("{:?}", flags.bridge()),
            format!("{:?}", want.bridge)
        );
        assert_eq!(flags.plugin_limits(), want.plugin_limits);
        assert_eq!(flags.log_segment_bytes, want.log_segment_bytes);
        assert_eq!(flags.log_segments as usize, want.log_segments);
        assert_eq!(flags.max_log_line_bytes as usize, want.max_log_line);
        assert_eq!(flags.max_metadata_bytes as usize, want.max_metadata_bytes);
        assert_eq!(
            flags.max_message_bytes as usize,
            want.grpc.max_message_bytes
        );
        assert_eq!(
            flags.max_concurrent_streams,
            want.grpc.max_concurrent_streams
        );
        assert_eq!(flags.storage_max_keys, want.storage_quotas.max_keys);
        assert_eq!(flags.storage_max_bytes, want.storage_quotas.max_bytes);
        assert_eq!(flags.plugin_uid_range, want.plugin_uid_range);
    }

    #[test]
    fn flags_override_the_defaults() {
        let flags = serve_flags(&[
            "--stable-window",
            "90s",
            "--health-interval",
            "1ms",
            "--plugin-max-processes",
            "64",
            "--plugin-max-open-files",
            "0",
            "--max-kv-key-bytes",
            "100",
        ]);
        let timing = flags.timing();
        assert_eq!(timing.stable_window, Duration::from_secs(90));
        assert_eq!(timing.health_interval, MIN_HEALTH_INTERVAL);
        let limits = flags.plugin_limits();
        assert_eq!((limits.processes, limits.open_files), (Some(64), None));
        assert_eq!(flags.bridge().max_key, 100);
    }
}
