//! Upgrading the daemon in place: the new binary checked, then the daemon re-executes
//! itself (same pid) and the new image takes over the listeners, every plugin's process,
//! pipes and connection, and the state, so no plugin restarts and no log line is lost.
//!
//! The steps, in order (ARCHITECTURE.md has the invariants):
//! 1. **Check** ([`check`]): `<binary> serve <the daemon's arguments> --check-upgrade`
//!    reads a preview of the state on its stdin and says whether it can take it over. A
//!    binary that fails, hangs past the upgrade timeout, or does not know the state's
//!    format changes nothing: `DAEMON_UPGRADE_FAILED` (stage `check`), and the call fails.
//! 2. **Upgrading**: `DAEMON_UPGRADING` is written and the caller answered. Streams end with
//!    UNAVAILABLE ([`UPGRADING_MESSAGE`]), the servers stop accepting (the listeners stay
//!    open: new connections wait in the backlog) and drain calls in flight (bounded), and
//!    every actor detaches its plugin (`Supervisor::hand_over`).
//! 3. **Exec** (`main.rs`, [`crate::plugin::spawn::exec_handing_over`]): from the spawner
//!    thread, so the plugins' parent-death signal does not fire. The descriptors listed in
//!    `TORUD_HANDOVER_FDS`: the running binary (for a rollback), the listeners, each
//!    plugin's pidfd, pipes and connection, and last the state ([`HandoverState`]) in a
//!    memfd.
//! 4. **Take over** ([`Received`]): the new image reads the state, checks its format and
//!    every pidfd, and serves with what it was given; once ready it writes
//!    `DAEMON_UPGRADED`. If it cannot read the state it executes the previous binary again
//!    with the same descriptors ([`roll_back`]), which takes over instead and
//!    writes `DAEMON_UPGRADE_FAILED` (stage `handover`).

use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::plugin::discovery::Skipped;
use crate::plugin::spawn::{Exec, ExecProgram, HANDOVER_FDS};
use crate::supervisor::handover::{self, Fds, PluginEntry};
use crate::supervisor::HandedOver;

/// The format of the handover state this binary writes; it reads this one and earlier ones.
pub const HANDOVER_FORMAT: u32 = 1;
/// The daemon's version, as the events and the check report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How a stream ended by an upgrade says so (its status is UNAVAILABLE).
pub const UPGRADING_MESSAGE: &str =
    "the daemon is upgrading: resume from the last cursor you received";
/// Set in the environment of a previous binary executed again after a failed handover: why.
const ROLLBACK_REASON: &str = "TORUD_UPGRADE_FAILED";

/// Whether the streams ending now end for an upgrade. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Upgrading(Arc<AtomicBool>);

impl Upgrading {
    /// From now on, streams that end say the daemon is upgrading.
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// The status a stream ending now ends with, if it ends for an upgrade.
    pub fn status(&self) -> Option<Status> {
        self.0
            .load(Ordering::SeqCst)
            .then(|| Status::unavailable(UPGRADING_MESSAGE))
    }
}

/// The state that crosses the exec (JSON, in a memfd). Descriptors are named by their place
/// in `TORUD_HANDOVER_FDS`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandoverState {
    /// [`HANDOVER_FORMAT`] of the binary that wrote it.
    pub format: u32,
    /// The version handing over.
    pub from_version: String,
    /// The binary handed over to.
    pub binary: PathBuf,
    /// When `DAEMON_UPGRADING` was written.
    #[serde(with = "time::serde::rfc3339")]
    pub began: OffsetDateTime,
    /// The TCP listener's place.
    pub tcp: usize,
    /// The control socket's place.
    pub control: usize,
    /// The metrics listener's place, if there is one.
    pub metrics: Option<usize>,
    /// The plugins.
    pub plugins: Vec<PluginEntry>,
    /// The files the last scan skipped.
    pub skipped: Vec<Skipped>,
    /// The arguments the daemon that handed over runs with (after the program name): a
    /// rollback executes it with these, whatever the new binary was given.
    #[serde(default)]
    pub args: Vec<OsString>,
    /// How long the new image has to serve before it hands back to the previous binary
    /// (the upgrade timeout of the daemon that handed over), in milliseconds; 0: no limit.
    #[serde(default)]
    pub serve_within_ms: u64,
}

/// Place of the running binary (for a rollback) in `TORUD_HANDOVER_FDS`; the state is last.
const ROLLBACK_EXE: usize = 0;

/// Why an upgrade did not begin.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Another upgrade is under way.
    #[error("an upgrade is already under way")]
    Busy,
    /// The binary cannot be run.
    #[error("{0}")]
    BadBinary(String),
    /// The new binary's check failed; nothing changed.
    #[error("the new binary's check failed (nothing changed): {0}")]
    CheckFailed(String),
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl From<UpgradeError> for Status {
    fn from(e: UpgradeError) -> Self {
        match &e {
            UpgradeError::Busy => Status::already_exists(e.to_string()),
            UpgradeError::BadBinary(_) => Status::invalid_argument(e.to_string()),
            UpgradeError::CheckFailed(_) => Status::failed_precondition(e.to_string()),
            UpgradeError::ShuttingDown => Status::unavailable(e.to_string()),
        }
    }
}

/// An upgrade that has begun: checked, announced.
#[derive(Debug, Clone)]
pub struct Began {
    /// The running version.
    pub from_version: String,
    /// The new binary's version.
    pub to_version: String,
    /// The new binary.
    pub binary: PathBuf,
    /// The seq of the `DAEMON_UPGRADING` event.
    pub upgrading_seq: u64,
    /// When it was written.
    pub at: OffsetDateTime,
    /// How long the new image has to serve (the upgrade timeout).
    pub timeout: Duration,
}

/// A request to upgrade, for the serving loop.
pub struct UpgradeRequest {
    /// The new binary; `None`: the one the daemon was started from.
    pub binary: Option<PathBuf>,
    /// Told when the upgrade began, or why not.
    pub reply: oneshot::Sender<Result<Began, UpgradeError>>,
}

/// Where upgrade requests go (the API, SIGUSR2); clones share it.
#[derive(Clone)]
pub struct Upgrades {
    tx: mpsc::Sender<UpgradeRequest>,
    busy: Arc<AtomicBool>,
}

impl Upgrades {
    /// The handle and the serving loop's end.
    pub fn channel() -> (Upgrades, mpsc::Receiver<UpgradeRequest>) {
        let (tx, rx) = mpsc::channel(4);
        let busy = Arc::new(AtomicBool::new(false));
        (Upgrades { tx, busy }, rx)
    }

    /// Asks for an upgrade to `binary`; answers once it began (the handover follows) or
    /// with why not.
    pub async fn request(&self, binary: Option<PathBuf>) -> Result<Began, UpgradeError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(UpgradeError::Busy);
        }
        let (reply, answer) = oneshot::channel();
        let sent = self.tx.send(UpgradeRequest { binary, reply }).await;
        let result = match sent {
            Ok(()) => answer.await.unwrap_or(Err(UpgradeError::ShuttingDown)),
            Err(_) => Err(UpgradeError::ShuttingDown),
        };
        if result.is_err() {
            self.busy.store(false, Ordering::SeqCst);
        }
        result
    }
}

/// The binary the daemon runs, kept from its start: its path (where a package upgrade puts
/// the new one) and an `O_PATH` descriptor of the file itself (the one to go back to, even
/// once the path names another file).
#[derive(Debug)]
pub struct SelfExe {
    /// The path it was started from.
    pub path: PathBuf,
    fd: OwnedFd,
}

impl SelfExe {
    /// Opens the running binary.
    pub fn open() -> std::io::Result<SelfExe> {
        let path = std::env::current_exe()?;
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open("/proc/self/exe")?;
        Ok(SelfExe {
            path,
            fd: fd.into(),
        })
    }

    /// A descriptor of the running binary.
    pub fn fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

/// A binary the daemon can hand over to: an absolute path to an executable file.
pub fn valid_binary(binary: &Path) -> Result<(), UpgradeError> {
    if !binary.is_absolute() {
        return Err(UpgradeError::BadBinary(format!(
            "binary {binary:?} is not an absolute path"
        )));
    }
    let meta = std::fs::metadata(binary)
        .map_err(|e| UpgradeError::BadBinary(format!("binary {}: {e}", binary.display())))?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(UpgradeError::BadBinary(format!(
            "binary {} is not an executable file",
            binary.display()
        )));
    }
    Ok(())
}

/// What `--check-upgrade` prints: the new binary's verdict on the state it would get.
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckReport {
    /// Its version.
    pub version: String,
    /// The state format it read.
    pub format: u32,
    /// Plugins in the state.
    pub plugins: usize,
}

/// The new binary's side of a check: reads the state, says whether it can take it over.
pub fn check_state(bytes: &[u8]) -> Result<CheckReport, String> {
    let state = parse_state(bytes)?;
    Ok(CheckReport {
        version: VERSION.to_owned(),
        format: state.format,
        plugins: state.plugins.len(),
    })
}

fn parse_state(bytes: &[u8]) -> Result<HandoverState, String> {
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let format: Format = serde_json::from_slice(bytes)
        .map_err(|e| format!("the handover state is not readable: {e}"))?;
    if format.format > HANDOVER_FORMAT || format.format == 0 {
        return Err(format!(
            "the handover state has format {}; this binary ({VERSION}) reads formats 1 to {HANDOVER_FORMAT}",
            format.format
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("the handover state is not readable: {e}"))
}

/// The daemon's arguments after the program name (`serve ...`), as given to it.
fn serve_args() -> Vec<OsString> {
    std::env::args_os().skip(1).collect()
}

/// Runs `binary serve <args> --check-upgrade` with `state` on stdin, at most `limit`: the
/// version it reports, or why it cannot take over.
pub async fn check(binary: &Path, state: &[u8], limit: Duration) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(serve_args())
        .arg("--check-upgrade")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // It dies with the daemon, as plugins do: a check hanging when the daemon is SIGKILLed
    // does not outlive it. (Set from a tokio worker, which lives as long as the runtime;
    // the check ends before any handover's exec.)
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped");
    let state = state.to_vec();
    let run = async move {
        // A binary that exits without reading is answered by its exit status.
        let _ = stdin.write_all(&state).await;
        drop(stdin);
        child.wait_with_output().await
    };
    let output = match tokio::time::timeout(limit, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("running {} failed: {e}", binary.display())),
        Err(_) => {
            if let Some(pid) = pid {
                // Its group: a script's children too. (Dropping the child killed and reaps
                // the leader; the group id is not reused before its members are gone.)
                // SAFETY: a plain syscall.
                unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            }
            return Err(format!(
                "{} did not finish its check within {}",
                binary.display(),
                humantime::format_duration(limit)
            ));
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    if !output.status.success() {
        return Err(format!(
            "{} --check-upgrade: {}{}",
            binary.display(),
            output.status,
            if stderr.is_empty() {
                String::new()
            } else {
                format!(": {}", last_line(stderr))
            }
        ));
    }
    let report: CheckReport = serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "{} --check-upgrade did not report its verdict ({e}); is it a torud binary?",
            binary.display()
        )
    })?;
    Ok(report.version)
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or(text)
}

/// A preview of the state (the plugins' statuses, no descriptors) for the check.
pub fn preview(
    binary: &Path,
    began: OffsetDateTime,
    statuses: Vec<crate::model::PluginStatus>,
    skipped: Vec<Skipped>,
) -> Vec<u8> {
    let state = HandoverState {
        format: HANDOVER_FORMAT,
        from_version: VERSION.to_owned(),
        binary: binary.to_owned(),
        began,
        tcp: 0,
        control: 0,
        metrics: None,
        plugins: statuses
            .into_iter()
            .map(|status| PluginEntry {
                status,
                verified: None,
                run: None,
            })
            .collect(),
        skipped,
        args: serve_args(),
        serve_within_ms: 0,
    };
    serde_json::to_vec(&state).expect("the state serializes")
}

/// Everything the exec passes: the state, and the descriptors in their order.
pub struct Handover {
    /// The binary to execute.
    pub binary: PathBuf,
    /// The descriptors, in `TORUD_HANDOVER_FDS` order (the state's memfd last).
    pub fds: Fds,
}

/// The listeners kept for a handover (copies of the served ones).
pub struct KeptListeners {
    /// The TCP listener.
    pub tcp: OwnedFd,
    /// The control socket.
    pub control: OwnedFd,
    /// The metrics listener.
    pub metrics: Option<OwnedFd>,
}

/// Puts the handover together: the running binary, the listeners, the plugins, and the
/// state (written to a memfd, last).
pub fn assemble(
    began: &Began,
    exe: &SelfExe,
    listeners: KeptListeners,
    plugins: Vec<HandedOver>,
    skipped: Vec<Skipped>,
) -> std::io::Result<Handover> {
    let mut fds = Fds::default();
    let exe_place = fds.push(exe.fd()?);
    debug_assert_eq!(exe_place, ROLLBACK_EXE);
    let tcp = fds.push(listeners.tcp);
    let control = fds.push(listeners.control);
    let metrics = listeners.metrics.map(|fd| fds.push(fd));
    let plugins = handover::save(plugins, &mut fds);
    let state = HandoverState {
        format: HANDOVER_FORMAT,
        from_version: VERSION.to_owned(),
        binary: began.binary.clone(),
        began: began.at,
        tcp,
        control,
        metrics,
        plugins,
        skipped,
        args: serve_args(),
        serve_within_ms: began.timeout.as_millis() as u64,
    };
    let bytes = serde_json::to_vec(&state).map_err(std::io::Error::other)?;
    fds.push(memfd_with(&bytes)?);
    Ok(Handover {
        binary: began.binary.clone(),
        fds,
    })
}

/// A memfd holding `bytes`, read from its start.
fn memfd_with(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create returns a descriptor we then own.
    let fd = unsafe { libc::memfd_create(c"torud-handover".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created, ours.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file.into())
}

/// The exec of a handover: `binary` with the daemon's own arguments and environment, and
/// `fds` in order. Returns only when it failed.
pub fn exec(
    program: ExecProgram,
    argv0: &Path,
    serve: Vec<OsString>,
    fds: &Fds,
    extra_env: &[(&str, &str)],
) -> std::io::Error {
    let mut args = vec![argv0.as_os_str().to_owned()];
    args.extend(serve);
    let mut env: Vec<OsString> = std::env::vars_os()
        .filter(|(name, _)| name != ROLLBACK_REASON && name != HANDOVER_FDS)
        .map(|(name, value)| {
            let mut pair = name.into_vec();
            pair.push(b'=');
            pair.extend(value.into_vec());
            OsString::from_vec(pair)
        })
        .collect();
    for (name, value) in extra_env {
        env.push(format!("{name}={value}").into());
    }
    let exec = Exec {
        program,
        args,
        env,
        fds: fds.raw(),
    };
    crate::plugin::spawn::exec_handing_over(&exec)
}

/// Executes the handover's binary; when that fails, the running binary again (a rollback)
/// with the same state. Returns only when both failed.
pub fn execute(handover: &Handover) -> std::io::Error {
    let binary = &handover.binary;
    let failed = exec(
        ExecProgram::Path(binary.clone()),
        binary,
        serve_args(),
        &handover.fds,
        &[],
    );
    tracing::error!(binary = %binary.display(), error = %failed, "cannot execute the new binary; executing the running one again");
    let reason = format!("cannot execute {}: {failed}", binary.display());
    roll_back(&handover.fds, &reason, None)
}

/// What an earlier image handed over, as this image found it at its start.
pub struct Received {
    /// The state.
    pub state: HandoverState,
    /// The descriptors (the state's memfd among them).
    pub fds: Fds,
    /// Set when this image is the previous binary executed again after a failed
    /// handover: why it failed.
    pub rolled_back: Option<String>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("from_version", &self.state.from_version)
            .field("plugins", &self.state.plugins.len())
            .field("rolled_back", &self.rolled_back)
            .finish()
    }
}

/// A handover this image cannot take.
#[derive(Debug)]
pub struct Unreadable {
    /// Why.
    pub reason: String,
    /// The descriptors as passed (to pass them on to the previous binary), unless this
    /// image is that binary already (a rollback that cannot take over either ends there).
    pub fds: Option<Fds>,
}

impl Received {
    /// The handover passed to this image, if it was started by one: read from the
    /// descriptors `TORUD_HANDOVER_FDS` names (removed from the environment). Call first
    /// thing, before any thread starts.
    pub fn take() -> Result<Option<Received>, Unreadable> {
        let Some(list) = std::env::var_os(HANDOVER_FDS) else {
            return Ok(None);
        };
        let rolled_back = std::env::var(ROLLBACK_REASON).ok();
        // SAFETY (both): called before any other thread exists.
        std::env::remove_var(HANDOVER_FDS);
        std::env::remove_var(ROLLBACK_REASON);
        let second = rolled_back.is_some();
        let unreadable = |reason: String, fds: Option<Fds>| Unreadable {
            reason,
            fds: fds.filter(|_| !second),
        };
        let numbers: Result<Vec<RawFd>, _> = list
            .to_string_lossy()
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::parse::<RawFd>)
            .collect();
        let numbers = numbers.map_err(|e| {
            unreadable(
                format!("{HANDOVER_FDS} is not a list of descriptors: {e}"),
                None,
            )
        })?;
        let mut owned = Vec::with_capacity(numbers.len());
        for &n in &numbers {
            // SAFETY: the exec passed these descriptors to this image, which owns them now
            // and has not opened anything yet.
            if n < 0 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
                return Err(unreadable(format!("descriptor {n} was not passed"), None));
            }
            // SAFETY: as above.
            let fd = unsafe { OwnedFd::from_raw_fd(n) };
            // Not inherited by anything this image starts.
            // SAFETY: flag change on our own descriptor.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            owned.push(fd);
        }
        let fds = Fds::from_received(owned);
        if fds.len() < 2 {
            return Err(unreadable(
                "too few descriptors were passed".into(),
                Some(fds),
            ));
        }
        // Read through a copy: the state's descriptor stays in the list, which a rollback
        // passes on whole.
        let state = fds.get(fds.len() - 1).map(OwnedFd::try_clone);
        let Some(Ok(state)) = state else {
            return Err(unreadable("the state cannot be read".into(), None));
        };
        let mut bytes = Vec::new();
        let mut file = std::fs::File::from(state);
        file.rewind()
            .and_then(|_| file.read_to_end(&mut bytes))
            .map_err(|e| unreadable(format!("the state cannot be read: {e}"), None))?;
        let parsed = parse_state(&bytes).and_then(|state| {
            handover::validate(&state.plugins, &fds)?;
            Ok(state)
        });
        match parsed {
            Ok(state) => Ok(Some(Received {
                state,
                fds,
                rolled_back,
            })),
            Err(reason) => Err(unreadable(reason, Some(fds))),
        }
    }

    /// The handed-over plugins, each pidfd checked to name its pid.
    pub fn plugins(&mut self) -> Result<Vec<HandedOver>, String> {
        let entries = std::mem::take(&mut self.state.plugins);
        handover::load(entries, &mut self.fds)
    }

    /// Copies of every descriptor passed, in order (the state's memfd last): what
    /// [`roll_back`] passes on if this image fails before it serves.
    pub fn copy_fds(&self) -> std::io::Result<Fds> {
        let mut copies = Vec::with_capacity(self.fds.len());
        for place in 0..self.fds.len() {
            let fd = self.fds.get(place).ok_or_else(|| {
                std::io::Error::other(format!("descriptor #{place} was already taken"))
            })?;
            copies.push(fd.try_clone()?);
        }
        Ok(Fds::from_received(copies))
    }

    /// What the take-over reports once the daemon is ready.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            from_version: self.state.from_version.clone(),
            binary: self.state.binary.clone(),
            began: self.state.began,
            plugins: self.state.plugins.len(),
            rolled_back: self.rolled_back.clone(),
        }
    }
}

/// How a handover went, as the image that took over reports it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The version that handed over.
    pub from_version: String,
    /// The binary handed over to.
    pub binary: PathBuf,
    /// When `DAEMON_UPGRADING` was written.
    pub began: OffsetDateTime,
    /// Plugins handed over.
    pub plugins: usize,
    /// Set when this image is the previous binary executed again: why the new one did not
    /// take over.
    pub rolled_back: Option<String>,
}

impl Outcome {
    /// From `DAEMON_UPGRADING` to now.
    pub fn duration(&self) -> Duration {
        (OffsetDateTime::now_utc() - self.began)
            .try_into()
            .unwrap_or_default()
    }
}

/// Executes the previous binary (the first descriptor passed) again with the same
/// descriptors, because this image cannot take the handover: `reason` reaches it (it
/// writes `DAEMON_UPGRADE_FAILED`). `args` are its own arguments when the state could be
/// read (else this image's). Returns only when that exec failed.
pub fn roll_back(fds: &Fds, reason: &str, args: Option<Vec<OsString>>) -> std::io::Error {
    let exe = fds.raw()[ROLLBACK_EXE];
    let argv0 = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("torud"));
    let args = args.filter(|a| !a.is_empty()).unwrap_or_else(serve_args);
    exec(
        ExecProgram::Fd(exe),
        &argv0,
        args,
        fds,
        &[(ROLLBACK_REASON, reason)],
    )
}

/// What a new image passes on to the previous binary if it fails before it serves: copies
/// of every descriptor it was given and the previous daemon's arguments. Let go of once
/// it serves (they are a descriptor or four per plugin). Nothing when this image is the
/// previous binary already.
#[derive(Default)]
pub struct Fallback(std::sync::Mutex<Option<(Fds, Vec<OsString>)>>);

impl Fallback {
    /// The fallback of a daemon started with `received`, with a watch: if this image does
    /// not serve within the time the state allows (it hangs), it hands back too.
    pub fn watched(received: Option<&Received>) -> Arc<Fallback> {
        let fallback = Arc::new(Fallback::of(received));
        let limit = received.map_or(0, |r| r.state.serve_within_ms);
        if limit > 0 && fallback.armed() {
            let watched = fallback.clone();
            let limit = Duration::from_millis(limit);
            let spawned = std::thread::Builder::new()
                .name("torud-takeover-watch".into())
                .spawn(move || {
                    std::thread::sleep(limit);
                    let reason = format!(
                        "the new image did not serve within {}",
                        humantime::format_duration(limit)
                    );
                    if let Some(failed) = watched.roll_back(&reason) {
                        eprintln!(
                            "torud: error: cannot execute the previous binary again: {failed}"
                        );
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no watch on the take-over");
            }
        }
        fallback
    }

    fn armed(&self) -> bool {
        self.0.lock().expect("not poisoned").is_some()
    }

    /// The fallback of a daemon started with `received`.
    pub fn of(received: Option<&Received>) -> Fallback {
        let kept = received
            .filter(|r| r.rolled_back.is_none())
            .and_then(|r| match r.copy_fds() {
                Ok(fds) => Some((fds, r.state.args.clone())),
                Err(e) => {
                    tracing::warn!(error = %e, "no rollback is possible from here on");
                    None
                }
            });
        Fallback(std::sync::Mutex::new(kept))
    }

    /// This image serves: no rollback from here on.
    pub fn serving(&self) {
        drop(self.0.lock().expect("not poisoned").take());
    }

    /// This image failed before it served: executes the previous binary again. Returns
    /// when there is none to go back to (`None`) or that exec failed.
    pub fn roll_back(&self, reason: &str) -> Option<std::io::Error> {
        let (fds, args) = self.0.lock().expect("not poisoned").take()?;
        tracing::error!("{reason}; executing the previous binary again");
        Some(roll_back(&fds, reason, Some(args)))
    }
}
