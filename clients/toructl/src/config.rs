//! `toructl config`: the daemon's configuration in force (`show`) and reloading it from its
//! file (`reload`), through `ConfigService`.

use std::process::ExitCode;

use serde_json::json;
use torud_api::pb;
use torud_api::pb::config_service_client::ConfigServiceClient;

use crate::commands::{emit, print_json, status_line};
use crate::connect::Conn;
use crate::render;
use crate::Output;

type Result = std::result::Result<ExitCode, String>;

fn client(conn: &Conn) -> ConfigServiceClient<tonic::transport::Channel> {
    ConfigServiceClient::new(conn.channel.clone())
}

/// `config show`: the TOML as the daemon wrote it (control characters escaped).
pub async fn show(conn: &Conn, out: Output) -> Result {
    let r = client(conn)
        .get_config(conn.unary(pb::GetConfigRequest {}))
        .await
        .map_err(status_line)?
        .into_inner();
    match out {
        Output::Json => print_json(&json!({ "file": r.file, "toml": r.toml }), true),
        Output::Table => {
            let file = if r.file.is_empty() {
                "none".to_owned()
            } else {
                r.file
            };
            let text = format!("# config file: {file}\n{}", r.toml);
            emit(render::escape_text(&text).as_bytes());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `config reload [--restart]`: what needs a restart, and each restart's result; exits 1
/// when a restart failed.
pub async fn reload(conn: &Conn, out: Output, restart_plugins: bool) -> Result {
    let r = client(conn)
        .reload_config(conn.unary(pb::ReloadConfigRequest { restart_plugins }))
        .await
        .map_err(status_line)?
        .into_inner();
    let failed = r.plugins_restarted.iter().any(|p| !p.error.is_empty());
    match out {
        Output::Json => print_json(&reloaded_json(&r), true),
        Output::Table => emit(reloaded_text(&r).as_bytes()),
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn reloaded_json(r: &pb::ReloadConfigResponse) -> serde_json::Value {
    json!({
        "file": r.file,
        "plugins_needing_restart": r.plugins_needing_restart.iter()
            .map(|p| json!({ "plugin_id": p.plugin_id, "settings": p.settings }))
            .collect::<Vec<_>>(),
        "plugins_restarted": r.plugins_restarted.iter()
            .map(|p| json!({ "plugin_id": p.plugin_id, "error": p.error }))
            .collect::<Vec<_>>(),
        "daemon_restart_keys": r.daemon_restart_keys,
    })
}

/// One line per list: the file, the plugins needing a restart (with the settings their
/// process keeps), the restarts done, and the settings needing a daemon restart.
fn reloaded_text(r: &pb::ReloadConfigResponse) -> String {
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    let file = if r.file.is_empty() {
        "(no config file)"
    } else {
        &r.file
    };
    let needing = r
        .plugins_needing_restart
        .iter()
        .map(|p| format!("{} ({})", p.plugin_id, p.settings.join(", ")))
        .collect();
    let mut text = format!(
        "reloaded: {}\nplugins needing a restart: {}\n",
        render::escape(file),
        render::escape(&list(needing))
    );
    if !r.plugins_restarted.is_empty() {
        let restarted = r
            .plugins_restarted
            .iter()
            .map(|p| match p.error.as_str() {
                "" => p.plugin_id.clone(),
                error => format!("{} (failed: {error})", p.plugin_id),
            })
            .collect();
        text += &format!("plugins restarted: {}\n", render::escape(&list(restarted)));
    }
    text += &format!(
        "settings needing a daemon restart: {}\n",
        render::escape(&list(r.daemon_restart_keys.clone()))
    );
    text
}
