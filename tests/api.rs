//! The gRPC surface itself: reflection, and unary calls answered without transport delays.

mod common;

use std::time::{Duration, Instant};

use common::*;
use torud_api::pb;

/// Regression: the listener was served without TCP_NODELAY, so every unary response waited
/// for a delayed ACK (about 40 ms on Linux loopback). A median under 20 ms cannot happen
/// with that bug (DisablePlugin of the Rust example exits in a few milliseconds).
#[tokio::test]
async fn unary_calls_are_not_held_back_by_nagle() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["hello"])
        .await;
    // Over TCP, where Nagle's algorithm applies (the control socket is a Unix socket).
    let mut tcp = d.tcp_client(&d.token("admin")).await;
    let mut took = Vec::new();
    for _ in 0..11 {
        let id = || pb::EnablePluginRequest {
            plugin_id: "hello".into(),
        };
        tcp.enable_plugin(id()).await.unwrap();
        let began = Instant::now();
        tcp.disable_plugin(pb::DisablePluginRequest {
            plugin_id: "hello".into(),
        })
        .await
        .unwrap();
        took.push(began.elapsed());
    }
    took.sort();
    assert!(
        took[5] < Duration::from_millis(20),
        "median DisablePlugin took {:?}",
        took[5]
    );
}

#[tokio::test]
async fn reflection_lists_every_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mut d = Daemon::new(&[]);
    d.start().await;
    let mut client = ServerReflectionClient::new(d.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer: {resp:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "toru.v1.ConfigService",
            "toru.v1.KvService",
            "toru.v1.LogService",
            "toru.v1.PluginService",
        ]
    );
}
