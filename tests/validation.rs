//! Every RPC validates its fields: table-driven, through the real daemon. Each bad request
//! must come back INVALID_ARGUMENT with a message naming the field, and the daemon must keep
//! serving.

mod common;

use common::*;
use tonic::transport::Channel;
use torud::pb;
use torud::pb::kv_service_client::KvServiceClient;
use torud::pb::log_service_client::LogServiceClient;

/// Ids that are not plugin ids.
fn bad_ids() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("path traversal", "../x".into()),
        ("slash", "a/b".into()),
        ("NUL", "a\0b".into()),
        ("space", "a b".into()),
        ("non-ASCII", "caf\u{e9}".into()),
        ("65 characters", "a".repeat(65)),
        ("10 MB", "x".repeat(10 * 1024 * 1024)),
    ]
}

struct Clients {
    plugins: Client,
    kv: KvServiceClient<Channel>,
    logs: LogServiceClient<Channel>,
}

type Call<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send + 'a>>;

/// Every RPC that takes a plugin id, called with `id`, and the field it should name.
fn calls_with_id(c: &mut Clients, id: String) -> Vec<(&'static str, &'static str, Call<'_>)> {
    let Clients { plugins, kv, logs } = c;
    let (p1, p2, p3, p4, p5, p6) = (
        plugins.clone(),
        plugins.clone(),
        plugins.clone(),
        plugins.clone(),
        plugins.clone(),
        plugins.clone(),
    );
    let (k1, k2, k3) = (kv.clone(), kv.clone(), kv.clone());
    let (l1, l2) = (logs.clone(), logs.clone());
    let filter = |id: &String| {
        Some(pb::LogFilter {
            plugin_ids: vec![id.clone()],
            min_level: 0,
            contains: String::new(),
        })
    };
    let (i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11) = (
        id.clone(),
        id.clone(),
        id.clone(),
        id.clone(),
        id.clone(),
        id.clone(),
        id.clone(),
        id.clone(),
        id.clone(),
        id.clone(),
        id.clone(),
    );
    vec![
        (
            "GetPlugin",
            "plugin_id",
            Box::pin(async move {
                let mut p = p1;
                p.get_plugin(pb::GetPluginRequest { plugin_id: i1 })
                    .await
                    .map(|_| ())
            }),
        ),
        (
            "EnablePlugin",
            "plugin_id",
            Box::pin(async move {
                let mut p = p2;
                p.enable_plugin(pb::EnablePluginRequest { plugin_id: i2 })
                    .await
                    .map(|_| ())
            }),
        ),
        (
            "DisablePlugin",
            "plugin_id",
            Box::pin(async move {
                let mut p = p3;
                p.disable_plugin(pb::DisablePluginRequest { plugin_id: i3 })
                    .await
                    .map(|_| ())
            }),
        ),
        (
            "RestartPlugin",
            "plugin_id",
            Box::pin(async move {
                let mut p = p4;
                p.restart_plugin(pb::RestartPluginRequest { plugin_id: i4 })
                    .await
                    .map(|_| ())
            }),
        ),
        (
            "CallPlugin",
            "plugin_id",
            Box::pin(async move {
                let mut p = p5;
                p.call_plugin(pb::CallPluginRequest {
                    plugin_id: i5,
                    method: "GET".into(),
                    path: "/".into(),
                    headers: vec![],
                    body: vec![],
                })
                .await
                .map(|_| ())
            }),
        ),
        (
            "WatchEvents",
            "plugin_ids",
            Box::pin(async move {
                let mut p = p6;
                p.watch_events(pb::WatchEventsRequest {
                    after_seq: None,
                    plugin_ids: vec![i6],
                })
                .await
                .map(|_| ())
            }),
        ),
        (
            "GetValue",
            "plugin_id",
            Box::pin(async move {
                let mut k = k1;
                k.get_value(pb::GetValueRequest {
                    plugin_id: i7,
                    key: "k".into(),
                })
                .await
                .map(|_| ())
            }),
        ),
        (
            "SetValue",
            "plugin_id",
            Box::pin(async move {
                let mut k = k2;
                k.set_value(pb::SetValueRequest {
                    plugin_id: i8,
                    key: "k".into(),
                    value: "v".into(),
                })
                .await
                .map(|_| ())
            }),
        ),
        (
            "DeleteValue",
            "plugin_id",
            Box::pin(async move {
                let mut k = k3;
                k.delete_value(pb::DeleteValueRequest {
                    plugin_id: i9,
                    key: "k".into(),
                })
                .await
                .map(|_| ())
            }),
        ),
        (
            "QueryLogs",
            "filter.plugin_ids",
            Box::pin(async move {
                let mut l = l1;
                l.query_logs(pb::QueryLogsRequest {
                    filter: filter(&i10),
                    ..Default::default()
                })
                .await
                .map(|_| ())
            }),
        ),
        (
            "StreamLogs",
            "filter.plugin_ids",
            Box::pin(async move {
                let mut l = l2;
                l.stream_logs(pb::StreamLogsRequest {
                    filter: filter(&i11),
                    start: None,
                    follow: false,
                })
                .await
                .map(|_| ())
            }),
        ),
    ]
}

async fn daemon() -> (Daemon, Clients) {
    // Room for the 10 MB ids: the default 4 MiB message limit would refuse them first
    // (OUT_OF_RANGE), which is also correct but not what this test checks.
    let mut d = Daemon::new(&["--max-message-bytes", "16777216"]);
    d.install_hello("hello");
    d.start().await;
    let mut plugins = d.client().await;
    Events::watch(&mut plugins, Some(0))
        .await
        .wait_added(&["hello"])
        .await;
    enable(&mut plugins, "hello").await;
    let channel = d.channel().await;
    let kv = KvServiceClient::new(channel.clone()).max_encoding_message_size(usize::MAX);
    let logs = LogServiceClient::new(channel.clone()).max_encoding_message_size(usize::MAX);
    let plugins = plugins.max_encoding_message_size(usize::MAX);
    (d, Clients { plugins, kv, logs })
}

fn check(rpc: &str, case: &str, field: &str, result: Result<(), tonic::Status>) {
    let err = result.expect_err(&format!("{rpc} accepted {case}"));
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{rpc} with {case}: {err:?}"
    );
    assert!(
        err.message().starts_with(field) || err.message().contains(&format!("{field}:")),
        "{rpc} with {case}: the message does not name {field}: {}",
        err.message()
    );
    assert!(
        err.message().len() < 1024,
        "{rpc} with {case}: the message echoes the input"
    );
}

#[tokio::test]
async fn every_rpc_refuses_ids_that_are_not_plugin_ids() {
    let (_d, mut clients) = daemon().await;
    for (case, id) in bad_ids() {
        for (rpc, field, call) in calls_with_id(&mut clients, id.clone()) {
            check(rpc, case, field, call.await);
        }
    }
    // Still serving.
    get(&mut clients.plugins, "hello").await;
}

#[tokio::test]
async fn every_rpc_refuses_bad_numbers_enums_tokens_and_keys() {
    let (_d, mut c) = daemon().await;
    let hello = || {
        Some(pb::LogFilter {
            plugin_ids: vec!["hello".into()],
            min_level: 0,
            contains: String::new(),
        })
    };
    let with_level = |level: i32| {
        Some(pb::LogFilter {
            plugin_ids: vec!["hello".into()],
            min_level: level,
            contains: String::new(),
        })
    };
    // ListPlugins: page sizes and tokens.
    for (case, size, token, field) in [
        ("negative page size", -1, "", "page_size"),
        ("huge page size", i32::MAX, "", "page_size"),
        ("malformed page token", 0, "not a token", "page_token"),
        ("page token of bytes", 0, "\u{0}\u{1}", "page_token"),
    ] {
        let r = c
            .plugins
            .list_plugins(pb::ListPluginsRequest {
                page_size: size,
                page_token: token.into(),
            })
            .await
            .map(|_| ());
        check("ListPlugins", case, field, r);
    }
    // QueryLogs: page sizes, tokens, unknown levels, seq bounds without one plugin.
    let queries = [
        (
            "negative page size",
            pb::QueryLogsRequest {
                page_size: -5,
                filter: hello(),
                ..Default::default()
            },
            "page_size",
        ),
        (
            "huge page size",
            pb::QueryLogsRequest {
                page_size: 1_000_000,
                filter: hello(),
                ..Default::default()
            },
            "page_size",
        ),
        (
            "malformed page token",
            pb::QueryLogsRequest {
                page_token: "zz".into(),
                filter: hello(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            "page token of valid hex but no token",
            pb::QueryLogsRequest {
                page_token: "00ff".into(),
                filter: hello(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            "unknown level",
            pb::QueryLogsRequest {
                filter: with_level(99),
                ..Default::default()
            },
            "filter.min_level",
        ),
        (
            "negative level",
            pb::QueryLogsRequest {
                filter: with_level(-1),
                ..Default::default()
            },
            "filter.min_level",
        ),
        (
            "after_seq without one plugin",
            pb::QueryLogsRequest {
                after_seq: 5,
                ..Default::default()
            },
            "after_seq",
        ),
    ];
    for (case, req, field) in queries {
        let r = c.logs.query_logs(req).await.map(|_| ());
        check("QueryLogs", case, field, r);
    }
    // StreamLogs: unknown levels and malformed cursors.
    let cursors = |list: &[&str]| {
        Some(pb::stream_logs_request::Start::AfterCursors(pb::Cursors {
            cursors: list.iter().map(|s| s.to_string()).collect(),
        }))
    };
    let streams = [
        (
            "unknown level",
            pb::StreamLogsRequest {
                filter: with_level(42),
                start: None,
                follow: false,
            },
            "filter.min_level",
        ),
        (
            "cursor without a seq",
            pb::StreamLogsRequest {
                filter: hello(),
                start: cursors(&["hello"]),
                follow: false,
            },
            "after_cursors",
        ),
        (
            "cursor with a bad seq",
            pb::StreamLogsRequest {
                filter: hello(),
                start: cursors(&["hello:-1"]),
                follow: false,
            },
            "after_cursors",
        ),
        (
            "cursor with a bad id",
            pb::StreamLogsRequest {
                filter: hello(),
                start: cursors(&["../x:5"]),
                follow: false,
            },
            "after_cursors",
        ),
    ];
    for (case, req, field) in streams {
        let r = c.logs.stream_logs(req).await.map(|_| ());
        check("StreamLogs", case, field, r);
    }
    // KV: keys and values.
    for (case, key) in [("empty key", String::new()), ("long key", "k".repeat(513))] {
        let r =
            c.kv.get_value(pb::GetValueRequest {
                plugin_id: "hello".into(),
                key: key.clone(),
            })
            .await
            .map(|_| ());
        check("GetValue", case, "key", r);
        let r =
            c.kv.set_value(pb::SetValueRequest {
                plugin_id: "hello".into(),
                key: key.clone(),
                value: "v".into(),
            })
            .await
            .map(|_| ());
        check("SetValue", case, "key", r);
        let r =
            c.kv.delete_value(pb::DeleteValueRequest {
                plugin_id: "hello".into(),
                key,
            })
            .await
            .map(|_| ());
        check("DeleteValue", case, "key", r);
    }
    let r =
        c.kv.set_value(pb::SetValueRequest {
            plugin_id: "hello".into(),
            key: "k".into(),
            value: "v".repeat(1024 * 1024 + 1),
        })
        .await
        .map(|_| ());
    check("SetValue", "a value over 1 MiB", "value", r);
    // CallPlugin: methods, paths and header names.
    let call = |method: &str, path: &str, header: &str| pb::CallPluginRequest {
        plugin_id: "hello".into(),
        method: method.into(),
        path: path.into(),
        headers: vec![pb::Header {
            name: header.into(),
            value: "v".into(),
        }],
        body: vec![],
    };
    for (case, req, field) in [
        ("empty method", call("", "/", "x"), "method"),
        ("method with a space", call("GE T", "/", "x"), "method"),
        ("path without a slash", call("GET", "items", "x"), "path"),
        ("empty header name", call("GET", "/", ""), "headers"),
        (
            "header name with a newline",
            call("GET", "/", "a\nb"),
            "headers",
        ),
    ] {
        let r = c.plugins.call_plugin(req).await.map(|_| ());
        check("CallPlugin", case, field, r);
    }
    get(&mut c.plugins, "hello").await;
}
