//! An in-process test harness: runs a [`Plugin`] through the SDK's real connection code
//! over an in-memory stream, with the harness playing the host (sending `init`, requests,
//! `ping`, `cancel` and `shutdown`, and keeping the plugin's storage in memory with the
//! host's semantics). Plugin authors unit-test plugins with it, no daemon needed.
//!
//! ```
//! use toru_plugin_sdk::testing::Harness;
//! use toru_plugin_sdk::{Context, HttpRequest, HttpResponse, KvOp, Metadata, Plugin, PluginError};
//!
//! struct Counter;
//!
//! impl Plugin for Counter {
//!     fn metadata(&self) -> Metadata {
//!         Metadata::new("counter", "Counter", "1.0.0", "/counter")
//!     }
//!     async fn call(&self, ctx: &Context, _req: HttpRequest) -> Result<HttpResponse, PluginError> {
//!         let n: u64 = ctx.storage.get("n").await?.map_or(0, |v| v.parse().unwrap_or(0)) + 1;
//!         ctx.storage.set("n", &n.to_string()).await?;
//!         Ok(HttpResponse::text(n.to_string()))
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let host = Harness::start(Counter).await.unwrap();
//! host.call(HttpRequest::default()).await.unwrap();
//! let second = host.call(HttpRequest::default()).await.unwrap();
//! assert_eq!(second.body.as_deref(), Some(&b"2"[..]));
//! assert_eq!(host.storage()["n"], "2");
//! // The default KV handler reads the same storage.
//! assert_eq!(host.kv(KvOp::Get { key: "n".into() }).await.unwrap().as_deref(), Some("2"));
//! host.shutdown().await.unwrap();
//! # });
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::FrameCodec;
use crate::plugin::{HttpRequest, HttpResponse, KvOp, Plugin, PluginError};
use crate::serve::{serve_connection, ServeError, Shared};
use crate::storage_wire::{answer_envelope, StorageAnswer, StorageError, StorageOp};
use crate::wire::{
    decode_body, AnswerKind, Envelope, HttpAnswer, HttpCall, InitParams, MessageType,
};

/// How long the harness waits for any answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the harness could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The plugin did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The plugin stopped (or its connection closed) instead of answering.
    #[error("the plugin stopped: {0}")]
    Stopped(String),
    /// The plugin answered something unexpected.
    #[error("unexpected answer: {0}")]
    BadAnswer(String),
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>;

/// A plugin running in this process, with the harness as its host.
pub struct Harness {
    out: mpsc::UnboundedSender<Envelope>,
    waiters: Waiters,
    store: Arc<Mutex<BTreeMap<String, String>>>,
    /// The plugin's serving task; taken by [`Harness::shutdown`].
    served: Mutex<Option<JoinHandle<Result<(), ServeError>>>>,
    next_id: AtomicU64,
}

impl Harness {
    /// Starts `plugin` with empty storage, sends `init` and waits for `ready`.
    pub async fn start<P: Plugin>(plugin: P) -> Result<Self, HarnessError> {
        Self::with_storage(plugin, BTreeMap::new()).await
    }

    /// Starts `plugin` with `storage` as what it kept before, then sends `init` and waits
    /// for `ready` (an `init` that fails is [`HarnessError::Stopped`]).
    pub async fn with_storage<P: Plugin>(
        plugin: P,
        storage: BTreeMap<String, String>,
    ) -> Result<Self, HarnessError> {
        let (host_end, plugin_end) = tokio::io::duplex(1 << 16);
        let shared = Shared::new(Arc::new(plugin));
        let served = tokio::spawn(async move {
            let connection = tokio::spawn(serve_connection(shared.clone(), plugin_end));
            shared.stopped().await;
            let result = shared.finish().await;
            let _ = connection.await;
            result
        });
        let (read, write) = tokio::io::split(host_end);
        let (out, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(
            FramedWrite::new(write, FrameCodec::default()),
            rx,
        ));
        let harness = Harness {
            out,
            waiters: Waiters::default(),
            store: Arc::new(Mutex::new(storage)),
            served: Mutex::new(Some(served)),
            next_id: AtomicU64::new(1),
        };
        tokio::spawn(read_loop(
            FramedRead::new(read, FrameCodec::default()),
            harness.waiters.clone(),
            harness.store.clone(),
            harness.out.clone(),
        ));
        let init = Envelope::init(
            harness.fresh_id(),
            &InitParams {
                instance_id: "harness".into(),
                plugin_socket: String::new(),
                log_path: String::new(),
                host_protocol_version: crate::PROTOCOL_VERSION,
            },
        );
        let answer = match harness.request(init).await {
            Ok(answer) => answer,
            // Report why the plugin stopped, when it did.
            Err(e) => return Err(harness.stopped().await.err().unwrap_or(e)),
        };
        if answer.kind != MessageType::Ready {
            return Err(HarnessError::BadAnswer(format!(
                "{} instead of ready",
                answer.kind.as_str()
            )));
        }
        Ok(harness)
    }

    fn fresh_id(&self) -> String {
        format!("h{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends `envelope` and waits for the message with its `request_id`.
    pub async fn request(&self, envelope: Envelope) -> Result<Envelope, HarnessError> {
        let id = envelope.request_id.clone().unwrap_or_default();
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters").insert(id.clone(), tx);
        self.send(envelope)?;
        let result = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
        self.waiters.lock().expect("waiters").remove(&id);
        match result {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(HarnessError::Stopped("its connection closed".into())),
            Err(_) => Err(HarnessError::Timeout(ANSWER_TIMEOUT)),
        }
    }

    /// Sends a message that is not answered (`cancel`, `shutdown`, or anything crafted).
    pub fn send(&self, envelope: Envelope) -> Result<(), HarnessError> {
        self.out
            .send(envelope)
            .map_err(|_| HarnessError::Stopped("its connection closed".into()))
    }

    /// Forwards an HTTP-style call; the plugin's answer, or the error it answered with.
    pub async fn call(&self, request: HttpRequest) -> Result<HttpResponse, PluginError> {
        let call = HttpCall {
            method: request.method,
            path: request.path,
            headers: request.headers.into_iter().collect(),
            body: request.body,
        };
        let answer = self
            .request(Envelope::http_request(self.fresh_id(), &call))
            .await
            .map_err(|e| PluginError::new("unavailable", e.to_string()))?;
        refused(&answer)?;
        let fields = answer
            .answer(AnswerKind::Http)
            .ok_or_else(|| PluginError::internal("the answer has no status"))?;
        let parsed =
            HttpAnswer::from_fields(&fields).map_err(|e| PluginError::internal(e.to_string()))?;
        parsed
            .check()
            .map_err(|e| PluginError::internal(format!("torud would refuse this answer: {e}")))?;
        Ok(HttpResponse {
            status: u16::try_from(parsed.status).unwrap_or(0),
            headers: parsed.headers.into_iter().collect(),
            body: decode_body(&fields).map_err(|e| PluginError::internal(e.to_string()))?,
        })
    }

    /// Forwards a KV operation as the daemon's `KvService` does.
    pub async fn kv(&self, op: KvOp) -> Result<Option<String>, PluginError> {
        let envelope = kv_envelope(&self.fresh_id(), &op);
        let answer = self
            .request(envelope)
            .await
            .map_err(|e| PluginError::new("unavailable", e.to_string()))?;
        refused(&answer)?;
        let fields = answer
            .answer(AnswerKind::Kv)
            .ok_or_else(|| PluginError::internal("the answer has no value"))?;
        match fields.get("value") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(PluginError::internal(format!("value is {other}"))),
        }
    }

    /// Sends `ping` and waits for `pong`.
    pub async fn ping(&self) -> Result<(), HarnessError> {
        let answer = self
            .request(Envelope::bare(MessageType::Ping, self.fresh_id()))
            .await?;
        match answer.kind {
            MessageType::Pong => Ok(()),
            other => Err(HarnessError::BadAnswer(format!(
                "{} instead of pong",
                other.as_str()
            ))),
        }
    }

    /// A copy of what the plugin keeps in its storage.
    pub fn storage(&self) -> BTreeMap<String, String> {
        self.store.lock().expect("store").clone()
    }

    /// Sends `shutdown` and waits (within [`ANSWER_TIMEOUT`]) until the plugin has stopped:
    /// requests in flight finished and [`Plugin::shutdown`] ran.
    pub async fn shutdown(&self) -> Result<(), HarnessError> {
        let _ = self.send(Envelope::shutdown(self.fresh_id()));
        self.stopped().await
    }

    /// Waits (within [`ANSWER_TIMEOUT`]) for the plugin's serving to end.
    async fn stopped(&self) -> Result<(), HarnessError> {
        let Some(served) = self.served.lock().expect("served").take() else {
            return Err(HarnessError::Stopped("already shut down".into()));
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, served).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(HarnessError::Stopped(e.to_string())),
            Ok(Err(e)) => Err(HarnessError::Stopped(e.to_string())),
            Err(_) => Err(HarnessError::Timeout(ANSWER_TIMEOUT)),
        }
    }
}

fn refused(answer: &Envelope) -> Result<(), PluginError> {
    match answer.payload.get("error") {
        Some(e @ Value::Object(_)) => {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default();
            Err(PluginError::new(text("code"), text("message")))
        }
        _ => Ok(()),
    }
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut out: FramedWrite<W, FrameCodec>,
    mut rx: mpsc::UnboundedReceiver<Envelope>,
) {
    while let Some(envelope) = rx.recv().await {
        if out.send(envelope.to_vec()).await.is_err() {
            return;
        }
    }
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    mut frames: FramedRead<R, FrameCodec>,
    waiters: Waiters,
    store: Arc<Mutex<BTreeMap<String, String>>>,
    out: mpsc::UnboundedSender<Envelope>,
) {
    while let Some(Ok(frame)) = frames.next().await {
        let Ok(envelope) = Envelope::from_slice(&frame) else {
            continue;
        };
        let id = envelope.request_id.clone().unwrap_or_default();
        if envelope.kind == MessageType::Storage {
            let result =
                StorageOp::from_payload(&envelope.payload).and_then(|op| apply(&store, op));
            let _ = out.send(answer_envelope(id, &result));
            continue;
        }
        if let Some(waiter) = waiters.lock().expect("waiters").remove(&id) {
            let _ = waiter.send(envelope);
        }
    }
    // Dropping the waiters wakes everyone still waiting.
    waiters.lock().expect("waiters").clear();
}

/// The host's storage semantics, in memory (no quotas).
fn apply(
    store: &Mutex<BTreeMap<String, String>>,
    op: StorageOp,
) -> Result<StorageAnswer, StorageError> {
    let mut map = store.lock().expect("store");
    let key_ok = |k: &str| {
        if k.is_empty() || k.len() > 512 {
            Err(StorageError::new(
                "invalid_argument",
                "keys are 1 to 512 bytes",
            ))
        } else {
            Ok(())
        }
    };
    Ok(match op {
        StorageOp::Get { key } => {
            key_ok(&key)?;
            StorageAnswer::Value(map.get(&key).cloned())
        }
        StorageOp::Set { key, value } => {
            key_ok(&key)?;
            StorageAnswer::Value(map.insert(key, value))
        }
        StorageOp::Delete { key } => {
            key_ok(&key)?;
            StorageAnswer::Value(map.remove(&key))
        }
        StorageOp::List {
            prefix,
            after,
            limit,
        } => {
            let limit = limit.clamp(1, 1000) as usize;
            let mut keys: Vec<String> = map
                .range::<String, _>(&prefix..)
                .map(|(k, _)| k)
                .take_while(|k| k.starts_with(&prefix))
                .filter(|k| after.is_empty() || **k > after)
                .take(limit + 1)
                .cloned()
                .collect();
            let more = keys.len() > limit;
            keys.truncate(limit);
            StorageAnswer::Keys { keys, more }
        }
    })
}

/// A request envelope the harness would send for `op` with `request_id`, for tests that
/// cancel it or craft their own.
pub fn kv_envelope(request_id: &str, op: &KvOp) -> Envelope {
    Envelope::kv_request(request_id.to_owned(), op)
}

/// A `cancel` for `request_id`.
pub fn cancel_envelope(request_id: &str) -> Envelope {
    Envelope::bare(MessageType::Cancel, request_id.to_owned())
}
