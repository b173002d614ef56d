//! Reaching a plugin's socket: waiting for it to accept, connecting while its backlog is
//! full, and Toru's one-message-per-connection discipline for v1 plugins. The multiplexed
//! request path is `link.rs`'s; the non-intrusive v1 health check is `listening.rs`'s.
//! A plugin cannot point the daemon at another plugin's socket: the socket file is opened
//! without following links and connected through its descriptor, and every connection is
//! checked against the peer's credentials (the listener must run as the owner of the
//! directory the socket is in, `run/<id>/`, the plugin's user).
//! This module knows nothing of processes or states.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use toru_plugin_sdk::codec::encode_frame;
use toru_plugin_sdk::{Envelope, FrameError};

/// First wait between connection attempts; doubles up to [`FAST_RETRY_CAP`] while the
/// plugin is young, then up to [`MAX_RETRY_DELAY`]. Most plugins bind within a few
/// milliseconds, and a failed `connect` on a missing socket costs a few microseconds, so
/// polling finely at first costs little and adds at most 0.2 ms to readiness.
const FIRST_RETRY_DELAY: Duration = Duration::from_micros(50);
/// Cap of the wait during the first [`FAST_RETRY_PERIOD`].
const FAST_RETRY_CAP: Duration = Duration::from_micros(200);
/// How long to poll finely.
const FAST_RETRY_PERIOD: Duration = Duration::from_millis(50);
/// Longest wait between connection attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_millis(2);

/// Errors reaching a plugin.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket did not accept a connection before the deadline.
    #[error("not ready within {}: socket {path} did not accept a connection ({last_error})", humantime::format_duration(*limit))]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long we were allowed to try.
        limit: Duration,
        /// The last connect error.
        last_error: String,
    },
    /// Connecting failed in a way retrying cannot fix.
    #[error("cannot connect to {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Sending failed.
    #[error("sending to the plugin failed: {0}")]
    Send(#[from] FrameError),
    /// The listener is not the plugin's user.
    #[error("cannot connect to {path}: {source}")]
    Peer {
        /// The socket.
        path: PathBuf,
        /// Whose listener it is.
        source: std::io::Error,
    },
}

/// The credentials (pid, uid, gid) of the process at the other end of a Unix socket, as
/// they were when it connected or listened (`SO_PEERCRED`).
pub fn peer_credentials(stream: &impl std::os::fd::AsRawFd) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// Opens the socket file at `path` itself (`O_PATH | O_NOFOLLOW`) and returns it with the
/// short `/proc/thread-self/fd/N` name (this thread's table: the main thread, whose
/// table `/proc/self` shows, has a table of its own) that connects to exactly that socket: a symbolic link a
/// plugin put in its directory (to another plugin's socket, say) is refused, not followed.
fn open_socket(path: &Path) -> std::io::Result<(std::fs::File, String)> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_symlink() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "it is a symbolic link; a plugin's socket must be the socket itself",
        ));
    }
    if !kind.is_socket() {
        // Not a socket (yet): like a socket nobody listens on.
        return Err(std::io::ErrorKind::ConnectionRefused.into());
    }
    use std::os::fd::AsRawFd;
    let name = format!("/proc/thread-self/fd/{}", file.as_raw_fd());
    Ok((file, name))
}

/// Checks that the process listening on `stream` runs as the owner of the directory
/// `path` is in; a `PermissionDenied` error says whose it is otherwise.
pub fn check_peer(stream: &impl std::os::fd::AsRawFd, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let owner = std::fs::symlink_metadata(dir)?.uid();
    let cred = peer_credentials(stream)?;
    if cred.uid != owner {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "its listener (pid {}) runs as uid {}, not as uid {}, the owner of {}: \
                 refusing a socket that leads to another user's process",
                cred.pid,
                cred.uid,
                owner,
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// How many connects may wait at once on blocking threads, polling every few hundred
/// microseconds. Further waiters (a thousand plugins starting together) poll from the
/// runtime at millisecond steps instead, so that a crowd neither holds a thread (and its
/// memory) each nor floods the host with attempts.
const FINE_POLLERS: usize = 8;
/// Connects waiting at once, on blocking threads and on the runtime.
static WAITING: AtomicUsize = AtomicUsize::new(0);
/// Of them, those on blocking threads.
static FINE_POLLING: AtomicUsize = AtomicUsize::new(0);
/// Per waiter of a crowd, the added cap on its wait between attempts: the crowd as a whole
/// makes about 10,000 attempts per second, however large it is.
const CROWD_DELAY_PER_WAITER: Duration = Duration::from_micros(100);

/// Counts a connect among [`WAITING`] (or [`FINE_POLLING`]) until dropped.
struct Waiting(&'static AtomicUsize);

impl Waiting {
    fn new(counter: &'static AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Waiting(counter)
    }

    /// A place among the [`FINE_POLLERS`], if one is free.
    fn fine() -> Option<Self> {
        let claimed = FINE_POLLING
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < FINE_POLLERS).then_some(n + 1)
            })
            .is_ok();
        claimed.then_some(Waiting(&FINE_POLLING))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects to `path`, retrying while the socket does not exist or refuses, until
/// `timeout`. The first `FINE_POLLERS` waiters poll on a blocking thread with
/// sub-millisecond sleeps (tokio's timer has millisecond resolution); the others poll from
/// the runtime (`connect_coarsely`). Attempts stop when the returned future is dropped.
pub async fn connect_with_retry(
    path: &Path,
    timeout: Duration,
) -> Result<UnixStream, ConnectError> {
    let _waiting = Waiting::new(&WAITING);
    let Some(fine) = Waiting::fine() else {
        return connect_coarsely(path, timeout).await;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let path = path.to_owned();
    let task = tokio::task::spawn_blocking(move || {
        let _fine = fine;
        connect_blocking(&path, timeout, &stop)
    });
    let std_stream = task.await.expect("connect task panicked")?;
    std_stream
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(std_stream))
        .map_err(|source| ConnectError::Io {
            path: PathBuf::new(),
            source,
        })
}

/// [`connect_with_retry`] for a waiter beyond the [`FINE_POLLERS`]: non-blocking attempts
/// from the runtime, the wait between them doubling from 1 ms up to a cap that grows with
/// the number of waiters.
async fn connect_coarsely(path: &Path, timeout: Duration) -> Result<UnixStream, ConnectError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(1);
    loop {
        let attempt = match open_socket(path) {
            Ok((_file, name)) => UnixStream::connect(&name).await,
            Err(e) => Err(e),
        };
        match attempt {
            Ok(stream) => return verified(stream, path),
            Err(e) if not_yet_listening(&e) || e.kind() == std::io::ErrorKind::WouldBlock => {
                let waited = start.elapsed();
                if waited >= timeout {
                    return Err(ConnectError::Timeout {
                        path: path.to_owned(),
                        limit: timeout,
                        last_error: e.to_string(),
                    });
                }
                tokio::time::sleep(delay.min(timeout - waited)).await;
                let crowd = CROWD_DELAY_PER_WAITER * WAITING.load(Ordering::Relaxed) as u32;
                delay = (delay * 2).min(crowd.max(MAX_RETRY_DELAY));
            }
            Err(source) => {
                return Err(ConnectError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// A connected `stream`, once [`check_peer`] says the plugin's own user serves it.
fn verified<S: std::os::fd::AsRawFd>(stream: S, path: &Path) -> Result<S, ConnectError> {
    check_peer(&stream, path)
        .map(|()| stream)
        .map_err(|source| ConnectError::Peer {
            path: path.to_owned(),
            source,
        })
}

/// Whether a failed connect means the plugin is not listening yet (no socket, or nobody
/// accepting on it), so another attempt may succeed.
fn not_yet_listening(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn connect_blocking(
    path: &Path,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<std::os::unix::net::UnixStream, ConnectError> {
    let start = Instant::now();
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        let connected = open_socket(path)
            .and_then(|(_file, name)| std::os::unix::net::UnixStream::connect(name));
        match connected {
            Ok(stream) => return verified(stream, path),
            Err(e) if not_yet_listening(&e) => {
                let waited = start.elapsed();
                if waited >= timeout || stop.load(Ordering::Relaxed) {
                    return Err(ConnectError::Timeout {
                        path: path.to_owned(),
                        limit: timeout,
                        last_error: e.to_string(),
                    });
                }
                std::thread::sleep(delay.min(timeout - waited));
                let cap = if waited < FAST_RETRY_PERIOD {
                    FAST_RETRY_CAP
                } else {
                    MAX_RETRY_DELAY
                };
                delay = (delay * 2).min(cap);
            }
            Err(source) => {
                return Err(ConnectError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Connects to a listening socket, waiting while its backlog is full (Linux answers EAGAIN
/// at once then, rather than blocking). Callers bound it with their own timeout.
pub async fn connect_patiently(path: &Path) -> std::io::Result<UnixStream> {
    let mut delay = Duration::from_micros(200);
    loop {
        let (_file, name) = open_socket(path)?;
        match UnixStream::connect(&name).await {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(20));
            }
            Ok(stream) => return check_peer(&stream, path).map(|()| stream),
            other => return other,
        }
    }
}

/// Toru's v1 discipline: one message on its own connection, then close.
pub async fn send_one(path: &Path, envelope: &Envelope) -> Result<(), ConnectError> {
    let io = |source| ConnectError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = connect_patiently(path).await.map_err(io)?;
    send_one_on(&mut stream, envelope).await.map_err(io)
}

/// Writes one framed message on `stream` and closes the writing half.
pub async fn send_one_on(stream: &mut UnixStream, envelope: &Envelope) -> std::io::Result<()> {
    stream.write_all(&encode_frame(&envelope.to_vec())).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crowd_of_waiters_beyond_the_fine_pollers_all_connect() {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths: Vec<PathBuf> = (0..FINE_POLLERS * 3)
            .map(|i| dir.path().join(format!("{i}.sock")))
            .collect();
        let waiters: Vec<_> = paths
            .iter()
            .map(|path| {
                let path = path.clone();
                tokio::spawn(
                    async move { connect_with_retry(&path, Duration::from_secs(10)).await },
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _listeners: Vec<_> = paths
            .iter()
            .map(|path| std::os::unix::net::UnixListener::bind(path).expect("bind"))
            .collect();
        for waiter in waiters {
            waiter.await.expect("task").expect("connected");
        }
    }

    #[tokio::test]
    async fn a_coarse_waiter_times_out_naming_the_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("never.sock");
        let err = connect_coarsely(&path, Duration::from_millis(30))
            .await
            .expect_err("nothing listens");
        assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("never.sock"), "{err}");
    }
}
