//! `torud`: a per-host daemon that runs plugins and fronts them with a gRPC control plane.
//! See `ARCHITECTURE.md` for the map of the modules.

#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod bridge;
pub mod capture;
pub mod check;
pub mod config;
pub mod connection;
pub mod discovery;
pub mod events;
pub mod isolation;
pub mod model;
pub mod process;
pub mod seqlog;
pub mod server;
pub mod state;
pub mod storage;
pub mod supervisor;
pub mod text;
pub mod throttle;

/// Code generated from `proto/toru/v1/*.proto`. Only `api/` (and clients) use it.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("toru.v1");

    /// Encoded file descriptor set of the `toru.v1` protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("toru_descriptor");
}
