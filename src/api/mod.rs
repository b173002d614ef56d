//! The control plane: the gRPC adapter on top of the supervisor, who may call it, and the
//! server that wires it together.
//!
//! Architecture invariant: this is the only part of the daemon that knows protobuf or tonic
//! types; requests are validated and converted here, domain errors become `tonic::Status` in
//! one place (`convert.rs`), and no supervision logic lives here.

pub mod auth;
pub mod config;
pub mod console;
pub mod convert;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod kv;
pub mod logs;
pub mod metrics;
pub mod plugins;
pub mod readiness;
pub mod server;
pub mod systemd;
pub mod upgrade;
pub mod web;

#[cfg(test)]
pub(crate) use plugins::decode_page_token;
pub(crate) use plugins::{checked_id, checked_ids_in, truncate};
