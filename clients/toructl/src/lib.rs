//! `toructl`: the operator's command line for `torud`. Parses flags (address and
//! credentials also from `TORUD_ADDR`, `TORUD_TOKEN`, `TORUD_DATA_DIR`), connects, runs one
//! command from `commands.rs`, and prints any error as one line on stderr with a non-zero
//! exit status.

mod commands;
mod config;
mod connect;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "toructl",
    version,
    args_override_self = true,
    about = "Controls a torud daemon: plugins, KV, calls, logs, events, health, config",
    after_help = "The daemon is found by --addr, else TORUD_ADDR, else the control socket \
                  <data-dir>/torud.sock when it exists, else 127.0.0.1:50051. The token is \
                  --token, else TORUD_TOKEN, else <data-dir>/admin.token (TCP only)."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Flags every command takes.
#[derive(Args)]
struct Global {
    /// Daemon address: host:port, https://host:port (TLS), or unix:PATH for its control
    /// socket.
    #[arg(long, global = true, env = "TORUD_ADDR")]
    addr: Option<String>,
    /// Bearer token (admin or read-only).
    #[arg(long, global = true, env = "TORUD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The daemon's data directory: its control socket and admin.token are used from there.
    #[arg(long, global = true, env = "TORUD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// CA certificate (PEM) that signed the daemon's, for https:// addresses.
    #[arg(long, global = true, env = "TORUCTL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for daemons that require one (with --tls-key).
    #[arg(long, global = true, env = "TORUCTL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM), with --tls-cert.
    #[arg(long, global = true, env = "TORUCTL_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Output,
    /// Timeout of each request (streams have none).
    #[arg(long, global = true, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// How answers are printed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables and lines for people.
    Table,
    /// JSON: one document per answer, one object per line for streams.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Plugins: list, inspect, enable, disable, restart, rescan.
    #[command(subcommand)]
    Plugins(PluginsCmd),
    /// A plugin's key-value space.
    #[command(subcommand)]
    Kv(KvCmd),
    /// Sends an HTTP-style call to a plugin and prints its answer.
    Call(CallArgs),
    /// Plugin logs: stored records, then (with -f) new ones as they come.
    Logs(LogsArgs),
    /// Lifecycle events, then (with -f) new ones as they come.
    Events(EventsArgs),
    /// Standard health checks of the daemon and plugins; exits 1 when a named plugin is
    /// not serving.
    Health(HealthArgs),
    /// The daemon's configuration: show the one in force, reload it from its file.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// The daemon itself: upgrade it in place.
    #[command(subcommand)]
    Daemon(DaemonCmd),
}

#[derive(Subcommand)]
enum DaemonCmd {
    /// Hands the daemon over to a new binary (or the one it was started from, replaced by
    /// a package upgrade) without restarting a plugin; waits for the outcome. Exits 1 when
    /// the new binary failed its check or could not take over (the daemon then goes on as
    /// it was).
    Upgrade {
        /// The new binary's absolute path on the daemon's host (default: the path the
        /// daemon was started from).
        #[arg(long)]
        binary: Option<String>,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Prints the configuration in force as TOML (secrets redacted) and the file it reads.
    Show,
    /// Reloads the daemon's config file and says what needs a restart to pick it up. An
    /// invalid file changes nothing: the error names its line and key, and the exit status
    /// is 1 (as when a restart fails).
    Reload {
        /// Also restart the plugins whose process keeps changed settings.
        #[arg(long)]
        restart: bool,
    },
}

#[derive(Subcommand)]
enum PluginsCmd {
    /// Lists every plugin with its state (and files that were skipped).
    List,
    /// Shows one plugin in detail.
    Get {
        /// Plugin id.
        id: String,
    },
    /// Enables a plugin; returns once it is running (or says why it is not).
    Enable {
        /// Plugin id.
        id: String,
    },
    /// Disables a plugin; returns once its process is gone.
    Disable {
        /// Plugin id.
        id: String,
    },
    /// Restarts an enabled plugin.
    Restart {
        /// Plugin id.
        id: String,
    },
    /// Reads the plugins directory again.
    Rescan,
}

#[derive(Subcommand)]
enum KvCmd {
    /// Prints a key's value; exits 1 when the key does not exist.
    Get {
        /// Plugin id.
        id: String,
        /// Key.
        key: String,
    },
    /// Sets a key.
    Set {
        /// Plugin id.
        id: String,
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Deletes a key.
    Delete {
        /// Plugin id.
        id: String,
        /// Key.
        key: String,
    },
}

/// Arguments of `call`.
#[derive(Args)]
pub struct CallArgs {
    /// Plugin id.
    pub id: String,
    /// Path with query string, e.g. /items?limit=5.
    pub path: String,
    /// HTTP method.
    #[arg(short = 'X', long, default_value = "GET")]
    pub method: String,
    /// A header, "name: value" (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// The request body.
    #[arg(short, long, conflicts_with = "data_file")]
    pub data: Option<String>,
    /// Read the request body from this file ("-" for stdin).
    #[arg(long)]
    pub data_file: Option<PathBuf>,
}

/// Arguments of `logs`.
#[derive(Args)]
pub struct LogsArgs {
    /// Plugins (none: every plugin).
    pub ids: Vec<String>,
    /// Keep following new records.
    #[arg(short, long)]
    pub follow: bool,
    /// Start with the last N records of each plugin (default 20 unless --since or --after).
    #[arg(long, conflicts_with_all = ["since", "after"])]
    pub tail: Option<u32>,
    /// Start at a time: RFC 3339 (2026-01-02T03:04:05Z) or an age (10m, 2h).
    #[arg(long, conflicts_with = "after")]
    pub since: Option<String>,
    /// Resume right after a cursor from `-o json` output (repeatable, one per plugin).
    #[arg(long)]
    pub after: Vec<String>,
    /// Lowest level shown: trace, debug, info, warn, error.
    #[arg(long)]
    pub level: Option<String>,
    /// Only records whose message contains this text.
    #[arg(long)]
    pub grep: Option<String>,
}

/// Arguments of `events`.
#[derive(Args)]
pub struct EventsArgs {
    /// Plugins (none: every plugin).
    pub ids: Vec<String>,
    /// Keep following new events.
    #[arg(short, long)]
    pub follow: bool,
    /// Start after this event seq (default 0: every event kept).
    #[arg(long, default_value_t = 0)]
    pub after: u64,
}

/// Arguments of `health`.
#[derive(Args)]
pub struct HealthArgs {
    /// Plugins to check (none: the daemon and every plugin, exit 0 if the daemon serves).
    pub ids: Vec<String>,
}

/// Runs `toructl` with the process's arguments; the exit code says how it went.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("toructl: error: {}", render::escape(&message));
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    let settings = connect::Settings {
        addr: cli.global.addr,
        token: cli.global.token,
        data_dir: cli.global.data_dir,
        tls: connect::TlsFiles {
            ca: cli.global.tls_ca,
            cert: cli.global.tls_cert,
            key: cli.global.tls_key,
        },
    };
    let resolved = connect::resolve(&settings)?;
    let conn = connect::Conn::open(&resolved, &settings.tls, cli.global.timeout).await?;
    let out = cli.global.output;
    use commands as c;
    match cli.command {
        Command::Plugins(cmd) => match cmd {
            PluginsCmd::List => c::plugins_list(&conn, out).await,
            PluginsCmd::Get { id } => c::plugins_get(&conn, out, id).await,
            PluginsCmd::Enable { id } => c::plugins_enable(&conn, out, id).await,
            PluginsCmd::Disable { id } => c::plugins_disable(&conn, out, id).await,
            PluginsCmd::Restart { id } => c::plugins_restart(&conn, out, id).await,
            PluginsCmd::Rescan => c::plugins_rescan(&conn, out).await,
        },
        Command::Kv(cmd) => match cmd {
            KvCmd::Get { id, key } => c::kv_get(&conn, out, id, key).await,
            KvCmd::Set { id, key, value } => c::kv_set(&conn, out, id, key, value).await,
            KvCmd::Delete { id, key } => c::kv_delete(&conn, out, id, key).await,
        },
        Command::Call(args) => c::call(&conn, out, args).await,
        Command::Logs(args) => c::logs(&conn, out, args).await,
        Command::Events(args) => c::events(&conn, out, args).await,
        Command::Health(args) => c::health(&conn, out, args).await,
        Command::Config(ConfigCmd::Show) => config::show(&conn, out).await,
        Command::Config(ConfigCmd::Reload { restart }) => config::reload(&conn, out, restart).await,
        Command::Daemon(DaemonCmd::Upgrade { binary, wait }) => {
            c::daemon_upgrade(&conn, out, binary, wait).await
        }
    }
}
