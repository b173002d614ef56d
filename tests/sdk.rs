//! Plugins built on the SDKs, under the real daemon: their structured logs arrive with
//! levels and fields.

mod common;

use std::time::{Duration, Instant};

use common::*;
use torud_api::pb;
use torud_api::pb::log_service_client::LogServiceClient;

#[tokio::test]
async fn sdk_logs_are_stored_with_their_level_and_fields() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.install_py_echo();
    d.start().await;
    let mut client = d.client().await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_added(&["hello", "py-echo"])
        .await;
    let mut logs = LogServiceClient::new(d.channel().await);
    for id in ["hello", "py-echo"] {
        enable(&mut client, id).await;
        let req = || pb::QueryLogsRequest {
            filter: Some(pb::LogFilter {
                plugin_ids: vec![id.into()],
                min_level: 0,
                contains: "initialised by the host".into(),
            }),
            ..Default::default()
        };
        // The record is stored a moment after the plugin wrote it.
        let deadline = Instant::now() + SECS10;
        let record = loop {
            let page = logs.query_logs(req()).await.unwrap().into_inner();
            if let Some(r) = page.records.into_iter().next() {
                break r;
            }
            assert!(Instant::now() < deadline, "{id}: no init record");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(
            (record.stream, record.level),
            (pb::LogStream::Stderr as i32, pb::LogLevel::Info as i32),
            "{id}: {record:?}"
        );
        assert!(!record.plugin_time.is_empty(), "{id}: {record:?}");
        let fields: serde_json::Value = serde_json::from_str(&record.fields_json).unwrap();
        assert!(
            fields["instance_id"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{id}: {fields}"
        );
    }
}
