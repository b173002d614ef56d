//! What the daemon keeps on disk besides logs: the event log (`events`), the enabled/disabled
//! decisions (`state`), and the plugins' durable key-value storage (`storage`).
//!
//! Architecture invariant: nothing here knows gRPC, sockets or processes.

pub mod events;
pub mod state;
pub mod storage;
