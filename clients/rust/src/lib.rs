//! `torud-api`: the torud control plane's API as Rust types, generated from
//! `proto/toru/v1/*.proto` (the single source of truth) by this crate's `build.rs`, and what a
//! client needs besides: the bearer-token interceptor, the health service names, and the
//! names of the files in the daemon's data directory that a local client reads.
//!
//! The daemon serves these services, and `toructl`, `torud-bench` and the tests call them.
//! This crate knows nothing of the daemon: a client that depends only on it can do nothing
//! a remote gRPC client cannot.

#![warn(missing_docs)]

pub mod codec;
pub mod text;

/// Code generated from `proto/toru/v1/*.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("toru.v1");
}

/// The control socket's file name in the data directory (no token asked; mode 0600).
pub const CONTROL_SOCKET: &str = "torud.sock";
/// The admin token's file name in the data directory, when the daemon generated it.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The read token's file name in the data directory, when the daemon generated it.
pub const READ_TOKEN_FILE: &str = "read.token";

/// The `grpc.health.v1` service name of a plugin (the daemon's own is `""`).
pub fn health_service_name(plugin_id: &str) -> String {
    format!("toru.plugin.{plugin_id}")
}

/// A protobuf timestamp.
pub fn timestamp(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

/// The client side of authentication: adds `authorization: Bearer <token>` to every call (as
/// a tonic interceptor, or to one request with [`Bearer::apply`]).
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    /// The header for `token`; an error when the token has characters a header cannot carry.
    pub fn new(token: &str) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        Ok(Bearer(format!("Bearer {token}").parse()?))
    }

    /// Adds the header to `req`.
    pub fn apply<T>(&self, req: &mut tonic::Request<T>) {
        req.metadata_mut()
            .insert(http::header::AUTHORIZATION.as_str(), self.0.clone());
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.apply(&mut req);
        Ok(req)
    }
}
