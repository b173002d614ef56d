//! The log pipeline: capture of a plugin's stdout and stderr into records (`capture`), the
//! sequenced, segmented store every log and the event log are kept in (`seqlog`), and
//! queries over it by seq and time (`query`).
//!
//! Architecture invariant: nothing here knows gRPC, plugins' processes or the supervisor.

pub mod capture;
pub mod query;
pub mod seqlog;
