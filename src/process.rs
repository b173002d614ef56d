//! Plugin processes: how they are spawned (own process group, parent-death signal, a clean
//! environment), signalled and reaped.
//!
//! Architecture invariant: every plugin process — the long-running one and the short
//! `--metadata` one — is its own process-group leader with `PR_SET_PDEATHSIG = SIGKILL`, so
//! signalling the group reaches its descendants and the plugin dies with the daemon even
//! when the daemon is SIGKILLed. The parent-death signal fires when the *thread* that
//! spawned the child exits, so children are only spawned from async tasks (tokio's worker
//! threads live as long as the runtime), never from `spawn_blocking` threads.
//! This module knows nothing of sockets, states or events.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::capture::{drain_lines, PluginLog, StderrTail};
use crate::config::PluginLimits;

#[cfg(target_env = "gnu")]
type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type RlimitResource = libc::c_int;
use crate::model::ExitStatus;
use crate::model::LogStream;

/// Builds a command for a plugin executable with only the allowlisted environment, its own
/// process group, the parent-death signal and `limits`.
pub fn plugin_command(
    binary: &Path,
    allowlist: &[String],
    extra_env: &[(&str, OsString)],
    limits: &PluginLimits,
) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env_clear();
    for name in allowlist {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    for (name, value) in extra_env {
        cmd.env(name, value);
    }
    cmd.stdin(Stdio::null()).process_group(0).kill_on_drop(true);
    let daemon_pid = std::process::id() as libc::pid_t;
    let rlimits: Vec<(RlimitResource, u64)> = [
        (libc::RLIMIT_AS, limits.address_space),
        (libc::RLIMIT_NOFILE, limits.open_files),
        (libc::RLIMIT_NPROC, limits.processes),
    ]
    .into_iter()
    .filter_map(|(resource, value)| value.map(|v| (resource, v)))
    .collect();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, setrlimit, _exit); `rlimits` was built
    // before the fork, so nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            for &(resource, value) in &rlimits {
                let limit = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
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
            // The daemon may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != daemon_pid {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd
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
        if environ
            .split(|&b| b == 0)
            .any(|var| var.starts_with(&marker))
        {
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

/// A running plugin process with its output being drained into its log.
pub struct PluginProcess {
    child: Child,
    pid: u32,
    exit: Option<ExitStatus>,
    drains: Vec<JoinHandle<()>>,
    stderr_tail: StderrTail,
}

impl PluginProcess {
    /// Spawns the plugin with stdout and stderr drained line by line (lines longer than
    /// `max_line` split) into `log`.
    pub fn spawn(mut cmd: Command, log: PluginLog, max_line: usize) -> std::io::Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let stderr_tail = StderrTail::default();
        let mut drains = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            widen_pipe(&out);
            drains.push(tokio::spawn(drain_lines(
                out,
                LogStream::Stdout,
                pid,
                log.clone(),
                None,
                max_line,
            )));
        }
        if let Some(err) = child.stderr.take() {
            widen_pipe(&err);
            drains.push(tokio::spawn(drain_lines(
                err,
                LogStream::Stderr,
                pid,
                log,
                Some(stderr_tail.clone()),
                max_line,
            )));
        }
        Ok(PluginProcess {
            child,
            pid,
            exit: None,
            drains,
            stderr_tail,
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

    /// After the process exited: kills what is left of its group (grandchildren holding the
    /// pipes), waits (bounded) for the output to be drained, and returns the stderr tail.
    pub async fn finish(&mut self, drain_timeout: Duration) -> Vec<String> {
        self.signal_group(libc::SIGKILL);
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

impl Drop for PluginProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.signal_group(libc::SIGKILL);
        }
        for drain in &self.drains {
            drain.abort();
        }
    }
}
