//! [`serve`]: turns a [`Plugin`] into a plugin executable. It prints the metadata on
//! `--metadata`; otherwise it binds `TORU_PLUGIN_SOCKET`, and on each connection answers
//! `init` with `ready` (after [`Plugin::init`]), `ping` with `pong`, runs every `http` and
//! `kv` request on its own task (so requests are served concurrently and answered in any
//! order), aborts a request on `cancel`, routes the host's `storage` answers to
//! [`Storage`](crate::Storage) callers, and stops gracefully on `shutdown` or SIGTERM:
//! no new requests, those in flight get [`SHUTDOWN_GRACE`], then [`Plugin::shutdown`].
//!
//! It accepts any number of connections and messages per connection, so it serves a host
//! that keeps one persistent connection (protocol 2) as well as one that connects per
//! message (protocol 1). The connection logic is generic over the stream, so the test
//! harness ([`crate::testing`]) runs exactly this code in memory.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::task::TaskTracker;

use crate::codec::FrameCodec;
use crate::plugin::{Context, HttpRequest, KvOp, Plugin, PluginError};
use crate::storage::{Pending, Storage};
use crate::wire::{decode_body, encode_body, Envelope, MessageType};
use crate::{ENV_DATA_DIR, ENV_INSTANCE_ID, ENV_PLUGIN_ID, ENV_PLUGIN_SOCKET, PROTOCOL_VERSION};

/// How long requests in flight may run on after shutdown is asked, before they are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Runs a plugin executable: prints metadata on `--metadata`, otherwise installs the JSON
/// log layer ([`crate::logging`]) and serves on the socket named by `TORU_PLUGIN_SOCKET`
/// until shutdown. Use it as the whole of `main`.
pub fn serve<P: Plugin>(plugin: P) -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--metadata") {
        println!("{}", metadata_json(&plugin));
        return ExitCode::SUCCESS;
    }
    let Some(socket) = std::env::var_os(ENV_PLUGIN_SOCKET) else {
        eprintln!("{ENV_PLUGIN_SOCKET} is not set: run this plugin under torud (or `torud plugin check`), or run it with --metadata");
        return ExitCode::from(2);
    };
    crate::logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_socket(Arc::new(plugin), socket.into())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("plugin stopped: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The metadata line `--metadata` prints: the plugin's metadata with this SDK's protocol.
pub fn metadata_json<P: Plugin>(plugin: &P) -> String {
    let mut meta = plugin.metadata();
    meta.protocol_version = PROTOCOL_VERSION;
    serde_json::to_string(&meta).expect("metadata serialises")
}

/// Why serving ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be bound or accepted on.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// [`Plugin::init`] failed.
    #[error("init failed: {0}")]
    Init(PluginError),
}

/// State shared by every connection of one plugin process.
pub(crate) struct Shared<P> {
    plugin: Arc<P>,
    /// Signalled once when shutdown is asked (message or signal).
    stop: Notify,
    stopping: std::sync::atomic::AtomicBool,
    /// Set when `init` fails; the process exits with it.
    failure: Mutex<Option<PluginError>>,
    /// The context of the connection `init` came on (used for `shutdown`).
    init_ctx: OnceLock<Context>,
    /// Request tasks, awaited (within the grace) at shutdown.
    tasks: TaskTracker,
    /// Cancelled once shutdown is complete (the hook has run): connections then close.
    finished: tokio_util::sync::CancellationToken,
}

impl<P: Plugin> Shared<P> {
    pub(crate) fn new(plugin: Arc<P>) -> Arc<Self> {
        Arc::new(Shared {
            plugin,
            stop: Notify::new(),
            stopping: false.into(),
            failure: Mutex::new(None),
            init_ctx: OnceLock::new(),
            tasks: TaskTracker::new(),
            finished: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub(crate) fn request_stop(&self) {
        if !self
            .stopping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            self.tasks.close();
            self.stop.notify_waiters();
            self.stop.notify_one();
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once shutdown has been asked.
    pub(crate) async fn stopped(&self) {
        let notified = self.stop.notified();
        if !self.is_stopping() {
            notified.await;
        }
    }

    /// Lets requests in flight finish (within the grace), then runs [`Plugin::shutdown`];
    /// connections stay open until then, so both can still use storage.
    pub(crate) async fn finish(&self) -> Result<(), ServeError> {
        let result = self.finish_inner().await;
        self.finished.cancel();
        result
    }

    async fn finish_inner(&self) -> Result<(), ServeError> {
        self.request_stop();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("requests still running after the shutdown grace; dropping them");
        }
        if let Some(e) = self.failure.lock().expect("failure poisoned").take() {
            return Err(ServeError::Init(e));
        }
        if let Some(ctx) = self.init_ctx.get() {
            self.plugin.shutdown(ctx).await;
        }
        Ok(())
    }
}

async fn serve_socket<P: Plugin>(
    plugin: Arc<P>,
    socket: std::path::PathBuf,
) -> Result<(), ServeError> {
    // Before binding: once the socket exists, a SIGTERM must stop the plugin gracefully.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let shared = Shared::new(plugin);
    let connections = TaskTracker::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                connections.spawn(serve_connection(shared.clone(), stream));
            }
            _ = shared.stopped() => break,
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM received; stopping");
                shared.request_stop();
                break;
            }
        }
    }
    drop(listener);
    let result = shared.finish().await;
    // Connections close once their last answers are written.
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
    let _ = std::fs::remove_file(&socket);
    result
}

/// The context of a connection before (or without) `init`, from the environment.
fn base_context(storage: Storage, fallback_id: String) -> Context {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Context {
        plugin_id: env(ENV_PLUGIN_ID).unwrap_or(fallback_id),
        instance_id: env(ENV_INSTANCE_ID).unwrap_or_default(),
        data_dir: env(ENV_DATA_DIR).map(Into::into),
        host_protocol_version: 0,
        storage,
    }
}

/// Serves one connection until the host closes it or shutdown is asked: starts the
/// answer writer, then reads the host's messages one by one and dispatches each, and once
/// the reading ends lets the writer send what is queued.
pub(crate) async fn serve_connection<P, S>(shared: Arc<Shared<P>>, stream: S)
where
    P: Plugin,
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let mut frames = FramedRead::new(read, FrameCodec::default());
    let (tx, rx) = mpsc::unbounded_channel::<Envelope>();
    let writer = tokio::spawn(write_answers(
        FramedWrite::new(write, FrameCodec::default()),
        rx,
    ));
    let closing = closing(shared.clone());
    tokio::pin!(closing);
    let mut connection = Connection::new(shared, tx);
    while let Some(env) = next_envelope(&mut frames, closing.as_mut()).await {
        connection.dispatch(env);
    }
    // Its senders (its own and its storage's) go with it: the writer ends once the
    // answers queued by requests still running are written.
    drop(connection);
    let _ = writer.await;
}

/// Resolves when a connection should close although the host keeps it open: after
/// shutdown is asked the connection stays open while requests in flight and the shutdown
/// hook finish (they may still need storage answers), at most for twice the grace.
async fn closing<P: Plugin>(shared: Arc<Shared<P>>) {
    let grace = async {
        shared.stopped().await;
        tokio::time::sleep(SHUTDOWN_GRACE * 2).await;
    };
    tokio::select! {
        _ = shared.finished.cancelled() => {}
        _ = grace => {}
    }
}

/// The next envelope from the host, skipping frames that are not one; `None` when the
/// connection ends (closed by the host, broken, or `closing` resolved).
async fn next_envelope<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, FrameCodec>,
    mut closing: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Option<Envelope> {
    loop {
        let frame = tokio::select! {
            frame = frames.next() => frame,
            _ = &mut closing => return None,
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                tracing::warn!("connection dropped: {e}");
                return None;
            }
            None => return None,
        };
        match Envelope::from_slice(&frame) {
            Ok(env) => return Some(env),
            Err(e) => tracing::warn!("ignoring a message that is not a JSON envelope: {e}"),
        }
    }
}

/// One connection's state while its messages are dispatched.
struct Connection<P> {
    shared: Arc<Shared<P>>,
    /// Answers to write, in order (the writer task sends them).
    tx: mpsc::UnboundedSender<Envelope>,
    /// Storage requests of this connection's handlers waiting for the host's answers.
    pending: Pending,
    /// What handlers get; `init` fills in the host's values.
    ctx: Context,
    /// Requests running, by request id, so `cancel` can abort them.
    running: Arc<Mutex<HashMap<String, AbortHandle>>>,
}

impl<P: Plugin> Connection<P> {
    fn new(shared: Arc<Shared<P>>, tx: mpsc::UnboundedSender<Envelope>) -> Self {
        let pending = Pending::default();
        let ctx = base_context(
            Storage::connected(tx.clone(), pending.clone()),
            shared.plugin.metadata().id,
        );
        Connection {
            shared,
            tx,
            pending,
            ctx,
            running: Arc::default(),
        }
    }

    /// Acts on one message of the host's.
    fn dispatch(&mut self, env: Envelope) {
        let id = env.request_id.clone().unwrap_or_default();
        match env.kind {
            MessageType::Lifecycle => self.lifecycle(&env, id),
            MessageType::Ping => self.send(Envelope::bare(MessageType::Pong, id)),
            MessageType::Cancel => self.cancel(&id),
            MessageType::Storage => {
                if !self.pending.deliver(env) {
                    tracing::warn!(request_id = %id, "dropped a storage answer nobody waits for");
                }
            }
            MessageType::Http | MessageType::Kv if self.shared.is_stopping() => {
                let e = PluginError::new("unavailable", "the plugin is shutting down");
                self.send(Envelope::new(env.kind, id, error_fields(&e)));
            }
            MessageType::Http | MessageType::Kv => self.start_request(env, id),
            MessageType::Ready | MessageType::Pong | MessageType::Unknown => {
                tracing::warn!("ignoring a message of type {}", env.kind.as_str());
            }
        }
    }

    /// Queues an answer; a closed writer means the host is gone, and nobody is left to tell.
    fn send(&self, answer: Envelope) {
        let _ = self.tx.send(answer);
    }

    /// `init` or `shutdown`.
    fn lifecycle(&mut self, env: &Envelope, id: String) {
        match env.lifecycle_action() {
            Some("init") => self.init(env, id),
            Some("shutdown") => {
                tracing::info!("shutdown requested by the host");
                self.shared.request_stop();
            }
            other => tracing::warn!("ignoring unknown lifecycle action {other:?}"),
        }
    }

    /// Takes the host's values into the context and runs [`Plugin::init`] on a task (init
    /// may use storage, whose answers this connection delivers), answering `ready` when it
    /// succeeds and stopping the plugin when it fails.
    fn init(&mut self, env: &Envelope, id: String) {
        let ctx = &mut self.ctx;
        ctx.instance_id = env.payload["instance_id"]
            .as_str()
            .map_or(ctx.instance_id.clone(), str::to_owned);
        ctx.host_protocol_version = env.payload["protocol_version"]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(1);
        let _ = self.shared.init_ctx.set(ctx.clone());
        let (shared, ctx, tx) = (self.shared.clone(), ctx.clone(), self.tx.clone());
        tokio::spawn(async move {
            match shared.plugin.init(&ctx).await {
                Ok(()) => {
                    tracing::info!(instance_id = %ctx.instance_id,
                        host_protocol = ctx.host_protocol_version, "initialised by the host; ready");
                    let _ = tx.send(Envelope::bare(MessageType::Ready, id));
                }
                Err(e) => {
                    tracing::error!("init failed: {e}");
                    *shared.failure.lock().expect("failure poisoned") = Some(e);
                    shared.request_stop();
                }
            }
        });
    }

    /// Aborts a running request; it is then never answered.
    fn cancel(&self, id: &str) {
        if let Some(task) = self.running.lock().expect("running poisoned").remove(id) {
            task.abort();
            tracing::debug!(request_id = %id, "request cancelled by the host");
        }
    }

    /// Runs an `http` or `kv` request on its own task, answered when it ends unless it was
    /// cancelled meanwhile.
    fn start_request(&self, env: Envelope, id: String) {
        let (shared, ctx, tx, running) = (
            self.shared.clone(),
            self.ctx.clone(),
            self.tx.clone(),
            self.running.clone(),
        );
        let key = id.clone();
        // The entry goes in before the task can look for it: the lock is held across the
        // spawn, and the task takes it to remove its entry.
        let mut table = self.running.lock().expect("running poisoned");
        // A traced request's handler runs with its trace context current (its logs carry it).
        let trace = env
            .traceparent
            .as_deref()
            .and_then(crate::trace::TraceParent::parse);
        let task = self.shared.tasks.spawn(async move {
            let answer =
                crate::trace::scope(trace, answer_request(&*shared.plugin, &ctx, &env)).await;
            // Answer only if not cancelled meanwhile.
            if running
                .lock()
                .expect("running poisoned")
                .remove(&key)
                .is_some()
            {
                let _ = tx.send(answer);
            }
        });
        table.insert(id, task.abort_handle());
    }
}

/// Writes answers, flushing only when no more are queued, so a burst goes out in few writes.
async fn write_answers<W: AsyncWrite + Unpin>(
    mut out: FramedWrite<W, FrameCodec>,
    mut rx: mpsc::UnboundedReceiver<Envelope>,
) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(answer) = next {
            if out.feed(answer.to_vec()).await.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if SinkExt::<Vec<u8>>::flush(&mut out).await.is_err() {
            return;
        }
    }
}

/// The operation object of a request: `payload.payload` when present, else `payload`.
fn inner(payload: &Value) -> &Value {
    match payload.get("payload") {
        Some(v @ Value::Object(_)) => v,
        _ => payload,
    }
}

fn string_map(v: Option<&Value>) -> std::collections::BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    (k.clone(), text)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn error_fields(e: &PluginError) -> Value {
    json!({"error": {"code": e.code, "message": e.message}})
}

/// Runs the handler for one `http` or `kv` request and builds its answer.
async fn answer_request<P: Plugin>(plugin: &P, ctx: &Context, env: &Envelope) -> Envelope {
    let op = inner(&env.payload);
    let id = env.request_id.clone().unwrap_or_default();
    let text = |k: &str| op.get(k).and_then(Value::as_str).map(str::to_owned);
    let fields = if env.kind == MessageType::Kv {
        let key = text("key").unwrap_or_default();
        let kv = match op.get("action").and_then(Value::as_str) {
            Some("get") => Ok(KvOp::Get { key }),
            Some("set") => match text("value") {
                Some(value) => Ok(KvOp::Set { key, value }),
                None => Err(PluginError::invalid_argument("set needs a string value")),
            },
            Some("delete") => Ok(KvOp::Delete { key }),
            other => Err(PluginError::invalid_argument(format!(
                "unknown kv action {other:?}"
            ))),
        };
        match kv {
            Ok(kv) => match plugin.kv(ctx, kv).await {
                Ok(value) => json!({ "value": value }),
                Err(e) => error_fields(&e),
            },
            Err(e) => error_fields(&e),
        }
    } else {
        let body = op.as_object().map(decode_body).transpose();
        match body {
            Err(e) => error_fields(&PluginError::invalid_argument(e.to_string())),
            Ok(body) => {
                let request = HttpRequest {
                    method: text("method").unwrap_or_default(),
                    path: text("path").unwrap_or_default(),
                    headers: string_map(op.get("headers")),
                    body: body.flatten(),
                };
                match plugin.call(ctx, request).await {
                    Ok(response) => {
                        let mut fields =
                            json!({"status": response.status, "headers": response.headers});
                        encode_body(&mut fields, response.body.as_deref());
                        fields
                    }
                    Err(e) => error_fields(&e),
                }
            }
        }
    };
    Envelope::new(env.kind, id, fields)
}
