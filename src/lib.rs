//! `torud`: a per-host daemon that runs plugins and fronts them with a gRPC control plane.
//! See `ARCHITECTURE.md` for the map of the modules.

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod logs;
pub mod model;
pub mod plugin;
pub mod secret;
pub mod store;
pub mod supervisor;
pub mod telemetry;

/// The encoded file descriptor set of the `toru.v1` protos (with their imports), written by
/// `build.rs`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("toru_descriptor");
