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
            process_group: self.process_group,
            dir: dir.as_ref().map_or(std::ptr::null(), |d| d.as_ptr()),
            pre_exec: &mut pre_exec,
            error: error_write.as_raw_fd(),
        };
        let flags = if self.copy_memory {
            0
        } else {
            libc::CLONE_VM | libc::CLONE_VFORK
        };
        let pid = {
            let _blocked = BlockSignals::all()?;
            // SAFETY: the child runs `child_main` on its own stack with `args`, which live
            // until clone returns (with CLONE_VFORK, after the child's exec or exit; without
            // it, the child has its own copy). Signals are blocked so no handler of the
            // daemon runs in the child before it resets them.
            unsafe {
                libc::clone(
                    child_main,
                    stack.top(),
                    flags | libc::SIGCHLD,
                    (&mut args as *mut ChildArgs<'_, '_>).cast(),
                )
            }
        };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
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
    process_group: bool,
    /// The directory to enter, or null.
    dir: *const libc::c_char,
    pre_exec: &'a mut Vec<&'f mut (dyn FnMut() -> io::Result<()> + Send + Sync)>,
    /// Where the child writes its errno when it cannot exec (close-on-exec).
    error: RawFd,
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

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a descriptor we then own.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
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
