//! The health scheduler under paused time: an idle healthy plugin's registration is never
//! woken, a change is told within one interval (v1 sockets from a table the test writes;
//! protocol-2 heartbeats to an in-process plugin on a socket pair), heartbeats go around a
//! full in-flight cap, and dropping registrations unregisters them and ends the schedule.
//! Paused time advances only when every task waits on a timer, so the instants read here
//! are exact.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Wake, Waker};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use toru_plugin_sdk::{Envelope, FrameCodec, KvOp, MessageType, DEFAULT_MAX_FRAME_LEN};

use super::{Check, HealthChecks, Verdict};
use crate::plugin::link::{Link, LinkError, LinkLimits};
use crate::plugin::listening::ListeningSockets;

const INTERVAL: Duration = Duration::from_secs(5);
/// Longest (paused, so instant) wait for anything, so a broken scheduler fails a test
/// instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(600);
const SOCKET: &str = "/srv/data/run/fake/plugin.sock";

/// `future`'s output, or a panic naming `what` when it takes longer than [`PATIENCE`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: nothing after {PATIENCE:?}"),
    }
}

/// Counts the times it is woken.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl CountingWaker {
    fn wakes(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Polls `future` once with `waker`, which it must not be ready for.
fn poll_pending<F: Future + Unpin>(future: &mut F, waker: &Arc<CountingWaker>) {
    let waker = Waker::from(waker.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(
        matches!(std::pin::Pin::new(future).poll(&mut cx), Poll::Pending),
        "ready before anything changed"
    );
}

/// The host's socket table as the test sets it: [`SOCKET`] listening or not, and a note
/// of each read.
struct Host {
    listening: Arc<AtomicBool>,
    reads: mpsc::UnboundedReceiver<()>,
}

impl Host {
    /// A scheduler reading this host's table, where [`SOCKET`] listens.
    fn new() -> (HealthChecks, Host) {
        let listening = Arc::new(AtomicBool::new(true));
        let (read, reads) = mpsc::unbounded_channel();
        let flag = listening.clone();
        let table = ListeningSockets::reading(move || {
            let _ = read.send(());
            let flags = if flag.load(Ordering::SeqCst) {
                "00010000"
            } else {
                "00000000"
            };
            Ok(format!(
                "Num       RefCount Protocol Flags    Type St Inode Path\n\
                 0000000000000000: 00000002 00000000 {flags} 0001 01 4242 {SOCKET}\n"
            ))
        });
        let host = Host { listening, reads };
        (HealthChecks::with_listening(table), host)
    }

    /// Waits for `n` more reads of the table (one per tick).
    async fn ticks(&mut self, n: usize) {
        for _ in 0..n {
            within("a read of the socket table", self.reads.recv())
                .await
                .expect("the table's reader lives in the scheduler");
        }
    }
}

fn socket() -> Check {
    Check::Socket(PathBuf::from(SOCKET))
}

fn verdict(healthy: bool, reason: &str) -> Verdict {
    Verdict {
        healthy,
        reason: reason.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_healthy_v1_plugin_is_never_woken_and_a_change_is_told_within_an_interval() {
    let (checks, mut host) = Host::new();
    let mut registration = checks.register(INTERVAL, socket());
    let waker = Arc::new(CountingWaker::default());
    let mut changed = Box::pin(registration.changed());
    poll_pending(&mut changed, &waker);
    // Every check done by the 10th read was of a listening socket: no wake-up.
    host.ticks(10).await;
    assert_eq!(waker.wakes(), 0, "woken while its verdict stayed the same");

    host.listening.store(false, Ordering::SeqCst);
    let since = Instant::now();
    let told = within("the unhealthy verdict", &mut changed).await;
    assert_eq!(told, verdict(false, "socket not listening"));
    assert!(
        since.elapsed() <= INTERVAL,
        "told after {:?}",
        since.elapsed()
    );
    drop(changed);

    host.listening.store(true, Ordering::SeqCst);
    let since = Instant::now();
    let told = within("the healthy verdict", registration.changed()).await;
    assert_eq!(told, verdict(true, "socket accepting again"));
    assert!(
        since.elapsed() <= INTERVAL,
        "told after {:?}",
        since.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_thousand_plugins_share_one_read_of_the_table_per_tick() {
    let (checks, mut host) = Host::new();
    let registrations: Vec<_> = (0..1000)
        .map(|i| {
            let path = if i == 0 {
                Path::new(SOCKET).to_owned()
            } else {
                PathBuf::from(format!("/srv/{i}.sock"))
            };
            checks.register(INTERVAL, Check::Socket(path))
        })
        .collect();
    host.ticks(3).await;
    let start = Instant::now();
    host.ticks(3).await;
    // Three ticks, three reads: one per tick for all of them, not one per plugin.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= 3 * INTERVAL && elapsed < 4 * INTERVAL,
        "3 reads in {elapsed:?}"
    );
    assert_eq!(checks.registered(INTERVAL), 1000);
    drop(registrations);
    assert_eq!(checks.registered(INTERVAL), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_registrations_unregisters_them_and_ends_their_schedule() {
    let (checks, mut host) = Host::new();
    let a = checks.register(INTERVAL, socket());
    let b = checks.register(INTERVAL, socket());
    let other = checks.register(2 * INTERVAL, socket());
    assert_eq!(checks.registered(INTERVAL), 2);
    host.ticks(1).await;
    drop(a);
    assert_eq!(checks.registered(INTERVAL), 1);
    drop((b, other));
    assert_eq!(checks.registered(INTERVAL), 0);
    within("every schedule's task to end", checks.all_ended()).await;
    // A plugin registering afterwards gets a schedule of its own again.
    let mut again = checks.register(INTERVAL, socket());
    host.listening.store(false, Ordering::SeqCst);
    let told = within("a verdict on a new schedule", again.changed()).await;
    assert!(!told.healthy);
}

/// A protocol-2 plugin on one end of a socket pair: answers `ping` with `pong` while
/// `answering`, ignores everything else, and tells the test the kind of each frame.
async fn plugin(
    stream: UnixStream,
    answering: Arc<AtomicBool>,
    seen: mpsc::UnboundedSender<MessageType>,
) {
    let mut framed = Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME_LEN));
    while let Some(Ok(frame)) = framed.next().await {
        let Ok(message) = Envelope::from_slice(&frame) else {
            continue;
        };
        let _ = seen.send(message.kind);
        if message.kind == MessageType::Ping && answering.load(Ordering::SeqCst) {
            let request_id = message.request_id.unwrap_or_default();
            let pong = Envelope::bare(MessageType::Pong, request_id).to_vec();
            if framed.send(pong).await.is_err() {
                return;
            }
        }
    }
}

/// A link to an in-process protocol-2 plugin with room for one request in flight.
struct Peer {
    link: Link,
    answering: Arc<AtomicBool>,
    seen: mpsc::UnboundedReceiver<MessageType>,
}

impl Peer {
    fn new() -> Peer {
        let (host, plugin_end) = UnixStream::pair().expect("socket pair");
        let limits = LinkLimits {
            max_frame: DEFAULT_MAX_FRAME_LEN,
            max_in_flight: 1,
        };
        let link = Link::persistent(host, 2, limits, None);
        let answering = Arc::new(AtomicBool::new(true));
        let (seen_tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(plugin(plugin_end, answering.clone(), seen_tx));
        Peer {
            link,
            answering,
            seen,
        }
    }

    /// Waits for the next `n` frames of `kind` to reach the plugin.
    async fn frames(&mut self, kind: MessageType, n: usize) {
        let mut left = n;
        while left > 0 {
            let got = within("a frame at the plugin", self.seen.recv())
                .await
                .expect("the plugin runs");
            if got == kind {
                left -= 1;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_a_protocol_2_plugin_healthy_quietly_and_a_silence_is_told() {
    let (checks, _host) = Host::new();
    let mut peer = Peer::new();
    let mut registration = checks.register(INTERVAL, Check::Heartbeat(peer.link.clone()));
    let waker = Arc::new(CountingWaker::default());
    let mut changed = Box::pin(registration.changed());
    poll_pending(&mut changed, &waker);
    // Ten pings, each answered within its interval (the 11th round judged the 10th).
    peer.frames(MessageType::Ping, 11).await;
    assert_eq!(waker.wakes(), 0, "woken while every heartbeat was answered");

    peer.answering.store(false, Ordering::SeqCst);
    let since = Instant::now();
    let told = within("the unhealthy verdict", &mut changed).await;
    let timeout = LinkError::Timeout(INTERVAL);
    assert_eq!(
        told,
        verdict(false, &format!("heartbeat failed: {timeout}"))
    );
    // The ping sent at the last tick is unanswered at the next.
    assert!(
        since.elapsed() <= 2 * INTERVAL,
        "told after {:?}",
        since.elapsed()
    );
    drop(changed);

    peer.answering.store(true, Ordering::SeqCst);
    let since = Instant::now();
    let told = within("the healthy verdict", registration.changed()).await;
    assert_eq!(told, verdict(true, "heartbeat answered again"));
    assert!(
        since.elapsed() <= INTERVAL,
        "told after {:?}",
        since.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeats_go_around_a_full_in_flight_cap() {
    let (checks, _host) = Host::new();
    let mut peer = Peer::new();
    let link = peer.link.clone();
    let key = "k".to_owned();
    // Never answered: it holds the link's one slot for the whole test.
    let held = tokio::spawn(async move { link.kv(&KvOp::Get { key }, PATIENCE * 2).await });
    peer.frames(MessageType::Kv, 1).await;
    let refused = peer.link.kv(&KvOp::Get { key: "j".into() }, INTERVAL).await;
    assert_eq!(refused, Err(LinkError::Busy(1)));

    let mut registration = checks.register(INTERVAL, Check::Heartbeat(peer.link.clone()));
    let waker = Arc::new(CountingWaker::default());
    let mut changed = Box::pin(registration.changed());
    poll_pending(&mut changed, &waker);
    peer.frames(MessageType::Ping, 4).await;
    assert_eq!(
        waker.wakes(),
        0,
        "a heartbeat failed while the cap was full"
    );
    held.abort();
}
