//! Putting a configuration read anew in force ([`Supervisor::reload`]), and restarting the
//! plugins whose processes keep settings it changed ([`Supervisor::restart_stale`]).
//!
//! A reload is one swap of the configuration in force: every part that reads it at the
//! moment of use (timeouts, backoff, restart policy, rescans) follows from its next use.
//! What cannot follow is reported, not applied: daemon-wide settings read once at start-up
//! keep their running values ([`crate::config::reload`] says which and why), and a plugin's
//! process keeps what it was started with ([`ProcessSettings`], recorded by the actor at
//! each spawn) until it is restarted. Reading and checking the file is the caller's job:
//! nothing here can fail half-way.

use std::path::Path;
use std::sync::Arc;

use crate::config::reload::{daemon_restart_keys, keep_daemon_settings};
use crate::config::{Config, ProcessSettings};
use crate::model::{EventDraft, EventKind, PluginState};

use super::{Supervisor, SupervisorError};

/// What a reload changed that needs a restart to take effect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Plugins with a process (starting or running) that keeps settings the reload changed.
    pub plugins: Vec<StaleProcess>,
    /// Keys of the daemon-wide settings that changed but keep their running values until
    /// the daemon restarts.
    pub daemon_restart: Vec<String>,
}

/// A plugin whose process was started with other settings than those now in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleProcess {
    /// The plugin.
    pub id: String,
    /// The keys of the settings that differ (`args`, `env`, `max-open-files`, …).
    pub settings: Vec<&'static str>,
}

/// Why a plugin restarted after a reload does not run with the configuration in force.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RestartFailure {
    /// The restart failed.
    #[error(transparent)]
    Failed(#[from] SupervisorError),
    /// It was still starting with the previous configuration, and a restart during a start
    /// waits for that start: it runs, but with the previous settings.
    #[error(
        "it was starting when asked and became ready with the previous settings; restart it \
         again"
    )]
    StartedWithPrevious,
}

impl Supervisor {
    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.inner.ctx.config()
    }

    /// Puts `given` (a configuration as loaded: directories as written) in force, in one
    /// swap, but for the settings only a daemon restart applies, which keep their running
    /// values and are named. Says which plugins' processes keep settings it changed, and
    /// appends a `ConfigReloaded` event naming `file` and both lists. Reloads apply one
    /// after another.
    pub fn reload(
        &self,
        given: Config,
        file: Option<&Path>,
    ) -> Result<ReloadOutcome, SupervisorError> {
        if self.inner.cancel.is_cancelled() {
            return Err(SupervisorError::ShuttingDown);
        }
        let ctx = &self.inner.ctx;
        let mut last_given = self
            .inner
            .given
            .lock()
            .expect("given configuration poisoned");
        let daemon_restart = daemon_restart_keys(&last_given, &given);
        let in_force = keep_daemon_settings(given.clone(), &ctx.config());
        // The next reload compares with what runs, so a pending daemon restart is named
        // again.
        *last_given = keep_daemon_settings(given, &last_given);
        ctx.config.store(Arc::new(in_force));
        let outcome = ReloadOutcome {
            plugins: self.stale_processes(),
            daemon_restart,
        };
        self.append_event(reloaded_event(&outcome, file));
        Ok(outcome)
    }

    /// Plugins with a process (starting or running) whose recorded start settings differ
    /// from the configuration in force, ordered by id.
    pub fn stale_processes(&self) -> Vec<StaleProcess> {
        let config = self.inner.ctx.config();
        // The state first: a process spawned since has its settings recorded already.
        let with_process: Vec<String> = self
            .list()
            .into_iter()
            .filter(|s| matches!(s.state, PluginState::Starting | PluginState::Running))
            .map(|s| s.id().to_owned())
            .collect();
        with_process
            .into_iter()
            .filter_map(|id| {
                let started = self.inner.ctx.started_with(&id)?;
                let settings = started.differences(&ProcessSettings::of(&config, &id));
                (!settings.is_empty()).then_some(StaleProcess { id, settings })
            })
            .collect()
    }

    /// Restarts `plugins` (all at once, each like `RestartPlugin`), each answered once it
    /// is ready again with the configuration in force, or with why not.
    pub async fn restart_stale(
        &self,
        plugins: &[StaleProcess],
    ) -> Vec<(String, Result<(), RestartFailure>)> {
        let restarts = plugins.iter().map(|p| async move {
            let result = match self.restart(&p.id).await {
                Ok(_) if self.runs_previous_settings(&p.id) => {
                    Err(RestartFailure::StartedWithPrevious)
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e.into()),
            };
            (p.id.clone(), result)
        });
        futures::future::join_all(restarts).await
    }

    /// Whether plugin `id`'s process was started with other settings than those in force.
    fn runs_previous_settings(&self, id: &str) -> bool {
        let now = ProcessSettings::of(&self.inner.ctx.config(), id);
        self.inner
            .ctx
            .started_with(id)
            .is_some_and(|started| *started != now)
    }
}

/// The `ConfigReloaded` event: the file, and what needs a restart.
fn reloaded_event(outcome: &ReloadOutcome, file: Option<&Path>) -> EventDraft {
    let from = file.map_or_else(
        || "flags and environment (no config file)".to_owned(),
        |f| f.display().to_string(),
    );
    let ids: Vec<&str> = outcome.plugins.iter().map(|p| p.id.as_str()).collect();
    let mut reason = format!("configuration reloaded from {from}");
    if !ids.is_empty() {
        reason += &format!(
            "; restart to apply it to the running plugins {}",
            ids.join(", ")
        );
    }
    if !outcome.daemon_restart.is_empty() {
        reason += &format!(
            "; {} keep their running values until the daemon restarts",
            outcome.daemon_restart.join(", ")
        );
    }
    let mut draft = EventDraft::new("", EventKind::ConfigReloaded)
        .reason(reason)
        .detail("plugins_needing_restart", ids.join(","))
        .detail("daemon_restart_keys", outcome.daemon_restart.join(","));
    if let Some(file) = file {
        draft = draft.detail("file", file.display());
    }
    draft
}
