//! Trace context: the W3C `traceparent` a host passes with a request (protocol 2, the
//! envelope's `traceparent` field), so a plugin's logs and spans join the caller's trace.
//!
//! [`crate::serve`] makes the request's context current while its handler runs:
//! [`current`] returns it, and the SDK's JSON log lines ([`crate::logging`]) carry its
//! `trace_id` and `span_id` on their own. Work a handler spawns onto other tasks does not
//! inherit it: pass [`current`]'s value along, and run it under [`scope`].

use std::fmt;
use std::future::Future;

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// A parsed W3C `traceparent`: `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id, 32 lower-case hex digits, not all zero.
    pub trace_id: String,
    /// The caller's span id, 16 lower-case hex digits, not all zero.
    pub span_id: String,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header value; `None` when it is not a valid version-00 value
    /// (which the W3C rules say to ignore, starting afresh).
    pub fn parse(text: &str) -> Option<TraceParent> {
        let mut parts = text.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        if parts.next().is_some()
            || version != "00"
            || !hex(trace_id, 32)
            || !nonzero(trace_id)
            || !hex(span_id, 16)
            || !nonzero(span_id)
            || !hex(flags, 2)
        {
            return None;
        }
        Some(TraceParent {
            trace_id: trace_id.to_owned(),
            span_id: span_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// Whether the caller sampled this trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// The trace context of the request whose handler is running on this task, if its
/// `traceparent` came with it.
pub fn current() -> Option<TraceParent> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `work` with `trace` as its [`current`] context (none when `trace` is `None`).
pub async fn scope<F: Future>(trace: Option<TraceParent>, work: F) -> F::Output {
    match trace {
        Some(trace) => CURRENT.scope(trace, work).await,
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let t = TraceParent::parse(VALID).unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id, "00f067aa0ba902b7");
        assert!(t.sampled());
        assert_eq!(t.to_string(), VALID);
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_context_is_current_only_inside_its_scope() {
        assert_eq!(current(), None);
        let t = TraceParent::parse(VALID).unwrap();
        let inside = scope(Some(t.clone()), async { current() }).await;
        assert_eq!(inside, Some(t));
        assert_eq!(current(), None);
    }
}
