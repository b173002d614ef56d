//! Toru plugin SDK: write a plugin for `torud` as one small [`Plugin`] implementation and
//! one call to [`serve`]. The SDK handles the rest of the protocol (`docs/PROTOCOL.md`):
//! `--metadata`, the socket, `init` and version negotiation (SDK plugins speak protocol
//! 2: one persistent, multiplexed connection), `ready`, heartbeats, cancellation,
//! concurrent requests, graceful shutdown on the `shutdown` message or SIGTERM, structured
//! JSON logging through [`tracing`] ([`logging`]), and durable storage kept by the daemon
//! ([`Storage`]; the default KV handler uses it, so values set through the daemon's
//! `KvService` survive plugin and daemon restarts). [`testing::Harness`] runs a plugin
//! in-process for unit tests, no daemon needed.
//!
//! # Example
//!
//! A complete plugin: it greets callers, counts calls in its durable storage, and leaves KV
//! to the default handler.
//!
//! ```no_run
//! use std::process::ExitCode;
//! use toru_plugin_sdk::{Context, HttpRequest, HttpResponse, Metadata, Plugin, PluginError};
//!
//! struct Greeter;
//!
//! impl Plugin for Greeter {
//!     fn metadata(&self) -> Metadata {
//!         Metadata::new("greeter", "Greeter", "1.0.0", "/greet")
//!     }
//!
//!     async fn init(&self, ctx: &Context) -> Result<(), PluginError> {
//!         tracing::info!(instance = %ctx.instance_id, "starting");
//!         Ok(())
//!     }
//!
//!     async fn call(&self, ctx: &Context, req: HttpRequest) -> Result<HttpResponse, PluginError> {
//!         if req.method != "GET" {
//!             return Err(PluginError::invalid_argument("only GET is supported"));
//!         }
//!         let calls = ctx.storage.get("calls").await?.and_then(|v| v.parse().ok()).unwrap_or(0u64);
//!         ctx.storage.set("calls", &(calls + 1).to_string()).await?;
//!         tracing::info!(path = %req.path, calls = calls + 1, "greeted");
//!         Ok(HttpResponse::text(format!("hello, caller number {}", calls + 1)))
//!     }
//! }
//!
//! fn main() -> ExitCode {
//!     toru_plugin_sdk::serve(Greeter)
//! }
//! ```
//!
//! Build it, install the executable as `greeter.binary` in the daemon's plugins directory,
//! and check it with `torud plugin check greeter.binary`. `docs/PLUGIN_GUIDE.md` walks
//! through it.
//!
//! The daemon also uses [`codec`], [`wire`], [`storage_wire`] and [`metadata`] from here,
//! so the protocol is defined exactly once. This crate knows nothing of gRPC, the daemon's
//! supervision, or how the daemon stores data.

#![warn(missing_docs)]

pub mod codec;
pub mod logging;
pub mod metadata;
mod plugin;
mod serve;
mod storage;
pub mod storage_wire;
pub mod testing;
pub mod trace;
pub mod wire;

pub use codec::{FrameCodec, FrameError, DEFAULT_MAX_FRAME_LEN};
pub use metadata::{Metadata, MetadataError};
pub use plugin::{
    default_kv, Context, HttpRequest, HttpResponse, KvOp, Plugin, PluginError, Storage,
};
pub use serve::{metadata_json, serve, ServeError, SHUTDOWN_GRACE};
pub use storage_wire::StorageError;
pub use wire::{AnswerKind, Envelope, MessageType};

/// The newest plugin protocol version this crate speaks. A plugin that declares nothing in
/// its metadata speaks version 1.
pub const PROTOCOL_VERSION: u32 = 2;

/// Environment variable holding the Unix socket path the plugin must bind and listen on.
pub const ENV_PLUGIN_SOCKET: &str = "TORU_PLUGIN_SOCKET";
/// Environment variable holding the plugin's id as the daemon knows it.
pub const ENV_PLUGIN_ID: &str = "TORU_PLUGIN_ID";
/// Environment variable holding the id of this run of the plugin.
pub const ENV_INSTANCE_ID: &str = "TORU_INSTANCE_ID";
/// Environment variable holding a writable directory private to the plugin.
pub const ENV_DATA_DIR: &str = "TORU_DATA_DIR";
