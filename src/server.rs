//! Wires the daemon together: binds the listener, starts the supervisor, serves the gRPC
//! services (plugins, health, reflection) and shuts everything down in order when the
//! `shutdown` future resolves: open streams end, plugins stop (in parallel, by escalation),
//! the server drains.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::api::kv::KvApi;
use crate::api::logs::LogApi;
use crate::api::{health, PluginApi};
use crate::config::Config;
use crate::pb;
use crate::supervisor::{StartupError, Supervisor};

/// How long connections get to close after plugins have stopped. The server has been
/// draining since shutdown began (streams ended at once, unary calls finished with their
/// plugins), so what is left is mostly idle client connections that ignore GOAWAY.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors that stop the daemon from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The supervisor could not start.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// Reflection could not be built.
    #[error("cannot build server reflection: {0}")]
    Reflection(String),
    /// SIGTERM/SIGINT handlers could not be installed.
    #[error("cannot install the SIGTERM and SIGINT handlers")]
    Signals,
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(String),
}

/// Binds `config.listen`, then serves until `shutdown` resolves. `on_listening` is told the
/// bound address once the listener is ready.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let addr = config.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let supervisor = Supervisor::start(config)?;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let bridge = tokio::spawn(health::bridge(reporter.clone(), supervisor.clone()));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let stop = CancellationToken::new();
    let api = PluginApi::new(supervisor.clone(), stop.clone());
    let kv = KvApi::new(supervisor.clone());
    let logs = LogApi::new(supervisor.clone(), stop.clone());
    let server = tonic::transport::Server::builder()
        .add_service(pb::plugin_service_server::PluginServiceServer::new(api))
        .add_service(pb::kv_service_server::KvServiceServer::new(kv))
        .add_service(pb::log_service_server::LogServiceServer::new(logs))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small responses wait for delayed ACKs (~40 ms).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    tracing::info!(%local, "listening");
    on_listening(local);

    shutdown.await;
    tracing::info!("shutting down: stopping plugins");
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    stop.cancel();
    supervisor.shutdown().await;
    bridge.abort();
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(ServeError::Transport(e.to_string())),
        Ok(Err(e)) => return Err(ServeError::Transport(e.to_string())),
        Err(_) => tracing::info!("closing client connections still open after shutdown"),
    }
    tracing::info!("stopped");
    Ok(())
}
