//! The `torud` binary: parses flags (each with a `TORUD_*` environment equivalent), sets up
//! logging and signals, and hands over to [`torud::api::server::run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use torud::config::{
    Config, PluginLimits, Timing, TlsFiles, TokenSource, ADMIN_TOKEN_FILE, DEFAULT_PLUGIN_ENV,
    READ_TOKEN_FILE,
};

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
    Serve(ServeArgs),
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

/// Flags of `torud serve`; a flag given twice takes its last value.
#[derive(Args)]
#[command(args_override_self = true)]
struct ServeArgs {
    /// Address of the gRPC control plane (port 0 picks a free port).
    #[arg(long, env = "TORUD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory scanned for `*.binary` plugin executables (created if missing).
    #[arg(long, env = "TORUD_PLUGINS_DIR", default_value = "./plugins")]
    plugins_dir: PathBuf,
    /// Directory for state, events, logs, sockets and plugin data (created if missing).
    #[arg(long, env = "TORUD_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Enable plugins that have no saved enabled/disabled state yet (first discovery).
    #[arg(long, env = "TORUD_ENABLE_NEW_PLUGINS")]
    enable_new_plugins: bool,
    /// Longest a plugin may take to answer `--metadata`.
    #[arg(long, env = "TORUD_METADATA_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    metadata_timeout: Duration,
    /// Longest a plugin may take from spawn to ready (socket accepting, init sent).
    #[arg(long, env = "TORUD_START_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    start_timeout: Duration,
    /// First restart delay after a failure; doubles with each consecutive failure.
    #[arg(long, env = "TORUD_BACKOFF_BASE", default_value = "1s", value_parser = humantime::parse_duration)]
    backoff_base: Duration,
    /// Largest restart delay.
    #[arg(long, env = "TORUD_BACKOFF_MAX", default_value = "16s", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// Consecutive failed runs after which a plugin is disabled ("crash loop").
    #[arg(long, env = "TORUD_MAX_FAILURES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    max_failures: u32,
    /// A run that stays up this long resets the consecutive failure count.
    #[arg(long, env = "TORUD_STABLE_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    stable_window: Duration,
    /// Wait after the shutdown message before SIGTERM.
    #[arg(long, env = "TORUD_STOP_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    stop_grace: Duration,
    /// Wait after SIGTERM before SIGKILL.
    #[arg(long, env = "TORUD_KILL_GRACE", default_value = "2s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// How often the socket of a running v1 plugin is checked for health.
    #[arg(long, env = "TORUD_HEALTH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// Longest a forwarded KV operation waits for the plugin (the caller's deadline may be
    /// shorter).
    #[arg(long, env = "TORUD_KV_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    kv_timeout: Duration,
    /// Longest a forwarded call waits for the plugin (the caller's deadline may be shorter).
    #[arg(long, env = "TORUD_CALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// Largest frame accepted from a plugin, in bytes; a larger one resets its connection.
    #[arg(long, env = "TORUD_MAX_FRAME_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    max_frame_bytes: u32,
    /// Requests in flight to one plugin at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TORUD_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
    /// Size of one segment of a plugin's log, in bytes.
    #[arg(long, env = "TORUD_LOG_SEGMENT_BYTES", default_value_t = 10 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(4096..))]
    log_segment_bytes: u64,
    /// Segments of a plugin's log kept; older ones are deleted.
    #[arg(long, env = "TORUD_LOG_SEGMENTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
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
    #[arg(long, env = "TORUD_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    max_message_bytes: u32,
    /// Concurrent gRPC streams (calls, subscriptions) per client connection.
    #[arg(long, env = "TORUD_MAX_CONCURRENT_STREAMS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_streams: u32,
    /// Longest KV key accepted, in bytes.
    #[arg(long, env = "TORUD_MAX_KV_KEY_BYTES", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    max_kv_key_bytes: u32,
    /// Longest KV value accepted, in bytes.
    #[arg(long, env = "TORUD_MAX_KV_VALUE_BYTES", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_kv_value_bytes: u32,
    /// Longest line of plugin output kept as one log record; longer lines are split into
    /// continued records.
    #[arg(long, env = "TORUD_MAX_LOG_LINE_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(16..))]
    max_log_line_bytes: u32,
    /// Most bytes a plugin's `--metadata` may print.
    #[arg(long, env = "TORUD_MAX_METADATA_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(64..))]
    max_metadata_bytes: u32,
    /// Address-space limit (RLIMIT_AS) of every plugin process, in bytes; 0 inherits the
    /// daemon's.
    #[arg(long, env = "TORUD_PLUGIN_MAX_ADDRESS_SPACE", default_value_t = 32 * 1024 * 1024 * 1024)]
    plugin_max_address_space: u64,
    /// Open-file limit (RLIMIT_NOFILE) of every plugin process; 0 inherits the daemon's.
    #[arg(long, env = "TORUD_PLUGIN_MAX_OPEN_FILES", default_value_t = 4096)]
    plugin_max_open_files: u64,
    /// Process limit (RLIMIT_NPROC, counted per user, not enforced for root) of every
    /// plugin process; 0 inherits the daemon's.
    #[arg(long, env = "TORUD_PLUGIN_MAX_PROCESSES", default_value_t = 0)]
    plugin_max_processes: u64,
    /// Pin a plugin's binary: ID=SHA256 (hex). A plugin whose binary has another hash is
    /// refused at start. Repeat for several plugins.
    #[arg(long = "pin", env = "TORUD_PINS", value_delimiter = ',', value_parser = parse_pin)]
    pins: Vec<(String, String)>,
    /// Keys one plugin may keep in its durable storage.
    #[arg(long, env = "TORUD_STORAGE_MAX_KEYS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    storage_max_keys: u64,
    /// Bytes (keys plus values) one plugin may keep in its durable storage.
    #[arg(long, env = "TORUD_STORAGE_MAX_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    storage_max_bytes: u64,
    /// Uids (with equal gids) for plugins' own users when the daemon runs as root:
    /// FIRST-LAST. The first is used by `--metadata` probes; each plugin gets one of the
    /// others, kept in <data-dir>/users.json.
    #[arg(long, env = "TORUD_PLUGIN_UID_RANGE", default_value = "524288-589823")]
    plugin_uid_range: torud::plugin::isolation::UidRange,
    /// Run a plugin as a given user instead of its own dynamic one: ID=USER or ID=UID
    /// (`root` only when named like this, for plugins that manage the system). Repeat for
    /// several plugins.
    #[arg(long = "plugin-user", env = "TORUD_PLUGIN_USERS", value_delimiter = ',', value_parser = torud::plugin::isolation::users::parse_plugin_user)]
    plugin_users: Vec<(String, torud::plugin::isolation::UserChoice)>,
    /// Log filter for the daemon's own logs (stderr), e.g. `info` or `torud=debug`.
    #[arg(long, env = "TORUD_LOG", default_value = "info")]
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

fn absolute_dir(path: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(path)?;
    path.canonicalize()
}

fn main() -> ExitCode {
    // Every file and directory the daemon (or `plugin check`) creates is its own alone,
    // whatever umask it was started with; plugins inherit this umask too.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Plugin(PluginCommand::Check { path, timeout }) => {
            return torud::plugin::check::run_cli(torud::plugin::check::CheckOptions {
                path,
                timeout,
            })
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let dirs = absolute_dir(&args.plugins_dir)
        .map_err(|e| format!("plugins directory {}: {e}", args.plugins_dir.display()))
        .and_then(|p| {
            absolute_dir(&args.data_dir)
                .map(|d| (p, d))
                .map_err(|e| format!("data directory {}: {e}", args.data_dir.display()))
        });
    let (plugins_dir, data_dir) = match dirs {
        Ok(dirs) => dirs,
        Err(e) => {
            eprintln!("torud: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = Config::new(plugins_dir, data_dir);
    config.listen = args.listen;
    config.enable_new_plugins = args.enable_new_plugins;
    config.timing = Timing {
        metadata_timeout: args.metadata_timeout,
        start_timeout: args.start_timeout,
        backoff_base: args.backoff_base,
        backoff_max: args.backoff_max,
        max_failures: args.max_failures,
        stable_window: args.stable_window,
        stop_grace: args.stop_grace,
        kill_grace: args.kill_grace,
        health_interval: args.health_interval.max(Duration::from_millis(10)),
    };
    config.log_segment_bytes = args.log_segment_bytes;
    config.log_segments = args.log_segments as usize;
    config.bridge.kv_timeout = args.kv_timeout;
    config.bridge.call_timeout = args.call_timeout;
    config.bridge.max_frame = args.max_frame_bytes as usize;
    config.bridge.max_in_flight = args.max_in_flight as usize;
    config.plugin_env_allowlist = DEFAULT_PLUGIN_ENV
        .iter()
        .map(|s| s.to_string())
        .chain(args.plugin_env.into_iter().filter(|s| !s.is_empty()))
        .collect();

    let token = |value_env: &str, file: Option<PathBuf>, generated: &str| match (
        std::env::var(value_env).ok().filter(|v| !v.is_empty()),
        file,
    ) {
        (Some(value), _) => TokenSource::Value(value),
        (None, Some(file)) => TokenSource::File(file),
        (None, None) => TokenSource::Generated(config.data_dir.join(generated)),
    };
    config.security.admin_token =
        token("TORUD_ADMIN_TOKEN", args.admin_token_file, ADMIN_TOKEN_FILE);
    config.security.read_token = token("TORUD_READ_TOKEN", args.read_token_file, READ_TOKEN_FILE);
    config.security.tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca,
        }),
        _ => None,
    };
    config.security.insecure_plaintext_non_loopback = args.insecure_plaintext_non_loopback;
    config.grpc.max_message_bytes = args.max_message_bytes as usize;
    config.grpc.max_concurrent_streams = args.max_concurrent_streams;

    config.bridge.max_key = args.max_kv_key_bytes as usize;
    config.bridge.max_value = args.max_kv_value_bytes as usize;
    config.max_log_line = args.max_log_line_bytes as usize;
    config.max_metadata_bytes = args.max_metadata_bytes as usize;
    let limit = |v: u64| (v > 0).then_some(v);
    config.plugin_limits = PluginLimits {
        address_space: limit(args.plugin_max_address_space),
        open_files: limit(args.plugin_max_open_files),
        processes: limit(args.plugin_max_processes),
    };
    config.pins = args.pins.into_iter().collect();
    config.storage_quotas.max_keys = args.storage_max_keys;
    config.storage_quotas.max_bytes = args.storage_max_bytes;
    config.plugin_uid_range = args.plugin_uid_range;
    config.plugin_users = args.plugin_users.into_iter().collect();

    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("torud: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed before anything listens, so a SIGTERM right after start-up still
        // stops the daemon gracefully.
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return Err(torud::api::server::ServeError::Signals);
        };
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        };
        torud::api::server::run(config, shutdown, |addr| {
            println!("torud listening on {addr}");
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("torud: error: {e}");
            ExitCode::FAILURE
        }
    }
}
