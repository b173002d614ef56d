//! Starting a child process without copying the daemon: `clone(CLONE_VM | CLONE_VFORK)`,
//! the way `posix_spawn` starts one, but with the child-side steps plugins need (cgroup,
//! rlimits, user, parent-death signal) that `posix_spawn` cannot express.
//!
//! Why: `std`'s `Command` forks as soon as it has a `pre_exec` closure, and a fork copies
//! the daemon's page tables and write-protects its whole heap, which the daemon then faults
//! back page by page. With a thousand plugins the daemon holds ~100 MB, and the forks of
//! their probes and starts were most of its start-up time (`torud-bench scale`, perf:
//! `copy_page_range`, `do_wp_page`). A child sharing the daemon's memory until it execs
//! costs the same whatever the daemon's size.
//!
//! The child runs on a stack of its own in the daemon's memory while the spawning thread
//! waits, so what it runs must be async-signal-safe, allocate nothing, and change nothing
//! the two share: in particular the user switch must be raw system calls (glibc's
//! `setuid` would ask every daemon thread to switch too). A child whose steps change
//! the memory's own attributes (the sandbox sets the dumpable flag, which belongs to the
//! memory) is started with its memory copied instead ([`Command::copy_memory`]), as a
//! fork would. Either way an exec failure reaches the parent through a close-on-exec pipe.
//!
//! Such children are cloned by one spawner thread whose descriptor table is its own and
//! nearly empty (the private `Spawner`), so that exec does not close the daemon's thousands of
//! descriptors in each child. The child's first step joins its cgroup
//! ([`Command::cgroup_procs`]).
//!
//! The returned [`Child`] is waited for through a pidfd registered with tokio, so no
//! `SIGCHLD` handler is involved, and is killed (when asked) and reaped when dropped.
//! This module knows nothing of plugins: `process.rs` says what runs in the child.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

/// A child's standard stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// The daemon's own.
    Inherit,
    /// `/dev/null`.
    Null,
    /// A pipe to the daemon: the child's end is its stream, the daemon's is on [`Child`].
    Piped,
}

impl Stdio {
    /// A pipe to the daemon.
    pub fn piped() -> Self {
        Stdio::Piped
    }

    /// `/dev/null`.
    pub fn null() -> Self {
        Stdio::Null
    }

    /// The daemon's own.
    pub fn inherit() -> Self {
        Stdio::Inherit
    }
}

/// The work done in the child before exec.
type PreExec = Box<dyn FnMut() -> io::Result<()> + Send + Sync>;

/// A process to start: program, arguments and environment (kept in a `std` `Command`, which
/// is only read, never spawned), its standard streams, its process group and what runs in
/// the child before exec.
pub struct Command {
    std: std::process::Command,
    env_cleared: bool,
    stdio: [Stdio; 3],
    process_group: bool,
    kill_on_drop: bool,
    copy_memory: bool,
    cgroup_procs: Option<OwnedFd>,
    fd_floor: RawFd,
    pre_exec: Vec<PreExec>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("program", &self.std.get_program())
            .field("stdio", &self.stdio)
            .finish_non_exhaustive()
    }
}

impl Command {
    /// A command running `program` (a path; a name without `/` is taken in the working
    /// directory, never looked up on `PATH`), with the daemon's environment and streams.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Command {
            std: std::process::Command::new(program),
            env_cleared: false,
            stdio: [Stdio::Inherit; 3],
            process_group: false,
            kill_on_drop: false,
            copy_memory: false,
            cgroup_procs: None,
            fd_floor: 0,
            pre_exec: Vec::new(),
        }
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.std.arg(arg);
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.std.args(args);
        self
    }

    /// Sets an environment variable.
    pub fn env(&mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.std.env(name, value);
        self
    }

    /// Starts from an empty environment instead of the daemon's.
    pub fn env_clear(&mut self) -> &mut Self {
        self.std.env_clear();
        self.env_cleared = true;
        self
    }

    /// The directory the child starts in (entered before the [`Self::pre_exec`] steps).
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.std.current_dir(dir);
        self
    }

    /// The child's standard input.
    pub fn stdin(&mut self, io: Stdio) -> &mut Self {
        self.stdio[0] = io;
        self
    }

    /// The child's standard output.
    pub fn stdout(&mut self, io: Stdio) -> &mut Self {
        self.stdio[1] = io;
        self
    }

    /// The child's standard error.
    pub fn stderr(&mut self, io: Stdio) -> &mut Self {
        self.stdio[2] = io;
        self
    }

    /// Makes the child the leader of a new process group (only 0 is accepted: its own).
    pub fn process_group(&mut self, pgroup: i32) -> &mut Self {
        assert_eq!(pgroup, 0, "only a group of its own is supported");
        self.process_group = true;
        self
    }

    /// SIGKILLs the child when its [`Child`] is dropped before it was reaped.
    pub fn kill_on_drop(&mut self, kill: bool) -> &mut Self {
        self.kill_on_drop = kill;
        self
    }

    /// Starts the child with a copy of the daemon's memory (as `fork` does) instead of
    /// sharing it until exec: for a child whose steps change attributes of the memory
    /// itself, such as its dumpable flag.
    pub fn copy_memory(&mut self, copy: bool) -> &mut Self {
        self.copy_memory = copy;
        self
    }

    /// Moves the child into the cgroup whose `cgroup.procs` this is, open for writing, as its
    /// first step (while it still has the daemon's privileges).
    pub fn cgroup_procs(&mut self, procs: OwnedFd) -> &mut Self {
        self.cgroup_procs = Some(procs);
        self
    }

    /// Keeps the descriptor numbers below `floor` free of what the spawn itself opens in the
    /// child (its pipes' ends, its error pipe), for steps that put descriptors of their own
    /// at numbers chosen before the spawn (the sandbox's binds).
    pub fn keep_fds_free_below(&mut self, floor: RawFd) -> &mut Self {
        self.fd_floor = self.fd_floor.max(floor);
        self
    }

    /// Runs `f` in the child before exec, after its streams and process group are set.
    ///
    /// # Safety
    ///
    /// `f` runs in a child that shares the daemon's memory (unless [`Self::copy_memory`])
    /// while the spawning thread waits: it must be async-signal-safe, must not allocate or
    /// take locks, and must change nothing shared with the daemon (use raw system calls for
    /// user and group changes, which glibc would apply to every thread).
    pub unsafe fn pre_exec<F>(&mut self, f: F) -> &mut Self
    where
        F: FnMut() -> io::Result<()> + Send + Sync + 'static,
    {
        self.pre_exec.push(Box::new(f));
        self
    }

    /// The program, arguments and environment, as a `std` command (for reading).
    pub fn as_std(&self) -> &std::process::Command {
        &self.std
    }

    /// Starts the child. Call from a thread that outlives it when it relies on a
    /// parent-death signal (it fires when the spawning thread exits).
    pub fn spawn(&mut self) -> io::Result<Child> {
        let program = program_path(self.std.get_program())?;
        let mut argv = vec![cstring(self.std.get_program().as_bytes())?];
        for arg in self.std.get_args() {
            argv.push(cstring(arg.as_bytes())?);
        }
        let envp = self.environment()?;
        let dir = match self.std.get_current_dir() {
            Some(dir) => Some(cstring(dir.as_os_str().as_bytes())?),
            None => None,
        };
        let argv_ptrs = null_terminated(&argv);
        let envp_ptrs = null_terminated(&envp);

        let mut parent_ends: [Option<OwnedFd>; 3] = [None, None, None];
        let mut child_ends: [Option<OwnedFd>; 3] = [None, None, None];
        for (i, io) in self.stdio.iter().enumerate() {
            match io {
                Stdio::Inherit => {}
                Stdio::Null => child_ends[i] = Some(open_dev_null()?),
                Stdio::Piped => {
                    let (read, write) = pipe()?;
                    let (parent, child) = if i == 0 { (write, read) } else { (read, write) };
                    parent_ends[i] = Some(parent);
                    child_ends[i] = Some(child);
                }
            }
        }
        let (error_read, error_write) = pipe()?;
        let stack = Stack::new()?;
        let mut pre_exec: Vec<&mut (dyn FnMut() -> io::Result<()> + Send + Sync)> = self
            .pre_exec
            .iter_mut()
            .map(|f| &mut **f as &mut (dyn FnMut() -> io::Result<()> + Send + Sync))
            .collect();
        let mut args = ChildArgs {
            program: program.as_ptr(),
            argv: argv_ptrs.as_ptr(),
            envp: envp_ptrs.as_ptr(),
            stdio: [0, 1, 2].map(|i| child_ends[i].as_ref().map_or(-1, |fd| fd.as_raw_fd())),
            cgroup_procs: self.cgroup_procs.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
            process_group: self.process_group,
            dir: dir.as_ref().map_or(std::ptr::null(), |d| d.as_ptr()),
            pre_exec: &mut pre_exec,
            error: error_write.as_raw_fd(),
            stack: stack.top(),
            copy_memory: self.copy_memory,
            fd_floor: self.fd_floor,
        };
        let pid = match Spawner::get() {
            Some(spawner) => spawner.clone_child(&mut args)?,
            None => clone_child(&mut args)?,
        };
        drop(error_write);
        drop(child_ends);
        if let Some(errno) = read_child_error(&error_read) {
            // It exited without exec: reap it.
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return Err(io::Error::from_raw_os_error(errno));
        }
        // SAFETY: an OwnedFd's descriptor stays open and the same until the AsyncFd drops it.
        let registered = pidfd_open(pid)
            .and_then(|fd| unsafe { AsyncFd::register(fd) }.map_err(io::Error::from));
        let pidfd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: our own unreaped child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                return Err(e);
            }
        };
        let [_, stdout, stderr] = parent_ends;
        Ok(Child {
            pid: pid as u32,
            pidfd: Some(pidfd),
            status: None,
            kill_on_drop: self.kill_on_drop,
            stdout: stdout.map(ChildPipe::from_owned_fd).transpose()?,
            stderr: stderr.map(ChildPipe::from_owned_fd).transpose()?,
        })
    }

    /// The child's environment, `NAME=value` each.
    fn environment(&self) -> io::Result<Vec<CString>> {
        let mut vars: std::collections::BTreeMap<OsString, OsString> = if self.env_cleared {
            Default::default()
        } else {
            std::env::vars_os().collect()
        };
        for (name, value) in self.std.get_envs() {
            match value {
                Some(value) => vars.insert(name.to_owned(), value.to_owned()),
                None => vars.remove(name),
            };
        }
        vars.into_iter()
            .map(|(name, value)| {
                let mut pair = name.into_vec();
                pair.push(b'=');
                pair.extend_from_slice(value.as_bytes());
                cstring(&pair)
            })
            .collect()
    }
}

/// The daemon's end of a child's piped stream.
pub type ChildPipe = tokio::net::unix::pipe::Receiver;

/// A started child process: wait for it through its pidfd; dropped unreaped, it is killed
/// (with `kill_on_drop`) and reaped in the background.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    kill_on_drop: bool,
    /// Its standard output, when piped.
    pub stdout: Option<ChildPipe>,
    /// Its standard error, when piped.
    pub stderr: Option<ChildPipe>,
}

impl Child {
    /// A child of this process started by an earlier image of the daemon (which handed over
    /// `pidfd`, a pidfd of it): waited for and killed on drop like one this image started.
    pub fn adopt(pid: u32, pidfd: OwnedFd) -> io::Result<Child> {
        // SAFETY: an OwnedFd's descriptor stays open and the same until the AsyncFd drops it.
        let pidfd = unsafe { AsyncFd::register(pidfd) }.map_err(io::Error::from)?;
        Ok(Child {
            pid,
            pidfd: Some(pidfd),
            status: None,
            kill_on_drop: true,
            stdout: None,
            stderr: None,
        })
    }

    /// Lets go of the child without reaping or killing it (for a handover): its pidfd, or
    /// `None` when it was reaped already.
    pub fn take_pidfd(&mut self) -> Option<OwnedFd> {
        if self.status.is_some() {
            return None;
        }
        let pidfd = self.pidfd.take()?.into_inner();
        // Nothing for the drop to do any more.
        self.status = Some(ExitStatus::from_raw(0));
        Some(pidfd)
    }

    /// Its pid, until it is reaped.
    pub fn id(&self) -> Option<u32> {
        self.status.is_none().then_some(self.pid)
    }

    /// Waits for it to exit and reaps it. Cancel-safe.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            let pidfd = self
                .pidfd
                .as_ref()
                .expect("unreaped children keep their pidfd");
            // Readable once it exited. Cleared before the next `try_wait`, so an exit after
            // that reaps nothing yet is a new readiness event, and a spurious one costs a
            // loop.
            pidfd.readable().await?.clear_ready();
        }
    }

    /// Reaps it if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        // SAFETY: waiting for our own child, without blocking.
        let got = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut raw, libc::WNOHANG) };
        match got {
            0 => Ok(None),
            n if n < 0 => Err(io::Error::last_os_error()),
            _ => {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                self.pidfd = None;
                Ok(Some(status))
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        if self.kill_on_drop {
            // SAFETY: our own unreaped child: the pid cannot have been reused.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
        let mut orphan = Child {
            pid: self.pid,
            pidfd: self.pidfd.take(),
            status: None,
            kill_on_drop: false,
            stdout: None,
            stderr: None,
        };
        let pid = self.pid as libc::pid_t;
        // Reaped when it exits: on the runtime if there is one, else on a thread.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = orphan.wait().await;
                });
            }
            Err(_) => {
                orphan.status = Some(ExitStatus::from_raw(0));
                std::thread::spawn(move || {
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                });
            }
        }
    }
}

/// What the child needs, prepared by the parent (nothing is allocated in the child).
struct ChildArgs<'a, 'f> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The descriptor to put at 0, 1, 2, or -1 to keep the daemon's.
    stdio: [RawFd; 3],
    /// The `cgroup.procs` to join, or -1.
    cgroup_procs: RawFd,
    process_group: bool,
    /// The directory to enter, or null.
    dir: *const libc::c_char,
    pre_exec: &'a mut Vec<&'f mut (dyn FnMut() -> io::Result<()> + Send + Sync)>,
    /// Where the child writes its errno when it cannot exec (close-on-exec).
    error: RawFd,
    /// The top of the child's stack.
    stack: *mut libc::c_void,
    /// Whether the child gets a copy of the memory rather than sharing it.
    copy_memory: bool,
    /// The spawner puts the child's descriptors at or above this number.
    fd_floor: RawFd,
}

/// Starts the child described by `args` from the calling thread; returns its pid.
fn clone_child(args: &mut ChildArgs<'_, '_>) -> io::Result<libc::pid_t> {
    let flags = if args.copy_memory {
        0
    } else {
        libc::CLONE_VM | libc::CLONE_VFORK
    };
    let _blocked = BlockSignals::all()?;
    // SAFETY: the child runs `child_main` on its own stack with `args`, which live until
    // clone returns (with CLONE_VFORK, after the child's exec or exit; without it, the child
    // has its own copy). Signals are blocked so no handler of the daemon runs in the child
    // before it resets them.
    let pid = unsafe {
        libc::clone(
            child_main,
            args.stack,
            flags | libc::SIGCHLD,
            (args as *mut ChildArgs<'_, '_>).cast(),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// The thread that starts every child, from a descriptor table of its own holding almost
/// nothing, and the one that execs the daemon's next image in a handover.
///
/// A child gets a copy of its parent's descriptor table, and exec closes every descriptor
/// in it one by one (each close flushes the file and drops its locks). The daemon holds
/// five or six descriptors per plugin, so at 1000 plugins each exec closed ~5000 of them:
/// `do_close_on_exec` was 16% of the CPU the daemon and its children spent starting
/// (`perf`, `torud-bench scale`). This thread unshares its table at its start and closes
/// what it inherited; a spawn sends it the child's description, it takes the few
/// descriptors the child needs from the daemon's table (`pidfd_getfd`) and clones.
///
/// It never exits: the parent-death signal of a plugin fires when the thread that started
/// it ends. An exec by another thread ends this one too, so a handover's exec is made
/// here ([`exec_handing_over`]): the plugins outlive it, and the new image's only thread —
/// its main thread — is their parent. The daemon runs this loop on its main thread
/// ([`serve_from_main_thread`]), so that every image, the first or one after a handover,
/// starts its children and makes its exec from the same thread. (Without that, a library
/// user gets it on a thread of its own, started at the first spawn.) Its signals stay
/// blocked.
struct Spawner {
    requests: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
}

/// What the spawner thread is asked to do. Each pointer is valid until the reply is sent
/// (the asking thread waits for it).
enum Job {
    /// Start a child.
    Clone {
        args: *mut ChildArgs<'static, 'static>,
        reply: std::sync::mpsc::SyncSender<io::Result<libc::pid_t>>,
    },
    /// Replace the daemon's image; the reply is the error when exec fails.
    Exec {
        exec: *const Exec,
        reply: std::sync::mpsc::SyncSender<io::Error>,
    },
    /// The daemon's own work (on another thread) has ended: stop serving.
    Done,
}

// SAFETY: the pointers are used only while the sender waits for the reply, so the data they
// point to (plain descriptors, C strings and closures that are Send + Sync) stays alive and
// untouched by the sender.
unsafe impl Send for Job {}

impl Spawner {
    /// The spawner thread: the main thread's when the daemon installed it there, else one
    /// started at the first call; `None` when this kernel (or a seccomp policy) refuses what
    /// it needs: then children start from the calling thread.
    fn get() -> Option<&'static Spawner> {
        SPAWNER.get_or_init(Spawner::start).as_ref()
    }

    fn start() -> Option<Spawner> {
        let (requests, incoming) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<bool>(1);
        let started = std::thread::Builder::new()
            .name("torud-spawner".into())
            .spawn(move || {
                let daemon = pidfd_open(std::process::id() as libc::pid_t);
                let own = match daemon.and_then(own_table) {
                    Ok(own) => own,
                    Err(e) => {
                        tracing::warn!(error = %e, "no spawner thread: plugins start from the async workers");
                        let _ = ready_tx.send(false);
                        return;
                    }
                };
                let _ = ready_tx.send(true);
                serve_jobs(Some(&own), &incoming);
            });
        match started {
            Ok(_) if ready_rx.recv() == Ok(true) => Some(Spawner {
                requests: std::sync::Mutex::new(requests),
            }),
            _ => None,
        }
    }

    fn send(&self, job: Job) -> Result<(), Job> {
        self.requests
            .lock()
            .expect("spawner queue poisoned")
            .send(job)
            .map_err(|e| e.0)
    }

    /// Starts the child on the spawner thread and waits for its pid.
    fn clone_child(&self, args: &mut ChildArgs<'_, '_>) -> io::Result<libc::pid_t> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let job = Job::Clone {
            args: (args as *mut ChildArgs<'_, '_>).cast(),
            reply,
        };
        if self.send(job).is_err() {
            return clone_child(args);
        }
        answer
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone")))
    }
}

static SPAWNER: std::sync::OnceLock<Option<Spawner>> = std::sync::OnceLock::new();

/// Serves jobs until [`Job::Done`]; `own` is this thread's own table (`None`: it shares the
/// daemon's).
fn serve_jobs(own: Option<&OwnTable>, incoming: &std::sync::mpsc::Receiver<Job>) {
    for job in incoming {
        match job {
            Job::Clone { args, reply } => {
                // SAFETY: see `Job`.
                let args = unsafe { &mut *args };
                let _ = reply.send(match own {
                    Some(own) => own.clone_child(args),
                    None => clone_child(args),
                });
            }
            Job::Exec { exec, reply } => {
                // SAFETY: see `Job`.
                let exec = unsafe { &*exec };
                let _ = reply.send(exec_here(own, exec));
            }
            Job::Done => return,
        }
    }
}

/// Runs `daemon` on a new thread while the calling thread — the process's main thread —
/// serves as the spawner thread, and returns what `daemon` returns. Call first thing in
/// `main`, before any thread starts (signals are unblocked for the daemon's threads first:
/// an image started by a handover inherits the spawner's blocked mask).
pub fn serve_from_main_thread<T: Send + 'static>(
    daemon: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    // SAFETY: plain signal-mask call on this thread, inherited by the threads it starts.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    let (requests, incoming) = std::sync::mpsc::channel::<Job>();
    let done = requests.clone();
    if SPAWNER
        .set(Some(Spawner {
            requests: std::sync::Mutex::new(requests),
        }))
        .is_err()
    {
        return Err(io::Error::other("a spawner thread is already running"));
    }
    let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel(1);
    let worker = std::thread::Builder::new()
        .name("torud".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let result = daemon();
            let _ = done.send(Job::Done);
            result
        })?;
    // After the daemon's thread started: it keeps the process's table, this thread gets its
    // own, taking descriptors from that thread's (a pidfd of the thread, Linux 6.9). Where
    // that is refused, this thread shares the daemon's table.
    let worker_tid = tid_rx
        .recv()
        .map_err(|_| io::Error::other("the daemon's thread did not start"))?;
    let own = pidfd_open_thread(worker_tid)
        .and_then(own_table)
        .inspect_err(
            |e| tracing::debug!(error = %e, "the spawner shares the daemon's descriptor table"),
        )
        .ok();
    if own.is_none() {
        block_all_signals();
    }
    serve_jobs(own.as_ref(), &incoming);
    worker
        .join()
        .map_err(|_| io::Error::other("the daemon's thread panicked"))
}

/// The program a handover execs.
#[derive(Debug)]
pub enum ExecProgram {
    /// A file by its path.
    Path(std::path::PathBuf),
    /// An executable file by a descriptor of the daemon's (`O_PATH` will do): one that may
    /// no longer have a path, such as the daemon's own replaced binary.
    Fd(RawFd),
}

/// A handover's exec: the program, its arguments and environment, and the daemon's
/// descriptors the new image inherits. Their numbers in the new image are given to it, in
/// order, in the environment variable [`HANDOVER_FDS`] (comma-separated).
#[derive(Debug)]
pub struct Exec {
    /// What to run.
    pub program: ExecProgram,
    /// `argv`, including `argv[0]`.
    pub args: Vec<OsString>,
    /// The environment, `NAME=value` each ([`HANDOVER_FDS`] is added).
    pub env: Vec<OsString>,
    /// Descriptors (of the daemon's table) the new image gets, in this order.
    pub fds: Vec<RawFd>,
}

/// The environment variable naming the descriptors a handover passed, in order.
pub const HANDOVER_FDS: &str = "TORUD_HANDOVER_FDS";

/// Replaces the daemon's image as [`Exec`] says, from the spawner thread (so the plugins it
/// started survive it). Returns only when exec failed, with the reason; the daemon is
/// untouched then.
pub fn exec_handing_over(exec: &Exec) -> io::Error {
    let Some(spawner) = Spawner::get() else {
        return io::Error::other("no spawner thread: a handover cannot keep the plugins");
    };
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let job = Job::Exec {
        exec: exec as *const Exec,
        reply,
    };
    if spawner.send(job).is_err() {
        return io::Error::other("the spawner thread is gone");
    }
    answer
        .recv()
        .unwrap_or_else(|_| io::Error::other("the spawner thread is gone"))
}

/// The exec, on the spawner thread: the descriptors taken into its table (when it has its
/// own) without close-on-exec, their numbers in [`HANDOVER_FDS`], then execve.
fn exec_here(own: Option<&OwnTable>, exec: &Exec) -> io::Error {
    let mut taken = Vec::with_capacity(exec.fds.len());
    let mut numbers = Vec::with_capacity(exec.fds.len());
    let mut take = |fd: RawFd| -> io::Result<RawFd> {
        match own {
            Some(own) => {
                let copy = take_fd(&own.daemon, fd)?;
                let raw = copy.as_raw_fd();
                taken.push(copy);
                Ok(raw)
            }
            None => Ok(fd),
        }
    };
    let program = match &exec.program {
        ExecProgram::Path(path) => match cstring(path.as_os_str().as_bytes()) {
            Ok(path) => Ok(path),
            Err(e) => return e,
        },
        ExecProgram::Fd(fd) => match take(*fd) {
            Ok(fd) => Err(fd),
            Err(e) => return e,
        },
    };
    for &fd in &exec.fds {
        match take(fd) {
            Ok(number) => numbers.push(number),
            Err(e) => return e,
        }
    }
    let list: Vec<String> = numbers.iter().map(|n| n.to_string()).collect();
    let mut env: Vec<CString> = Vec::with_capacity(exec.env.len() + 1);
    let prefix = format!("{HANDOVER_FDS}=");
    for var in &exec.env {
        if var.as_bytes().starts_with(prefix.as_bytes()) {
            continue;
        }
        match cstring(var.as_bytes()) {
            Ok(var) => env.push(var),
            Err(e) => return e,
        }
    }
    env.push(CString::new(format!("{prefix}{}", list.join(","))).expect("digits and commas"));
    let args: Result<Vec<CString>, _> = exec.args.iter().map(|a| cstring(a.as_bytes())).collect();
    let args = match args {
        Ok(args) => args,
        Err(e) => return e,
    };
    let argv = null_terminated(&args);
    let envp = null_terminated(&env);
    // The descriptors cross the exec: clear their close-on-exec flag, and set it back if
    // the exec fails (in a shared table they are the daemon's own).
    let set_cloexec = |on: bool| {
        for &fd in &numbers {
            // SAFETY: flag changes on descriptors that stay open meanwhile.
            unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
        }
    };
    set_cloexec(false);
    // SAFETY: execve with NUL-terminated arrays that live until it returns (only on failure).
    unsafe {
        match &program {
            Ok(path) => libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()),
            Err(fd) => libc::syscall(
                libc::SYS_execveat,
                *fd,
                c"".as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            ) as libc::c_int,
        };
    }
    let error = io::Error::last_os_error();
    set_cloexec(true);
    error
}

/// Blocks every signal on the calling thread (for good).
fn block_all_signals() {
    // SAFETY: plain signal-mask call on this thread.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
}

/// The spawner thread's own descriptor table: unshared from the daemon's, emptied but for
/// the standard streams, and a pidfd of the daemon to take descriptors from its table.
struct OwnTable {
    daemon: OwnedFd,
}

/// Gives the calling thread a table of its own; `daemon` is a pidfd of a thread that keeps
/// the daemon's table. Checked before anything changes: on an error the calling thread
/// still shares the daemon's table.
fn own_table(daemon: OwnedFd) -> io::Result<OwnTable> {
    drop(take_fd(&daemon, 0)?);
    let daemon_fd = daemon.as_raw_fd();
    block_all_signals();
    // SAFETY: plain system calls affecting only this thread's table. The pidfd keeps its
    // number in the copy (close_range spares it); the daemon's table keeps its own copy of
    // it, one descriptor, never used there.
    unsafe {
        if libc::unshare(libc::CLONE_FILES) != 0 {
            return Err(io::Error::last_os_error());
        }
        if daemon_fd > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (daemon_fd - 1) as u32, 0u32);
        }
        libc::syscall(
            libc::SYS_close_range,
            (daemon_fd + 1) as u32,
            u32::MAX,
            0u32,
        );
    }
    Ok(OwnTable { daemon })
}

/// A copy, in this thread's table, of the daemon's descriptor `fd` (close-on-exec).
fn take_fd(daemon: &OwnedFd, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd returns a new descriptor we then own.
    unsafe {
        let got = libc::syscall(libc::SYS_pidfd_getfd, daemon.as_raw_fd(), fd, 0u32);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(got as RawFd))
    }
}

impl OwnTable {
    /// Takes the child's descriptors into this table, renumbers `args` to them, clones, and
    /// closes them again.
    fn clone_child(&self, args: &mut ChildArgs<'_, '_>) -> io::Result<libc::pid_t> {
        let mut taken = Vec::with_capacity(5);
        let mut take = |fd: &mut RawFd| -> io::Result<()> {
            if *fd >= 0 {
                let mut copy = take_fd(&self.daemon, *fd)?;
                if copy.as_raw_fd() < args.fd_floor {
                    copy = raise_fd(&copy, args.fd_floor)?;
                }
                *fd = copy.as_raw_fd();
                taken.push(copy);
            }
            Ok(())
        };
        for fd in args.stdio.iter_mut() {
            take(fd)?;
        }
        take(&mut args.cgroup_procs)?;
        take(&mut args.error)?;
        clone_child(args)
    }
}

/// A copy of `fd` numbered `floor` or above (close-on-exec).
fn raise_fd(fd: &OwnedFd, floor: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    unsafe {
        let got = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor);
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(got))
    }
}

/// The child: streams, process group, signals back to their defaults, the caller's steps,
/// exec. On any failure it writes its errno to the error pipe and exits 127.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive while the parent waits (CLONE_VFORK)
    // or copied with the memory. Only async-signal-safe calls follow.
    unsafe {
        let args = &mut *(arg as *mut ChildArgs<'_, '_>);
        let errno = child_steps(args);
        let bytes = errno.to_ne_bytes();
        libc::write(args.error, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// The child's steps up to exec; returns the errno of the one that failed.
unsafe fn child_steps(args: &mut ChildArgs<'_, '_>) -> i32 {
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    };
    // "0" moves the writing process; first, while it still has the daemon's privileges.
    if args.cgroup_procs >= 0 && libc::write(args.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
        return errno();
    }
    reset_signal_handlers();
    for (target, &fd) in args.stdio.iter().enumerate() {
        if fd >= 0 && libc::dup2(fd, target as RawFd) < 0 {
            return errno();
        }
    }
    if args.process_group && libc::setpgid(0, 0) != 0 {
        return errno();
    }
    if !args.dir.is_null() && libc::chdir(args.dir) != 0 {
        return errno();
    }
    // The daemon ignores SIGPIPE and blocked every signal around clone: a program starts
    // with neither.
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
        return errno();
    }
    for step in args.pre_exec.iter_mut() {
        if let Err(e) = step() {
            return e.raw_os_error().unwrap_or(libc::EINVAL);
        }
    }
    libc::execve(args.program, args.argv, args.envp);
    errno()
}

/// Every signal the daemon handles goes back to its default action (the handlers are the
/// daemon's code, not the child's), and SIGPIPE too (the daemon ignores it). The child has
/// its own table of actions (no CLONE_SIGHAND), so the daemon's stay as they are.
unsafe fn reset_signal_handlers() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
            continue;
        }
        let handled = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
        if handled || sig == libc::SIGPIPE {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &default, std::ptr::null_mut());
        }
    }
}

/// The errno the child wrote, or `None` when the pipe closed empty (it exec'd).
fn read_child_error(pipe: &OwnedFd) -> Option<i32> {
    let mut bytes = [0u8; 4];
    let mut got = 0;
    while got < bytes.len() {
        // SAFETY: reading into our own buffer.
        let n = unsafe {
            libc::read(
                pipe.as_raw_fd(),
                bytes[got..].as_mut_ptr().cast(),
                bytes.len() - got,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    (got == bytes.len()).then(|| i32::from_ne_bytes(bytes))
}

/// Blocks every signal in this thread until dropped (then restores the mask).
struct BlockSignals(libc::sigset_t);

impl BlockSignals {
    fn all() -> io::Result<Self> {
        // SAFETY: plain signal-mask calls on this thread.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(BlockSignals(old))
        }
    }
}

impl Drop for BlockSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `all`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// The child's stack: mapped for one spawn, with a guard page below it.
struct Stack {
    base: *mut libc::c_void,
}

/// The child's stack size: its steps are a few system calls, the sandbox's the deepest.
const STACK_BYTES: usize = 256 * 1024;
/// The guard page below the stack.
const GUARD_BYTES: usize = 4096;

impl Stack {
    fn new() -> io::Result<Self> {
        // SAFETY: a fresh private mapping, guarded at its low end.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                STACK_BYTES + GUARD_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            libc::mprotect(base, GUARD_BYTES, libc::PROT_NONE);
            Ok(Stack { base })
        }
    }

    /// The stack's top (it grows down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping.
        unsafe { self.base.cast::<u8>().add(STACK_BYTES + GUARD_BYTES).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the child exec'd, exited or has a copy).
        unsafe { libc::munmap(self.base, STACK_BYTES + GUARD_BYTES) };
    }
}

/// The path execve gets: as given when it has a `/`, else in the working directory.
fn program_path(program: &OsStr) -> io::Result<CString> {
    let bytes = program.as_bytes();
    if bytes.contains(&b'/') {
        cstring(bytes)
    } else {
        cstring(Path::new(".").join(program).as_os_str().as_bytes())
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a program, argument or environment variable holds a NUL byte",
        )
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, which we then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

fn open_dev_null() -> io::Result<OwnedFd> {
    // SAFETY: open returns a descriptor we then own.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// A pidfd of one thread (`PIDFD_THREAD`, which is `O_EXCL`): `pidfd_getfd` then takes from
/// that thread's descriptor table.
fn pidfd_open_thread(tid: libc::pid_t) -> io::Result<OwnedFd> {
    pidfd_open_flags(tid, libc::O_EXCL as libc::c_uint)
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    pidfd_open_flags(pid, 0)
}

fn pidfd_open_flags(pid: libc::pid_t, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a descriptor we then own.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, flags);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as RawFd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    async fn read_all(pipe: &mut ChildPipe) -> String {
        let mut out = String::new();
        pipe.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn runs_the_program_with_its_arguments_environment_and_pipes() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo out $A; echo err >&2; exit 3"])
            .env_clear()
            .env("A", "a")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let out = read_all(child.stdout.as_mut().expect("piped")).await;
        let err = read_all(child.stderr.as_mut().expect("piped")).await;
        let status = child.wait().await.expect("wait");
        assert_eq!((out.as_str(), err.as_str()), ("out a\n", "err\n"));
        assert_eq!(status.code(), Some(3));
        assert_eq!(child.id(), None, "a reaped child has no pid");
    }

    #[tokio::test]
    async fn the_child_shares_the_daemons_memory_until_exec() {
        // What makes a spawn cheap: no copy of the daemon. A flag set in the child before
        // exec is seen by the parent; a forked child would set it in its own copy.
        let seen = Arc::new(AtomicBool::new(false));
        let in_child = seen.clone();
        let mut cmd = Command::new("/bin/true");
        // SAFETY: an atomic store, async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                in_child.store(true, Ordering::SeqCst);
                Ok(())
            })
        };
        let mut child = cmd.spawn().expect("spawn");
        assert!(child.wait().await.expect("wait").success());
        assert!(
            seen.load(Ordering::SeqCst),
            "the child ran on a copy of memory"
        );

        let copied = Arc::new(AtomicBool::new(false));
        let in_copy = copied.clone();
        let mut cmd = Command::new("/bin/true");
        cmd.copy_memory(true);
        // SAFETY: as above.
        unsafe {
            cmd.pre_exec(move || {
                in_copy.store(true, Ordering::SeqCst);
                Ok(())
            })
        };
        let mut child = cmd.spawn().expect("spawn");
        assert!(child.wait().await.expect("wait").success());
        assert!(
            !copied.load(Ordering::SeqCst),
            "copy_memory shared the memory"
        );
    }

    #[tokio::test]
    async fn sigpipe_is_back_to_its_default_in_the_child() {
        // Rust programs (this test too) ignore SIGPIPE; a child that inherited that would
        // see `yes` report a broken pipe instead of dying quietly of the signal.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "yes | head -c 1 >/dev/null"])
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let err = read_all(child.stderr.as_mut().expect("piped")).await;
        child.wait().await.expect("wait");
        assert_eq!(err, "", "SIGPIPE was inherited ignored");
    }

    #[tokio::test]
    async fn the_child_starts_from_a_table_of_its_own_not_the_daemons() {
        // A descriptor the daemon holds without close-on-exec: a child with a copy of the
        // daemon's table would inherit it (and exec would have had to close all the rest).
        // SAFETY: open returns a descriptor we then own.
        let held = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
        assert!(held >= 0);
        // SAFETY: we own it.
        let held = unsafe { OwnedFd::from_raw_fd(held) };
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "ls /proc/self/fd"]).stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let out = read_all(child.stdout.as_mut().expect("piped")).await;
        child.wait().await.expect("wait");
        let fds: Vec<&str> = out.split_whitespace().collect();
        assert!(
            !fds.contains(&held.as_raw_fd().to_string().as_str()),
            "the child inherited descriptor {} of the daemon: {fds:?}",
            held.as_raw_fd()
        );
    }

    #[tokio::test]
    async fn failures_before_exec_are_the_spawns_errors() {
        let missing = Command::new("/nonexistent/program").spawn();
        assert_eq!(
            missing.expect_err("no such program").kind(),
            io::ErrorKind::NotFound
        );
        for copy in [false, true] {
            let mut cmd = Command::new("/bin/true");
            cmd.copy_memory(copy);
            // SAFETY: returns an error, nothing else.
            unsafe { cmd.pre_exec(|| Err(io::Error::from_raw_os_error(libc::EPERM))) };
            let err = cmd.spawn().expect_err("the step failed");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        }
    }

    #[tokio::test]
    async fn its_own_group_default_signals_and_kill_on_drop() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "ps -o pgid= -p $$ | tr -d ' '; exec sleep 100"])
            .stdout(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn");
        let pid = child.id().expect("running");
        let mut out = String::new();
        let pipe = child.stdout.as_mut().expect("piped");
        let mut buf = [0u8; 256];
        while !out.ends_with('\n') {
            let n = pipe.read(&mut buf).await.expect("read");
            assert!(n > 0, "no output");
            out.push_str(std::str::from_utf8(&buf[..n]).expect("utf-8"));
        }
        assert_eq!(out.trim(), pid.to_string(), "not its own group leader");
        drop(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // SAFETY: signal 0 only checks for existence.
        while unsafe { libc::kill(pid as libc::pid_t, 0) } == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "not killed and reaped on drop"
            );
            tokio::task::yield_now().await;
        }
    }
}
