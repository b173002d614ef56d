//! A plugin's own settings (`[plugins.<id>]` in the config file) through the real daemon:
//! the plugin starts with its own arguments, environment, working directory and rlimits,
//! while a plugin without a section gets the daemon-wide ones; its secret values reach
//! nothing but the plugin; `TORU_*` variables cannot be given; a working directory it
//! cannot use is a start failure that says why.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use torud_api::pb;

/// A value that must reach the tuned plugin's environment and nothing else.
const SECRET: &str = "sk-live-5ec7e7-do-not-log";

/// Writes `text` as the daemon's config file and has the daemon read it.
fn use_config(d: &mut Daemon, text: &str) -> PathBuf {
    let path = d.root.path().join("torud.toml");
    std::fs::write(&path, text).unwrap();
    d.args
        .extend(["--config".to_owned(), path.display().to_string()]);
    path
}

/// A directory made for the test, 0755.
fn make_dir(d: &Daemon, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = d.root.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// What a `dump-env` fixture wrote about itself.
struct Seen {
    env: serde_json::Map<String, serde_json::Value>,
    args: Vec<String>,
    cwd: PathBuf,
    limits: String,
}

impl Seen {
    fn of(d: &Daemon, id: &str) -> Seen {
        let dir = d.data_dir.join("plugins").join(id);
        let json = |file: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap()
        };
        let launch = json("launch.json");
        Seen {
            env: json("env.json").as_object().unwrap().clone(),
            args: serde_json::from_value(launch["args"].clone()).unwrap(),
            cwd: PathBuf::from(launch["cwd"].as_str().unwrap()),
            limits: std::fs::read_to_string(dir.join("limits.txt")).unwrap(),
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(|v| v.as_str().unwrap())
    }

    /// The soft limit on open files.
    fn open_files(&self) -> &str {
        let line = self
            .limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        line["Max open files".len()..]
            .split_whitespace()
            .next()
            .unwrap()
    }
}

/// Every file under `dir` (recursively) but those under `skip`.
fn files_under(dir: &Path, skip: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if path.starts_with(skip) {
            continue;
        }
        if kind.is_dir() {
            files.extend(files_under(&path, skip));
        } else if kind.is_file() {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn a_plugins_own_settings_reach_it_and_its_secret_nothing_else() {
    let mut d = Daemon::new(&[]);
    let work = make_dir(&d, "work");
    // An allowlisted variable of the daemon's, which the tuned plugin's own value overrides.
    d.envs.push(("TZ".into(), "UTC".into()));
    use_config(
        &mut d,
        &format!(
            r#"
[plugins.tuned]
args = ["serve", "--api-url=https://example.test", "two words"]
working-dir = "{}"
max-open-files = 333
env = {{ API_KEY = "{SECRET}", TZ = "Europe/Paris", HOME = "/srv/tuned-home" }}
"#,
            work.display()
        ),
    );
    d.install_fixture("tuned", "dump-env", &[]);
    d.install_fixture("plain", "dump-env", &[]);
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["tuned", "plain"]).await;
    enable(&mut client, "tuned").await;
    enable(&mut client, "plain").await;

    let tuned = Seen::of(&d, "tuned");
    assert_eq!(tuned.var("API_KEY"), Some(SECRET));
    assert_eq!(tuned.var("TZ"), Some("Europe/Paris"), "its own value wins");
    assert_eq!(
        tuned.var("HOME"),
        Some("/srv/tuned-home"),
        "its own HOME wins over its user's"
    );
    assert_eq!(tuned.var("TORU_PLUGIN_ID"), Some("tuned"));
    assert_eq!(
        tuned.args,
        ["serve", "--api-url=https://example.test", "two words"]
    );
    assert_eq!(tuned.cwd, work);
    assert_eq!(tuned.open_files(), "333");

    // No section: the daemon-wide environment, limits and working directory (the daemon's).
    let plain = Seen::of(&d, "plain");
    assert_eq!(plain.var("API_KEY"), None);
    assert_eq!(plain.var("TZ"), Some("UTC"));
    let plain_home = d.data_dir.join("plugins/plain");
    assert_eq!(plain.var("HOME"), plain_home.to_str(), "its own user's");
    assert_eq!(plain.var("TORU_PLUGIN_ID"), Some("plain"));
    assert!(plain.args.is_empty(), "{:?}", plain.args);
    assert_eq!(plain.cwd, std::env::current_dir().unwrap());
    assert_eq!(plain.open_files(), "4096");

    // The secret is in no answer, no event, no log and no file of the daemon's.
    let answers = format!(
        "{:?} {:?} {:?}",
        get(&mut client, "tuned").await,
        client
            .list_plugins(pb::ListPluginsRequest::default())
            .await
            .unwrap()
            .into_inner(),
        events.seen
    );
    assert!(answers.contains("tuned") && !answers.contains(SECRET));
    let stderr = d.daemon_stderr();
    assert!(
        stderr.contains("tuned") && !stderr.contains(SECRET),
        "{stderr}"
    );
    assert!(!d.log_text("tuned").contains(SECRET));
    // Only the plugin's own directory holds it, in the environment it wrote there.
    let own = d.data_dir.join("plugins/tuned");
    let files = files_under(&d.data_dir, &own);
    assert!(files
        .iter()
        .any(|f| f.starts_with(d.data_dir.join("events"))));
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let found = bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes());
        assert!(!found, "the secret is in {}", file.display());
    }
}

#[tokio::test]
async fn a_toru_variable_in_a_plugins_env_is_refused_at_start() {
    let mut d = Daemon::new(&[]);
    let config = use_config(
        &mut d,
        "# torud\n[plugins.tuned]\nargs = [\"serve\"]\n\n[plugins.tuned.env]\nAPI_KEY = \"k\"\nTORU_DATA_DIR = \"/tmp/elsewhere\"\n",
    );
    let run = tokio::process::Command::new(TORUD)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .arg("--plugins-dir")
        .arg(&d.plugins_dir)
        .arg("--data-dir")
        .arg(&d.data_dir)
        .args(&d.args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the daemon neither refused nor started within 20 s")
        .unwrap();
    assert!(!out.status.success(), "the daemon started");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:7:1: plugins.tuned.env.TORU_DATA_DIR: TORU_DATA_DIR is set by the daemon",
        config.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        !d.data_dir.join("events").exists(),
        "nothing was started before the refusal"
    );
}

/// `EnablePlugin`'s error for `id`, and the event saying why it did not start.
async fn failed_start(client: &mut Client, events: &mut Events, id: &str) -> (String, pb::Event) {
    let err = client
        .enable_plugin(pb::EnablePluginRequest {
            plugin_id: id.into(),
        })
        .await
        .expect_err("the start succeeded");
    let event = events
        .wait_for("the failed start", SECS10, |e| {
            e.plugin_id == id
                && (e.to_state == pb::PluginState::Crashed as i32
                    || e.to_state == pb::PluginState::Disabled as i32)
        })
        .await;
    (err.message().to_owned(), event)
}

#[tokio::test]
async fn a_working_directory_the_plugin_cannot_use_fails_its_start_with_the_reason() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::new(&["--restart", "never"]);
    let missing = d.root.path().join("missing");
    let locked = make_dir(&d, "locked");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
    let others = d.data_dir.join("plugins/plain");
    use_config(
        &mut d,
        &format!(
            "[plugins.lost]\nworking-dir = \"{}\"\n\n[plugins.locked]\nworking-dir = \"{}\"\n\n\
             [plugins.nosy]\nworking-dir = \"{}\"\n",
            missing.display(),
            locked.display(),
            others.display()
        ),
    );
    for id in ["lost", "locked", "nosy", "plain"] {
        d.install_fixture(id, "dump-env", &[]);
    }
    d.start().await;
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events
        .wait_added(&["lost", "locked", "nosy", "plain"])
        .await;
    enable(&mut client, "plain").await;

    let (err, event) = failed_start(&mut client, &mut events, "lost").await;
    let why = format!(
        "its working directory {} does not exist; create it, or change plugins.lost.working-dir",
        missing.display()
    );
    assert!(err.contains(&why), "{err}");
    assert!(event.reason.contains(&why), "{}", event.reason);
    // Under restart policy never, it stays enabled but crashed.
    assert_eq!(event.to_state, pb::PluginState::Crashed as i32);
    assert!(get(&mut client, "lost").await.enabled);

    let (err, _) = failed_start(&mut client, &mut events, "nosy").await;
    assert!(
        err.contains("is inside the data directory") && err.contains("plugins.nosy.working-dir"),
        "{err}"
    );

    // The daemon is root (as these tests run): the plugin's own user cannot enter 0700 root.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests run as root");
    let (err, event) = failed_start(&mut client, &mut events, "locked").await;
    assert!(
        err.contains(&format!("cannot reach {}", locked.display()))
            && err.contains("chmod o+x")
            && err.contains("plugins.locked.working-dir"),
        "{err}"
    );
    assert_eq!(event.to_state, pb::PluginState::Disabled as i32);
    for id in ["lost", "locked", "nosy"] {
        assert!(
            !d.data_dir
                .join("plugins")
                .join(id)
                .join("env.json")
                .exists(),
            "{id} was run"
        );
    }
}

#[tokio::test]
async fn without_root_the_working_directory_is_entered_in_the_sandbox() {
    const NOBODY: u32 = 65534;
    let mut d = Daemon::new(&[]);
    let work = make_dir(&d, "work");
    use_config(
        &mut d,
        &format!("[plugins.tuned]\nworking-dir = \"{}\"\n", work.display()),
    );
    d.hand_to(NOBODY);
    d.install_fixture("tuned", "dump-env", &[]);
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["tuned"])
        .await;
    enable(&mut client, "tuned").await;
    let seen = Seen::of(&d, "tuned");
    assert_eq!(seen.cwd, work);
}
