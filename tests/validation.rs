//! Every RPC validates its fields: table-driven, through the real daemon. Each bad request
//! must come back INVALID_ARGUMENT with a message naming the field, and the daemon must keep
//! serving.

mod common;

use common::*;
use tonic::transport::Channel;
use torud_api::pb;
use torud_api::pb::kv_service_client::KvServiceClient;
use torud_api::pb::log_service_client::LogServiceClient;

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

#[tokio::test]
async fn a_page_token_only_continues_the_query_that_made_it() {
    let (_d, mut c) = daemon().await;
    let query = |contains: &str, page_token: String| pb::QueryLogsRequest {
        filter: Some(pb::LogFilter {
            plugin_ids: vec!["hello".into()],
            min_level: 0,
            contains: contains.into(),
        }),
        page_size: 1,
        page_token,
        ..Default::default()
    };
    let first = c
        .logs
        .query_logs(query("", String::new()))
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty(), "hello's log has more than one record");
    // The same query continues; a page size of its own is fine.
    let mut same = query("", token.clone());
    same.page_size = 5;
    c.logs.query_logs(same).await.unwrap();
    let since = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let mut changed = vec![
        ("another text filter", query("spawned", token.clone())),
        ("another order", {
            let mut q = query("", token.clone());
            q.newest_first = true;
            q
        }),
        ("a since bound", {
            let mut q = query("", token.clone());
            q.since = since(1);
            q
        }),
        ("an until bound", {
            let mut q = query("", token.clone());
            q.until = since(4_000_000_000);
            q
        }),
        ("another level", {
            let mut q = query("", token.clone());
            q.filter.as_mut().unwrap().min_level = pb::LogLevel::Warn as i32;
            q
        }),
        ("a seq bound", {
            let mut q = query("", token.clone());
            q.before_seq = 1000;
            q
        }),
    ];
    for (case, req) in changed.drain(..) {
        let r = c.logs.query_logs(req).await.map(|_| ());
        check("QueryLogs", case, "page_token", r);
    }
}

#[tokio::test]
async fn times_before_1677_or_after_2262_are_bounds_not_empty_answers() {
    let (_d, mut c) = daemon().await;
    let at = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
    let query = |since, until| pb::QueryLogsRequest {
        filter: Some(pb::LogFilter {
            plugin_ids: vec!["hello".into()],
            min_level: 0,
            contains: String::new(),
        }),
        since,
        until,
        ..Default::default()
    };
    let all = c
        .logs
        .query_logs(query(None, None))
        .await
        .unwrap()
        .into_inner()
        .records
        .len();
    assert!(all > 0);
    // Year 1500, year 1, 1970, the year 3000 and 9999 as bounds: nothing is before or after.
    for (case, since, until) in [
        ("since 1500", at(-14_831_769_600, 0), None),
        ("since year 1", at(-62_135_596_800, 0), None),
        ("since 1970", at(0, 0), None),
        ("until 3000", None, at(32_503_680_000, 0)),
        ("until 9999", None, at(253_402_300_799, 999_999_999)),
        (
            "1500 to 3000",
            at(-14_831_769_600, 0),
            at(32_503_680_000, 0),
        ),
    ] {
        let got = c
            .logs
            .query_logs(query(since, until))
            .await
            .unwrap_or_else(|e| panic!("{case}: {e:?}"))
            .into_inner()
            .records
            .len();
        assert_eq!(got, all, "{case}");
    }
    let mut logs = c.logs.clone();
    let mut stream = logs
        .stream_logs(pb::StreamLogsRequest {
            filter: query(None, None).filter,
            start: Some(pb::stream_logs_request::Start::Since(
                at(-14_831_769_600, 0).unwrap(),
            )),
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut streamed = 0;
    while let Some(r) = stream.message().await.unwrap() {
        streamed += r.records.len();
    }
    assert!(
        streamed >= all,
        "StreamLogs since 1500: {streamed} of {all}"
    );
    // Not a time at all: refused, naming the field.
    for (case, since, until, field) in [
        ("negative nanos", at(0, -1), None, "since"),
        ("a billion nanos", None, at(0, 1_000_000_000), "until"),
        ("before year 1", at(-62_135_596_801, 0), None, "since"),
        ("after year 9999", None, at(253_402_300_800, 0), "until"),
    ] {
        let r = c.logs.query_logs(query(since, until)).await.map(|_| ());
        check("QueryLogs", case, field, r);
    }
}

/// `GetPluginRequest` and `QueryLogsRequest` with their string fields as raw bytes, to send
/// what a well-behaved client cannot: invalid UTF-8.
mod raw {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetPluginRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub plugin_id: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LogFilter {
        #[prost(bytes = "vec", repeated, tag = "1")]
        pub plugin_ids: Vec<Vec<u8>>,
        #[prost(bytes = "vec", tag = "3")]
        pub contains: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueryLogsRequest {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<LogFilter>,
    }
}

/// Calls `path` with `request` encoded as is, expecting a `Resp`.
async fn raw_call<Req, Resp>(
    channel: Channel,
    path: &'static str,
    request: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(
        tonic::Request::new(request),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn invalid_utf8_in_a_string_field_is_invalid_argument_naming_it() {
    let (d, mut c) = daemon().await;
    let channel = d.channel().await;
    let r = raw_call::<_, pb::GetPluginResponse>(
        channel.clone(),
        "/toru.v1.PluginService/GetPlugin",
        raw::GetPluginRequest {
            plugin_id: b"hel\xfflo".to_vec(),
        },
    )
    .await
    .map(|_| ());
    check("GetPlugin", "invalid UTF-8", "plugin_id", r);
    let r = raw_call::<_, pb::QueryLogsResponse>(
        channel,
        "/toru.v1.LogService/QueryLogs",
        raw::QueryLogsRequest {
            filter: Some(raw::LogFilter {
                plugin_ids: vec![b"hello".to_vec()],
                contains: b"\xc3\x28".to_vec(),
            }),
        },
    )
    .await
    .map(|_| ());
    check("QueryLogs", "invalid UTF-8", "contains", r);
    get(&mut c.plugins, "hello").await;
}
