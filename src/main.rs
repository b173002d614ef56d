//! The `torud` binary: parses flags (each with a `TORUD_*` environment equivalent), sets up
//! logging and signals, and hands over to [`torud::api::server::run`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use torud::api::server::{Ending, ServeError, Start};
use torud::api::upgrade::{self, Fallback, Received, SelfExe, Unreadable};
#[cfg(test)]
use torud::config::MIN_HEALTH_INTERVAL;
use torud::config::{Config, ConfigError, Loader, Settings, Source, DEFAULT_LOG_FILTER};
use torud::plugin::check;

/// Log capture allocates a few small strings per line; mimalloc makes that markedly
/// cheaper than the system allocator (measured with `torud-bench logs`). Built without
/// transparent huge pages (`no_thp`): with them, a thousand plugins' small heaps sat in
/// 2 MiB pages (`torud-bench scale`: 335 KiB of RSS per plugin instead of 80).
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

/// `torud serve`'s command line: the config file, and every setting as a flag (each with
/// a `TORUD_*` variable). A flag given twice takes its last value.
#[derive(Args)]
#[command(args_override_self = true)]
struct ServeArgs {
    /// The config file (TOML; keys are these flags' long names, plus `[plugins.<id>]`
    /// sections). Without it, /etc/torud/torud.toml is read if it exists. A flag or
    /// variable wins over the file.
    #[arg(long, env = "TORUD_CONFIG")]
    config: Option<PathBuf>,
    /// Do not serve: check that this binary can take over a running daemon's handover
    /// state (read on stdin, as an upgrade passes it), print the verdict as JSON and exit.
    /// An upgrade runs the new binary so, with the daemon's own flags, before handing over.
    #[arg(long)]
    check_upgrade: bool,
    #[command(flatten)]
    settings: Settings,
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
    /// The configuration could not be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Tokio's runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The daemon could not serve.
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("the upgrade could not execute the new binary, nor the running one again: {0}")]
    Upgrade(std::io::Error),
    #[error("the daemon panicked")]
    Panicked,
}

/// The configuration of `torud serve`: flag > environment > config file > default, with
/// the plugins and data directories created and made absolute; what to warn of; and where
/// it came from, for reloads.
fn load_config(args: ServeArgs) -> Result<(Config, Vec<String>, Source), MainError> {
    // Absolute, so that the file a reload reads and `GetConfig` names is unambiguous.
    let file = args.config.map(|f| std::path::absolute(&f).unwrap_or(f));
    let loader = Loader::new(args.settings, file);
    let loaded = loader.load()?;
    let given = loaded.config;
    let mut config = given.clone();
    config.plugins_dir =
        absolute_dir(&config.plugins_dir).map_err(|source| MainError::PluginsDir {
            path: config.plugins_dir.clone(),
            source,
        })?;
    let data_dir = absolute_dir(&config.data_dir).map_err(|source| MainError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    config.relocate_data_dir(data_dir);
    Ok((config, loaded.warnings, Source { loader, given }))
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

/// The daemon's own logs go to stderr, filtered by `log` (`info` when it cannot be read).
fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("torud: log filter {filter:?} cannot be read ({e}); using {DEFAULT_LOG_FILTER}");
        tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)
    });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
}

/// Runs the daemon on a multi-threaded runtime until SIGTERM or SIGINT (SIGHUP reloads the
/// configuration from `source`).
fn serve(
    config: Config,
    source: Source,
    received: Option<Received>,
    fallback: &Fallback,
) -> Result<(), MainError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    let exe = SelfExe::open()
        .inspect_err(
            |e| tracing::warn!(error = %e, "the running binary cannot be opened: upgrades are off"),
        )
        .ok();
    let ending = runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let start = Start { exe, received };
        torud::api::server::serve(config, source, start, shutdown, |bound| {
            fallback.serving();
            println!("torud listening on {}", bound.grpc);
            if let Some(addr) = bound.metrics {
                println!("torud metrics on http://{addr}/metrics");
            }
        })
        .await
    })?;
    match ending {
        Ending::Stopped => Ok(()),
        // Returns only if neither the new binary nor the running one could be executed.
        Ending::HandOver(handover) => Err(MainError::Upgrade(upgrade::execute(&handover))),
    }
}

/// `torud serve --check-upgrade`: reads the handover state on stdin and prints the verdict.
fn check_upgrade() -> ExitCode {
    use std::io::Read;
    let mut state = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut state) {
        eprintln!("torud: error: cannot read the handover state on stdin: {e}");
        return ExitCode::FAILURE;
    }
    match upgrade::check_state(&state) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("the report serializes")
            );
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("torud: error: {reason}");
            ExitCode::FAILURE
        }
    }
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
    // Before any thread starts: what a handover passed (it leaves the environment).
    let received = Received::take();
    // This thread starts every child and makes a handover's exec (see `plugin::spawn`).
    match torud::plugin::spawn::serve_from_main_thread(move || daemon(received)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("torud: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn daemon(received: Result<Option<Received>, Unreadable>) -> ExitCode {
    let received = match received {
        Ok(received) => received,
        Err(unreadable) => {
            eprintln!(
                "torud: error: cannot take over from the running daemon: {}",
                unreadable.reason
            );
            // Back to the binary that handed over, with everything it passed.
            if let Some(fds) = &unreadable.fds {
                let failed = upgrade::roll_back(fds, &unreadable.reason, None);
                eprintln!("torud: error: cannot execute the previous binary again: {failed}");
            }
            return ExitCode::FAILURE;
        }
    };
    // Until it serves, an image started by a handover can go back to the previous binary.
    let fallback = Fallback::watched(received.as_ref());
    let fail = |reason: String| {
        eprintln!("torud: error: {reason}");
        if let Some(failed) =
            fallback.roll_back(&format!("the new image could not take over: {reason}"))
        {
            eprintln!("torud: error: cannot execute the previous binary again: {failed}");
        }
        ExitCode::FAILURE
    };
    let args = match Cli::try_parse() {
        Ok(Cli {
            command: Command::Serve(args),
        }) => args,
        Ok(Cli {
            command: Command::Plugin(PluginCommand::Check { path, timeout }),
        }) => return check::run_cli(check::CheckOptions { path, timeout }),
        Err(e) if received.is_some() => return fail(e.to_string()),
        Err(e) => e.exit(),
    };
    if args.check_upgrade {
        // The configuration must load, as it would for serving.
        if let Err(e) = load_config(args) {
            eprintln!("torud: error: {e}");
            return ExitCode::FAILURE;
        }
        return check_upgrade();
    }
    let result = load_config(args).and_then(|(config, warnings, source)| {
        init_logging(&config.log_filter);
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        if let Some(received) = &received {
            tracing::info!(from = %received.state.from_version, plugins = received.state.plugins.len(), "taking over from the daemon's earlier image");
        }
        raise_open_file_limit();
        // A panic before this image serves hands back as well.
        let serving = std::panic::AssertUnwindSafe(|| serve(config, source, received, &fallback));
        std::panic::catch_unwind(serving)
            .unwrap_or_else(|_| Err(MainError::Panicked))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn serve_args(args: &[&str]) -> ServeArgs {
        let args = ["torud", "serve"].iter().chain(args);
        match Cli::try_parse_from(args).unwrap().command {
            Command::Serve(args) => args,
            Command::Plugin(_) => unreachable!("serve was parsed"),
        }
    }

    #[test]
    fn the_flags_are_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn without_flags_the_configuration_is_the_default() {
        let config = serve_args(&[]).settings.apply(|_| None).unwrap();
        assert_eq!(config, Config::default());
    }

    /// Each flag's help names its default as `[default: X]`; given as the flag's value, X
    /// must leave the configuration at its default, so the help cannot drift from
    /// [`Config::default`].
    #[test]
    fn the_defaults_the_help_names_are_the_defaults() {
        let command = Cli::command();
        let serve = command.find_subcommand("serve").unwrap();
        let mut checked = 0;
        for arg in serve.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let Some(default) = help
                .split_once("[default: ")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(value, _)| value.to_owned())
            else {
                continue;
            };
            let flag = format!("--{}", arg.get_long().unwrap());
            let config = serve_args(&[&flag, &default])
                .settings
                .apply(|_| None)
                .unwrap_or_else(|e| panic!("{flag} {default}: {e}"));
            // Flags naming a directory move it, and the tokens generated in it.
            let want = Config {
                plugins_dir: config.plugins_dir.clone(),
                data_dir: config.data_dir.clone(),
                security: config.security.clone(),
                ..Config::default()
            };
            assert_eq!(config, want, "{flag}'s help says [default: {default}]");
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} flags name their default");
    }

    /// The README's table of flags names every flag of `torud serve`.
    #[test]
    fn the_readme_lists_every_flag() {
        let readme = include_str!("../README.md");
        let command = Cli::command();
        let serve = command.find_subcommand("serve").unwrap();
        let missing: Vec<String> = serve
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| {
                *long != "help"
                    && !readme.contains(&format!("| `--{long}"))
                    && !readme.contains(&format!(", `--{long}`"))
            })
            .map(str::to_owned)
            .collect();
        assert!(
            missing.is_empty(),
            "README.md's flag table lacks {missing:?}"
        );
    }

    #[test]
    fn flags_override_the_defaults() {
        let config = serve_args(&[
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
            "--enable-new-plugins",
            "--restart",
            "on-failure",
        ])
        .settings
        .apply(|_| None)
        .unwrap();
        assert_eq!(config.timing.stable_window, Duration::from_secs(90));
        assert_eq!(config.timing.health_interval, MIN_HEALTH_INTERVAL);
        let limits = config.plugin_limits;
        assert_eq!((limits.processes, limits.open_files), (Some(64), None));
        assert_eq!(config.bridge.max_key, 100);
        assert!(config.enable_new_plugins);
        assert_eq!(config.restart, torud::config::RestartPolicy::OnFailure);
    }

    #[test]
    fn out_of_range_flags_are_refused() {
        let args = ["torud", "serve", "--max-failures", "0"];
        let e = Cli::try_parse_from(args).err().unwrap().to_string();
        assert!(e.contains("below the smallest value allowed"), "{e}");
    }
}
