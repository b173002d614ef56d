//! The bridge: how requests reach a running plugin and how answers come back.
//!
//! A [`Link`] is the way to one running plugin. For protocol 2 or later it owns one
//! persistent connection, multiplexed: a writer task sends frames (batching whatever is
//! queued into one flush), a reader task matches answers to waiting callers by
//! `request_id`, in whatever order they come. For v1 plugins it follows Toru's discipline:
//! each request on a connection of its own, the answer read before closing.
//!
//! Every request is bounded by a timeout and by the in-flight cap; a caller that goes away
//! (its future dropped) frees its entry at once and, for protocol 2, tells the plugin with
//! `cancel`. When the connection fails — closed, unreadable, a frame over the limit, or a
//! frame that is not JSON — the link closes: every pending request fails at once with the
//! reason, and the supervisor (watching [`Link::closed`]) takes over.
//!
//! Architecture invariant: nothing here is shared between plugins, and no lock is held
//! across `.await`; a stuck plugin delays only requests to itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use toru_plugin_sdk::trace::TraceParent;
use toru_plugin_sdk::wire::{HttpAnswer, HttpCall};
use toru_plugin_sdk::{AnswerKind, Envelope, FrameCodec, FrameError, KvOp, MessageType};

use crate::plugin::connection::{connect_patiently, send_one};
use crate::plugin::throttle::{Admit, Throttle};
use crate::store::storage::Namespace;

/// Storage requests from one plugin served at once; the plugin's further frames wait.
const STORAGE_IN_FLIGHT: usize = 64;

/// Limits of one link.
#[derive(Debug, Clone, Copy)]
pub struct LinkLimits {
    /// Largest frame accepted from the plugin.
    pub max_frame: usize,
    /// Requests in flight at once; more are refused.
    pub max_in_flight: usize,
}

impl From<&crate::config::BridgeConfig> for LinkLimits {
    fn from(c: &crate::config::BridgeConfig) -> Self {
        LinkLimits {
            max_frame: c.max_frame,
            max_in_flight: c.max_in_flight,
        }
    }
}

/// Why a request did not get an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The connection is gone (or went while waiting).
    #[error("the plugin's connection is gone: {0}")]
    Unavailable(String),
    /// No answer within this limit; the plugin keeps running and a late answer is dropped.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Too many requests in flight.
    #[error("{0} requests are already in flight to this plugin (the limit); retry later")]
    Busy(usize),
    /// The plugin answered something that cannot be read.
    #[error("the plugin's answer is invalid: {0}")]
    BadAnswer(String),
    /// The request cannot be expressed to this plugin.
    #[error("{0}")]
    Unsupported(String),
    /// The plugin answered with an error (`{"error": {"code", "message"}}`), for example its
    /// storage quota is full.
    #[error("the plugin refused: {message}")]
    Refused {
        /// The error's code.
        code: RefusalCode,
        /// The plugin's message.
        message: String,
    },
}

/// The code of a plugin's error answer, read once where the answer arrives. The known
/// codes are those the API layer maps to a gRPC status of the same name; any other is
/// kept as written (for messages) and reported as UNKNOWN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalCode {
    /// `invalid_argument`: the request cannot be accepted as it is.
    InvalidArgument,
    /// `resource_exhausted`: for example the plugin's storage quota is full.
    ResourceExhausted,
    /// `not_found`.
    NotFound,
    /// `unavailable`: worth retrying later.
    Unavailable,
    /// `failed_precondition`.
    FailedPrecondition,
    /// `permission_denied`.
    PermissionDenied,
    /// Any other code (or none: empty), as the plugin wrote it.
    Unknown(String),
}

impl RefusalCode {
    /// The code as written on the wire.
    pub fn parse(code: &str) -> Self {
        match code {
            "invalid_argument" => RefusalCode::InvalidArgument,
            "resource_exhausted" => RefusalCode::ResourceExhausted,
            "not_found" => RefusalCode::NotFound,
            "unavailable" => RefusalCode::Unavailable,
            "failed_precondition" => RefusalCode::FailedPrecondition,
            "permission_denied" => RefusalCode::PermissionDenied,
            other => RefusalCode::Unknown(other.to_owned()),
        }
    }

    /// The code as the plugin wrote it.
    pub fn as_str(&self) -> &str {
        match self {
            RefusalCode::InvalidArgument => "invalid_argument",
            RefusalCode::ResourceExhausted => "resource_exhausted",
            RefusalCode::NotFound => "not_found",
            RefusalCode::Unavailable => "unavailable",
            RefusalCode::FailedPrecondition => "failed_precondition",
            RefusalCode::PermissionDenied => "permission_denied",
            RefusalCode::Unknown(code) => code,
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The way to one running plugin; clones share it.
#[derive(Clone)]
pub struct Link {
    inner: Arc<LinkInner>,
}

struct LinkInner {
    transport: Transport,
    protocol: u32,
    limits: LinkLimits,
    pending: Pending,
    in_flight: AtomicUsize,
    closed: CancellationToken,
    /// Why the link closed; set once, before `closed` is cancelled.
    close_reason: Mutex<Option<String>>,
    /// The daemon's log lines about what the plugin sent, within budgets.
    warnings: Warnings,
    /// Woken whenever a waiting caller's entry leaves `pending`.
    answered: tokio::sync::Notify,
    /// A handover: the reader stops (once the storage requests it started are answered)
    /// and gives back its half and the bytes it had read past the last frame.
    detach_read: CancellationToken,
    /// A handover: the writer sends what is queued and gives back its half.
    detach_write: CancellationToken,
    /// The reader's and writer's tasks, taken by a handover.
    tasks: Mutex<Option<LinkTasks>>,
}

/// The tasks of a persistent link, each giving back its half of the connection when a
/// handover stops it (`None` when the link closed instead).
struct LinkTasks {
    read: tokio::task::JoinHandle<Option<(OwnedReadHalf, Vec<u8>)>>,
    write: tokio::task::JoinHandle<Option<OwnedWriteHalf>>,
}

/// A protocol-2 plugin's connection let go of for a handover: the socket, and bytes read
/// from it that are not a whole frame yet (the next image reads on after them).
#[derive(Debug)]
pub struct DetachedConnection {
    /// The connected socket.
    pub socket: std::os::fd::OwnedFd,
    /// Read, not yet a whole frame.
    pub unread: Vec<u8>,
}

/// The log lines a plugin can trigger at will (answers nobody asked for, refused storage
/// requests), each kind within its own [`Throttle`] so one plugin cannot flood the daemon's
/// log. Plugin-supplied text is logged with `Debug` formatting (quoted, control characters
/// escaped), so it can never start a line of its own. The mutexes are held only to ask the
/// throttle, never across `.await`.
struct Warnings {
    /// Who the lines are about: the plugin's id (its storage namespace), or "" when unknown.
    plugin: String,
    unknown_ids: Mutex<Throttle>,
    storage_refusals: Mutex<Throttle>,
}

/// The kinds of lines [`Warnings`] budgets: unknown ids are warnings, refused storage
/// requests (the plugin is told why) are debug lines, and so are their notes and counts.
#[derive(Clone, Copy)]
enum Noise {
    UnknownIds,
    StorageRefusals,
}

impl Noise {
    fn what(self) -> &'static str {
        match self {
            Noise::UnknownIds => "answers with unknown request ids",
            Noise::StorageRefusals => "refused storage requests",
        }
    }
}

impl Warnings {
    fn new(plugin: String) -> Self {
        Warnings {
            plugin,
            unknown_ids: Mutex::default(),
            storage_refusals: Mutex::default(),
        }
    }

    fn unknown_id(&self, request_id: &str, kind: &str) {
        self.within_budget(Noise::UnknownIds, || {
            tracing::warn!(plugin = %self.plugin, request_id = ?request_id, kind,
                "dropped a message with an unknown request_id (late, or never asked)")
        });
    }

    fn storage_refused(&self, request_id: &str, error: &dyn std::fmt::Display) {
        self.within_budget(Noise::StorageRefusals, || {
            tracing::debug!(plugin = %self.plugin, request_id = ?request_id,
                error = ?error.to_string(), "storage request refused")
        });
    }

    /// Runs `log` if the budget of `noise` allows, after saying how many lines were held
    /// back before it, and says so when it was the last line of this interval.
    fn within_budget(&self, noise: Noise, log: impl FnOnce()) {
        let (admit, interval) = {
            let mut throttle = self.throttle(noise).lock().expect("throttle poisoned");
            (throttle.admit(), throttle.interval())
        };
        let Admit::Log { suppressed, last } = admit else {
            return;
        };
        self.report_suppressed(noise, suppressed);
        log();
        if last {
            let interval = humantime::format_duration(interval);
            let what = noise.what();
            match noise {
                Noise::UnknownIds => tracing::warn!(plugin = %self.plugin,
                    "further {what} from this plugin are counted, not logged, for up to {interval}"),
                Noise::StorageRefusals => tracing::debug!(plugin = %self.plugin,
                    "further {what} from this plugin are counted, not logged, for up to {interval}"),
            }
        }
    }

    fn throttle(&self, noise: Noise) -> &Mutex<Throttle> {
        match noise {
            Noise::UnknownIds => &self.unknown_ids,
            Noise::StorageRefusals => &self.storage_refusals,
        }
    }

    fn report_suppressed(&self, noise: Noise, suppressed: u64) {
        if suppressed == 0 {
            return;
        }
        let what = noise.what();
        match noise {
            Noise::UnknownIds => tracing::warn!(plugin = %self.plugin, suppressed,
                "{suppressed} more {what} from this plugin were not logged"),
            Noise::StorageRefusals => tracing::debug!(plugin = %self.plugin, suppressed,
                "{suppressed} more {what} from this plugin were not logged"),
        }
    }

    /// Reports what is still held back (when the link closes).
    fn flush(&self) {
        for noise in [Noise::UnknownIds, Noise::StorageRefusals] {
            let suppressed = self
                .throttle(noise)
                .lock()
                .expect("throttle poisoned")
                .take_suppressed();
            self.report_suppressed(noise, suppressed);
        }
    }
}

enum Transport {
    Persistent {
        tx: mpsc::Sender<Vec<u8>>,
    },
    PerRequest {
        socket: PathBuf,
        /// Bounds the connections open to a v1 plugin at once (its listen backlog is
        /// small, and each one is a file descriptor of the daemon's).
        connections: tokio::sync::Semaphore,
    },
}

/// Connections open at once to one v1 plugin; further requests wait (within their timeout).
const V1_CONNECTIONS: usize = 32;

/// Callers waiting for answers on a persistent connection, by `request_id`. The mutex is
/// held only to insert, remove or drain entries, never across `.await`.
#[derive(Default)]
struct Pending(Mutex<HashMap<String, oneshot::Sender<Envelope>>>);

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Envelope>>> {
        self.0.lock().expect("pending table poisoned")
    }
}

impl Link {
    /// A link over the persistent connection of a protocol-2 plugin. Spawns its reader and
    /// writer tasks, which end when the link closes. The plugin's `storage` requests on this
    /// connection are served from `storage`, the namespace of the plugin the daemon spawned
    /// (refused when `None`).
    pub fn persistent(
        stream: UnixStream,
        protocol: u32,
        limits: LinkLimits,
        storage: Option<Namespace>,
    ) -> Link {
        Link::persistent_after(stream, Vec::new(), protocol, limits, storage)
    }

    /// A link over a connection an earlier image of the daemon handed over
    /// ([`Link::detach`]), reading on after the bytes it had read.
    pub fn adopt(
        connection: DetachedConnection,
        protocol: u32,
        limits: LinkLimits,
        storage: Option<Namespace>,
    ) -> std::io::Result<Link> {
        let stream = std::os::unix::net::UnixStream::from(connection.socket);
        stream.set_nonblocking(true)?;
        let stream = UnixStream::from_std(stream)?;
        Ok(Link::persistent_after(
            stream,
            connection.unread,
            protocol,
            limits,
            storage,
        ))
    }

    fn persistent_after(
        stream: UnixStream,
        unread: Vec<u8>,
        protocol: u32,
        limits: LinkLimits,
        storage: Option<Namespace>,
    ) -> Link {
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::channel(limits.max_in_flight + STORAGE_IN_FLIGHT + 64);
        let plugin = storage.as_ref().map_or("", Namespace::name).to_owned();
        let link = Link::new(Transport::Persistent { tx }, protocol, limits, plugin);
        let write = tokio::spawn(link.clone().write_loop(write, rx));
        let read = tokio::spawn(link.clone().read_loop(read, unread, storage));
        *link.inner.tasks.lock().expect("link tasks poisoned") = Some(LinkTasks { read, write });
        link
    }

    /// Lets go of a protocol-2 plugin's connection for a handover, without closing it: waits
    /// (at most `drain`) for the answers callers are waiting for (those still waiting then
    /// fail as unavailable), stops reading once the storage requests read are answered,
    /// sends everything queued, and gives back the socket with any bytes read past the last
    /// whole frame. The link is closed afterwards. `None` for a v1 link (nothing to hand
    /// over: each request has its own connection) or one already closed.
    pub async fn detach(&self, drain: Duration) -> Option<DetachedConnection> {
        let tasks = self
            .inner
            .tasks
            .lock()
            .expect("link tasks poisoned")
            .take()?;
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            let answered = self.inner.answered.notified();
            if self.inner.pending.lock().is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                self.fail_pending("the daemon is upgrading");
                break;
            }
        }
        self.inner.detach_read.cancel();
        let read = tasks.read.await.ok().flatten();
        self.inner.detach_write.cancel();
        let write = tasks.write.await.ok().flatten();
        self.close("handed over to the daemon's next image");
        let ((read, unread), write) = (read?, write?);
        let stream = read.reunite(write).ok()?.into_std().ok()?;
        Some(DetachedConnection {
            socket: stream.into(),
            unread,
        })
    }

    /// Fails every waiting caller with `reason`, leaving the connection open.
    fn fail_pending(&self, reason: &str) {
        let mut slot = self
            .inner
            .close_reason
            .lock()
            .expect("close reason poisoned");
        if slot.is_none() {
            *slot = Some(reason.to_owned());
        }
        drop(slot);
        self.inner.pending.lock().clear();
    }

    /// A link to a v1 plugin: one connection per request.
    pub fn per_request(socket: PathBuf, limits: LinkLimits) -> Link {
        let connections = tokio::sync::Semaphore::new(V1_CONNECTIONS);
        Link::new(
            Transport::PerRequest {
                socket,
                connections,
            },
            1,
            limits,
            String::new(),
        )
    }

    fn new(transport: Transport, protocol: u32, limits: LinkLimits, plugin: String) -> Link {
        Link {
            inner: Arc::new(LinkInner {
                transport,
                protocol,
                limits,
                pending: Pending::default(),
                in_flight: AtomicUsize::new(0),
                closed: CancellationToken::new(),
                close_reason: Mutex::new(None),
                warnings: Warnings::new(plugin),
                answered: tokio::sync::Notify::new(),
                detach_read: CancellationToken::new(),
                detach_write: CancellationToken::new(),
                tasks: Mutex::new(None),
            }),
        }
    }

    /// The protocol version the plugin speaks.
    pub fn protocol(&self) -> u32 {
        self.inner.protocol
    }

    /// Resolves with the reason once the link has closed. Never resolves for a v1 link
    /// unless [`Link::close`] is called.
    pub async fn closed(&self) -> String {
        self.inner.closed.cancelled().await;
        self.close_reason()
    }

    fn close_reason(&self) -> String {
        self.inner
            .close_reason
            .lock()
            .expect("close reason poisoned")
            .clone()
            .unwrap_or_else(|| "closed".into())
    }

    /// Closes the link: every pending request fails with `reason`. Idempotent; the first
    /// reason wins.
    pub fn close(&self, reason: &str) {
        {
            let mut slot = self
                .inner
                .close_reason
                .lock()
                .expect("close reason poisoned");
            if self.inner.closed.is_cancelled() {
                return;
            }
            if slot.is_none() {
                *slot = Some(reason.to_owned());
            }
        }
        self.inner.closed.cancel();
        // Dropping the senders wakes every waiter, which then reads the reason.
        self.inner.pending.lock().clear();
        self.inner.warnings.flush();
    }

    /// Sends a message that is not answered (lifecycle).
    pub async fn notify(&self, envelope: &Envelope) -> Result<(), LinkError> {
        match &self.inner.transport {
            Transport::Persistent { tx } => tx
                .send(envelope.to_vec())
                .await
                .map_err(|_| LinkError::Unavailable(self.close_reason())),
            Transport::PerRequest { socket, .. } => send_one(socket, envelope)
                .await
                .map_err(|e| LinkError::Unavailable(e.to_string())),
        }
    }

    /// Sends `envelope` and waits for the answer with its `request_id`, at most `limit`.
    /// Counts against the in-flight cap.
    pub async fn request(
        &self,
        envelope: Envelope,
        limit: Duration,
    ) -> Result<Envelope, LinkError> {
        let _slot = InFlight::acquire(&self.inner)?;
        self.exchange(envelope, limit).await
    }

    async fn exchange(&self, envelope: Envelope, limit: Duration) -> Result<Envelope, LinkError> {
        match tokio::time::timeout(limit, self.exchange_unbounded(envelope)).await {
            Ok(result) => result,
            Err(_) => Err(LinkError::Timeout(limit)),
        }
    }

    /// Sends `envelope` and waits for its answer, for as long as the caller waits: it
    /// starts no timer of its own, and dropping it frees the entry (and sends `cancel`).
    async fn exchange_unbounded(&self, envelope: Envelope) -> Result<Envelope, LinkError> {
        let bytes = envelope.to_vec();
        if bytes.len() > self.inner.limits.max_frame {
            return Err(LinkError::Unsupported(format!(
                "the request is {} bytes, over the {}-byte frame limit",
                bytes.len(),
                self.inner.limits.max_frame
            )));
        }
        let id = envelope.request_id.unwrap_or_default();
        match &self.inner.transport {
            Transport::Persistent { tx } => self.request_persistent(tx, id, bytes).await,
            Transport::PerRequest {
                socket,
                connections,
            } => {
                let _open = connections.acquire().await.expect("never closed");
                self.request_own_connection(socket, id, bytes).await
            }
        }
    }

    async fn request_persistent(
        &self,
        tx: &mpsc::Sender<Vec<u8>>,
        id: String,
        bytes: Vec<u8>,
    ) -> Result<Envelope, LinkError> {
        let (answer_tx, answer_rx) = oneshot::channel();
        self.inner.pending.lock().insert(id.clone(), answer_tx);
        let mut entry = PendingEntry {
            link: self,
            id: Some(id),
        };
        if self.inner.closed.is_cancelled() {
            return Err(LinkError::Unavailable(self.close_reason()));
        }
        tx.send(bytes)
            .await
            .map_err(|_| LinkError::Unavailable(self.close_reason()))?;
        match answer_rx.await {
            Ok(answer) => {
                entry.id = None;
                Ok(answer)
            }
            Err(_) => Err(LinkError::Unavailable(self.close_reason())),
        }
    }

    async fn request_own_connection(
        &self,
        socket: &std::path::Path,
        id: String,
        bytes: Vec<u8>,
    ) -> Result<Envelope, LinkError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            LinkError::Unavailable(format!("{what} {}: {e}", socket.display()))
        };
        let stream = connect_patiently(socket)
            .await
            .map_err(|e| unavailable("cannot connect to", &e))?;
        let (read, write) = stream.into_split();
        let mut out = FramedWrite::new(write, FrameCodec::new(self.inner.limits.max_frame));
        out.send(bytes)
            .await
            .map_err(|e| unavailable("cannot write to", &e))?;
        let mut frames = FramedRead::new(read, FrameCodec::new(self.inner.limits.max_frame));
        let frame = match frames.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(LinkError::BadAnswer(e.to_string())),
            None => {
                return Err(LinkError::Unavailable(
                    "the plugin closed the connection without answering".into(),
                ))
            }
        };
        let answer = Envelope::from_slice(&frame)
            .map_err(|e| LinkError::BadAnswer(format!("not a JSON envelope: {e}")))?;
        match &answer.request_id {
            Some(got) if *got != id => Err(LinkError::BadAnswer(format!(
                "it answered request_id {got:?} to request {id:?}"
            ))),
            _ => Ok(answer),
        }
    }

    /// A KV operation; the answer's `value` (`None` for null).
    pub async fn kv(&self, op: &KvOp, limit: Duration) -> Result<Option<String>, LinkError> {
        self.kv_traced(op, limit, None).await
    }

    /// A KV operation within the trace `trace` (passed to a protocol-2 plugin in the
    /// envelope; a v1 plugin's messages never change).
    pub async fn kv_traced(
        &self,
        op: &KvOp,
        limit: Duration,
        trace: Option<&TraceParent>,
    ) -> Result<Option<String>, LinkError> {
        let envelope = self.traced(Envelope::kv_request(new_request_id(), op), trace);
        let answer = self.request(envelope, limit).await?;
        let fields = answer.answer(AnswerKind::Kv).ok_or_else(|| {
            refusal(&answer).unwrap_or_else(|| {
                LinkError::BadAnswer("no \"value\" in any accepted shape".into())
            })
        })?;
        match fields.get("value") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(LinkError::BadAnswer(format!(
                "\"value\" is {other}, not a string or null"
            ))),
        }
    }

    /// An HTTP-style call.
    pub async fn call(&self, call: &HttpCall, limit: Duration) -> Result<HttpAnswer, LinkError> {
        self.call_traced(call, limit, None).await
    }

    /// The envelope with `trace` in it, for a plugin that speaks protocol 2.
    fn traced(&self, mut envelope: Envelope, trace: Option<&TraceParent>) -> Envelope {
        if self.inner.protocol >= 2 {
            envelope.traceparent = trace.map(TraceParent::to_string);
        }
        envelope
    }

    /// An HTTP-style call within the trace `trace` (as [`Link::kv_traced`]).
    pub async fn call_traced(
        &self,
        call: &HttpCall,
        limit: Duration,
        trace: Option<&TraceParent>,
    ) -> Result<HttpAnswer, LinkError> {
        let binary = call
            .body
            .as_deref()
            .is_some_and(|b| std::str::from_utf8(b).is_err());
        if binary && self.inner.protocol < 2 {
            return Err(LinkError::Unsupported(
                "the body is not UTF-8, and this plugin speaks protocol 1, which carries only text bodies".into(),
            ));
        }
        let envelope = self.traced(Envelope::http_request(new_request_id(), call), trace);
        let answer = self.request(envelope, limit).await?;
        let fields = answer.answer(AnswerKind::Http).ok_or_else(|| {
            refusal(&answer).unwrap_or_else(|| {
                LinkError::BadAnswer("no \"status\" in any accepted shape".into())
            })
        })?;
        let answer =
            HttpAnswer::from_fields(&fields).map_err(|e| LinkError::BadAnswer(e.to_string()))?;
        answer
            .check()
            .map_err(|e| LinkError::BadAnswer(e.to_string()))?;
        Ok(answer)
    }

    /// A heartbeat: `ping`, answered by `pong`, within `limit`. Not counted against the
    /// in-flight cap, so a busy plugin is not mistaken for a dead one.
    pub async fn ping(&self, limit: Duration) -> Result<(), LinkError> {
        match tokio::time::timeout(limit, self.heartbeat()).await {
            Ok(result) => result,
            Err(_) => Err(LinkError::Timeout(limit)),
        }
    }

    /// [`Link::ping`] without a limit of its own: the caller bounds it (the supervisor's
    /// health scheduler gives a whole round of heartbeats one deadline instead of a timer
    /// each). Not counted against the in-flight cap either.
    pub async fn heartbeat(&self) -> Result<(), LinkError> {
        let ping = Envelope::bare(MessageType::Ping, new_request_id());
        let answer = self.exchange_unbounded(ping).await?;
        match answer.kind {
            MessageType::Pong => Ok(()),
            other => Err(LinkError::BadAnswer(format!(
                "{} instead of pong",
                other.as_str()
            ))),
        }
    }

    async fn write_loop(
        self,
        write: OwnedWriteHalf,
        mut rx: mpsc::Receiver<Vec<u8>>,
    ) -> Option<OwnedWriteHalf> {
        let mut out = FramedWrite::new(write, FrameCodec::new(self.inner.limits.max_frame));
        loop {
            let first = tokio::select! {
                biased;
                msg = rx.recv() => msg,
                _ = self.inner.closed.cancelled() => return None,
                _ = self.inner.detach_write.cancelled() => {
                    // Nothing is queued (the biased select took it first): hand over.
                    return Some(out.into_inner());
                }
            };
            let first = first?;
            let mut next = Some(first);
            let mut failed = None;
            while let Some(frame) = next {
                if let Err(e) = out.feed(frame).await {
                    failed = Some(e);
                    break;
                }
                next = rx.try_recv().ok();
            }
            let flushed = match failed {
                Some(e) => Err(e),
                None => SinkExt::<Vec<u8>>::flush(&mut out).await,
            };
            if let Err(e) = flushed {
                self.close(&format!("writing to the plugin failed: {e}"));
                return None;
            }
        }
    }

    async fn read_loop(
        self,
        read: OwnedReadHalf,
        unread: Vec<u8>,
        storage: Option<Namespace>,
    ) -> Option<(OwnedReadHalf, Vec<u8>)> {
        let mut frames = FramedRead::new(read, FrameCodec::new(self.inner.limits.max_frame));
        frames.read_buffer_mut().extend_from_slice(&unread);
        let storage_slots = Arc::new(tokio::sync::Semaphore::new(STORAGE_IN_FLIGHT));
        let reason = loop {
            // `next` is cancel-safe: a partly read frame stays in the buffer.
            let frame = tokio::select! {
                frame = frames.next() => frame,
                _ = self.inner.closed.cancelled() => return None,
                _ = self.inner.detach_read.cancelled() => {
                    // The storage requests read are answered (queued for the writer) first.
                    let _all = storage_slots.acquire_many(STORAGE_IN_FLIGHT as u32).await;
                    let unread = frames.read_buffer().to_vec();
                    return Some((frames.into_inner(), unread));
                }
            };
            let bytes = match frame {
                Some(Ok(bytes)) => bytes,
                Some(Err(FrameError::TooLarge { len, max })) => {
                    break format!(
                        "the plugin sent a frame of {len} bytes, over the {max}-byte limit"
                    )
                }
                Some(Err(FrameError::Io(e))) => {
                    break format!("reading from the plugin failed: {e}")
                }
                None => break "the plugin closed its connection".to_owned(),
            };
            let envelope = match Envelope::from_slice(&bytes) {
                Ok(envelope) => envelope,
                Err(e) => {
                    break format!("the plugin sent a frame that is not a JSON envelope: {e}")
                }
            };
            let id = envelope.request_id.clone().unwrap_or_default();
            if envelope.kind == MessageType::Storage {
                // A plugin → host request: served from this connection's namespace, never
                // from anything the message names.
                let slot = tokio::select! {
                    slot = storage_slots.clone().acquire_owned() => slot.expect("never closed"),
                    _ = self.inner.closed.cancelled() => return None,
                };
                let Transport::Persistent { tx } = &self.inner.transport else {
                    unreachable!("only persistent links read frames")
                };
                let (storage, tx) = (storage.clone(), tx.clone());
                let link = self.clone();
                tokio::spawn(async move { link.serve_storage(storage, envelope, tx, slot).await });
                continue;
            }
            let waiter = self.inner.pending.lock().remove(&id);
            match waiter {
                Some(waiter) => {
                    let _ = waiter.send(envelope);
                }
                None => self.inner.warnings.unknown_id(&id, envelope.kind.as_str()),
            }
            self.inner.answered.notify_waiters();
        };
        self.close(&reason);
        None
    }

    /// Answers one storage request of the plugin and queues the answer for the writer.
    async fn serve_storage(
        &self,
        storage: Option<Namespace>,
        request: Envelope,
        tx: mpsc::Sender<Vec<u8>>,
        _slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        use toru_plugin_sdk::storage_wire::{answer_envelope, StorageError, StorageOp};
        let id = request.request_id.clone().unwrap_or_default();
        let result = match (&storage, StorageOp::from_payload(&request.payload)) {
            (None, _) => Err(StorageError::new(
                "unavailable",
                "storage is not available on this connection",
            )),
            (_, Err(e)) => Err(e),
            (Some(ns), Ok(op)) => match foreign_namespace(&request.payload, ns.name()) {
                Some(other) => Err(StorageError::new(
                    "permission_denied",
                    format!(
                        "plugin {:?} asked for the storage of {other:?}: a plugin reaches only its own storage; leave out \"namespace\" and \"plugin_id\"",
                        ns.name()
                    ),
                )),
                None => ns.apply(op).await,
            },
        };
        if let Err(e) = &result {
            self.inner.warnings.storage_refused(&id, e);
        }
        let _ = tx.send(answer_envelope(id, &result).to_vec()).await;
    }
}

/// A namespace other than `own` that a storage request names (in `namespace` or
/// `plugin_id`, flat or nested): such a request is refused, never served from it.
fn foreign_namespace(payload: &serde_json::Value, own: &str) -> Option<String> {
    let nested = payload.get("payload");
    [Some(payload), nested]
        .into_iter()
        .flatten()
        .flat_map(|p| ["namespace", "plugin_id"].map(|k| p.get(k)))
        .flatten()
        .find(|v| v.as_str() != Some(own))
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
}

/// The plugin's error answer (`{"error": {"code", "message"}}` in `payload`), if it is one.
fn refusal(answer: &Envelope) -> Option<LinkError> {
    let error = answer.payload.get("error").filter(|e| e.is_object())?;
    let text = |k: &str| {
        error
            .get(k)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    Some(LinkError::Refused {
        code: RefusalCode::parse(&text("code")),
        message: text("message"),
    })
}

/// Counts a request in flight while it lives.
struct InFlight<'a>(&'a LinkInner);

impl<'a> InFlight<'a> {
    fn acquire(inner: &'a LinkInner) -> Result<Self, LinkError> {
        let max = inner.limits.max_in_flight;
        let before = inner.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            inner.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(LinkError::Busy(max));
        }
        Ok(InFlight(inner))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Removes an unanswered entry when its caller goes away (timeout or dropped future) and,
/// for protocol 2, tells the plugin to drop the work.
struct PendingEntry<'a> {
    link: &'a Link,
    id: Option<String>,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let removed = self.link.inner.pending.lock().remove(&id).is_some();
        self.link.inner.answered.notify_waiters();
        if removed && !self.link.inner.closed.is_cancelled() {
            if let Transport::Persistent { tx } = &self.link.inner.transport {
                let _ = tx.try_send(Envelope::bare(MessageType::Cancel, id).to_vec());
            }
        }
    }
}

/// A fresh `request_id`.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
