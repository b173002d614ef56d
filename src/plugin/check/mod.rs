//! `torud plugin check PATH`: the conformance checker. Runs a plugin executable the way
//! the daemon does — `--metadata`, spawn, connect, `init` — then KV and call round trips,
//! the extensions its protocol version has (ready, heartbeat, cancel, concurrent requests,
//! durable storage), and shutdown, and reports each step (passed, failed with the precise
//! reason, or skipped), what the plugin supports, and the tail of its stderr on failure.
//!
//! It reuses the daemon's own pieces (discovery's probe, the process builder, the
//! environment, `init`→`ready` handshake and `shutdown` of `handshake`, the link, a real
//! storage namespace in a temporary directory), so a plugin that passes here speaks to the
//! daemon the same way. What is its own is the reporting, and the capture of the plugin's
//! output, kept whole in memory to count structured lines and show the last ones.
//! Architecture invariant: it knows nothing of gRPC (of `torud-api` it uses only the text
//! escaping), supervision or the data directory.

mod report;
mod round_trips;
mod run;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use toru_plugin_sdk::{Metadata, PROTOCOL_VERSION};

use crate::config::{PluginLimits, DEFAULT_PLUGIN_ENV};
use crate::plugin::discovery::{probe, ProbeOptions};
use crate::plugin::handshake::Launch;
use crate::plugin::process::Credentials;
use crate::store::storage::{Namespace, Quotas, Storage};

pub use report::{Outcome, Report, Step};

/// How to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The plugin executable.
    pub path: PathBuf,
    /// Longest wait for each step (metadata, start, each answer, exit after shutdown).
    pub timeout: Duration,
}

/// Runs the check from the command line: prints the report, exits 0 only if it conforms.
pub fn run_cli(opts: CheckOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("torud: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(check(&opts));
    print!("{}", report.render(&opts.path));
    if report.failures() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs every step against the plugin at `opts.path`: its metadata, a start the way the
/// daemon starts it, the round trips, shutdown, and what its output shows.
pub async fn check(opts: &CheckOptions) -> Report {
    let mut report = Report::default();
    let limit = opts.timeout;
    let Some(plugin) = read_metadata(&opts.path, limit, &mut report).await else {
        return report;
    };
    let Some(scratch) = Scratch::prepare(&plugin, &mut report) else {
        return report;
    };
    let Some(mut running) = run::spawn(&plugin, &scratch, &mut report) else {
        return report;
    };
    let link = run::start(&plugin, &scratch, &mut running, limit, &mut report).await;
    if let Some(link) = &link {
        round_trips::run(
            &mut report,
            link,
            plugin.protocol(),
            limit,
            scratch.namespace.as_ref(),
        )
        .await;
    }
    run::stop(&mut report, link, &scratch, &mut running, limit).await;
    run::report_output(&mut report, &running.output());
    report
}

/// The plugin under check, as its `--metadata` declared it, and how the daemon would run it.
struct Plugin {
    /// The executable, resolved.
    path: PathBuf,
    /// Its metadata.
    meta: Metadata,
    /// The environment variables it keeps from the checker's (the daemon's default).
    env_allowlist: Vec<String>,
    /// The daemon's default process limits, so a plugin that passes here fits under them.
    limits: PluginLimits,
    /// Run as root, the plugin gets an unprivileged user, as under the daemon.
    run_as: Option<Credentials>,
}

impl Plugin {
    fn protocol(&self) -> u32 {
        self.meta.protocol_version
    }
}

/// The `metadata` step: discovery's probe, as the daemon runs it.
async fn read_metadata(path: &Path, limit: Duration, report: &mut Report) -> Option<Plugin> {
    let path = match path.canonicalize() {
        Ok(p) => p,
        Err(e) => {
            report.add(
                "metadata",
                Outcome::Fail(format!("cannot resolve the file: {e}")),
            );
            return None;
        }
    };
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let env_allowlist: Vec<String> = DEFAULT_PLUGIN_ENV.iter().map(|s| s.to_string()).collect();
    let limits = PluginLimits::default();
    let run_as = crate::plugin::isolation::daemon_is_root()
        .then(|| crate::plugin::isolation::UidRange::default().probe_credentials());
    let probe_opts = ProbeOptions {
        timeout: limit,
        env_allowlist: env_allowlist.clone(),
        max_bytes: crate::config::DEFAULT_MAX_METADATA_BYTES,
        limits: limits.clone(),
        run_as,
        hide: None,
        cgroups: None,
    };
    let meta = match probe(dir, path.clone(), probe_opts).await {
        Ok(spec) => spec.metadata,
        Err(skipped) => {
            report.add("metadata", Outcome::Fail(skipped.reason));
            return None;
        }
    };
    let protocol = meta.protocol_version;
    let newer = if protocol > PROTOCOL_VERSION {
        format!(" (newer than this host's {PROTOCOL_VERSION})")
    } else {
        String::new()
    };
    report.add(
        "metadata",
        Outcome::Pass(format!(
            "id {}, version {}, route {}, protocol {protocol}{newer}",
            meta.id, meta.version, meta.route,
        )),
    );
    report.supports.push(if protocol >= 2 {
        format!("protocol {protocol} (one persistent multiplexed connection)")
    } else {
        "protocol 1 (a connection per message)".to_owned()
    });
    Some(Plugin {
        path,
        meta,
        env_allowlist,
        limits,
        run_as,
    })
}

/// A temporary directory standing in for the daemon's data directory: the plugin's own
/// corner (its data directory and socket) and a real storage namespace.
struct Scratch {
    /// Removed when the check ends.
    tmp: tempfile::TempDir,
    /// The plugin's data directory.
    data_dir: PathBuf,
    /// Where the plugin listens.
    socket: PathBuf,
    /// Kept open for the namespace.
    _storage: Option<Storage>,
    /// The plugin's durable KV, served to its `storage` requests; `None` if it cannot open.
    namespace: Option<Namespace>,
}

impl Scratch {
    /// Makes the directory, handing the plugin's corner to its user; a failure is the
    /// `start` step's.
    fn prepare(plugin: &Plugin, report: &mut Report) -> Option<Scratch> {
        let tmp = match tempfile::Builder::new().prefix("torud-check-").tempdir() {
            Ok(t) => t,
            Err(e) => {
                report.add(
                    "start",
                    Outcome::Fail(format!("cannot make a temporary directory: {e}")),
                );
                return None;
            }
        };
        let own = tmp.path().join("plugin");
        let data_dir = own.join("data");
        let socket = own.join("p.sock");
        if let Err(e) = own_corner(tmp.path(), &data_dir, plugin.run_as) {
            report.add(
                "start",
                Outcome::Fail(format!("cannot prepare {}: {e}", own.display())),
            );
            return None;
        }
        let storage = Storage::open(&tmp.path().join("storage.redb"), Quotas::default()).ok();
        let namespace = storage.as_ref().map(|s| s.namespace(&plugin.meta.id));
        Some(Scratch {
            tmp,
            data_dir,
            socket,
            _storage: storage,
            namespace,
        })
    }

    /// What the plugin is told at start, as the daemon tells it.
    fn launch(&self, id: &str) -> Launch {
        Launch {
            id: id.to_owned(),
            instance_id: INSTANCE_ID.into(),
            socket: self.socket.clone(),
            data_dir: self.data_dir.clone(),
            log_path: self.tmp.path().to_path_buf(),
            home: None,
        }
    }
}

/// Makes `data_dir` and its parent, and hands the parent to `run_as`; the scratch root
/// stays the caller's, traversable.
fn own_corner(root: &Path, data_dir: &Path, run_as: Option<Credentials>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data_dir)?;
    if let Some(who) = run_as {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
        for dir in [data_dir.parent().unwrap_or(data_dir), data_dir] {
            std::os::unix::fs::chown(dir, Some(who.uid), Some(who.gid))?;
        }
    }
    Ok(())
}

/// The instance id the plugin is given.
const INSTANCE_ID: &str = "torud-check";

/// A duration in milliseconds with one decimal, as the report shows it.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
