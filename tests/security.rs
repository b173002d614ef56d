//! Who may call the control plane, through the real daemon: tokens and roles over TCP, the
//! trusted control socket, file modes, TLS (with and without client certificates), and the
//! refusal to serve plaintext beyond loopback.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use torud_api::pb;
use torud_api::pb::plugin_service_client::PluginServiceClient;
use torud_api::pb::PluginState;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn list() -> pb::ListPluginsRequest {
    pb::ListPluginsRequest::default()
}

fn enable_req(id: &str) -> pb::EnablePluginRequest {
    pb::EnablePluginRequest {
        plugin_id: id.into(),
    }
}

#[tokio::test]
async fn tcp_calls_need_a_token_and_the_read_role_cannot_change_anything() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.start().await;
    let mut trusted = d.client().await;
    Events::watch(&mut trusted, Some(0))
        .await
        .wait_added(&["hello"])
        .await;

    let before = state_of(&get(&mut trusted, "hello").await);
    assert_ne!(before, PluginState::Running);
    // No token, a wrong one, a malformed header: UNAUTHENTICATED, and nothing happens.
    let mut anonymous = PluginServiceClient::new(d.tcp_channel().await);
    let err = anonymous.list_plugins(list()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("authorization"), "{}", err.message());
    let mut wrong = d.tcp_client("not-the-token-at-all").await;
    let err = wrong.enable_plugin(enable_req("hello")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // The token without its "Bearer " scheme.
    let bare: tonic::metadata::MetadataValue<_> = d.token("admin").parse().unwrap();
    let mut malformed = PluginServiceClient::with_interceptor(
        d.tcp_channel().await,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bare.clone());
            Ok(req)
        },
    );
    let err = malformed.list_plugins(list()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The read token reads, and is refused every change.
    let mut reader = d.tcp_client(&d.token("read")).await;
    let plugins = reader.list_plugins(list()).await.unwrap().into_inner();
    assert_eq!(plugins.plugins.len(), 1);
    let err = reader.enable_plugin(enable_req("hello")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("admin"), "{}", err.message());
    let mut kv_reader = torud_api::pb::kv_service_client::KvServiceClient::with_interceptor(
        d.tcp_channel().await,
        Bearer::new(&d.token("read")).unwrap(),
    );
    let err = kv_reader
        .set_value(pb::SetValueRequest {
            plugin_id: "hello".into(),
            key: "k".into(),
            value: "v".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let plugin = get(&mut trusted, "hello").await;
    assert_eq!(state_of(&plugin), before, "refused calls changed nothing");

    // The admin token does everything.
    let mut admin = d.tcp_client(&d.token("admin")).await;
    admin.enable_plugin(enable_req("hello")).await.unwrap();
    assert_eq!(
        state_of(&get(&mut trusted, "hello").await),
        PluginState::Running
    );

    // Health and reflection stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.tcp_channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn secrets_and_sockets_are_private_to_the_daemons_user() {
    let (mut d, _client) = start_enabled(
        &[],
        |d| {
            d.install_hello("hello");
        },
        &["hello"],
    )
    .await;
    // Run as root: plugins may traverse the data directory, nothing more
    // (tests/isolation.rs tries it from inside a plugin).
    assert_eq!(mode(&d.data_dir), 0o711);
    assert_eq!(mode(&d.data_dir.join("admin.token")), 0o600);
    assert_eq!(mode(&d.data_dir.join("read.token")), 0o600);
    assert_eq!(mode(&d.data_dir.join("torud.sock")), 0o600);
    assert_eq!(mode(&d.data_dir.join("run")), 0o711);
    assert_eq!(mode(&d.data_dir.join("run").join("hello")), 0o700);
    assert!(d.data_dir.join("run/hello/plugin.sock").exists());
    assert_eq!(mode(&d.data_dir.join("plugins").join("hello")), 0o700);
    assert_ne!(d.token("admin"), d.token("read"));
    assert_eq!(d.token("admin").len(), 64);

    // Tokens survive a restart: read back, not regenerated.
    let before = d.token("admin");
    d.stop().await;
    d.start().await;
    assert_eq!(d.token("admin"), before);
    let mut admin = d.tcp_client(&before).await;
    admin.list_plugins(list()).await.unwrap();
}

#[tokio::test]
async fn tokens_from_files_and_the_environment_replace_generated_ones() {
    let mut d = Daemon::new(&[]);
    let file = d.root.path().join("admin-token");
    std::fs::write(&file, "file-admin-token-0123456789\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.args.extend([
        "--admin-token-file".to_string(),
        file.to_string_lossy().into_owned(),
    ]);
    d.envs.push((
        "TORUD_READ_TOKEN".into(),
        "env-read-token-0123456789".into(),
    ));
    d.start().await;
    assert!(!d.data_dir.join("admin.token").exists());
    assert!(!d.data_dir.join("read.token").exists());
    let mut admin = d.tcp_client("file-admin-token-0123456789").await;
    admin.list_plugins(list()).await.unwrap();
    let mut reader = d.tcp_client("env-read-token-0123456789").await;
    reader.list_plugins(list()).await.unwrap();
    let err = reader
        .rescan_plugins(pb::RescanPluginsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

/// Runs `torud serve` with `args` expecting it to refuse to start; returns its stderr.
async fn refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(TORUD)
            .arg("serve")
            .arg("--plugins-dir")
            .arg(dir.path().join("p"))
            .arg("--data-dir")
            .arg(dir.path().join("d"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the daemon should exit at once")
    .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn plaintext_beyond_loopback_and_weak_tokens_are_refused() {
    let err = refused(&["--listen", "0.0.0.0:0"]).await;
    assert!(
        err.contains("refusing to serve plaintext")
            && err.contains("--insecure-plaintext-non-loopback"),
        "{err}"
    );
    let mut d = Daemon::new(&["--insecure-plaintext-non-loopback"]);
    d.args
        .extend(["--listen".to_string(), "0.0.0.0:0".to_string()]);
    d.start().await;
    d.client().await.list_plugins(list()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("t");
    std::fs::write(&short, "short\n").unwrap();
    let err = refused(&["--admin-token-file", short.to_str().unwrap()]).await;
    assert!(err.contains("at least 16 characters"), "{err}");
    let err = refused(&["--admin-token-file", "/nonexistent/token"]).await;
    assert!(err.contains("/nonexistent/token"), "{err}");
}

#[tokio::test]
async fn tls_serves_tokens_encrypted_and_can_require_client_certificates() {
    let pki = pki();
    let mut d = Daemon::new(&[]);
    let files = d.root.path().to_owned();
    for (name, pem) in [
        ("ca.pem", &pki.ca),
        ("server.pem", &pki.server_cert),
        ("server.key", &pki.server_key),
    ] {
        std::fs::write(files.join(name), pem).unwrap();
    }
    let path = |name: &str| files.join(name).to_string_lossy().into_owned();
    d.args.extend([
        "--tls-cert".into(),
        path("server.pem"),
        "--tls-key".into(),
        path("server.key"),
        "--tls-client-ca".into(),
        path("ca.pem"),
        // TLS makes a non-loopback address acceptable without the insecure flag.
        "--listen".into(),
        "0.0.0.0:0".into(),
    ]);
    d.start().await;
    let port = d.addr.rsplit(':').next().unwrap().to_owned();
    let endpoint = || Endpoint::from_shared(format!("https://localhost:{port}")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");

    // With a client certificate and the token: served.
    let channel = endpoint()
        .tls_config(
            tls.clone()
                .identity(Identity::from_pem(&pki.client_cert, &pki.client_key)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin =
        PluginServiceClient::with_interceptor(channel, Bearer::new(&d.token("admin")).unwrap());
    admin.list_plugins(list()).await.unwrap();

    // Without a client certificate: the handshake (or the first call) fails.
    let without = match endpoint().tls_config(tls.clone()).unwrap().connect().await {
        Err(_) => true,
        Ok(channel) => {
            let mut c = PluginServiceClient::with_interceptor(
                channel,
                Bearer::new(&d.token("admin")).unwrap(),
            );
            c.list_plugins(list()).await.is_err()
        }
    };
    assert!(without, "a client without a certificate was served");

    // Plaintext against the TLS port: refused.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut c =
            PluginServiceClient::with_interceptor(channel, Bearer::new(&d.token("admin")).unwrap());
        assert!(c.list_plugins(list()).await.is_err());
    }
}
