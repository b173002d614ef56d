//! Plugin discovery by the Toru rules: `*.binary` executables in the plugins directory, each
//! run once with `--metadata` (with a timeout and an output cap), the metadata validated.
//!
//! Every file is probed concurrently and reported as soon as its probe ends, so a plugin
//! that hangs on `--metadata` delays nobody else. Files that resolve outside the plugins
//! directory, are not executable, have a control character in their name (it would reach
//! terminals and logs), or misbehave are reported as skipped with a reason.
//! Each outcome carries the file's identity from before its probe, and `recheck` probes one
//! file again before a start to confirm it still declares its id. Which of several files
//! declaring one id is used is the supervisor's rule, not this module's.
//! This module knows nothing of supervision or of gRPC.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use toru_plugin_sdk::Metadata;

use crate::model::PluginSpec;
use crate::plugin::process::Launch;
use crate::plugin::process::PluginLimits;
use crate::plugin::process::{plugin_command, signal_group, Confinement, Credentials};
use crate::plugin::spawn::Stdio;

/// Stderr kept from a failed `--metadata` run, for the reason.
const MAX_METADATA_STDERR: usize = 2048;
/// Suffix of plugin executables.
pub const PLUGIN_SUFFIX: &str = ".binary";

/// A file in the plugins directory that was not loaded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// Why, and what to do.
    pub reason: String,
}

/// The outcome of probing one file.
pub type Probe = Result<PluginSpec, Skipped>;

/// How to probe.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Longest a `--metadata` run may take.
    pub timeout: Duration,
    /// Environment variables passed through.
    pub env_allowlist: Vec<String>,
    /// Most bytes `--metadata` may print.
    pub max_bytes: usize,
    /// Resource limits of the `--metadata` process.
    pub limits: PluginLimits,
    /// The user the `--metadata` process runs as (`None`: the daemon's).
    pub run_as: Option<Credentials>,
    /// Hide the data directory from the `--metadata` process (a daemon that is not root).
    pub hide: Option<crate::plugin::isolation::sandbox::Hide>,
    /// Where each `--metadata` process gets a cgroup of its own, killed whole when the probe
    /// ends, so nothing it started (a `setsid()` grandchild) outlives it.
    pub cgroups: Option<crate::plugin::isolation::CgroupRoot>,
}

impl ProbeOptions {
    /// The options the configuration sets.
    pub fn from_config(
        config: &crate::config::Config,
        isolation: &crate::plugin::isolation::Isolation,
    ) -> Self {
        ProbeOptions {
            timeout: config.timing.metadata_timeout,
            env_allowlist: config.plugin_env_allowlist.clone(),
            max_bytes: config.max_metadata_bytes,
            limits: config.plugin_limits.clone(),
            run_as: isolation.probe_credentials(),
            hide: isolation.probe_hide(config),
            cgroups: isolation.cgroups().cloned(),
        }
    }
}

/// What tells one version of a file from another without reading it: device, inode, size,
/// and modification and status-change times. A file rewritten in place changes its times, a
/// file replaced by a rename changes its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    /// The identity of the file `path` resolves to.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Probes `path` again, right before a start, and checks that it still declares `id`.
/// Returns the file's identity as it was before the probe (a later change makes it differ
/// again), or why the file may not be started as `id`.
pub async fn recheck(
    dir: &Path,
    path: &Path,
    id: &str,
    opts: ProbeOptions,
) -> Result<FileIdentity, Recheck> {
    let failed = |reason: String| {
        Recheck::Failed(format!(
            "re-checking {} before starting it: {reason}",
            path.display()
        ))
    };
    let identity = FileIdentity::of(path).map_err(|e| failed(e.to_string()))?;
    let dir = dir.canonicalize().map_err(|e| failed(e.to_string()))?;
    let spec = probe(dir, path.to_owned(), opts)
        .await
        .map_err(|skipped| failed(skipped.reason))?;
    if spec.metadata.id != id {
        return Err(Recheck::OtherId(format!(
            "{} now declares id {:?}, not {id:?}; refusing to start it as {id:?}: restore the \
             file, or run RescanPlugins to load it under its new id",
            path.display(),
            spec.metadata.id
        )));
    }
    Ok(identity)
}

/// Why a re-checked file may not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    /// It now declares another id (the reason says which).
    OtherId(String),
    /// It could not be probed (the reason says why).
    Failed(String),
}

/// Lists the candidate files of `dir`, sorted by name.
pub fn candidates(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(PLUGIN_SUFFIX) && n.len() > PLUGIN_SUFFIX.len())
        })
        .collect();
    files.sort();
    Ok(files)
}

/// One file's probe outcome, with the identity the file had before the probe (a change
/// during or after the probe makes it differ, so a start checks the file again).
pub type Scanned = (Probe, Option<FileIdentity>);

/// Probes every candidate of `dir` concurrently, sending each outcome as soon as it is known.
/// Returns the candidate files and the channel of outcomes, which closes when all are done.
pub fn scan(
    dir: &Path,
    opts: ProbeOptions,
) -> std::io::Result<(Vec<PathBuf>, mpsc::UnboundedReceiver<Scanned>)> {
    let canonical_dir = dir.canonicalize()?;
    let files = candidates(&canonical_dir)?;
    let listed = files.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut probes: FuturesUnordered<_> = files
            .into_iter()
            .map(|path| {
                let identity = FileIdentity::of(&path).ok();
                let probed = probe(canonical_dir.clone(), path, opts.clone());
                async move { (probed.await, identity) }
            })
            .collect();
        while let Some(outcome) = probes.next().await {
            if tx.send(outcome).is_err() {
                break;
            }
        }
    });
    Ok((listed, rx))
}

/// Checks one file and runs it with `--metadata`.
pub async fn probe(dir: PathBuf, path: PathBuf, opts: ProbeOptions) -> Probe {
    let skip = |reason: String| Skipped {
        path: path.clone(),
        reason,
    };
    if let Some((at, c)) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(toru_plugin_sdk::metadata::first_control_char)
    {
        return Err(skip(format!(
            "its file name contains the control character U+{:04X} at character {at}, which would reach terminals and logs; rename the file",
            c as u32
        )));
    }
    let real = path
        .canonicalize()
        .map_err(|e| skip(format!("cannot resolve the file: {e}")))?;
    if !real.starts_with(&dir) {
        return Err(skip(format!(
            "it resolves to {}, outside the plugins directory; copy the executable into the directory instead of linking to it",
            real.display()
        )));
    }
    let meta = std::fs::metadata(&real).map_err(|e| skip(format!("cannot stat the file: {e}")))?;
    if !meta.is_file() {
        return Err(skip("it is not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(skip(format!(
            "it is not executable; run chmod +x {}",
            path.display()
        )));
    }
    let probe_user = "; --metadata runs as the first uid of --plugin-uid-range";
    if let Some(reason) = crate::plugin::isolation::unreachable(&real, opts.run_as, probe_user) {
        return Err(skip(reason));
    }
    let stdout = run_metadata(&path, &opts).await.map_err(skip)?;
    let metadata = Metadata::parse(&stdout).map_err(|e| skip(format!("invalid metadata: {e}")))?;
    Ok(PluginSpec {
        metadata,
        binary_path: path,
    })
}

/// How long the processes a `--metadata` probe left in its cgroup may take to die.
const PROBE_KILL_LIMIT: Duration = Duration::from_secs(2);

/// A cgroup name for one probe that no plugin id can take (ids have no `_`).
fn probe_cgroup_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("probe_{n}")
}

/// Runs `path --metadata` and returns its stdout, or why it failed.
async fn run_metadata(path: &Path, opts: &ProbeOptions) -> Result<Vec<u8>, String> {
    let sandbox = opts
        .hide
        .as_ref()
        .map(|hide| hide.sandbox())
        .transpose()
        .map_err(|e| format!("cannot prepare the sandbox of --metadata: {e}"))?;
    let mut cgroup = match &opts.cgroups {
        Some(root) => Some(
            root.plugin(&probe_cgroup_name())
                .await
                .map_err(|e| format!("cannot make a cgroup for --metadata: {e}"))?,
        ),
        None => None,
    };
    let confinement = Confinement {
        sandbox,
        cgroup_procs: cgroup.as_mut().and_then(|c| c.take_procs()),
        ..Confinement::user(opts.run_as)
    };
    // The probe is not the plugin's run: none of its own arguments, environment or directory.
    let mut cmd = plugin_command(
        path,
        &opts.env_allowlist,
        &Launch::default(),
        &[] as &[(&str, OsString)],
        &opts.limits,
        confinement,
    );
    cmd.arg("--metadata")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run it with --metadata: {e}"))?;
    let pid = child.id().unwrap_or(0);
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let work = async {
        let (out, err, status) = tokio::join!(
            read_capped(&mut stdout, opts.max_bytes),
            read_capped(&mut stderr, MAX_METADATA_STDERR),
            child.wait()
        );
        (out, err, status)
    };
    let outcome = tokio::time::timeout(opts.timeout, work).await;
    signal_group(pid, libc::SIGKILL);
    if let Some(cgroup) = cgroup {
        cgroup.kill_all(PROBE_KILL_LIMIT).await;
    }
    let (out, err, status) = match outcome {
        Ok(done) => done,
        Err(_) => {
            return Err(format!(
                "it did not answer --metadata within {:?}; it must print its metadata and exit",
                opts.timeout
            ))
        }
    };
    let status = status.map_err(|e| format!("waiting for --metadata failed: {e}"))?;
    let stderr_text = String::from_utf8_lossy(&err.0).trim().to_owned();
    if !status.success() {
        return Err(format!(
            "--metadata {}{}",
            crate::model::ExitStatus::from_std(status),
            if stderr_text.is_empty() {
                String::new()
            } else {
                format!("; stderr: {stderr_text}")
            }
        ));
    }
    let (bytes, overflow) = out;
    if overflow {
        return Err(format!(
            "--metadata printed more than {} bytes (see --max-metadata-bytes)",
            opts.max_bytes
        ));
    }
    Ok(bytes)
}

/// Reads to the end, keeping at most `cap` bytes; reports whether more came.
async fn read_capped<R: AsyncRead + Unpin>(reader: &mut R, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut overflow = false;
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                overflow |= n > room;
            }
        }
    }
    (kept, overflow)
}
