//! `toru.v1.KvService`: key-value operations forwarded to a plugin. Validates keys and values
//! against the configured limits; everything else is the supervisor's and the plugin link's.

use tonic::{Request, Response, Status};

use super::{checked_id, convert};
use crate::supervisor::Supervisor;
use crate::telemetry::metrics::{Metrics, Op};
use toru_plugin_sdk::KvOp;
use torud_api::pb;
use torud_api::pb::kv_service_server::KvService;

/// The `KvService` implementation.
pub struct KvApi {
    supervisor: Supervisor,
    /// Where each forwarded operation is counted.
    metrics: Metrics,
}

impl KvApi {
    /// A service over `supervisor`, counting its operations in `metrics`.
    pub fn new(supervisor: Supervisor, metrics: Metrics) -> Self {
        KvApi {
            supervisor,
            metrics,
        }
    }

    /// Forwards `op` to plugin `id`, counted as `kind`.
    async fn forward(
        &self,
        id: &str,
        op: KvOp,
        kind: Op,
        deadline: Option<std::time::Duration>,
    ) -> Result<Option<String>, Status> {
        let request = self.supervisor.kv(id, &op, deadline);
        convert::metered(&self.metrics, id, kind, request).await
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
        let deadline = convert::caller_deadline(request.metadata());
        let req = request.into_inner();
        let id = checked_id(&req.plugin_id)?;
        self.check_key(&req.key)?;
        let op = KvOp::Get { key: req.key };
        let value = self.forward(id, op, Op::KvGet, deadline).await?;
        Ok(Response::new(pb::GetValueResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn set_value(
        &self,
        request: Request<pb::SetValueRequest>,
    ) -> Result<Response<pb::SetValueResponse>, Status> {
        let deadline = convert::caller_deadline(request.metadata());
        let req = request.into_inner();
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
        self.forward(id, op, Op::KvSet, deadline).await?;
        Ok(Response::new(pb::SetValueResponse {}))
    }

    async fn delete_value(
        &self,
        request: Request<pb::DeleteValueRequest>,
    ) -> Result<Response<pb::DeleteValueResponse>, Status> {
        let deadline = convert::caller_deadline(request.metadata());
        let req = request.into_inner();
        let id = checked_id(&req.plugin_id)?;
        self.check_key(&req.key)?;
        let op = KvOp::Delete { key: req.key };
        let old = self.forward(id, op, Op::KvDelete, deadline).await?;
        Ok(Response::new(pb::DeleteValueResponse {
            existed: old.is_some(),
        }))
    }
}
