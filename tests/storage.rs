//! Durable per-plugin storage through the real daemon: values an SDK plugin keeps survive
//! plugin restarts, graceful daemon restarts and a SIGKILLed daemon; quotas give clear
//! errors; and a hand-written plugin crafting storage messages reaches only its own data.

mod common;

use common::*;
use tonic::transport::Channel;
use tonic::Code;
use torud_api::pb;
use torud_api::pb::kv_service_client::KvServiceClient;
use torud_api::pb::PluginState;

type Kv = KvServiceClient<Channel>;

async fn get(kv: &mut Kv, id: &str, key: &str) -> Result<Option<String>, tonic::Status> {
    let req = pb::GetValueRequest {
        plugin_id: id.into(),
        key: key.into(),
    };
    let r = kv.get_value(req).await?.into_inner();
    Ok(r.found.then_some(r.value))
}

async fn set(kv: &mut Kv, id: &str, key: &str, value: &str) -> Result<(), tonic::Status> {
    let req = pb::SetValueRequest {
        plugin_id: id.into(),
        key: key.into(),
        value: value.into(),
    };
    kv.set_value(req).await.map(|_| ())
}

/// Starts `d`, waits until every plugin in `ids` is discovered, and enables it (which
/// returns once it is running).
async fn start_running(d: &mut Daemon, ids: &[&str]) -> (Client, Kv) {
    d.start().await;
    let mut client = d.client().await;
    // Not by replaying events: after a restart the log holds the previous run's too.
    for id in ids {
        let deadline = std::time::Instant::now() + SECS10;
        let req = || pb::GetPluginRequest {
            plugin_id: id.to_string(),
        };
        while client.get_plugin(req()).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{id} never discovered"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        enable(&mut client, id).await;
    }
    let kv = d.kv_client().await;
    (client, kv)
}

#[tokio::test]
async fn sdk_kv_values_survive_plugin_and_daemon_restarts() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    let (mut client, mut kv) = start_running(&mut d, &["hello"]).await;
    set(&mut kv, "hello", "color", "blue").await.unwrap();
    set(&mut kv, "hello", "empty", "").await.unwrap();

    // Plugin restart: a new process, the same data.
    let before = get_pid(&mut client).await;
    client
        .restart_plugin(pb::RestartPluginRequest {
            plugin_id: "hello".into(),
        })
        .await
        .unwrap();
    assert_ne!(get_pid(&mut client).await, before);
    assert_eq!(
        get(&mut kv, "hello", "color").await.unwrap().as_deref(),
        Some("blue")
    );
    assert_eq!(
        get(&mut kv, "hello", "empty").await.unwrap().as_deref(),
        Some("")
    );

    // Graceful daemon restart.
    assert!(d.stop().await.success());
    let (_client, mut kv) = start_running(&mut d, &["hello"]).await;
    assert_eq!(
        get(&mut kv, "hello", "color").await.unwrap().as_deref(),
        Some("blue")
    );

    // A write acknowledged just before the daemon is SIGKILLed is not lost.
    set(&mut kv, "hello", "color", "green").await.unwrap();
    d.kill9().await;
    let (_client, mut kv) = start_running(&mut d, &["hello"]).await;
    assert_eq!(
        get(&mut kv, "hello", "color").await.unwrap().as_deref(),
        Some("green")
    );
    let req = pb::DeleteValueRequest {
        plugin_id: "hello".into(),
        key: "color".into(),
    };
    assert!(kv.delete_value(req).await.unwrap().into_inner().existed);
    assert_eq!(get(&mut kv, "hello", "color").await.unwrap(), None);
}

async fn get_pid(client: &mut Client) -> i64 {
    let p = common::get(client, "hello").await;
    assert_eq!(state_of(&p), PluginState::Running);
    p.pid as i64
}

#[tokio::test]
async fn quotas_refuse_writes_with_a_clear_error() {
    let mut d = Daemon::new(&["--storage-max-keys", "2", "--storage-max-bytes", "100"]);
    d.install_hello("hello");
    let (_client, mut kv) = start_running(&mut d, &["hello"]).await;
    set(&mut kv, "hello", "a", "1").await.unwrap();
    set(&mut kv, "hello", "b", "2").await.unwrap();
    let e = set(&mut kv, "hello", "c", "3").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--storage-max-keys"),
        "{}",
        e.message()
    );
    let e = set(&mut kv, "hello", "a", &"x".repeat(200))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--storage-max-bytes"),
        "{}",
        e.message()
    );
    // Replacing within the quota still works, and nothing refused was written.
    set(&mut kv, "hello", "a", "11").await.unwrap();
    assert_eq!(
        get(&mut kv, "hello", "a").await.unwrap().as_deref(),
        Some("11")
    );
    assert_eq!(get(&mut kv, "hello", "c").await.unwrap(), None);
}

/// Sends `payload` as a storage request from the snooping plugin; the host's answer.
async fn raw(kv: &mut Kv, payload: serde_json::Value) -> serde_json::Value {
    let key = format!("raw:{payload}");
    let text = get(kv, "snoop", &key).await.unwrap().expect("an answer");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn a_plugin_cannot_reach_another_plugins_namespace() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.install_fixture("snoop", "v2-snoop", &[]);
    let (mut client, mut kv) = start_running(&mut d, &["hello", "snoop"]).await;
    set(&mut kv, "hello", "secret", "s3cret").await.unwrap();

    // Naming hello's namespace is refused outright.
    for crafted in [
        serde_json::json!({"action": "get", "key": "secret", "namespace": "hello"}),
        serde_json::json!({"action": "get", "key": "secret", "plugin_id": "hello"}),
        serde_json::json!({"action": "get", "key": "secret", "payload": {"namespace": "hello"}}),
        serde_json::json!({"action": "set", "key": "secret", "value": "mine", "namespace": "hello"}),
        serde_json::json!({"action": "delete", "key": "secret", "plugin_id": ["hello"]}),
    ] {
        let answer = raw(&mut kv, crafted.clone()).await;
        assert_eq!(
            answer["error"]["code"], "permission_denied",
            "{crafted} got {answer}"
        );
        assert!(answer.get("value").is_none(), "{crafted} got {answer}");
    }
    // Naming itself is harmless; keys are opaque, so no key reaches hello's data.
    for crafted in [
        serde_json::json!({"action": "get", "key": "secret"}),
        serde_json::json!({"action": "get", "key": "secret", "namespace": "snoop"}),
        serde_json::json!({"action": "get", "key": "hello\u{0}secret"}),
        serde_json::json!({"action": "get", "key": "../hello/secret"}),
        serde_json::json!({"action": "get", "key": "hello/secret"}),
    ] {
        let answer = raw(&mut kv, crafted.clone()).await;
        assert_eq!(
            answer["value"],
            serde_json::Value::Null,
            "{crafted} read {answer}"
        );
    }
    let listed = raw(&mut kv, serde_json::json!({"action": "list", "prefix": ""})).await;
    assert_eq!(listed["keys"], serde_json::json!([]), "{listed}");

    // Writes land in snoop's namespace only.
    let wrote = raw(
        &mut kv,
        serde_json::json!({"action": "set", "key": "secret", "value": "mine"}),
    )
    .await;
    assert_eq!(wrote["value"], serde_json::Value::Null, "{wrote}");
    assert_eq!(
        get(&mut kv, "hello", "secret").await.unwrap().as_deref(),
        Some("s3cret")
    );
    let mine = raw(
        &mut kv,
        serde_json::json!({"action": "get", "key": "secret"}),
    )
    .await;
    assert_eq!(mine["value"], "mine");

    // Malformed requests get clear errors, and both plugins keep running.
    for (crafted, code) in [
        (
            serde_json::json!({"action": "drop_table"}),
            "invalid_argument",
        ),
        (serde_json::json!({"action": "get"}), "invalid_argument"),
        (
            serde_json::json!({"action": "get", "key": ""}),
            "invalid_argument",
        ),
        (
            serde_json::json!({"action": "set", "key": "k", "value": 7}),
            "invalid_argument",
        ),
        (serde_json::json!([1, 2]), "invalid_argument"),
    ] {
        let answer = raw(&mut kv, crafted.clone()).await;
        assert_eq!(answer["error"]["code"], code, "{crafted} got {answer}");
        assert!(answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    for id in ["hello", "snoop"] {
        let p = common::get(&mut client, id).await;
        assert_eq!(state_of(&p), PluginState::Running, "{id}");
    }
    assert_eq!(
        get(&mut kv, "hello", "secret").await.unwrap().as_deref(),
        Some("s3cret")
    );
}

#[tokio::test]
async fn the_python_sdk_example_keeps_kv_across_restarts_and_echoes_calls() {
    let mut d = Daemon::new(&[]);
    d.install_py_echo();
    let (mut client, mut kv) = start_running(&mut d, &["py-echo"]).await;
    assert_eq!(get(&mut kv, "py-echo", "a").await.unwrap(), None);
    set(&mut kv, "py-echo", "a", "1").await.unwrap();
    let req = pb::CallPluginRequest {
        plugin_id: "py-echo".into(),
        method: "PUT".into(),
        path: "/x?y=1".into(),
        headers: vec![],
        body: b"hello".to_vec(),
    };
    let answer = client.call_plugin(req).await.unwrap().into_inner();
    let echoed: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        echoed,
        serde_json::json!({"method": "PUT", "path": "/x?y=1", "body": "hello"})
    );
    client
        .restart_plugin(pb::RestartPluginRequest {
            plugin_id: "py-echo".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        get(&mut kv, "py-echo", "a").await.unwrap().as_deref(),
        Some("1")
    );
    assert!(d.stop().await.success());
    let (_client, mut kv) = start_running(&mut d, &["py-echo"]).await;
    assert_eq!(
        get(&mut kv, "py-echo", "a").await.unwrap().as_deref(),
        Some("1")
    );
}

/// Runs `torud serve` on `d`'s directories until it exits; returns its exit code and stderr.
fn serve_until_exit(d: &Daemon) -> (Option<i32>, String) {
    let out = std::process::Command::new(TORUD)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--plugins-dir")
        .arg(&d.plugins_dir)
        .arg("--data-dir")
        .arg(&d.data_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data directory whose `storage.redb` holds one key, damaged by `damage`.
fn damaged_storage(damage: impl FnOnce(&std::path::Path)) -> (Daemon, std::path::PathBuf) {
    let d = Daemon::new(&[]);
    std::fs::create_dir_all(&d.data_dir).unwrap();
    let path = d.data_dir.join("storage.redb");
    {
        let storage = torud::store::storage::Storage::open(&path, Default::default()).unwrap();
        storage
            .namespace("p")
            .apply_blocking(&toru_plugin_sdk::storage_wire::StorageOp::Set {
                key: "k".into(),
                value: "v".repeat(50_000),
            })
            .unwrap();
    }
    damage(&path);
    (d, path)
}

#[test]
fn a_truncated_or_overwritten_storage_file_stops_the_daemon_with_a_clear_error() {
    let truncate = |path: &std::path::Path| {
        let len = std::fs::metadata(path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(len / 2).unwrap();
    };
    let overwrite = |path: &std::path::Path| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[..4096].fill(0x41);
        std::fs::write(path, bytes).unwrap();
    };
    for (what, damage) in [
        ("truncated", &truncate as &dyn Fn(&std::path::Path)),
        ("overwritten", &overwrite),
    ] {
        let (d, path) = damaged_storage(damage);
        let (code, stderr) = serve_until_exit(&d);
        assert_eq!(code, Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains("is damaged"),
            "{what}: {stderr}"
        );
        assert!(!stderr.contains("another torud"), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
}

#[tokio::test]
async fn a_second_daemon_on_the_same_data_directory_is_told_so() {
    let mut d = Daemon::new(&[]);
    d.start().await;
    let (code, stderr) = serve_until_exit(&d);
    assert_eq!(code, Some(1), "{stderr}");
    // The control socket notices first; the storage lock says the same (unit-tested).
    assert!(
        stderr.contains("another daemon is serving this data directory")
            || stderr.contains("another torud is using this data directory"),
        "{stderr}"
    );
    assert!(!stderr.contains("damaged"), "{stderr}");
    d.stop().await;
}
