//! `toru.v1.ConfigService`: the configuration in force (`GetConfig`, as TOML with secrets
//! redacted) and reloading it from its file (`ReloadConfig`). [`Reloader`] is the one way a
//! reload happens, for the RPC and for SIGHUP (`server.rs`): read and check the whole file,
//! then hand it to [`Supervisor::reload`], which applies it in one swap; an invalid file
//! changes nothing.

use std::path::PathBuf;

use tonic::{Request, Response, Status};

use crate::config::{ConfigError, Settings, Source};
use crate::supervisor::{ReloadOutcome, RestartFailure, Supervisor, SupervisorError};
use torud_api::pb;
use torud_api::pb::config_service_server::ConfigService;

/// What a reload does about plugins whose process keeps settings it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleProcesses {
    /// Restart them and report how each went.
    Restart,
    /// Only name them.
    Report,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read, or is invalid (its message names file, line and key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The daemon cannot take it now (it is shutting down).
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// A bug: reading the file panicked.
    #[error("internal error: config reader: {0}")]
    Reader(tokio::task::JoinError),
}

/// A reload done: the file read, what needs a restart, and the restarts done.
#[derive(Debug)]
pub struct Reloaded {
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// What needs a restart to take effect.
    pub outcome: ReloadOutcome,
    /// With [`StaleProcesses::Restart`], each plugin restarted and how it went.
    pub restarted: Vec<(String, Result<(), RestartFailure>)>,
}

/// Reloads the configuration from the layers the daemon started with.
pub struct Reloader {
    source: Source,
    supervisor: Supervisor,
}

impl Reloader {
    /// Reloads from `source`'s layers into `supervisor`.
    pub fn new(source: Source, supervisor: Supervisor) -> Self {
        Reloader { source, supervisor }
    }

    /// The config file read, if any.
    pub fn file(&self) -> Option<PathBuf> {
        self.source.loader.file().map(PathBuf::from)
    }

    /// Reads the file anew, checks it whole, and puts it in force; then, if asked,
    /// restarts the plugins whose process keeps changed settings. Logs the outcome, or the
    /// error with nothing changed.
    pub async fn reload(&self, stale: StaleProcesses) -> Result<Reloaded, ReloadError> {
        super::systemd::reloading();
        let result = self.apply(stale).await;
        match &result {
            Ok(done) => {
                log_reloaded(done);
                super::systemd::reloaded(&format!(
                    "configuration reloaded; {} plugins need a restart",
                    done.outcome.plugins.len()
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "configuration not reloaded; nothing changed");
                super::systemd::reloaded(
                    "configuration not reloaded (see the log); nothing changed",
                );
            }
        }
        result
    }

    async fn apply(&self, stale: StaleProcesses) -> Result<Reloaded, ReloadError> {
        let loader = self.source.loader.clone();
        let loaded = tokio::task::spawn_blocking(move || loader.load())
            .await
            .map_err(ReloadError::Reader)??;
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        let outcome = self
            .supervisor
            .reload(loaded.config, loaded.file.as_deref())?;
        let restarted = match stale {
            StaleProcesses::Restart => self.supervisor.restart_stale(&outcome.plugins).await,
            StaleProcesses::Report => Vec::new(),
        };
        Ok(Reloaded {
            file: loaded.file,
            outcome,
            restarted,
        })
    }
}

fn log_reloaded(done: &Reloaded) {
    let needing: Vec<String> = done
        .outcome
        .plugins
        .iter()
        .map(|p| format!("{} ({})", p.id, p.settings.join(", ")))
        .collect();
    tracing::info!(
        file = ?done.file,
        plugins_needing_restart = ?needing,
        daemon_restart_keys = ?done.outcome.daemon_restart,
        "configuration reloaded"
    );
    for (id, result) in &done.restarted {
        match result {
            Ok(()) => tracing::info!(plugin = %id, "restarted with the reloaded configuration"),
            Err(e) => tracing::warn!(plugin = %id, error = %e, "restart after reload failed"),
        }
    }
}

/// The `ConfigService` implementation.
pub struct ConfigApi {
    reloader: std::sync::Arc<Reloader>,
    upgrades: crate::api::upgrade::Upgrades,
}

impl ConfigApi {
    /// A service reloading through `reloader` and upgrading through `upgrades`.
    pub fn new(
        reloader: std::sync::Arc<Reloader>,
        upgrades: crate::api::upgrade::Upgrades,
    ) -> Self {
        ConfigApi { reloader, upgrades }
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    async fn get_config(
        &self,
        _request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        let settings = Settings::effective(&self.reloader.supervisor.config());
        let toml = toml::to_string(&settings).map_err(|e| {
            Status::internal(format!("cannot write the configuration as TOML: {e}"))
        })?;
        Ok(Response::new(pb::GetConfigResponse {
            toml,
            file: path_text(self.reloader.file()),
        }))
    }

    async fn reload_config(
        &self,
        request: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigResponse>, Status> {
        let stale = if request.into_inner().restart_plugins {
            StaleProcesses::Restart
        } else {
            StaleProcesses::Report
        };
        let done = self.reloader.reload(stale).await?;
        Ok(Response::new(reloaded(done)))
    }

    async fn upgrade_daemon(
        &self,
        request: Request<pb::UpgradeDaemonRequest>,
    ) -> Result<Response<pb::UpgradeDaemonResponse>, Status> {
        // Over TCP (a remote admin), only the file at the daemon's own path: naming any other
        // executable to run as the daemon's user takes a local caller on the control socket.
        let remote = request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .is_some();
        let binary = request.into_inner().binary;
        if remote && !binary.is_empty() {
            return Err(Status::permission_denied(
                "naming the binary needs the control socket (a local caller); over TCP the daemon upgrades only to the file at the path it was started from: leave `binary` empty",
            ));
        }
        let binary = (!binary.is_empty()).then(|| PathBuf::from(binary));
        let began = self.upgrades.request(binary).await?;
        Ok(Response::new(pb::UpgradeDaemonResponse {
            from_version: began.from_version,
            to_version: began.to_version,
            binary: path_text(Some(began.binary)),
            upgrading_seq: began.upgrading_seq,
        }))
    }
}

/// The response for a reload done.
fn reloaded(done: Reloaded) -> pb::ReloadConfigResponse {
    pb::ReloadConfigResponse {
        file: path_text(done.file),
        plugins_needing_restart: done
            .outcome
            .plugins
            .into_iter()
            .map(|p| pb::PluginNeedingRestart {
                plugin_id: p.id,
                settings: p.settings.into_iter().map(str::to_owned).collect(),
            })
            .collect(),
        plugins_restarted: done
            .restarted
            .into_iter()
            .map(|(plugin_id, result)| pb::PluginRestart {
                plugin_id,
                error: result.err().map(|e| e.to_string()).unwrap_or_default(),
            })
            .collect(),
        daemon_restart_keys: done.outcome.daemon_restart,
    }
}

fn path_text(path: Option<PathBuf>) -> String {
    path.map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}
