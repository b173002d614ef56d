//! A minimal plugin runtime: `--metadata`, binding the socket, reading `init`, answering
//! `http` and `kv` requests, and exiting on `shutdown` or SIGTERM.
//!
//! It accepts any number of connections and any number of messages per connection, so it
//! serves a host that keeps one persistent connection (protocol 2) as well as one that
//! opens a connection per message (protocol 1). Requests on one connection are answered in
//! order; KV values live in memory for the life of the process.
//! It does not know about the daemon's supervision or storage.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::FrameCodec;
use crate::metadata::Metadata;
use crate::wire::{decode_body, encode_body, Envelope, MessageType};
use crate::{ENV_PLUGIN_SOCKET, PROTOCOL_VERSION};

/// An HTTP-style call forwarded by the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method, for example `GET`.
    pub method: String,
    /// Path, with the query string if any.
    pub path: String,
    /// Headers, one value per name (repeated fields joined with `, `).
    pub headers: BTreeMap<String, String>,
    /// Body bytes, when there is one (base64 on the wire is already decoded).
    pub body: Option<Vec<u8>>,
}

/// The plugin's answer to an [`HttpRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code, for example 200.
    pub status: u16,
    /// Headers, one value per name.
    pub headers: BTreeMap<String, String>,
    /// Body bytes, when there is one (sent as base64 when not UTF-8).
    pub body: Option<Vec<u8>>,
}

/// What a plugin implements; [`run`] does the rest.
pub trait Plugin: Send + Sync + 'static {
    /// The plugin's metadata. `protocol_version` is set by the runtime.
    fn metadata(&self) -> Metadata;
    /// Answers one HTTP-style call.
    fn call(&self, request: HttpRequest) -> HttpResponse;
}

/// Runs a plugin executable: prints metadata on `--metadata`, otherwise serves on the socket
/// named by `TORU_PLUGIN_SOCKET` until shutdown. Use it as the whole of `main`.
pub fn run<P: Plugin>(plugin: P) -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--metadata") {
        let mut meta = plugin.metadata();
        meta.protocol_version = PROTOCOL_VERSION;
        println!(
            "{}",
            serde_json::to_string(&meta).expect("metadata serialises")
        );
        return ExitCode::SUCCESS;
    }
    let Some(socket) = std::env::var_os(ENV_PLUGIN_SOCKET) else {
        eprintln!("{ENV_PLUGIN_SOCKET} is not set: run this plugin under torud, or run it with --metadata");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(plugin, socket.into())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log("error", &format!("plugin stopped: {e}"));
            ExitCode::FAILURE
        }
    }
}

struct Shared<P> {
    plugin: P,
    kv: Mutex<HashMap<String, String>>,
    shutdown: Notify,
}

async fn serve<P: Plugin>(plugin: P, socket: std::path::PathBuf) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let shared = Arc::new(Shared {
        plugin,
        kv: Mutex::new(HashMap::new()),
        shutdown: Notify::new(),
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                tokio::spawn(handle_connection(shared.clone(), stream));
            }
            _ = shared.shutdown.notified() => {
                log("info", "shutdown requested by the host");
                break;
            }
            _ = sigterm.recv() => {
                log("info", "SIGTERM received");
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

async fn handle_connection<P: Plugin>(shared: Arc<Shared<P>>, stream: UnixStream) {
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, FrameCodec::default());
    let (tx, rx) = mpsc::unbounded_channel::<Envelope>();
    let writer = tokio::spawn(write_answers(
        FramedWrite::new(write, FrameCodec::default()),
        rx,
    ));
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                log("warn", &format!("connection dropped: {e}"));
                break;
            }
        };
        let env = match Envelope::from_slice(&frame) {
            Ok(env) => env,
            Err(e) => {
                log(
                    "warn",
                    &format!("ignoring a message that is not valid JSON: {e}"),
                );
                continue;
            }
        };
        let id = || env.request_id.clone().unwrap_or_default();
        let answer = match env.kind {
            MessageType::Lifecycle => match env.lifecycle_action() {
                Some("init") => {
                    log("info", "initialised by the host");
                    Some(Envelope::bare(MessageType::Ready, id()))
                }
                Some("shutdown") => {
                    shared.shutdown.notify_one();
                    None
                }
                other => {
                    log("warn", &format!("unknown lifecycle action {other:?}"));
                    None
                }
            },
            MessageType::Http => Some(answer_http(&shared.plugin, &env)),
            MessageType::Kv => Some(answer_kv(&shared.kv, &env)),
            MessageType::Ping => Some(Envelope::bare(MessageType::Pong, id())),
            // Requests are answered as they arrive, so there is nothing left to cancel.
            MessageType::Cancel => None,
            MessageType::Ready
            | MessageType::Pong
            | MessageType::Storage
            | MessageType::Unknown => {
                log(
                    "warn",
                    &format!("ignoring a message of type {}", env.kind.as_str()),
                );
                None
            }
        };
        if let Some(answer) = answer {
            if tx.send(answer).is_err() {
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Writes answers, flushing only when no more are queued, so a burst goes out in few writes.
async fn write_answers(
    mut out: FramedWrite<OwnedWriteHalf, FrameCodec>,
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

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn answer_http<P: Plugin>(plugin: &P, env: &Envelope) -> Envelope {
    let op = inner(&env.payload);
    let text = |k: &str| {
        op.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let body = match op.as_object().map(decode_body) {
        Some(Ok(body)) => body,
        Some(Err(e)) => {
            return reply(
                env,
                json!({"status": 400, "headers": {}, "body": e.to_string()}),
            )
        }
        None => None,
    };
    let request = HttpRequest {
        method: text("method"),
        path: text("path"),
        headers: string_map(op.get("headers")),
        body,
    };
    let response = plugin.call(request);
    let mut fields = json!({"status": response.status, "headers": response.headers});
    encode_body(&mut fields, response.body.as_deref());
    reply(env, fields)
}

fn answer_kv(kv: &Mutex<HashMap<String, String>>, env: &Envelope) -> Envelope {
    let op = inner(&env.payload);
    let key = op.get("key").and_then(Value::as_str).unwrap_or_default();
    let mut map = kv.lock().expect("kv map lock poisoned");
    let value = match op.get("action").and_then(Value::as_str) {
        Some("get") => map.get(key).cloned(),
        Some("set") => {
            let value = op.get("value").and_then(Value::as_str).unwrap_or_default();
            map.insert(key.to_owned(), value.to_owned());
            Some(value.to_owned())
        }
        Some("delete") => map.remove(key),
        _ => None,
    };
    reply(env, json!({ "value": value }))
}

fn reply(request: &Envelope, fields: Value) -> Envelope {
    let id = request.request_id.clone().unwrap_or_default();
    Envelope::new(request.kind, id, fields)
}

/// Writes one structured log line to stderr, the way the daemon parses it.
pub fn log(level: &str, message: &str) {
    let line = json!({"timestamp": crate::wire::now_rfc3339(), "level": level, "message": message});
    eprintln!("{line}");
}
