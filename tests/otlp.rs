//! OpenTelemetry export, through the real daemon to a real OTLP/gRPC receiver (built here on
//! the OpenTelemetry project's `opentelemetry-proto` services): a 10,000-line burst arrives
//! whole with its severities and attributes; a caller's `traceparent` continues into the
//! daemon's span and on into the plugin's own log record; and a receiver stopped and
//! restarted mid-burst loses only what `torud_otlp_dropped_total` says.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Metric};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use torud_api::pb;

/// A log record as received, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    resource: HashMap<String, String>,
    record: LogRecord,
}

/// What the receiver got: every log record and span, in arrival order.
#[derive(Debug, Clone, Default)]
struct Collected {
    logs: Arc<Mutex<Vec<Received>>>,
    spans: Arc<Mutex<Vec<Span>>>,
    /// The metrics of the latest export.
    metrics: Arc<Mutex<Vec<Metric>>>,
    /// The `x-tenant` header of each logs export.
    tenants: Arc<Mutex<Vec<String>>>,
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> Option<String> {
    match value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .filter_map(|kv| Some((kv.key.clone(), text(&kv.value)?)))
        .collect()
}

#[tonic::async_trait]
impl LogsService for Collected {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let tenant = request
            .metadata()
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned());
        self.tenants
            .lock()
            .unwrap()
            .push(tenant.unwrap_or_default());
        let mut logs = self.logs.lock().unwrap();
        for resource_logs in request.into_inner().resource_logs {
            let resource = attributes(
                &resource_logs
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default(),
            );
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_logs.scope_logs {
                for record in scope.log_records {
                    logs.push(Received {
                        service: service.clone(),
                        resource: resource.clone(),
                        record,
                    });
                }
            }
        }
        Ok(Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Collected {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collected {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut latest = Vec::new();
        for resource_metrics in request.into_inner().resource_metrics {
            for scope in resource_metrics.scope_metrics {
                latest.extend(scope.metrics);
            }
        }
        *self.metrics.lock().unwrap() = latest;
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collected {
    fn logs_of(&self, service: &str) -> Vec<Received> {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .filter(|r| r.service == service)
            .cloned()
            .collect()
    }

    /// The burst's line numbers received from `service`, each with how often it came.
    fn burst_lines(&self, service: &str) -> HashMap<u64, usize> {
        let mut seen = HashMap::new();
        for r in self.logs_of(service) {
            let body = text(&r.record.body).unwrap_or_default();
            if let Some(n) = body.strip_prefix("line ") {
                *seen.entry(n.parse().unwrap()).or_insert(0) += 1;
            }
        }
        seen
    }
}

/// A receiver serving on `addr` until the returned sender is dropped or fired.
async fn serve(
    collected: &Collected,
    addr: SocketAddr,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    serve_with(collected, addr, tonic::transport::Server::builder()).await
}

/// [`serve`] on a server builder already set up (with TLS, say).
async fn serve_with(
    collected: &Collected,
    addr: SocketAddr,
    mut builder: tonic::transport::Server,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = builder
        .add_service(LogsServiceServer::new(collected.clone()))
        .add_service(TraceServiceServer::new(collected.clone()))
        .add_service(MetricsServiceServer::new(collected.clone()));
    let handle = tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    (stop, handle)
}

/// A running receiver on a free port: what it collects, the endpoint to give the daemon,
/// and its stop handle.
async fn receiver() -> (
    Collected,
    String,
    (oneshot::Sender<()>, tokio::task::JoinHandle<()>),
) {
    let collected = Collected::default();
    let addr = free_addr();
    let running = serve(&collected, addr).await;
    (collected, format!("http://{addr}"), running)
}

/// A free loopback port for the receiver (bound and released; the receiver binds it again).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`start_enabled`] with the one plugin `id`, waiting until it is RUNNING.
async fn start_running(args: &[&str], install: impl FnOnce(&Daemon), id: &str) -> (Daemon, Client) {
    let (d, mut client) = start_enabled(args, install, &[id]).await;
    Events::watch(&mut client, Some(0))
        .await
        .wait_state(id, pb::PluginState::Running, SECS10)
        .await;
    (d, client)
}

/// A `GET path` call to the `hello` plugin.
fn hello_get(path: &str) -> pb::CallPluginRequest {
    pb::CallPluginRequest {
        plugin_id: "hello".into(),
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        body: vec![],
    }
}

const LEVELS: [(&str, i32); 5] = [
    ("TRACE", 1),
    ("DEBUG", 5),
    ("INFO", 9),
    ("WARN", 13),
    ("ERROR", 17),
];

const BURST: u64 = 10_000;

#[tokio::test]
async fn every_line_of_a_burst_arrives_with_its_severity_and_attributes() {
    let (collected, endpoint, _receiver) = receiver().await;
    let (_d, mut client) = start_running(
        &["--otlp-endpoint", &endpoint],
        |d| {
            d.install_fixture(
                "burst",
                "burst-json",
                &["--lines", &BURST.to_string(), "--version", "2.5"],
            );
        },
        "burst",
    )
    .await;
    let pid = get(&mut client, "burst").await.pid;

    let seen = wait_for(
        "the whole burst at the receiver",
        Duration::from_secs(60),
        || {
            let seen = collected.burst_lines("burst");
            (seen.len() as u64 == BURST).then_some(seen)
        },
    )
    .await;
    assert!(seen.values().all(|&n| n == 1), "no line twice");
    for r in collected.logs_of("burst") {
        let body = text(&r.record.body).unwrap();
        let Some(n) = body.strip_prefix("line ") else {
            continue;
        };
        let n: usize = n.parse().unwrap();
        let (text_level, number) = LEVELS[n % 5];
        assert_eq!(r.record.severity_text, text_level, "{body}");
        assert_eq!(r.record.severity_number, number, "{body}");
        let attrs = attributes(&r.record.attributes);
        assert_eq!(
            attrs.get("n"),
            Some(&n.to_string()),
            "{body}: its own field"
        );
        assert_eq!(
            attrs.get("log.iostream").map(String::as_str),
            Some("stdout")
        );
        assert_eq!(attrs.get("process.pid"), Some(&pid.to_string()));
        assert!(attrs.contains_key("torud.seq"));
        assert!(r.record.time_unix_nano > 1_700_000_000 * 1_000_000_000);
        assert_eq!(
            r.resource.get("service.version").map(String::as_str),
            Some("2.5")
        );
        assert!(!r.resource.get("host.name").unwrap().is_empty());
    }
    // Its lifecycle events come as OTLP events, under the plugin's resource.
    let running = wait_for("the running event", Duration::from_secs(10), || {
        collected.logs_of("burst").into_iter().find(|r| {
            r.record.event_name == "torud.state_changed"
                && attributes(&r.record.attributes)
                    .get("torud.to_state")
                    .map(String::as_str)
                    == Some("running")
        })
    })
    .await;
    assert_eq!(
        attributes(&running.record.attributes)
            .get("torud.plugin_id")
            .map(String::as_str),
        Some("burst")
    );
}

#[tokio::test]
async fn a_callers_trace_continues_through_the_daemon_into_the_plugins_log() {
    let (collected, endpoint, _receiver) = receiver().await;
    let (_d, mut client) = start_running(
        &["--otlp-endpoint", &endpoint],
        |d| {
            // The Rust example logs each greeting at debug.
            let hello = example_path("hello-plugin");
            write_executable(
                &d.plugins_dir.join("hello.binary"),
                &format!(
                    "#!/bin/sh\nTORU_LOG=debug exec {} \"$@\"\n",
                    hello.display()
                ),
            );
        },
        "hello",
    )
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = Request::new(hello_get("/traced"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let answer = client.call_plugin(request).await.unwrap().into_inner();
    assert_eq!(answer.status, 200);

    let span = wait_for("the daemon's span", SECS10, || {
        let spans = collected.spans.lock().unwrap();
        spans.iter().find(|s| hex(&s.trace_id) == trace_id).cloned()
    })
    .await;
    assert_eq!(span.name, "toru.v1.PluginService/CallPlugin");
    assert_eq!(
        hex(&span.parent_span_id),
        caller_span,
        "a child of the caller's span"
    );
    assert_eq!(
        attributes(&span.attributes)
            .get("torud.plugin")
            .map(String::as_str),
        Some("hello")
    );
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);

    let greeting = wait_for("the plugin's log record in the trace", SECS10, || {
        collected.logs_of("hello").into_iter().find(|r| {
            attributes(&r.record.attributes)
                .get("path")
                .map(String::as_str)
                == Some("/traced")
        })
    })
    .await;
    assert_eq!(hex(&greeting.record.trace_id), trace_id);
    assert_eq!(
        hex(&greeting.record.span_id),
        hex(&span.span_id),
        "the plugin's record names the daemon's span"
    );

    // An untraced call starts a trace of its own.
    let untraced = hello_get("/untraced");
    client.call_plugin(untraced).await.unwrap();
    wait_for("a root span for the untraced call", SECS10, || {
        let spans = collected.spans.lock().unwrap();
        spans
            .iter()
            .find(|s| hex(&s.trace_id) != trace_id && s.parent_span_id.is_empty())
            .cloned()
    })
    .await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_receiver_stopped_mid_burst_loses_only_what_the_drop_metric_says() {
    let (collected, endpoint, (receiver, server)) = receiver().await;
    let addr: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    let (d, mut client) = start_enabled(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        |d| {
            d.install_fixture(
                "burst",
                "burst-json",
                &["--lines", &BURST.to_string(), "--gate"],
            );
        },
        &["burst"],
    )
    .await;
    let half = BURST / 2;
    wait_for(
        "the first half at the receiver",
        Duration::from_secs(60),
        || (collected.burst_lines("burst").len() as u64 == half).then_some(()),
    )
    .await;

    // The receiver goes away; the second half is logged while it is down.
    receiver.send(()).unwrap();
    server.await.unwrap();
    let pid = get(&mut client, "burst").await.pid;
    signal(pid, libc::SIGUSR1);
    wait_until("the burst captured", Duration::from_secs(60), || {
        d.log_text("burst").contains("burst done")
    })
    .await;
    wait_until("the outage noticed", Duration::from_secs(60), || {
        d.daemon_stderr().contains("OTLP export failing")
    })
    .await;
    let (_receiver, _) = serve(&collected, addr).await;

    // Everything arrives, or what did not is counted as dropped.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let (received, dropped) = loop {
        let seen = collected.burst_lines("burst");
        let text = scrape(&d).await;
        let dropped = sample(&text, r#"torud_otlp_dropped_total{signal="logs"}"#).unwrap() as u64;
        if seen.len() as u64 + dropped >= BURST {
            assert!(seen.keys().all(|&n| n < BURST));
            let exported =
                sample(&text, r#"torud_otlp_exported_total{signal="logs"}"#).unwrap() as u64;
            assert!(exported >= seen.len() as u64, "exported {exported}");
            break (seen.len() as u64, dropped);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} received, {dropped} counted as dropped, of {BURST}",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("after the outage: {received} received, {dropped} dropped");
    // The outage was reported in the daemon's log, once.
    let stderr = d.daemon_stderr();
    assert_eq!(stderr.matches("OTLP export failing").count(), 1, "{stderr}");
}

/// The value of the point of metric `name` whose attributes include `labels`, if the latest
/// export had it (a histogram's count).
fn point_value(metrics: &[Metric], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matches = |attrs: &[KeyValue]| {
        let attrs = attributes(attrs);
        labels
            .iter()
            .all(|(k, v)| attrs.get(*k).map(String::as_str) == Some(*v))
    };
    let number = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| match p.value {
        Some(number_data_point::Value::AsDouble(d)) => Some(d),
        Some(number_data_point::Value::AsInt(i)) => Some(i as f64),
        None => None,
    };
    match &metrics.iter().find(|m| m.name == name)?.data {
        Some(metric::Data::Gauge(g)) => g
            .data_points
            .iter()
            .find(|p| matches(&p.attributes))
            .and_then(number),
        Some(metric::Data::Sum(s)) => s
            .data_points
            .iter()
            .find(|p| matches(&p.attributes))
            .and_then(number),
        Some(metric::Data::Histogram(h)) => h
            .data_points
            .iter()
            .find(|p| matches(&p.attributes))
            .map(|p| p.count as f64),
        _ => None,
    }
}

#[tokio::test]
async fn the_metrics_reach_the_receiver_as_otlp_metrics() {
    let (collected, endpoint, _receiver) = receiver().await;
    let (_d, mut client) = start_running(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-metrics-interval",
            "200ms",
        ],
        |d| {
            d.install_hello("hello");
        },
        "hello",
    )
    .await;
    let call = hello_get("/");
    client.call_plugin(call).await.unwrap();

    let hello = [("plugin", "hello")];
    let call_ok = [("plugin", "hello"), ("op", "call"), ("code", "OK")];
    let call_latency = [("plugin", "hello"), ("op", "call")];
    wait_for(
        "the plugin and its call in the exported metrics",
        SECS10,
        || {
            let metrics = collected.metrics.lock().unwrap();
            let up = point_value(&metrics, "torud_plugin_up", &hello)?;
            let calls = point_value(&metrics, "torud_forwarded_requests", &call_ok)?;
            let timed = point_value(
                &metrics,
                "torud_forwarded_request_duration_seconds",
                &call_latency,
            )?;
            (up == 1.0 && calls == 1.0 && timed == 1.0).then_some(())
        },
    )
    .await;
    let metrics = collected.metrics.lock().unwrap().clone();
    let latency = metrics
        .iter()
        .find(|m| m.name == "torud_forwarded_request_duration_seconds")
        .unwrap();
    assert_eq!(latency.unit, "s");
    let Some(metric::Data::Sum(sum)) = &metrics
        .iter()
        .find(|m| m.name == "torud_forwarded_requests")
        .unwrap()
        .data
    else {
        panic!("a counter is a sum")
    };
    assert!(sum.is_monotonic);
}

#[tokio::test]
async fn export_reaches_a_tls_receiver_with_its_headers_and_checks_its_certificate() {
    let pki = pki();
    let collected = Collected::default();
    let addr = free_addr();
    let tls = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(&pki.server_cert, &pki.server_key),
    );
    let builder = tonic::transport::Server::builder().tls_config(tls).unwrap();
    let (_receiver, _) = serve_with(&collected, addr, builder).await;
    let endpoint = format!("https://localhost:{}", addr.port());
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca).unwrap();
    let ca = ca.path().display().to_string();

    let install = |d: &Daemon| {
        d.install_fixture("burst", "burst-json", &["--lines", "100"]);
    };
    let (_d, _) = start_enabled(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-ca",
            &ca,
            "--otlp-header",
            "x-tenant=blue",
        ],
        install,
        &["burst"],
    )
    .await;
    wait_for("the burst over TLS", SECS10, || {
        (collected.burst_lines("burst").len() == 100).then_some(())
    })
    .await;
    let tenants = collected.tenants.lock().unwrap().clone();
    assert!(tenants.iter().all(|t| t == "blue"), "{tenants:?}");

    // Without the CA, the receiver's certificate is not trusted: nothing is sent (this
    // daemon sends no x-tenant, so anything of its would show as "").
    let (untrusting, _) = start_enabled(&["--otlp-endpoint", &endpoint], install, &["burst"]).await;
    wait_until("the export refused", SECS10, || {
        untrusting.daemon_stderr().contains("OTLP export failing")
    })
    .await;
    let tenants = collected.tenants.lock().unwrap().clone();
    assert!(tenants.iter().all(|t| t == "blue"), "{tenants:?}");
}

#[tokio::test]
async fn the_last_records_before_a_shutdown_are_exported() {
    let (collected, endpoint, _receiver) = receiver().await;
    let (mut d, client) = start_running(
        &["--otlp-endpoint", &endpoint],
        |d| {
            d.install_hello("hello");
        },
        "hello",
    )
    .await;
    drop(client);
    assert!(d.stop().await.success());
    // Written as the daemon stopped the plugin, just before it exited.
    let logs = collected.logs_of("hello");
    let stopped_note = logs.iter().any(|r| {
        text(&r.record.body).is_some_and(|b| b.starts_with("stopped"))
            && attributes(&r.record.attributes)
                .get("log.iostream")
                .map(String::as_str)
                == Some("supervisor")
    });
    let stopped_event = logs.iter().any(|r| {
        r.record.event_name == "torud.state_changed"
            && attributes(&r.record.attributes)
                .get("torud.to_state")
                .map(String::as_str)
                == Some("stopped")
    });
    assert!(
        stopped_note && stopped_event,
        "{stopped_note} {stopped_event}"
    );
}
