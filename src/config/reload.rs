//! What a configuration reload can change, and what it cannot: the settings read once at
//! start-up ([`daemon_restart_keys`], kept by [`keep_daemon_settings`]), and what a plugin's
//! process is started with and keeps until it ends ([`ProcessSettings`]).
//!
//! Everything else is read at the moment of use (a call's timeout, a backoff, a rescan's
//! probe limits) and takes effect from its next use once the new configuration is in
//! force. This module only compares configurations; applying one is the supervisor's job.

use std::time::Duration;

use super::{Config, Launch, PluginLimits, PluginSettings};
use crate::plugin::isolation::users::UserChoice;

/// A setting the daemon reads once, at start-up, compared between two configurations.
type Differs = fn(&Config, &Config) -> bool;

/// The daemon-wide settings a reload cannot apply, by key (the flag's long name), each with
/// why:
/// - `listen`, `metrics-listen`, `tls-*`, `insecure-plaintext-non-loopback`: the listeners
///   are bound, and their TLS acceptor built, once;
/// - `otlp-*`: the exporter's connection is made once, at start-up;
/// - `cors-origin`: the CORS layer is built with the TCP server;
/// - `plugins-dir`: every known plugin, and each start's id check and sandbox, is tied to
///   it; changing it live would forget every plugin;
/// - `data-dir`: the event log, the state, the storage, the sockets and the token files are
///   there, open;
/// - `admin-token-file`, `read-token-file`: the tokens are loaded into the listener's check
///   once;
/// - `max-message-bytes`, `max-concurrent-streams`: set on the gRPC servers when built;
/// - `plugin-uid-range`: plugins' users are allocated in it when isolation is prepared;
/// - `storage-max-keys`, `storage-max-bytes`: the storage is opened with its quotas;
/// - `log-segment-bytes`, `log-segments` (and a plugin's own): each plugin's log is opened
///   with its retention when the plugin is first seen;
/// - `log`: the daemon's log filter is installed once, in the process-wide subscriber.
const DAEMON_SETTINGS: &[(&str, Differs)] = &[
    ("listen", |a, b| a.listen != b.listen),
    ("metrics-listen", |a, b| {
        a.metrics_listen != b.metrics_listen
    }),
    ("cors-origin", |a, b| a.cors_origins != b.cors_origins),
    ("otlp-endpoint", |a, b| {
        a.otlp.as_ref().map(|o| &o.endpoint) != b.otlp.as_ref().map(|o| &o.endpoint)
    }),
    ("otlp-header", |a, b| {
        a.otlp.as_ref().map(|o| &o.headers) != b.otlp.as_ref().map(|o| &o.headers)
    }),
    ("otlp-metrics-interval", |a, b| {
        a.otlp_metrics_interval != b.otlp_metrics_interval
    }),
    ("otlp-ca", |a, b| {
        a.otlp.as_ref().map(|o| &o.ca) != b.otlp.as_ref().map(|o| &o.ca)
    }),
    ("plugins-dir", |a, b| a.plugins_dir != b.plugins_dir),
    ("data-dir", |a, b| a.data_dir != b.data_dir),
    ("admin-token-file", |a, b| {
        a.security.admin_token != b.security.admin_token
    }),
    ("read-token-file", |a, b| {
        a.security.read_token != b.security.read_token
    }),
    ("tls-cert", |a, b| {
        a.security.tls.as_ref().map(|t| &t.cert) != b.security.tls.as_ref().map(|t| &t.cert)
    }),
    ("tls-key", |a, b| {
        a.security.tls.as_ref().map(|t| &t.key) != b.security.tls.as_ref().map(|t| &t.key)
    }),
    ("tls-client-ca", |a, b| {
        a.security.tls.as_ref().map(|t| &t.client_ca)
            != b.security.tls.as_ref().map(|t| &t.client_ca)
    }),
    ("insecure-plaintext-non-loopback", |a, b| {
        a.security.insecure_plaintext_non_loopback != b.security.insecure_plaintext_non_loopback
    }),
    ("max-message-bytes", |a, b| {
        a.grpc.max_message_bytes != b.grpc.max_message_bytes
    }),
    ("max-concurrent-streams", |a, b| {
        a.grpc.max_concurrent_streams != b.grpc.max_concurrent_streams
    }),
    ("plugin-uid-range", |a, b| {
        a.plugin_uid_range != b.plugin_uid_range
    }),
    ("storage-max-keys", |a, b| {
        a.storage_quotas.max_keys != b.storage_quotas.max_keys
    }),
    ("storage-max-bytes", |a, b| {
        a.storage_quotas.max_bytes != b.storage_quotas.max_bytes
    }),
    ("log-segment-bytes", |a, b| {
        a.log_segment_bytes != b.log_segment_bytes
    }),
    ("log-segments", |a, b| a.log_segments != b.log_segments),
    ("log", |a, b| a.log_filter != b.log_filter),
];

/// The keys of the settings that differ between `running` and `new` and need a daemon
/// restart to take effect (listed, with why, on `DAEMON_SETTINGS`); a plugin's own log
/// retention is named `plugins.<id>.log-segments`. Compare configurations as given
/// (directories as written): the running one's directories were made absolute after it was
/// loaded.
pub fn daemon_restart_keys(running: &Config, new: &Config) -> Vec<String> {
    let mut keys: Vec<String> = DAEMON_SETTINGS
        .iter()
        .filter(|(_, differs)| differs(running, new))
        .map(|(key, _)| (*key).to_owned())
        .collect();
    let ids: std::collections::BTreeSet<&String> =
        running.plugins.keys().chain(new.plugins.keys()).collect();
    for id in ids {
        let (was, now) = (own_retention(running, id), own_retention(new, id));
        if was.0 != now.0 {
            keys.push(format!("plugins.{id}.log-segment-bytes"));
        }
        if was.1 != now.1 {
            keys.push(format!("plugins.{id}.log-segments"));
        }
    }
    keys
}

/// `new` with every setting of [`daemon_restart_keys`] taken from `from` instead: what a
/// reload puts in force (with `from` the running configuration), or the configuration it
/// compares the next reload with (with `from` the one given at start-up).
pub fn keep_daemon_settings(mut new: Config, from: &Config) -> Config {
    new.listen = from.listen;
    new.metrics_listen = from.metrics_listen;
    new.otlp = from.otlp.clone();
    new.otlp_metrics_interval = from.otlp_metrics_interval;
    new.cors_origins = from.cors_origins.clone();
    new.plugins_dir = from.plugins_dir.clone();
    new.data_dir = from.data_dir.clone();
    new.security = from.security.clone();
    new.grpc = from.grpc.clone();
    new.plugin_uid_range = from.plugin_uid_range;
    new.storage_quotas = from.storage_quotas;
    new.log_segment_bytes = from.log_segment_bytes;
    new.log_segments = from.log_segments;
    new.log_filter = from.log_filter.clone();
    for (id, section) in &mut new.plugins {
        (section.log_segment_bytes, section.log_segments) = own_retention(from, id);
    }
    for (id, section) in &from.plugins {
        let kept = own_retention(from, id);
        if !new.plugins.contains_key(id) && kept != (None, None) {
            let only_retention = PluginSettings {
                log_segment_bytes: section.log_segment_bytes,
                log_segments: section.log_segments,
                ..PluginSettings::default()
            };
            new.plugins.insert(id.clone(), only_retention);
        }
    }
    new
}

/// A plugin's own log retention (`[plugins.<id>]`'s `log-segment-bytes`, `log-segments`).
type OwnRetention = (
    Option<super::values::AtLeast<4096>>,
    Option<super::values::AtLeast<1>>,
);

fn own_retention(config: &Config, id: &str) -> OwnRetention {
    config
        .plugins
        .get(id)
        .map_or((None, None), |s| (s.log_segment_bytes, s.log_segments))
}

/// What a plugin's process is started with and keeps until it ends: a change to any of
/// these reaches the plugin only through a restart. The supervisor records it for each
/// process it spawns, so a reload compares with what the process really has, however many
/// reloads ago it started.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSettings {
    /// Its arguments, own environment and working directory.
    pub launch: Launch,
    /// Its rlimits.
    pub limits: PluginLimits,
    /// The SHA-256 its binary was checked against, if pinned.
    pub pin: Option<String>,
    /// The user it was chosen to run as, if not its own dynamic one.
    pub user: Option<UserChoice>,
    /// The daemon's environment variables it was given.
    pub env_allowlist: Vec<String>,
    /// The longest line of its output kept as one record (its output capture's).
    pub max_log_line: usize,
    /// The largest frame on its link.
    pub max_frame: usize,
    /// The requests in flight on its link.
    pub max_in_flight: usize,
    /// How long a run must stay up to reset its failure count (set when it becomes ready).
    pub stable_window: Duration,
    /// How often its health is checked (set when it becomes ready).
    pub health_interval: Duration,
}

impl ProcessSettings {
    /// What a process of plugin `id` started now, under `config`, would get.
    pub fn of(config: &Config, id: &str) -> Self {
        let own = config.plugin(id);
        ProcessSettings {
            launch: own.launch,
            limits: own.limits,
            pin: config.pins.get(id).cloned(),
            user: config.plugin_users.get(id).cloned(),
            env_allowlist: config.plugin_env_allowlist.clone(),
            max_log_line: config.max_log_line,
            max_frame: config.bridge.max_frame,
            max_in_flight: config.bridge.max_in_flight,
            stable_window: own.timing.stable_window,
            health_interval: own.timing.health_interval,
        }
    }

    /// The keys of the settings that differ between `self` and `other`, as a plugin's
    /// section or the flags name them.
    pub fn differences(&self, other: &ProcessSettings) -> Vec<&'static str> {
        let (a, b) = (self, other);
        [
            ("args", a.launch.args != b.launch.args),
            ("env", a.launch.env != b.launch.env),
            ("working-dir", a.launch.working_dir != b.launch.working_dir),
            (
                "max-address-space",
                a.limits.address_space != b.limits.address_space,
            ),
            ("max-open-files", a.limits.open_files != b.limits.open_files),
            ("max-processes", a.limits.processes != b.limits.processes),
            ("pin", a.pin != b.pin),
            ("user", a.user != b.user),
            ("plugin-env", a.env_allowlist != b.env_allowlist),
            ("max-log-line-bytes", a.max_log_line != b.max_log_line),
            ("max-frame-bytes", a.max_frame != b.max_frame),
            ("max-in-flight", a.max_in_flight != b.max_in_flight),
            ("stable-window", a.stable_window != b.stable_window),
            ("health-interval", a.health_interval != b.health_interval),
        ]
        .into_iter()
        .filter_map(|(key, differs)| differs.then_some(key))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::parse;
    use std::path::Path;

    fn config(text: &str) -> Config {
        parse(Path::new("t.toml"), text)
            .unwrap()
            .apply(|_| None)
            .unwrap()
    }

    /// Each daemon-wide setting, changed alone in the file: named, and kept at its running
    /// value by [`keep_daemon_settings`].
    #[test]
    fn each_daemon_setting_is_named_and_kept() {
        let running = config("");
        let changes = [
            ("listen", "listen = \"127.0.0.1:7000\""),
            ("metrics-listen", "metrics-listen = \"9464\""),
            ("otlp-endpoint", "otlp-endpoint = \"http://127.0.0.1:4317\""),
            ("otlp-metrics-interval", "otlp-metrics-interval = \"1m\""),
            (
                "cors-origin",
                "cors-origin = [\"https://console.example.com\"]",
            ),
            ("plugins-dir", "plugins-dir = \"/elsewhere\""),
            ("data-dir", "data-dir = \"/elsewhere\""),
            ("admin-token-file", "admin-token-file = \"/t/admin\""),
            ("read-token-file", "read-token-file = \"/t/read\""),
            ("tls-cert", "tls-cert = \"/c\"\ntls-key = \"/k\""),
            (
                "insecure-plaintext-non-loopback",
                "insecure-plaintext-non-loopback = true",
            ),
            ("max-message-bytes", "max-message-bytes = 2048"),
            ("max-concurrent-streams", "max-concurrent-streams = 8"),
            ("plugin-uid-range", "plugin-uid-range = \"600000-600100\""),
            ("storage-max-keys", "storage-max-keys = 5"),
            ("storage-max-bytes", "storage-max-bytes = 5"),
            ("log-segment-bytes", "log-segment-bytes = 8192"),
            ("log-segments", "log-segments = 2"),
            ("log", "log = \"debug\""),
            (
                "plugins.hello.log-segments",
                "[plugins.hello]\nlog-segments = 2",
            ),
        ];
        let mut named = std::collections::BTreeSet::new();
        for (key, text) in changes {
            let new = config(text);
            let keys = daemon_restart_keys(&running, &new);
            assert!(keys.contains(&key.to_owned()), "{key}: {keys:?}");
            named.extend(keys);
            let kept = keep_daemon_settings(new, &running);
            assert_eq!(
                daemon_restart_keys(&running, &kept),
                Vec::<String>::new(),
                "{key}"
            );
        }
        // Every entry of the table is exercised (tls-key and tls-client-ca come with tls-cert).
        for (key, _) in DAEMON_SETTINGS {
            assert!(named.contains(*key), "{key} is never changed here");
        }
    }

    #[test]
    fn a_plugins_own_retention_is_kept_when_its_section_goes() {
        let running = config("[plugins.hello]\nlog-segments = 2\nargs = [\"-v\"]");
        let new = config("");
        assert_eq!(
            daemon_restart_keys(&running, &new),
            ["plugins.hello.log-segments"]
        );
        let kept = keep_daemon_settings(new, &running);
        assert_eq!(kept.plugin("hello").log_segments, 2);
        assert!(kept.plugin("hello").launch.args.is_empty(), "args applied");
    }

    #[test]
    fn settings_read_at_each_use_are_not_daemon_restarts() {
        let running = config("");
        let new = config(
            "call-timeout = \"3s\"\nrestart = \"never\"\nplugin-max-open-files = 10\n\
             [plugins.hello]\nargs = [\"-v\"]\nenv = { K = \"v\" }\n",
        );
        assert!(daemon_restart_keys(&running, &new).is_empty());
        let kept = keep_daemon_settings(new.clone(), &running);
        assert_eq!(kept, new, "everything else is taken as is");
    }

    #[test]
    fn process_settings_name_what_differs() {
        let before = ProcessSettings::of(&config(""), "hello");
        let after = ProcessSettings::of(
            &config(
                "call-timeout = \"3s\"\nmax-in-flight = 4\n[plugins.hello]\nargs = [\"-v\"]\n\
                 env = { K = \"v\" }\nmax-open-files = 7\ncall-timeout = \"1s\"\n",
            ),
            "hello",
        );
        assert_eq!(
            before.differences(&after),
            ["args", "env", "max-open-files", "max-in-flight"]
        );
        let other = ProcessSettings::of(&config("[plugins.hello]\nargs = [\"-v\"]"), "other");
        assert_eq!(before.differences(&other), Vec::<&str>::new());
    }
}
