//! The config file as the real daemon reads it: which layer wins (flag > environment >
//! file > default), and how a mistake in the file stops the daemon with its file, line and
//! key.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const TORUD: &str = env!("CARGO_BIN_EXE_torud");

/// A port free right now on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `torud serve --config FILE ARGS` with `envs`, returns the address it reports
/// listening on, and stops it.
async fn listening_address(config: &Path, args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut child = Command::new(TORUD)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("TORUD_LISTEN")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(stdout).lines().next_line(),
    )
    .await
    .expect("no listening line within 20 s")
    .unwrap()
    .expect("the daemon exited before listening");
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    line.strip_prefix("torud listening on ")
        .expect(&line)
        .to_owned()
}

/// Runs `torud serve` expecting it to refuse to start; its stderr.
async fn refusal(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(TORUD).arg("serve").args(args).output(),
    )
    .await
    .expect("the daemon did not exit within 20 s")
    .unwrap();
    assert!(!out.status.success(), "the daemon started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_flag_wins_over_its_variable_which_wins_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let [file_port, env_port, flag_port] = [free_port(), free_port(), free_port()];
    let config = dir.path().join("torud.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{file_port}\"\nplugins-dir = \"{}\"\ndata-dir = \"{}\"\n",
            dir.path().join("plugins").display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let at = |port: u16| format!("127.0.0.1:{port}");
    assert_eq!(listening_address(&config, &[], &[]).await, at(file_port));
    let env = at(env_port);
    let env = [("TORUD_LISTEN", env.as_str())];
    assert_eq!(listening_address(&config, &[], &env).await, at(env_port));
    let flag = at(flag_port);
    let args = ["--listen", flag.as_str()];
    assert_eq!(listening_address(&config, &args, &env).await, at(flag_port));
    assert!(
        dir.path().join("data").join("events").is_dir(),
        "the file's data-dir was used"
    );
}

#[tokio::test]
async fn a_mistake_in_the_file_stops_the_daemon_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("torud.toml");
    std::fs::write(
        &config,
        "# torud\nlisten = \"127.0.0.1:0\"\n\n[plugins.hello]\ncall-timeout = \"soon\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let stderr = refusal(&args).await;
    let want = format!(
        "{}:5:16: plugins.hello.call-timeout: \"soon\" is not a duration",
        config.display()
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(!data.exists(), "nothing was created before the refusal");

    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nlisten-on = 1\n").unwrap();
    let stderr = refusal(&args).await;
    assert!(
        stderr.contains(":2:1: listen-on: unknown field `listen-on`"),
        "{stderr}"
    );

    let missing = dir.path().join("missing.toml");
    let stderr = refusal(&["--config", missing.to_str().unwrap()]).await;
    assert!(
        stderr.contains(&format!("config file {}", missing.display())),
        "{stderr}"
    );
}
