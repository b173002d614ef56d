//! The config file (TOML) and the [`Loader`] that stacks it under the flags and the
//! environment: flag > environment > file > default, for every setting.
//!
//! The file's top-level keys are the flags' long names (`listen`, `call-timeout`, `pin`,
//! …); `[plugins.<id>]` sections hold one plugin's own settings. An unknown key, a wrong
//! type or an out-of-range value is an error that names the file, the line and column,
//! and the key. A reload ([`Loader::load`] again) reads the file anew and keeps the flags
//! and environment the daemon started with.

use std::path::{Path, PathBuf};

use super::settings::{SettingError, Settings};
use super::Config;

/// Where the config file is looked for when `--config` is not given; a missing file there
/// is no error (every setting has a default).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/torud/torud.toml";

/// Why a configuration could not be loaded. Nothing is applied when loading fails.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not valid: bad TOML, an unknown key, a wrong type or value.
    #[error("{}:{line}:{column}: {}{message}", path.display(), key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Line of the fault, from 1.
        line: usize,
        /// Column of the fault, from 1.
        column: usize,
        /// The key at fault (`plugins.hello.call-timeout`), when the fault is in a value.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// The settings, stacked, do not fit together (e.g. a TLS certificate without its key).
    #[error("configuration: {0}")]
    Setting(#[from] SettingError),
}

/// Reads a config file's text into its settings layer.
pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let invalid = |span: Option<std::ops::Range<usize>>, key: Option<String>, message: String| {
        let (line, column) = line_and_column(text, span.map_or(0, |s| s.start));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            key,
            message,
        }
    };
    let document = toml::Deserializer::parse(text)
        .map_err(|e| invalid(e.span(), None, e.message().to_owned()))?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let key = e.path().to_string();
        let key = (key != ".").then_some(key);
        let inner = e.into_inner();
        invalid(inner.span(), key, inner.message().to_owned())
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The layers a configuration is made of, kept so that a reload can stack them again with
/// the file read anew.
#[derive(Debug, Clone)]
pub struct Loader {
    /// What flags and environment variables gave (clap puts a flag over its variable).
    given: Settings,
    /// The config file, if any.
    file: Option<PathBuf>,
    /// Whether the file was named (then it must exist) rather than the default location.
    named: bool,
}

/// A configuration as loaded, with the stacked settings it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Flags, environment and file stacked (what [`Settings::apply`] was given).
    pub settings: Settings,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// What the operator should fix though it stops nothing (logged by the caller).
    pub warnings: Vec<String>,
}

/// Where the configuration in force came from, kept for reloads: the layers to stack again,
/// and the configuration as they gave it at start-up (directories as written, before they
/// were made absolute), which the first reload is compared with.
#[derive(Debug, Clone)]
pub struct Source {
    /// Flags and environment over the config file.
    pub loader: Loader,
    /// The configuration as loaded at start-up.
    pub given: Config,
}

impl Loader {
    /// Layers from flags and environment (`given`) over a config file: `file` if named (it
    /// must exist), else [`DEFAULT_CONFIG_FILE`] if it exists.
    pub fn new(given: Settings, file: Option<PathBuf>) -> Self {
        let named = file.is_some();
        Loader {
            given,
            file: file.or_else(|| Some(PathBuf::from(DEFAULT_CONFIG_FILE))),
            named,
        }
    }

    /// The config file this loader reads, if it exists or was named.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref().filter(|f| self.named || f.exists())
    }

    /// Reads the file (anew) and stacks flag > environment > file > default.
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let mut warnings = Vec::new();
        let file_layer = match self.file() {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let layer = parse(path, &text)?;
                warnings.extend(exposed_secrets(path, &layer));
                layer
            }
            None => Settings::default(),
        };
        let settings = self.given.clone().over(file_layer);
        let config = settings.clone().apply(|name| std::env::var(name).ok())?;
        Ok(Loaded {
            config,
            settings,
            file: self.file().map(Path::to_path_buf),
            warnings,
        })
    }
}

/// A warning when the file gives plugins secrets (`env`) yet other users may read it:
/// plugins run as other users and could read each other's secrets there.
fn exposed_secrets(path: &Path, layer: &Settings) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let has_secrets = layer
        .plugins
        .iter()
        .flatten()
        .any(|(_, s)| s.env.as_ref().is_some_and(|env| !env.is_empty()));
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (has_secrets && mode & 0o077 != 0).then(|| {
        format!(
            "config file {} holds plugins' env secrets but its mode is {:o}: other users \
             (plugins among them) may read it; make it 0600 (chmod 600 {})",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn error(text: &str) -> String {
        parse(Path::new("/etc/torud/torud.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let text = "listen = \"127.0.0.1:1\"\n\n[plugins.hello]\ncall-timeouts = \"3s\"\n";
        let e = error(text);
        assert!(e.starts_with("/etc/torud/torud.toml:4:1: plugins.hello.call-timeouts: unknown field `call-timeouts`"), "{e}");
    }

    #[test]
    fn a_wrong_type_or_value_is_named_with_its_line() {
        let e = error("max-failures = \"ten\"\n");
        assert!(
            e.starts_with("/etc/torud/torud.toml:1:16: max-failures: invalid type"),
            "{e}"
        );
        let e = error("# limits\nmax-failures = 0\n");
        assert!(
            e.starts_with("/etc/torud/torud.toml:2:16: max-failures: 0 is below"),
            "{e}"
        );
        let e = error("[plugins.hello]\ncall-timeout = \"soon\"\n");
        assert!(
            e.contains(":2:16: plugins.hello.call-timeout: \"soon\" is not a duration"),
            "{e}"
        );
        let e = error("[plugins.hello]\nworking-dir = \"rel\"\n");
        assert!(
            e.contains(":2:15: plugins.hello.working-dir: rel is not an absolute path"),
            "{e}"
        );
        let e = error("[plugins.hello_world]\nargs = []\n");
        assert!(e.contains("\"hello_world\" is not a plugin id"), "{e}");
        let e = error("[plugins.hello.env]\nTORU_ADMIN = \"x\"\n");
        assert!(e.contains("set by the daemon"), "{e}");
    }

    #[test]
    fn bad_toml_is_located() {
        let e = error("listen = \n");
        assert!(e.starts_with("/etc/torud/torud.toml:1:10: "), "{e}");
    }

    #[test]
    fn every_setting_of_the_file_lands_in_the_configuration() {
        let text = r#"
listen = "127.0.0.1:6000"
call-timeout = "45s"
max-failures = 3
restart = "on-failure"
pin = ["hello=0000000000000000000000000000000000000000000000000000000000000000"]
plugin-env = ["EXTRA"]

[plugins.hello]
args = ["--verbose"]
env = { API_KEY = "s3cret" }
working-dir = "/srv/hello"
restart = "never"
call-timeout = "2m"
max-open-files = 64
pin = "1111111111111111111111111111111111111111111111111111111111111111"
log-segments = 2
enable-when-new = true
"#;
        let settings = parse(Path::new("t.toml"), text).unwrap();
        let config = settings.apply(|_| None).unwrap();
        assert_eq!(config.listen.port(), 6000);
        assert_eq!(config.bridge.call_timeout, Duration::from_secs(45));
        assert_eq!(config.timing.max_failures, 3);
        assert_eq!(config.restart, super::super::RestartPolicy::OnFailure);
        assert!(config.plugin_env_allowlist.contains(&"EXTRA".to_owned()));
        // The top-level list wins over the plugin's own pin.
        assert!(config.pins["hello"].starts_with("0000"));
        let hello = config.plugin("hello");
        assert_eq!(hello.call_timeout, Duration::from_secs(120));
        assert_eq!(hello.kv_timeout, config.bridge.kv_timeout);
        assert_eq!(hello.restart, super::super::RestartPolicy::Never);
        assert_eq!(hello.limits.open_files, Some(64));
        assert_eq!(
            hello.limits.address_space,
            config.plugin_limits.address_space
        );
        assert_eq!(hello.launch.args, ["--verbose"]);
        assert_eq!(hello.launch.env["API_KEY"].expose(), "s3cret");
        assert_eq!(hello.launch.working_dir, Some(PathBuf::from("/srv/hello")));
        assert_eq!(hello.log_segments, 2);
        assert!(hello.enable_when_new && !config.enable_new_plugins);
        let other = config.plugin("other");
        assert_eq!(other.call_timeout, Duration::from_secs(45));
        assert_eq!(other.restart, super::super::RestartPolicy::OnFailure);
        assert!(format!("{config:?}").contains("(redacted)"));
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn a_higher_layer_wins_key_by_key() {
        let file = parse(
            Path::new("t.toml"),
            "call-timeout = \"45s\"\nkv-timeout = \"9s\"\n",
        )
        .unwrap();
        let flags = Settings {
            call_timeout: Some("1s".parse().unwrap()),
            ..Settings::default()
        };
        let config = flags.over(file).apply(|_| None).unwrap();
        assert_eq!(config.bridge.call_timeout, Duration::from_secs(1));
        assert_eq!(config.bridge.kv_timeout, Duration::from_secs(9));
        assert_eq!(config.timing, Config::default().timing);
    }

    #[test]
    fn settings_that_do_not_fit_together_are_refused() {
        let settings = parse(Path::new("t.toml"), "tls-cert = \"/c.pem\"\n").unwrap();
        let e = settings.apply(|_| None).unwrap_err();
        assert_eq!(e.key, "tls-cert");
    }

    /// The packaged example is valid as shipped and with every commented-out setting
    /// turned on.
    #[test]
    fn the_packaged_example_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/torud.toml"));
        let text = std::fs::read_to_string(path).unwrap();
        let shipped = parse(path, &text).unwrap().apply(|_| None).unwrap();
        assert_eq!(shipped.data_dir, Path::new("/var/lib/torud/data"));
        let enabled: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let all = parse(path, &enabled).unwrap().apply(|_| None).unwrap();
        let weather = all.plugin("weather");
        assert_eq!(weather.launch.args, ["--region", "eu"]);
        assert_eq!(weather.restart, super::super::RestartPolicy::OnFailure);
        assert!(all.pins.contains_key("weather"));
    }

    /// The Kubernetes example's ConfigMap holds a valid config file, listening where its
    /// probes and scrape annotations say.
    #[test]
    fn the_kubernetes_example_config_is_valid() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/kubernetes/torud-daemonset.yaml"
        ));
        let yaml = std::fs::read_to_string(path).unwrap();
        let block = yaml
            .split("  torud.toml: |\n")
            .nth(1)
            .expect("the ConfigMap's file");
        let toml: String = block
            .lines()
            .map_while(|line| {
                line.strip_prefix("    ")
                    .or((line.is_empty()).then_some(""))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let config = parse(path, &toml).unwrap().apply(|_| None).unwrap();
        assert_eq!(config.listen.port(), 50051);
        assert!(yaml.contains("port: 50051") && yaml.contains("containerPort: 50051"));
        assert_eq!(config.metrics_listen.map(|a| a.port()), Some(9464));
        assert!(yaml.contains("prometheus.io/port: \"9464\""));
        assert!(config.security.insecure_plaintext_non_loopback);
    }

    #[test]
    fn secrets_in_a_file_others_may_read_are_warned_of() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torud.toml");
        std::fs::write(&path, "[plugins.a.env]\nKEY = \"v\"\n").unwrap();
        let loader = Loader::new(Settings::default(), Some(path.clone()));
        let chmod = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        chmod(0o644).unwrap();
        let warnings = loader.load().unwrap().warnings;
        assert!(
            warnings.len() == 1 && warnings[0].contains("chmod 600"),
            "{warnings:?}"
        );
        chmod(0o600).unwrap();
        assert!(loader.load().unwrap().warnings.is_empty());
    }

    #[test]
    fn a_named_file_must_exist_the_default_one_need_not() {
        let missing = Loader::new(Settings::default(), Some("/nonexistent/torud.toml".into()));
        assert!(matches!(missing.load(), Err(ConfigError::Read { .. })));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torud.toml");
        std::fs::write(&path, "log = \"debug\"\n").unwrap();
        let loader = Loader::new(Settings::default(), Some(path.clone()));
        assert_eq!(loader.load().unwrap().config.log_filter, "debug");
        std::fs::write(&path, "log = \"warn\"\n").unwrap();
        assert_eq!(
            loader.load().unwrap().config.log_filter,
            "warn",
            "read anew"
        );
    }
}
