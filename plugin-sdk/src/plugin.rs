//! What a plugin author implements: the [`Plugin`] trait, the [`Context`] each handler
//! gets (identity and durable [`Storage`]), and the request, answer and error types.
//!
//! This module knows nothing of sockets or frames; [`crate::serve`] connects a `Plugin` to
//! the host.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;

use crate::metadata::Metadata;
use crate::storage_wire::StorageError;

pub use crate::storage::Storage;

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

impl HttpResponse {
    /// A `200` answer with a `text/plain` body.
    pub fn text(body: impl Into<String>) -> Self {
        HttpResponse {
            status: 200,
            headers: [("content-type".to_owned(), "text/plain".to_owned())].into(),
            body: Some(body.into().into_bytes()),
        }
    }
}

/// A key-value operation forwarded by the host (the daemon's `KvService`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Read `key`; answer its value or `None`.
    Get {
        /// The key.
        key: String,
    },
    /// Write `key`; answer the value written.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove `key`; answer the old value or `None` (the host reports whether it existed).
    Delete {
        /// The key.
        key: String,
    },
}

impl KvOp {
    /// The operation's name on the wire (the `action` field): `get`, `set` or `delete`.
    pub fn action(&self) -> &'static str {
        match self {
            KvOp::Get { .. } => "get",
            KvOp::Set { .. } => "set",
            KvOp::Delete { .. } => "delete",
        }
    }

    /// The key the operation is about.
    pub fn key(&self) -> &str {
        match self {
            KvOp::Get { key } | KvOp::Set { key, .. } | KvOp::Delete { key } => key,
        }
    }

    /// The value a `set` writes; `None` for the others.
    pub fn value(&self) -> Option<&str> {
        match self {
            KvOp::Set { value, .. } => Some(value),
            KvOp::Get { .. } | KvOp::Delete { .. } => None,
        }
    }
}

/// An error a handler answers with; the host turns `code` into a gRPC status
/// (`invalid_argument`, `not_found`, `resource_exhausted`, `unavailable`,
/// `failed_precondition`, `permission_denied`; anything else is UNKNOWN).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct PluginError {
    /// The error's code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

impl PluginError {
    /// An error with `code` and `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        PluginError {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The caller sent something the plugin cannot accept.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new("invalid_argument", message)
    }

    /// What the caller asked for does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new("not_found", message)
    }

    /// The plugin failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new("internal", message)
    }
}

impl From<StorageError> for PluginError {
    fn from(e: StorageError) -> Self {
        PluginError {
            code: e.code,
            message: e.message,
        }
    }
}

/// What every handler gets: who the plugin is in this run, and its durable storage.
#[derive(Clone, Debug)]
pub struct Context {
    /// The plugin's id as the host knows it (`TORU_PLUGIN_ID`; the metadata id otherwise).
    pub plugin_id: String,
    /// This run's id (from `init`, else `TORU_INSTANCE_ID`).
    pub instance_id: String,
    /// A writable directory private to the plugin (`TORU_DATA_DIR`), when the host gave one.
    pub data_dir: Option<PathBuf>,
    /// The protocol version the host announced in `init` (0 before `init`).
    pub host_protocol_version: u32,
    /// The plugin's durable key-value storage, kept by the host.
    pub storage: Storage,
}

/// What a plugin implements; [`crate::serve`] does the rest (metadata, socket, `init` and
/// `ready`, heartbeats, cancellation, concurrency, shutdown, logging).
///
/// Handlers run concurrently, each request on its own task; a request the host cancels is
/// dropped (its task aborted). Write the handlers with `async fn` in your `impl`.
pub trait Plugin: Send + Sync + 'static {
    /// The plugin's metadata. `protocol_version` is set by the SDK.
    fn metadata(&self) -> Metadata;

    /// Runs once after the host's `init`, before the plugin reports ready. An error stops
    /// the plugin (the host restarts it with backoff). Storage is usable here.
    fn init(&self, ctx: &Context) -> impl Future<Output = Result<(), PluginError>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Answers one HTTP-style call.
    fn call(
        &self,
        ctx: &Context,
        request: HttpRequest,
    ) -> impl Future<Output = Result<HttpResponse, PluginError>> + Send;

    /// Answers one key-value operation. The default keeps the values in the host's durable
    /// storage, so they survive plugin and daemon restarts.
    fn kv(
        &self,
        ctx: &Context,
        op: KvOp,
    ) -> impl Future<Output = Result<Option<String>, PluginError>> + Send {
        default_kv(ctx, op)
    }

    /// Runs once when the plugin is asked to stop (the `shutdown` message or SIGTERM),
    /// after requests in flight have finished (or a grace period has passed).
    fn shutdown(&self, ctx: &Context) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }
}

/// The default [`Plugin::kv`]: maps each operation onto the host's durable storage.
pub async fn default_kv(ctx: &Context, op: KvOp) -> Result<Option<String>, PluginError> {
    Ok(match op {
        KvOp::Get { key } => ctx.storage.get(&key).await?,
        KvOp::Set { key, value } => {
            ctx.storage.set(&key, &value).await?;
            Some(value)
        }
        KvOp::Delete { key } => ctx.storage.delete(&key).await?,
    })
}
