//! Toru plugin SDK: the plugin protocol's wire types, its frame codec, and a small runtime
//! that turns a [`Plugin`] implementation into a working plugin executable.
//!
//! The daemon (`torud`) uses [`codec`], [`wire`] and [`metadata`] from here, so the protocol
//! is defined exactly once. The protocol itself is described in `docs/PROTOCOL.md`.
//!
//! This crate does not know about gRPC, the daemon's supervision, or its storage.

#![warn(missing_docs)]

pub mod codec;
pub mod metadata;
pub mod runtime;
pub mod storage_wire;
pub mod wire;

pub use codec::{FrameCodec, FrameError, DEFAULT_MAX_FRAME_LEN};
pub use metadata::{Metadata, MetadataError};
pub use runtime::{run, HttpRequest, HttpResponse, Plugin};
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
