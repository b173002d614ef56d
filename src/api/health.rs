//! Bridges plugin health into the standard `grpc.health.v1` service: one service name per
//! plugin, `toru.plugin.<id>`, SERVING while the plugin is running and reachable and
//! NOT_SERVING otherwise; the daemon itself is the service `""`. Fed by the event log, so
//! `Watch` sees every transition.

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::model::EventKind;
use crate::supervisor::Supervisor;

pub use torud_api::health_service_name as service_name;

fn serving(healthy: bool) -> ServingStatus {
    if healthy {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Keeps the reporter in step with the plugins until the event log closes or the
/// supervisor shuts down.
pub async fn bridge(mut reporter: HealthReporter, supervisor: Supervisor) {
    let mut follower = supervisor.events().follow(None);
    for plugin in supervisor.list() {
        reporter
            .set_service_status(service_name(plugin.id()), serving(plugin.healthy))
            .await;
    }
    let stop = supervisor.shutdown_token();
    loop {
        let event = tokio::select! {
            next = follower.next() => match next {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "health bridge lost events");
                    continue;
                }
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let id = &event.body.plugin_id;
        if id.is_empty() {
            continue;
        }
        match event.body.kind {
            EventKind::PluginRemoved => reporter.clear_service_status(&service_name(id)).await,
            EventKind::StateChanged | EventKind::HealthChanged | EventKind::PluginAdded => {
                reporter
                    .set_service_status(service_name(id), serving(event.body.healthy))
                    .await
            }
            // These say nothing about health.
            EventKind::PluginSkipped
            | EventKind::PluginUpdated
            | EventKind::LoggingDegraded
            | EventKind::LoggingResumed
            | EventKind::EventStorageDegraded
            | EventKind::EventStorageResumed
            | EventKind::ConfigReloaded
            | EventKind::DaemonUpgrading
            | EventKind::DaemonUpgraded
            | EventKind::DaemonUpgradeFailed => {}
        }
    }
}
