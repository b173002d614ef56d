//! The plugin side: how a plugin executable is found and probed (`discovery`), who it runs
//! as and what it may reach (`isolation`), how its process is spawned, signalled and reaped
//! (`process`, starting it with `spawn`), how the daemon connects to its socket (`connection`) and sees, without
//! connecting, whether a v1 plugin's socket listens (`listening`), what it tells a plugin
//! at start and how it starts and stops one on that socket (`handshake`), how requests reach
//! it (`link`), and the conformance checker built from those same parts (`check`).
//!
//! Architecture invariant: nothing here knows gRPC or the supervisor's plugin table.

pub mod check;
pub mod connection;
pub mod discovery;
pub mod handshake;
pub mod isolation;
pub mod link;
pub mod listening;
pub mod process;
pub mod spawn;
pub mod throttle;
