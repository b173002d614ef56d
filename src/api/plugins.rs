//! `toru.v1.PluginService` on top of the [`Supervisor`]: validation, paging, the
//! `WatchEvents` producer task and `CallPlugin`; and the request checks the other services
//! share.

use crate::api::upgrade::Upgrading;
use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use toru_plugin_sdk::wire::{check_headers, HttpCall};

use super::convert;
use crate::supervisor::{Supervisor, SupervisorError};
use crate::telemetry::metrics::{Metrics, Op, SubscriptionKind};
use crate::telemetry::trace::Tracer;
use torud_api::pb;
use torud_api::pb::plugin_service_server::PluginService;

/// Default and largest `page_size` of `ListPlugins`.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: i32 = 1000;
/// Events buffered per `WatchEvents` stream before the producer waits for the client.
const WATCH_BUFFER: usize = 256;

/// The `PluginService` implementation.
pub struct PluginApi {
    supervisor: Supervisor,
    /// Cancelled when the daemon shuts down, ending open streams.
    stop: CancellationToken,
    /// Set when they end for an upgrade: they end with UNAVAILABLE saying so.
    upgrading: Upgrading,
    /// Where calls and event subscriptions are counted.
    metrics: Metrics,
    /// Where each call's span goes.
    tracer: Tracer,
}

impl PluginApi {
    /// A service over `supervisor`, counting in `metrics` and tracing calls with `tracer`;
    /// streams end when `stop` is cancelled (with UNAVAILABLE when `upgrading` is set).
    pub fn new(
        supervisor: Supervisor,
        stop: CancellationToken,
        upgrading: Upgrading,
        metrics: Metrics,
        tracer: Tracer,
    ) -> Self {
        PluginApi {
            supervisor,
            stop,
            upgrading,
            metrics,
            tracer,
        }
    }
}

/// The id if it can be a plugin id, else INVALID_ARGUMENT naming the field.
pub(crate) fn checked_id(id: &str) -> Result<&str, Status> {
    if toru_plugin_sdk::metadata::is_valid_id(id) {
        Ok(id)
    } else {
        Err(SupervisorError::InvalidId(truncate(id)).into())
    }
}

/// Each of `ids` if it can be a plugin id, else INVALID_ARGUMENT naming `field` (a list of
/// ids, where the message of [`checked_id`] would name the wrong field).
pub(crate) fn checked_ids_in<'a>(
    field: &str,
    ids: impl IntoIterator<Item = &'a String>,
) -> Result<(), Status> {
    for id in ids {
        if !toru_plugin_sdk::metadata::is_valid_id(id) {
            return Err(Status::invalid_argument(format!(
                "{field}: {:?} is not a plugin id (1 to 64 ASCII letters, digits and '-')",
                truncate(id)
            )));
        }
    }
    Ok(())
}

/// A bounded copy of a caller's string, for error messages.
pub(crate) fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

pub(crate) fn decode_page_token(token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let malformed =
        || Status::invalid_argument("page_token is malformed: pass next_page_token back unchanged");
    let bytes = hex::decode(token).map_err(|_| malformed())?;
    let id = String::from_utf8(bytes).map_err(|_| malformed())?;
    if !toru_plugin_sdk::metadata::is_valid_id(&id) {
        return Err(malformed());
    }
    Ok(Some(id))
}

/// The gap message for the events between `last` and `next` (exclusive), if any: they were
/// numbered but the event log does not hold them. Reported whatever the plugin filter, as
/// nobody can tell which plugins they were about.
fn missing_events(last: u64, next: u64) -> Option<pb::WatchEventsResponse> {
    let first = last.checked_add(1)?;
    (next > first).then(|| pb::WatchEventsResponse {
        event: None,
        gap: Some(pb::EventGap {
            first_seq: first,
            last_seq: next - 1,
            reason: format!(
                "events {first} to {} are not in the event log: they could not be stored \
                 (for example on a full disk) and were delivered live only",
                next - 1
            ),
        }),
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PluginService for PluginApi {
    async fn list_plugins(
        &self,
        request: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        let req = request.into_inner();
        if !(0..=MAX_PAGE_SIZE).contains(&req.page_size) {
            return Err(Status::invalid_argument(format!(
                "page_size must be between 0 and {MAX_PAGE_SIZE}, got {}",
                req.page_size
            )));
        }
        let size = if req.page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            req.page_size as usize
        };
        let after = decode_page_token(&req.page_token)?;
        let mut page = self
            .supervisor
            .page(after.as_deref(), size + 1, convert::plugin);
        let next_page_token = if page.len() > size {
            page.truncate(size);
            hex::encode(&page[size - 1].id)
        } else {
            String::new()
        };
        let skipped = if after.is_none() {
            self.supervisor
                .skipped()
                .into_iter()
                .map(|s| pb::SkippedPlugin {
                    path: s.path.to_string_lossy().into_owned(),
                    reason: s.reason,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::ListPluginsResponse {
            plugins: page,
            next_page_token,
            skipped,
        }))
    }

    async fn get_plugin(
        &self,
        request: Request<pb::GetPluginRequest>,
    ) -> Result<Response<pb::GetPluginResponse>, Status> {
        let id = checked_id(&request.get_ref().plugin_id)?;
        let status = self.supervisor.get(id)?;
        Ok(Response::new(pb::GetPluginResponse {
            plugin: Some(convert::plugin(&status)),
        }))
    }

    async fn enable_plugin(
        &self,
        request: Request<pb::EnablePluginRequest>,
    ) -> Result<Response<pb::EnablePluginResponse>, Status> {
        let id = checked_id(&request.get_ref().plugin_id)?;
        let status = self.supervisor.enable(id).await?;
        Ok(Response::new(pb::EnablePluginResponse {
            plugin: Some(convert::plugin(&status)),
        }))
    }

    async fn disable_plugin(
        &self,
        request: Request<pb::DisablePluginRequest>,
    ) -> Result<Response<pb::DisablePluginResponse>, Status> {
        let id = checked_id(&request.get_ref().plugin_id)?;
        let status = self.supervisor.disable(id).await?;
        Ok(Response::new(pb::DisablePluginResponse {
            plugin: Some(convert::plugin(&status)),
        }))
    }

    async fn restart_plugin(
        &self,
        request: Request<pb::RestartPluginRequest>,
    ) -> Result<Response<pb::RestartPluginResponse>, Status> {
        let id = checked_id(&request.get_ref().plugin_id)?;
        let status = self.supervisor.restart(id).await?;
        Ok(Response::new(pb::RestartPluginResponse {
            plugin: Some(convert::plugin(&status)),
        }))
    }

    async fn rescan_plugins(
        &self,
        _request: Request<pb::RescanPluginsRequest>,
    ) -> Result<Response<pb::RescanPluginsResponse>, Status> {
        let report = self.supervisor.rescan().await?;
        Ok(Response::new(pb::RescanPluginsResponse {
            added: report.added,
            removed: report.removed,
            updated: report.updated,
            skipped: report
                .skipped
                .into_iter()
                .map(|s| pb::SkippedPlugin {
                    path: s.path.to_string_lossy().into_owned(),
                    reason: s.reason,
                })
                .collect(),
        }))
    }

    async fn call_plugin(
        &self,
        request: Request<pb::CallPluginRequest>,
    ) -> Result<Response<pb::CallPluginResponse>, Status> {
        let deadline = convert::caller_deadline(request.metadata());
        let trace = convert::caller_trace(request.metadata());
        let req = request.into_inner();
        let id = checked_id(&req.plugin_id)?;
        if req.method.is_empty() || !req.method.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(Status::invalid_argument(format!(
                "method: {:?} is not an HTTP method (letters only, e.g. GET)",
                truncate(&req.method)
            )));
        }
        if !req.path.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "path: {:?} must start with '/'",
                truncate(&req.path)
            )));
        }
        check_headers(
            req.headers
                .iter()
                .map(|h| (h.name.as_str(), h.value.as_str())),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let call = HttpCall {
            method: req.method,
            path: req.path,
            headers: req.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            body: (!req.body.is_empty()).then_some(req.body),
        };
        let span = self.tracer.start(Op::Call.rpc(), id, trace);
        let context = span.context().cloned();
        let request = self.supervisor.call(id, &call, deadline, context.as_ref());
        let answer = convert::metered(&self.metrics, span, id, Op::Call, request).await?;
        Ok(Response::new(pb::CallPluginResponse {
            status: answer.status,
            headers: answer
                .headers
                .into_iter()
                .map(|(name, value)| pb::Header { name, value })
                .collect(),
            body: answer.body,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let req = request.into_inner();
        checked_ids_in("plugin_ids", &req.plugin_ids)?;
        let mut follower = self.supervisor.events().follow(req.after_seq);
        let filter = req.plugin_ids;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let stop = self.stop.clone();
        let upgrading = self.upgrading.clone();
        let subscription = self.metrics.subscribe(SubscriptionKind::Events);
        let events = self.supervisor.events().clone();
        let lag = subscription.lag_gauge(move || events.last_seq());
        tokio::spawn(async move {
            let _open = subscription;
            // The seq of the last event read; a jump past it is a hole in the event log.
            let mut last = follower.cursor();
            loop {
                let next = tokio::select! {
                    next = follower.next() => next,
                    _ = stop.cancelled() => {
                        if let Some(status) = upgrading.status() {
                            let _ = tx.send(Err(status)).await;
                        }
                        break;
                    }
                    _ = tx.closed() => break,
                };
                let item = match next {
                    None => break,
                    Some(Err(e)) => Err(Status::internal(e.to_string())),
                    Some(Ok(event)) => {
                        if let Some(gap) = missing_events(last, event.seq) {
                            if tx.send(Ok(gap)).await.is_err() {
                                break;
                            }
                        }
                        last = event.seq;
                        if !filter.is_empty() && !filter.contains(&event.body.plugin_id) {
                            lag.sent(last);
                            continue;
                        }
                        Ok(pb::WatchEventsResponse {
                            event: Some(convert::event(&event)),
                            gap: None,
                        })
                    }
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
                lag.sent(last);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
