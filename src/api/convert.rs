//! Conversions between domain types and their protobuf forms, and from domain errors to
//! `tonic::Status`. The one place where both kinds of type meet.

use tonic::Status;

use crate::api::config::ReloadError;
use crate::model::{Event, EventKind, ExitInfo, ExitStatus, PluginState, PluginStatus};
use crate::plugin::link::{LinkError, RefusalCode};
use crate::supervisor::SupervisorError;
use toru_plugin_sdk::trace::TraceParent;
use torud_api::pb;

pub use torud_api::timestamp;

/// The protobuf state.
pub fn state(s: PluginState) -> pb::PluginState {
    match s {
        PluginState::Stopped => pb::PluginState::Stopped,
        PluginState::Starting => pb::PluginState::Starting,
        PluginState::Running => pb::PluginState::Running,
        PluginState::Stopping => pb::PluginState::Stopping,
        PluginState::Backoff => pb::PluginState::Backoff,
        PluginState::Crashed => pb::PluginState::Crashed,
        PluginState::Disabled => pb::PluginState::Disabled,
    }
}

fn event_kind(k: EventKind) -> pb::EventKind {
    match k {
        EventKind::StateChanged => pb::EventKind::StateChanged,
        EventKind::HealthChanged => pb::EventKind::HealthChanged,
        EventKind::PluginAdded => pb::EventKind::PluginAdded,
        EventKind::PluginRemoved => pb::EventKind::PluginRemoved,
        EventKind::PluginSkipped => pb::EventKind::PluginSkipped,
        EventKind::PluginUpdated => pb::EventKind::PluginUpdated,
        EventKind::LoggingDegraded => pb::EventKind::LoggingDegraded,
        EventKind::LoggingResumed => pb::EventKind::LoggingResumed,
        EventKind::EventStorageDegraded => pb::EventKind::EventStorageDegraded,
        EventKind::EventStorageResumed => pb::EventKind::EventStorageResumed,
        EventKind::ConfigReloaded => pb::EventKind::ConfigReloaded,
        EventKind::DaemonUpgrading => pb::EventKind::DaemonUpgrading,
        EventKind::DaemonUpgraded => pb::EventKind::DaemonUpgraded,
        EventKind::DaemonUpgradeFailed => pb::EventKind::DaemonUpgradeFailed,
    }
}

/// The protobuf exit record.
pub fn exit_info(e: &ExitInfo) -> pb::ExitInfo {
    pb::ExitInfo {
        status: Some(match e.status {
            ExitStatus::Code(c) => pb::exit_info::Status::Code(c),
            ExitStatus::Signal(s) => pb::exit_info::Status::Signal(s),
        }),
        time: Some(timestamp(e.time)),
        stderr_tail: e.stderr_tail.clone(),
    }
}

/// The protobuf plugin resource.
pub fn plugin(s: &PluginStatus) -> pb::Plugin {
    let m = &s.spec.metadata;
    pb::Plugin {
        id: m.id.clone(),
        name: m.name.clone(),
        version: m.version.clone(),
        author: m.author.clone().unwrap_or_default(),
        description: m.description.clone().unwrap_or_default(),
        icon: m.icon.clone(),
        route: m.route.clone(),
        binary_path: s.spec.binary_path.to_string_lossy().into_owned(),
        enabled: s.enabled,
        state: state(s.state) as i32,
        healthy: s.healthy,
        pid: s.pid.unwrap_or(0),
        started_at: s.started_at.map(timestamp),
        restart_count: s.restart_count,
        consecutive_failures: s.consecutive_failures,
        next_restart_at: s.next_restart_at.map(timestamp),
        last_exit: s.last_exit.as_ref().map(exit_info),
        last_error: s.last_error.clone().unwrap_or_default(),
        protocol_version: m.protocol_version,
    }
}

/// The protobuf event.
pub fn event(e: &Event) -> pb::Event {
    let b = &e.body;
    pb::Event {
        seq: e.seq,
        plugin_id: b.plugin_id.clone(),
        time: Some(timestamp(e.time)),
        kind: event_kind(b.kind) as i32,
        from_state: b.from_state.map_or(0, |s| state(s) as i32),
        to_state: b.to_state.map_or(0, |s| state(s) as i32),
        reason: b.reason.clone(),
        details: b.details.clone().into_iter().collect(),
        exit: b.exit.as_ref().map(exit_info),
        next_restart_at: b.next_restart_at.map(timestamp),
        healthy: b.healthy,
    }
}

impl From<SupervisorError> for Status {
    fn from(e: SupervisorError) -> Status {
        let msg = e.to_string();
        match e {
            SupervisorError::InvalidId(_) => Status::invalid_argument(format!("plugin_id: {msg}")),
            SupervisorError::NotFound(_) => Status::not_found(msg),
            SupervisorError::NotEnabled(_) => Status::failed_precondition(msg),
            SupervisorError::StartFailed { .. } | SupervisorError::Interrupted(..) => {
                Status::unavailable(msg)
            }
            SupervisorError::ShuttingDown => Status::unavailable(msg),
            SupervisorError::PluginsDir { .. } => Status::failed_precondition(msg),
            SupervisorError::NotRunning { .. } => Status::unavailable(msg),
            SupervisorError::Bridge(_, ref b) => match b {
                LinkError::Unavailable(_) => Status::unavailable(msg),
                LinkError::Timeout(_) => Status::deadline_exceeded(msg),
                LinkError::Busy(_) => Status::resource_exhausted(msg),
                LinkError::BadAnswer(_) => Status::unknown(msg),
                LinkError::Unsupported(_) => Status::invalid_argument(msg),
                LinkError::Refused { code, .. } => refused(code, msg),
            },
            SupervisorError::State(_) | SupervisorError::StateWriter(_) => Status::internal(msg),
        }
    }
}

impl From<ReloadError> for Status {
    /// A file that cannot be read or is invalid is FAILED_PRECONDITION: the request is
    /// well formed, the file on the host is not, and retrying cannot succeed until it is
    /// fixed (INVALID_ARGUMENT would blame the request).
    fn from(e: ReloadError) -> Status {
        match e {
            ReloadError::Config(e) => Status::failed_precondition(e.to_string()),
            ReloadError::Supervisor(e) => e.into(),
            ReloadError::Reader(_) => Status::internal(e.to_string()),
        }
    }
}

/// The status of a plugin's refusal: the gRPC code of the same name, UNKNOWN for others.
fn refused(code: &RefusalCode, msg: String) -> Status {
    match code {
        RefusalCode::InvalidArgument => Status::invalid_argument(msg),
        RefusalCode::ResourceExhausted => Status::resource_exhausted(msg),
        RefusalCode::NotFound => Status::not_found(msg),
        RefusalCode::Unavailable => Status::unavailable(msg),
        RefusalCode::FailedPrecondition => Status::failed_precondition(msg),
        RefusalCode::PermissionDenied => Status::permission_denied(msg),
        RefusalCode::Unknown(_) => Status::unknown(msg),
    }
}

/// The caller's W3C trace context (`traceparent` metadata), if it sent a valid one (an
/// invalid one is ignored, as the W3C rules say).
pub fn caller_trace(metadata: &tonic::metadata::MetadataMap) -> Option<TraceParent> {
    TraceParent::parse(metadata.get("traceparent")?.to_str().ok()?)
}

/// The caller's deadline, from the `grpc-timeout` header (`<digits><unit>`, units H M S m u n).
pub fn caller_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Awaits a request forwarded to plugin `id` and counts it in `metrics` as `op`, by the
/// gRPC code it ends with and its latency, ending its `span` with that code.
pub async fn metered<T>(
    metrics: &crate::telemetry::metrics::Metrics,
    span: crate::telemetry::trace::CallSpan,
    id: &str,
    op: crate::telemetry::metrics::Op,
    request: impl std::future::Future<Output = Result<T, SupervisorError>>,
) -> Result<T, Status> {
    let began = std::time::Instant::now();
    let result = request.await.map_err(Status::from);
    let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
    metrics.forwarded(id, op, code as i32, began.elapsed());
    span.end(code as i32);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state::StateError;
    use crate::supervisor::Interruption;

    fn refusal(code: &str) -> Status {
        Status::from(SupervisorError::Bridge(
            "p".into(),
            LinkError::Refused {
                code: RefusalCode::parse(code),
                message: "no".into(),
            },
        ))
    }

    #[test]
    fn a_refusal_keeps_its_code_as_the_status() {
        use tonic::Code;
        for (code, want) in [
            ("invalid_argument", Code::InvalidArgument),
            ("resource_exhausted", Code::ResourceExhausted),
            ("not_found", Code::NotFound),
            ("unavailable", Code::Unavailable),
            ("failed_precondition", Code::FailedPrecondition),
            ("permission_denied", Code::PermissionDenied),
            ("internal", Code::Unknown),
            ("", Code::Unknown),
        ] {
            let status = refusal(code);
            assert_eq!(status.code(), want, "{code:?}");
            assert_eq!(status.message(), "plugin \"p\": the plugin refused: no");
            assert_eq!(RefusalCode::parse(code).to_string(), code);
        }
    }

    #[test]
    fn typed_errors_say_what_they_said_as_text() {
        let interrupted = SupervisorError::Interrupted("p".into(), Interruption::Disabled);
        assert_eq!(
            interrupted.to_string(),
            "plugin \"p\" did not become ready: it was disabled"
        );
        assert_eq!(Status::from(interrupted).code(), tonic::Code::Unavailable);
        let state = SupervisorError::from(StateError::Corrupt {
            path: "/d/state.json".into(),
            reason: "eof".into(),
        });
        assert_eq!(
            state.to_string(),
            "could not save the enabled state: state file /d/state.json is corrupt (eof); \
             fix or remove it (removing it disables every plugin)"
        );
        assert_eq!(Status::from(state).code(), tonic::Code::Internal);
        let timeout = SupervisorError::Bridge(
            "p".into(),
            LinkError::Timeout(std::time::Duration::from_millis(1500)),
        );
        assert_eq!(
            timeout.to_string(),
            "plugin \"p\": no answer within 1s 500ms"
        );
        assert_eq!(Status::from(timeout).code(), tonic::Code::DeadlineExceeded);
    }

    #[test]
    fn reads_grpc_timeout() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(caller_deadline(&md), None);
        for (text, want) in [
            ("250m", 250_000u64),
            ("3S", 3_000_000),
            ("1M", 60_000_000),
            ("7u", 7),
        ] {
            md.insert("grpc-timeout", text.parse().unwrap());
            assert_eq!(
                caller_deadline(&md).map(|d| d.as_micros() as u64),
                Some(want),
                "{text}"
            );
        }
        md.insert("grpc-timeout", "12x".parse().unwrap());
        assert_eq!(caller_deadline(&md), None);
    }
}
