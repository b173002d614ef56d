//! `toru.v1.KvService`: key-value operations forwarded to a plugin. Validates keys and values
//! against the configured limits; everything else is the supervisor's and the plugin link's.

use tonic::{Request, Response, Status};

use super::{checked_id, convert};
use crate::supervisor::Supervisor;
use crate::telemetry::metrics::{Metrics, Op};
use crate::telemetry::trace::Tracer;
use toru_plugin_sdk::KvOp;
use torud_api::pb;
use torud_api::pb::kv_service_server::KvService;

/// The `KvService` implementation.
pub struct KvApi {
    supervisor: Supervisor,
    /// Where each forwarded operation is counted.
    metrics: Metrics,
    /// Where each forwarded operation's span goes.
    tracer: Tracer,
}

impl KvApi {
    /// A service over `supervisor`, counting its operations in `metrics` and tracing them
    /// with `tracer`.
    pub fn new(supervisor: Supervisor, metrics: Metrics, tracer: Tracer) -> Self {
        KvApi {
            supervisor,
            metrics,
            tracer,
        }
    }

    /// Forwards `op` to plugin `id` within the caller's deadline and trace (from `metadata`),
    /// counted as `kind`.
    async fn forward(
        &self,
        id: &str,
        op: KvOp,
        kind: Op,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<String>, Status> {
        let deadline = convert::caller_deadline(metadata);
        let span = self
            .tracer
            .start(kind.rpc(), id, convert::caller_trace(metadata));
        let context = span.context().cloned();
        let request = self.supervisor.kv(id, &op, deadline, context.as_ref());
        convert::metered(&self.metrics, span, id, kind, request).await
    }

    fn check_key(&self, key: &str) -> Result<(), Status> {
        let max = self.supervisor.bridge_config().max_key;
        if key.is_empty() || key.len() > max {
            return Err(Status::invalid_argument(format!(
                "key: must be 1 to {max} bytes, got {}",
                key.len()
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl KvService for KvApi {
    async fn get_value(
        &self,
        request: Request<pb::GetValueRequest>,
    ) -> Result<Response<pb::GetValueResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let id = checked_id(&req.plugin_id)?;
        self.check_key(&req.key)?;
        let op = KvOp::Get { key: req.key };
        let value = self.forward(id, op, Op::KvGet, &metadata).await?;
        Ok(Response::new(pb::GetValueResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn set_value(
        &self,
        request: Request<pb::SetValueRequest>,
    ) -> Result<Response<pb::SetValueResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let id = checked_id(&req.plugin_id)?;
        self.check_key(&req.key)?;
        let max = self.supervisor.bridge_config().max_value;
        if req.value.len() > max {
            return Err(Status::invalid_argument(format!(
                "value: at most {max} bytes, got {}",
                req.value.len()
            )));
        }
        let op = KvOp::Set {
            key: req.key,
            value: req.value,
        };
        self.forward(id, op, Op::KvSet, &metadata).await?;
        Ok(Response::new(pb::SetValueResponse {}))
    }

    async fn delete_value(
        &self,
        request: Request<pb::DeleteValueRequest>,
    ) -> Result<Response<pb::DeleteValueResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let id = checked_id(&req.plugin_id)?;
        self.check_key(&req.key)?;
        let op = KvOp::Delete { key: req.key };
        let old = self.forward(id, op, Op::KvDelete, &metadata).await?;
        Ok(Response::new(pb::DeleteValueResponse {
            existed: old.is_some(),
        }))
    }
}
