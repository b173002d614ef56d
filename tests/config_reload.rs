//! Reloading the configuration without a restart, through the real daemon started with
//! `--config FILE`: `ReloadConfig` (what it applies, what it says needs a restart, the
//! restarts it does, an invalid file changing nothing), SIGHUP, `GetConfig` (the
//! configuration in force, flags over the file, secrets redacted) and who may call them.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use tonic::transport::Channel;
use torud_api::pb;
use torud_api::pb::config_service_client::ConfigServiceClient;
use torud_api::pb::PluginState;

/// The secret a plugin's environment gets, which no answer may contain.
const SECRET: &str = "s3cret-value-of-hello";

/// A daemon reading `config.toml` (written with `text`) in its root, with `args` besides.
fn daemon_with_config(text: &str, args: &[&str]) -> (Daemon, PathBuf) {
    let mut d = Daemon::new(args);
    let file = d.root.path().join("config.toml");
    std::fs::write(&file, text).unwrap();
    d.args.push("--config".into());
    d.args.push(file.display().to_string());
    (d, file)
}

/// Two plugins (`hello`, `other`) started from the first scan, each with its own section.
fn two_plugins(hello_extra: &str, other_extra: &str) -> String {
    format!(
        "enable-new-plugins = true\nkv-timeout = \"3s\"\n\n\
         [plugins.hello]\ncall-timeout = \"30s\"\n{hello_extra}\n\n\
         [plugins.other]\ncall-timeout = \"30s\"\n{other_extra}\n"
    )
}

/// Starts `d` with the Rust example as `hello` and the Python fixture as `other`, and waits
/// until both run.
async fn start_both(d: &mut Daemon) -> Client {
    d.install_hello("hello");
    d.install_fixture("other", "v2-echo", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    for id in ["hello", "other"] {
        events
            .wait_state(id, PluginState::Running, Duration::from_secs(20))
            .await;
    }
    client
}

async fn config_client(d: &Daemon) -> ConfigServiceClient<Channel> {
    ConfigServiceClient::new(d.channel().await)
}

/// A config client over TCP sending `token`.
async fn tcp_config_client(
    d: &Daemon,
    token: &str,
) -> ConfigServiceClient<tonic::codegen::InterceptedService<Channel, Bearer>> {
    ConfigServiceClient::with_interceptor(d.tcp_channel().await, Bearer::new(token).unwrap())
}

async fn reload(
    config: &mut ConfigServiceClient<Channel>,
    restart_plugins: bool,
) -> Result<pb::ReloadConfigResponse, tonic::Status> {
    config
        .reload_config(pb::ReloadConfigRequest { restart_plugins })
        .await
        .map(|r| r.into_inner())
}

async fn shown(config: &mut ConfigServiceClient<Channel>) -> pb::GetConfigResponse {
    config
        .get_config(pb::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The ids of a reload's `plugins_needing_restart`, each with its settings.
fn needing(r: &pb::ReloadConfigResponse) -> Vec<(String, Vec<String>)> {
    r.plugins_needing_restart
        .iter()
        .map(|p| (p.plugin_id.clone(), p.settings.clone()))
        .collect()
}

#[tokio::test]
async fn a_valid_change_is_applied_and_names_the_plugins_whose_launch_changed() {
    let (mut d, file) = daemon_with_config(&two_plugins("", ""), &["--kv-timeout", "7s"]);
    let mut client = start_both(&mut d).await;
    let mut config = config_client(&d).await;
    let before = shown(&mut config).await;
    assert_eq!(before.file, file.display().to_string());
    assert!(
        before.toml.contains("kv-timeout = \"7s\""),
        "{}",
        before.toml
    );

    // hello's environment changes (its process keeps the old one), both call timeouts
    // change (applied at once), and the file's kv-timeout changes under a flag.
    let hello_env = format!("env = {{ API_KEY = \"{SECRET}\" }}");
    let changed = two_plugins(&hello_env, "")
        .replace("call-timeout = \"30s\"", "call-timeout = \"9s\"")
        .replace("kv-timeout = \"3s\"", "kv-timeout = \"4s\"");
    std::fs::write(&file, changed).unwrap();
    let mut events = Events::watch(&mut client, None).await;
    let r = reload(&mut config, false).await.unwrap();
    assert_eq!(r.file, file.display().to_string());
    assert_eq!(needing(&r), [("hello".into(), vec!["env".into()])]);
    assert!(r.plugins_restarted.is_empty() && r.daemon_restart_keys.is_empty());
    let event = events
        .wait_for("the reload's event", Duration::from_secs(10), |e| {
            e.kind == pb::EventKind::ConfigReloaded as i32
        })
        .await;
    assert_eq!(event.details["plugins_needing_restart"], "hello");
    assert_eq!(event.details["file"], file.display().to_string());

    let after = shown(&mut config).await.toml;
    assert!(after.contains("call-timeout = \"9s\""), "{after}");
    assert!(
        after.contains("kv-timeout = \"7s\""),
        "the flag still wins: {after}"
    );
    assert!(after.contains("API_KEY = \"(redacted)\""), "{after}");
    assert!(!after.contains(SECRET), "a secret was shown: {after}");

    // A second reload changing only a timeout still names hello: its process was started
    // before the first.
    std::fs::write(
        &file,
        two_plugins(&hello_env, "").replace("call-timeout = \"30s\"", "call-timeout = \"8s\""),
    )
    .unwrap();
    let r = reload(&mut config, false).await.unwrap();
    assert_eq!(needing(&r), [("hello".into(), vec!["env".into()])]);
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test]
async fn restart_plugins_restarts_those_whose_launch_changed() {
    let (mut d, file) = daemon_with_config(&two_plugins("", ""), &[]);
    let mut client = start_both(&mut d).await;
    let (hello_pid, other_pid) = (
        get(&mut client, "hello").await.pid,
        get(&mut client, "other").await.pid,
    );
    let mut config = config_client(&d).await;

    std::fs::write(
        &file,
        two_plugins("args = [\"--reloaded\"]\nmax-open-files = 200", ""),
    )
    .unwrap();
    let r = reload(&mut config, true).await.unwrap();
    assert_eq!(
        needing(&r),
        [("hello".into(), vec!["args".into(), "max-open-files".into()])]
    );
    let restarted: Vec<(&str, &str)> = r
        .plugins_restarted
        .iter()
        .map(|p| (p.plugin_id.as_str(), p.error.as_str()))
        .collect();
    assert_eq!(restarted, [("hello", "")]);
    let hello = get(&mut client, "hello").await;
    assert_eq!(state_of(&hello), PluginState::Running);
    assert!(hello.pid != hello_pid && process_gone(hello_pid));
    assert_eq!(get(&mut client, "other").await.pid, other_pid);

    // Its new process has the new settings: nothing is left to restart.
    let r = reload(&mut config, false).await.unwrap();
    assert!(r.plugins_needing_restart.is_empty(), "{r:?}");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_says_where() {
    let (mut d, file) = daemon_with_config(&two_plugins("", ""), &[]);
    d.start().await;
    let mut config = config_client(&d).await;
    let before = shown(&mut config).await;

    std::fs::write(
        &file,
        "enable-new-plugins = true\n\n[plugins.hello]\ncall-timeout = \"soon\"\n",
    )
    .unwrap();
    let status = reload(&mut config, true).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let want = format!("{}:4:16: plugins.hello.call-timeout: ", file.display());
    assert!(status.message().starts_with(&want), "{}", status.message());
    assert_eq!(shown(&mut config).await, before, "nothing changed");

    // Settings that do not fit together are refused whole too.
    std::fs::write(&file, "call-timeout = \"1s\"\ntls-cert = \"/c.pem\"\n").unwrap();
    let status = reload(&mut config, false).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("tls-cert"),
        "{}",
        status.message()
    );
    assert_eq!(shown(&mut config).await, before, "nothing changed");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test]
async fn settings_read_at_start_up_keep_their_values_and_are_named() {
    let (mut d, file) = daemon_with_config("max-concurrent-streams = 100\n", &[]);
    d.start().await;
    let mut config = config_client(&d).await;
    let data_dir = d.data_dir.display().to_string();

    std::fs::write(
        &file,
        "max-concurrent-streams = 50\nstorage-max-keys = 10\nhealth-interval = \"3s\"\n",
    )
    .unwrap();
    let r = reload(&mut config, false).await.unwrap();
    assert_eq!(
        r.daemon_restart_keys,
        ["max-concurrent-streams", "storage-max-keys"]
    );
    let after = shown(&mut config).await.toml;
    assert!(after.contains("max-concurrent-streams = 100"), "{after}");
    assert!(after.contains("storage-max-keys = 100000"), "{after}");
    assert!(after.contains("health-interval = \"3s\""), "{after}");
    assert!(after.contains(&data_dir), "{after}");
    // Still pending at the next reload.
    let r = reload(&mut config, false).await.unwrap();
    assert_eq!(r.daemon_restart_keys.len(), 2, "{r:?}");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_the_file() {
    let (mut d, file) = daemon_with_config("call-timeout = \"30s\"\n", &[]);
    d.start().await;
    let mut config = config_client(&d).await;

    std::fs::write(&file, "call-timeout = \"12s\"\n").unwrap();
    signal(d.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !shown(&mut config)
        .await
        .toml
        .contains("call-timeout = \"12s\"")
    {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An invalid file is logged and changes nothing; the daemon keeps serving.
    std::fs::write(&file, "call-timeout = 12\n").unwrap();
    signal(d.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.daemon_stderr().contains("configuration not reloaded") {
        assert!(Instant::now() < deadline, "no log of the refused reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(shown(&mut config)
        .await
        .toml
        .contains("call-timeout = \"12s\""));
    assert!(
        d.daemon_stderr().contains("call-timeout"),
        "the log names the key"
    );
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test]
async fn a_read_token_may_see_the_configuration_but_not_reload_it() {
    let text = format!("[plugins.hello]\nenv = {{ API_KEY = \"{SECRET}\" }}\n");
    let (mut d, _file) = daemon_with_config(&text, &[]);
    d.start().await;
    let mut read = tcp_config_client(&d, &d.token("read")).await;
    let shown = read
        .get_config(pb::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!shown.toml.contains(SECRET), "{}", shown.toml);
    let admin_token = d.token("admin");
    assert!(!shown.toml.contains(&admin_token) && !shown.toml.contains(&d.token("read")));
    let denied = read
        .reload_config(pb::ReloadConfigRequest {
            restart_plugins: false,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let mut admin = tcp_config_client(&d, &admin_token).await;
    admin
        .reload_config(pb::ReloadConfigRequest {
            restart_plugins: false,
        })
        .await
        .unwrap();
    assert_eq!(d.stop().await.code(), Some(0));
}
