//! The log pipeline: capture of a plugin's stdout and stderr (`capture`), the record codec
//! that turns a line into a record and a record into a stored JSON line and back
//! (`record`), the sequenced, segmented store every log and the event log are kept in
//! (`seqlog`), and queries over it by seq and time (`query`).
//!
//! Architecture invariant: nothing here knows gRPC, plugins' processes or the supervisor.

pub mod capture;
pub mod query;
pub mod record;
pub mod seqlog;
