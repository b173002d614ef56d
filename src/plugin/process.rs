//! Plugin processes: how they are spawned (own process group, parent-death signal, a clean
//! environment with the plugin's own variables, its arguments and working directory, no
//! inherited descriptors, its cgroup and its user), signalled, reaped, and how everything a
//! plugin started is killed when it stops.
//!
//! Architecture invariant: every plugin process — the long-running one and the short
//! `--metadata` one — is its own process-group leader with `PR_SET_PDEATHSIG = SIGKILL`, so
//! signalling the group reaches its descendants and the plugin dies with the daemon even
//! when the daemon is SIGKILLed. The parent-death signal fires when the *thread* that
//! spawned the child exits, so children are cloned by `spawn.rs` on its spawner thread,
//! which never exits and is the one that makes a handover's exec (so a handover does not
//! fire it).
//! Before exec the child joins its cgroup (while still root), marks every descriptor above
//! 2 close-on-exec, enters its sandbox, and only then switches user (groups cleared, gid,
//! uid), sets `no_new_privs`, enters its working directory (as its user, in its view) and
//! sets the parent-death signal (which a uid change would clear).
//! The child is started by `spawn.rs` sharing the daemon's memory until exec (no copy of a
//! daemon holding a thousand plugins), so what it runs before exec allocates nothing.
//! This module knows nothing of sockets, states or events; who a plugin runs as is decided
//! by `isolation`.
//!
//! Supervision reaches processes through two small traits, [`Spawner`] (start one) and
//! [`Process`] (its id, wait for its exit, signal it, kill it and all it started, drain its
//! output), so the actor's timers can be tested with a fake process; [`OsSpawner`] and
//! [`PluginProcess`] are the real ones.

use std::ffi::{CString, OsString};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::logs::capture::{Capture, Paused, PluginLog, StderrTail};
use crate::plugin::isolation::cgroup::PluginCgroup;
use crate::plugin::spawn::{Child, Command, Stdio};
use crate::secret::Secret;
use tokio_util::sync::CancellationToken;

#[cfg(target_env = "gnu")]
type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type RlimitResource = libc::c_int;
use crate::model::ExitStatus;
use crate::model::LogStream;

/// Resource limits (rlimits) set in every plugin process before it runs; `None` inherits
/// the daemon's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLimits {
    /// Address space, in bytes (RLIMIT_AS).
    pub address_space: Option<u64>,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
    /// Processes and threads of the plugin's user (RLIMIT_NPROC: counted per user, not per
    /// plugin, and not enforced for root).
    pub processes: Option<u64>,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            // A guard against runaway allocation, roomy enough for runtimes that reserve
            // large virtual ranges (Go, the JVM); a cgroup is the tool for real memory caps.
            address_space: Some(32 * 1024 * 1024 * 1024),
            // The daemon raises its own limit to the hard one; plugins get a usual one.
            open_files: Some(4096),
            processes: None,
        }
    }
}

/// How one plugin's process is started, beyond what every plugin gets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Launch {
    /// Its arguments.
    pub args: Vec<String>,
    /// Its own environment variables (values secret).
    pub env: std::collections::BTreeMap<String, Secret>,
    /// The directory it starts in; `None` keeps the daemon's working directory.
    pub working_dir: Option<PathBuf>,
}

/// A user to switch to before exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The uid.
    pub uid: u32,
    /// The gid (supplementary groups are cleared).
    pub gid: u32,
}

/// What confines a plugin process beyond its environment and limits.
#[derive(Debug, Default)]
pub struct Confinement {
    /// The user to run as; `None` keeps the daemon's.
    pub credentials: Option<Credentials>,
    /// The plugin's cgroup's `cgroup.procs`, open for writing: the child joins it first.
    pub cgroup_procs: Option<OwnedFd>,
    /// Namespaces and Landlock, for a daemon that is not root.
    pub sandbox: Option<crate::plugin::isolation::sandbox::Sandbox>,
}

impl Confinement {
    /// Runs as `credentials` (if any), in no cgroup of its own.
    pub fn user(credentials: Option<Credentials>) -> Self {
        Confinement {
            credentials,
            cgroup_procs: None,
            sandbox: None,
        }
    }
}

/// Builds a command for a plugin executable with only the allowlisted environment, its own
/// process group, the parent-death signal, `limits`, no inherited descriptors beyond stdio,
/// and `confinement`; `launch` adds the plugin's own arguments, environment and working
/// directory.
///
/// The environment is stacked, later winning: the allowlisted variables of the daemon's,
/// then the plugin's own (`launch.env`, whose secret values are exposed here and nowhere
/// else), then `host_env` (the `TORU_*` variables, which always win, and `HOME`).
///
/// The working directory is entered last in the child, after the sandbox and the user
/// switch: as the plugin's own user and in its own view of the file system (a directory
/// its sandbox hides cannot be entered). Without one the plugin keeps the daemon's.
pub fn plugin_command(
    binary: &Path,
    allowlist: &[String],
    launch: &Launch,
    host_env: &[(&str, OsString)],
    limits: &PluginLimits,
    confinement: Confinement,
) -> Command {
    let mut cmd = Command::new(binary);
    cmd.args(&launch.args);
    cmd.env_clear();
    for name in allowlist {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    for (name, value) in &launch.env {
        cmd.env(name, value.expose());
    }
    for (name, value) in host_env {
        cmd.env(name, value);
    }
    cmd.stdin(Stdio::null()).process_group(0).kill_on_drop(true);
    let working_dir = working_dir_in_child(&mut cmd, launch.working_dir.as_deref());
    let daemon_pid = std::process::id() as libc::pid_t;
    let rlimits: Vec<(RlimitResource, u64)> = [
        (libc::RLIMIT_AS, limits.address_space),
        (libc::RLIMIT_NOFILE, limits.open_files),
        (libc::RLIMIT_NPROC, limits.processes),
    ]
    .into_iter()
    .filter_map(|(resource, value)| value.map(|v| (resource, v)))
    .collect();
    let Confinement {
        credentials,
        cgroup_procs,
        sandbox,
    } = confinement;
    // The sandbox makes the child dumpable again, a flag of the memory: a child sharing the
    // daemon's would make the daemon dumpable too.
    cmd.copy_memory(sandbox.is_some());
    if let Some(sandbox) = &sandbox {
        cmd.keep_fds_free_below(sandbox.fd_floor());
    }
    if let Some(procs) = cgroup_procs {
        cmd.cgroup_procs(procs);
    }
    // SAFETY: the closure runs in the child before exec (see `spawn`: sharing the daemon's
    // memory unless the sandbox asked for a copy) and only calls async-signal-safe functions
    // (write, setrlimit, close_range, fcntl, raw setgroups, setgid and setuid system calls,
    // chdir, prctl, getppid, _exit, and in `Sandbox::enter` unshare, open, dup3, mount, mkdir
    // and the Landlock calls); `rlimits`, the descriptor and the sandbox's paths were made
    // before the spawn (the working directory's too), so nothing allocates. The user switch
    // is raw system calls: glibc's wrappers would switch every thread of a process they
    // believe they are in, and a child sharing memory would look like the daemon to them.
    // (A uid change marks the memory not dumpable, which the daemon already is.)
    unsafe {
        cmd.pre_exec(move || {
            cloexec_from_3();
            for &(resource, value) in &rlimits {
                let limit = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(sandbox) = &sandbox {
                sandbox.enter()?;
            }
            if let Some(who) = credentials {
                let no_groups: *const libc::gid_t = std::ptr::null();
                if libc::syscall(libc::SYS_setgroups, 0, no_groups) != 0
                    || libc::syscall(libc::SYS_setgid, who.gid) != 0
                    || libc::syscall(libc::SYS_setuid, who.uid) != 0
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // As the plugin's user, in its view: what it could not reach is refused here.
            if let Some(dir) = &working_dir {
                if libc::chdir(dir.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the uid change, which clears it.
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
            // The daemon may have died between clone and prctl: then nobody would kill us.
            if libc::getppid() != daemon_pid {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd
}

/// The working directory as the child's `chdir` takes it, made before the spawn. Only a path
/// holding a NUL byte cannot be made so: it is then given to the command, whose spawn
/// refuses it.
fn working_dir_in_child(cmd: &mut Command, dir: Option<&Path>) -> Option<CString> {
    let dir = dir?;
    match CString::new(dir.as_os_str().as_bytes()) {
        Ok(dir) => Some(dir),
        Err(_) => {
            cmd.current_dir(dir);
            None
        }
    }
}

/// Marks every descriptor above 2 close-on-exec, so nothing the daemon inherited or
/// opened without the flag reaches a plugin. Async-signal-safe.
fn cloexec_from_3() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags; the fallback loop does
    // the same with fcntl on each descriptor (EBADF for closed ones is harmless).
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        ) == 0
        {
            return;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            1024
        };
        for fd in 3..top {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// Sends `sig` to every process in the group led by `pgid`, and to the leader itself (a
/// plugin that moved itself into another group is still reached). A group that is already
/// gone is not an error.
pub fn signal_group(pgid: u32, sig: i32) {
    if pgid == 0 {
        return;
    }
    // SAFETY: plain syscalls; a negative pid addresses the process group.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), sig);
        libc::kill(pgid as libc::pid_t, sig);
    }
}

/// SIGKILLs every process left over from an earlier run of a daemon using `run_dir`: any
/// process whose environment names a plugin socket inside it. A daemon that was SIGKILLed
/// takes its plugins' direct children with it (parent-death signal), but not processes
/// those forked; this finds them by the `TORU_PLUGIN_SOCKET` they inherited. Returns the
/// pids killed.
pub fn kill_leftovers(run_dir: &Path) -> Vec<u32> {
    let mut marker = format!("{}=", toru_plugin_sdk::ENV_PLUGIN_SOCKET).into_bytes();
    marker.extend_from_slice(run_dir.as_os_str().as_encoded_bytes());
    marker.push(b'/');
    kill_marked(|var| var.starts_with(&marker))
}

/// SIGKILLs every process that inherited `TORU_PLUGIN_SOCKET=socket`: what one plugin
/// started, where it has no cgroup. Returns the pids killed.
pub fn kill_marked_with(socket: &Path) -> Vec<u32> {
    let mut marker = format!("{}=", toru_plugin_sdk::ENV_PLUGIN_SOCKET).into_bytes();
    marker.extend_from_slice(socket.as_os_str().as_encoded_bytes());
    kill_marked(|var| var == marker.as_slice())
}

/// SIGKILLs every process (but this one) with an environment variable matching `marked`.
fn kill_marked(marked: impl Fn(&[u8]) -> bool) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut killed = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|&b| b == 0).any(&marked) {
            // SAFETY: plain syscall on a process that carries our socket directory.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            killed.push(pid);
        }
    }
    killed
}

/// Whether a process with this pid exists (and is not a zombie we could still reap).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Bytes a plugin's output pipes hold (Linux's default is 64 KiB): room for a few
/// milliseconds of a flood, so a plugin does not block while capture batches its reads.
/// Kept small enough that a hundred plugins stay within the kernel's per-user pipe budget;
/// if the kernel refuses, the default stays.
const PIPE_BYTES: libc::c_int = 256 * 1024;

fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on a pipe we own; failure leaves it as it was.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
}

/// How everything a plugin started is found when it stops.
#[derive(Debug)]
pub enum Descendants {
    /// Its cgroup: `cgroup.kill` reaches every process in it.
    Cgroup(PluginCgroup),
    /// No cgroup: the processes that inherited its `TORU_PLUGIN_SOCKET` (this socket path).
    Marker(PathBuf),
}

/// Bound on the wait for a killed plugin's cgroup to empty.
const CGROUP_EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts plugin processes: the seam between supervision and the operating system.
pub trait Spawner: Send + Sync + 'static {
    /// The process it starts.
    type Process: Process;

    /// Starts `cmd` (built by [`plugin_command`]) with stdout and stderr drained line by line
    /// (lines longer than `max_line` split) into `log`; `descendants` says how to find what
    /// it starts.
    fn spawn(
        &self,
        cmd: Command,
        log: PluginLog,
        max_line: usize,
        descendants: Descendants,
    ) -> std::io::Result<Self::Process>;

    /// Takes over a process an earlier image of the daemon handed over, its output drained
    /// into `log` again.
    fn adopt(
        &self,
        detached: DetachedProcess,
        log: PluginLog,
        max_line: usize,
    ) -> std::io::Result<Self::Process>;
}

/// What supervision does with a started plugin process.
pub trait Process: Send + 'static {
    /// The process id (also its process group id).
    fn pid(&self) -> u32;

    /// Waits for the process to exit. Cancel-safe; returns at once once it has exited.
    fn wait(&mut self) -> impl Future<Output = ExitStatus> + Send;

    /// The exit status, if the process has been reaped.
    fn exit_status(&self) -> Option<ExitStatus>;

    /// Signals the whole process group.
    fn signal_group(&self, sig: i32);

    /// SIGKILLs the group and waits for the exit, at most `limit`.
    fn kill_and_wait(&mut self, limit: Duration) -> impl Future<Output = ExitStatus> + Send;

    /// After the exit: kills everything it started, waits (at most `drain_timeout`) for its
    /// output to be drained, and returns the last lines of its stderr.
    fn finish(&mut self, drain_timeout: Duration) -> impl Future<Output = Vec<String>> + Send;

    /// Lets go of the running process without stopping it, for the daemon's next image:
    /// its capture paused at a line boundary, its pidfd and pipes given back. `None` when
    /// this kind of process cannot be handed over (then it is dropped, and so stopped).
    fn detach(self) -> impl Future<Output = Option<DetachedProcess>> + Send
    where
        Self: Sized;
}

/// A running plugin process let go of for a handover: everything the next image needs to
/// adopt it ([`PluginProcess::adopt`]).
#[derive(Debug)]
pub struct DetachedProcess {
    /// Its pid (and process group).
    pub pid: u32,
    /// Its pidfd: the one way the next image names it.
    pub pidfd: OwnedFd,
    /// Its stdout pipe's read end, with the unfinished line read from it.
    pub stdout: Option<(OwnedFd, Vec<u8>)>,
    /// Its stderr pipe's read end, with the unfinished line read from it.
    pub stderr: Option<(OwnedFd, Vec<u8>)>,
    /// The last lines of its stderr.
    pub stderr_tail: Vec<String>,
    /// How what it started is found.
    pub descendants: Descendants,
}

/// Spawns real processes: [`PluginProcess::spawn`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OsSpawner;

impl Spawner for OsSpawner {
    type Process = PluginProcess;

    fn spawn(
        &self,
        cmd: Command,
        log: PluginLog,
        max_line: usize,
        descendants: Descendants,
    ) -> std::io::Result<PluginProcess> {
        PluginProcess::spawn(cmd, log, max_line, descendants)
    }

    fn adopt(
        &self,
        detached: DetachedProcess,
        log: PluginLog,
        max_line: usize,
    ) -> std::io::Result<PluginProcess> {
        PluginProcess::adopt(detached, log, max_line)
    }
}

/// Kills a handed-over process that will not be adopted, named by its pidfd (its group too:
/// an unreaped child's pid, and so its group id, cannot have been reused).
pub fn kill_detached(process: &DetachedProcess) {
    use std::os::fd::AsRawFd;
    // SAFETY: signalling through a pidfd we hold.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            process.pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        );
    }
    signal_group(process.pid, libc::SIGKILL);
    if let Descendants::Cgroup(cgroup) = &process.descendants {
        cgroup.kill();
    }
}

/// A running plugin process with its output being drained into its log.
pub struct PluginProcess {
    child: Child,
    pid: u32,
    exit: Option<ExitStatus>,
    /// The stdout and stderr captures; a paused one gives its pipe back.
    drains: Vec<JoinHandle<Option<Paused<ChildPipe>>>>,
    /// Pauses the captures (for a handover).
    pause: CancellationToken,
    stderr_tail: StderrTail,
    descendants: Descendants,
    /// Let go of for a handover: dropping it stops nothing.
    detached: bool,
}

type ChildPipe = crate::plugin::spawn::ChildPipe;

/// A process's output to capture: each pipe with the unfinished line read from it before,
/// and the last stderr lines so far.
struct Pipes {
    stdout: Option<(ChildPipe, Vec<u8>)>,
    stderr: Option<(ChildPipe, Vec<u8>)>,
    tail: StderrTail,
}

impl PluginProcess {
    /// Spawns the plugin with stdout and stderr drained line by line (lines longer than
    /// `max_line` split) into `log`; `descendants` says how to find what it starts.
    pub fn spawn(
        mut cmd: Command,
        log: PluginLog,
        max_line: usize,
        descendants: Descendants,
    ) -> std::io::Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take().map(|out| (out, Vec::new()));
        let stderr = child.stderr.take().map(|err| (err, Vec::new()));
        for (pipe, _) in stdout.iter().chain(stderr.iter()) {
            widen_pipe(pipe);
        }
        let pipes = Pipes {
            stdout,
            stderr,
            tail: StderrTail::default(),
        };
        Ok(Self::capturing(
            child,
            pid,
            pipes,
            log,
            max_line,
            descendants,
        ))
    }

    /// Takes over a process an earlier image of the daemon handed over ([`DetachedProcess`]):
    /// waited for by its pidfd, its output captured again from where it paused.
    pub fn adopt(
        detached: DetachedProcess,
        log: PluginLog,
        max_line: usize,
    ) -> std::io::Result<Self> {
        let DetachedProcess {
            pid,
            pidfd,
            stdout,
            stderr,
            stderr_tail,
            mut descendants,
        } = detached;
        if let Descendants::Cgroup(cgroup) = &mut descendants {
            cgroup.arm();
        }
        let child = Child::adopt(pid, pidfd)?;
        let pipe = |(fd, partial): (OwnedFd, Vec<u8>)| -> std::io::Result<(ChildPipe, Vec<u8>)> {
            Ok((ChildPipe::from_owned_fd(fd)?, partial))
        };
        let stdout = stdout.map(pipe).transpose()?;
        let stderr = stderr.map(pipe).transpose()?;
        let tail = StderrTail::default();
        for line in &stderr_tail {
            tail.push(line);
        }
        let pipes = Pipes {
            stdout,
            stderr,
            tail,
        };
        Ok(Self::capturing(
            child,
            pid,
            pipes,
            log,
            max_line,
            descendants,
        ))
    }

    /// The process with its output captured from `pipes`.
    fn capturing(
        child: Child,
        pid: u32,
        pipes: Pipes,
        log: PluginLog,
        max_line: usize,
        descendants: Descendants,
    ) -> Self {
        let Pipes {
            stdout,
            stderr,
            tail: stderr_tail,
        } = pipes;
        let pause = CancellationToken::new();
        let mut drains = Vec::with_capacity(2);
        for (stream, pipe) in [(LogStream::Stdout, stdout), (LogStream::Stderr, stderr)] {
            let Some((pipe, partial)) = pipe else {
                continue;
            };
            let capture = Capture {
                stream,
                pid,
                log: log.clone(),
                tail: (stream == LogStream::Stderr).then(|| stderr_tail.clone()),
                max_line,
            };
            let pause = pause.clone();
            drains.push(tokio::spawn(async move {
                capture.run(pipe, partial, &pause).await
            }));
        }
        PluginProcess {
            child,
            pid,
            exit: None,
            drains,
            pause,
            stderr_tail,
            descendants,
            detached: false,
        }
    }

    /// Lets go of the running process for a handover: pauses its captures (every complete
    /// line read is stored first) and gives back its pidfd, pipes and unfinished lines.
    /// `None` when it has exited or its captures ended (it is then dropped, and stopped).
    pub async fn detach(mut self) -> Option<DetachedProcess> {
        if self.exit.is_some() || matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
            return None;
        }
        self.pause.cancel();
        let mut pipes = Vec::with_capacity(2);
        for drain in std::mem::take(&mut self.drains) {
            let paused = drain.await.ok().flatten()?;
            let fd = paused.reader.into_nonblocking_fd().ok()?;
            pipes.push((fd, paused.partial));
        }
        let mut pipes = pipes.into_iter();
        let (stdout, stderr) = (pipes.next(), pipes.next());
        let pidfd = self.child.take_pidfd()?;
        self.detached = true;
        let descendants =
            std::mem::replace(&mut self.descendants, Descendants::Marker(PathBuf::new()));
        Some(DetachedProcess {
            pid: self.pid,
            pidfd,
            stdout,
            stderr,
            stderr_tail: self.stderr_tail.lines(),
            descendants,
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILLs the group and waits for the exit, at most `limit` (a process stuck in the
    /// kernel may outlive SIGKILL for a while; it is then reaped in the background).
    pub async fn kill_and_wait(&mut self, limit: Duration) -> ExitStatus {
        if self.exit.is_none() {
            self.signal_group(libc::SIGKILL);
        }
        if let Descendants::Cgroup(cgroup) = &self.descendants {
            cgroup.kill();
        }
        match tokio::time::timeout(limit, self.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::error!(
                    pid = self.pid,
                    "plugin still not reaped {limit:?} after SIGKILL"
                );
                ExitStatus::Signal(libc::SIGKILL)
            }
        }
    }

    /// Waits for the process to exit. Cancel-safe; returns at once once it has exited.
    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let status = match self.child.wait().await {
            Ok(status) => ExitStatus::from_std(status),
            Err(e) => {
                tracing::error!(pid = self.pid, error = %e, "waiting for a plugin failed");
                ExitStatus::Code(-1)
            }
        };
        self.exit = Some(status);
        status
    }

    /// The exit status, if the process has been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// Signals the whole process group.
    pub fn signal_group(&self, sig: i32) {
        signal_group(self.pid, sig);
    }

    /// After the process exited: kills everything it started (its cgroup, or its group and
    /// every process carrying its marker), waits (bounded) for the output to be drained,
    /// and returns the stderr tail.
    pub async fn finish(&mut self, drain_timeout: Duration) -> Vec<String> {
        self.signal_group(libc::SIGKILL);
        match &self.descendants {
            Descendants::Cgroup(cgroup) => {
                cgroup.kill_all(CGROUP_EMPTY_TIMEOUT).await;
            }
            Descendants::Marker(socket) => {
                let killed = kill_marked_with(socket);
                if !killed.is_empty() {
                    tracing::info!(pid = self.pid, killed = ?killed, "killed processes the plugin left behind");
                }
            }
        }
        let drains = std::mem::take(&mut self.drains);
        let all = futures::future::join_all(drains);
        if tokio::time::timeout(drain_timeout, all).await.is_err() {
            tracing::warn!(
                pid = self.pid,
                "plugin output still open after exit; left unread"
            );
        }
        self.stderr_tail.lines()
    }
}

impl Process for PluginProcess {
    fn pid(&self) -> u32 {
        PluginProcess::pid(self)
    }

    fn wait(&mut self) -> impl Future<Output = ExitStatus> + Send {
        PluginProcess::wait(self)
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        PluginProcess::exit_status(self)
    }

    fn signal_group(&self, sig: i32) {
        PluginProcess::signal_group(self, sig)
    }

    fn kill_and_wait(&mut self, limit: Duration) -> impl Future<Output = ExitStatus> + Send {
        PluginProcess::kill_and_wait(self, limit)
    }

    fn finish(&mut self, drain_timeout: Duration) -> impl Future<Output = Vec<String>> + Send {
        PluginProcess::finish(self, drain_timeout)
    }

    fn detach(self) -> impl Future<Output = Option<DetachedProcess>> + Send {
        PluginProcess::detach(self)
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if self.exit.is_none() {
            self.signal_group(libc::SIGKILL);
        }
        match &self.descendants {
            Descendants::Cgroup(cgroup) => cgroup.kill(),
            Descendants::Marker(socket) => {
                kill_marked_with(socket);
            }
        }
        for drain in &self.drains {
            drain.abort();
        }
    }
}
