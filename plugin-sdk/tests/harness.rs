//! The SDK through its in-process harness: the real connection code, the harness as host.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;
use toru_plugin_sdk::testing::{cancel_envelope, kv_envelope, Harness, HarnessError};
use toru_plugin_sdk::{Context, HttpRequest, HttpResponse, KvOp, Metadata, Plugin, PluginError};

/// A plugin whose behaviour is steered by the request path.
#[derive(Default)]
struct Probe {
    barrier: Option<Arc<Barrier>>,
    dropped: Arc<AtomicBool>,
    shut_down: Arc<AtomicBool>,
    fail_init: bool,
}

/// Sets its flag when dropped (a cancelled handler drops its future).
struct OnDrop(Arc<AtomicBool>);
impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Plugin for Probe {
    fn metadata(&self) -> Metadata {
        Metadata::new("probe", "Probe", "1", "/probe")
    }

    async fn init(&self, ctx: &Context) -> Result<(), PluginError> {
        if self.fail_init {
            return Err(PluginError::internal("no configuration"));
        }
        // Storage works during init.
        ctx.storage.set("started", "yes").await?;
        Ok(())
    }

    async fn call(&self, ctx: &Context, req: HttpRequest) -> Result<HttpResponse, PluginError> {
        match req.path.as_str() {
            "/meet" => {
                self.barrier.as_ref().unwrap().wait().await;
                Ok(HttpResponse::text("met"))
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                ctx.storage.set("slow", "done").await?;
                Ok(HttpResponse::text("slow"))
            }
            "/teapot" => Err(PluginError::new("failed_precondition", "no tea")),
            "/list" => {
                let (first, more) = ctx.storage.list("k", "", 2).await?;
                let (rest, _) = ctx.storage.list("k", first.last().unwrap(), 2).await?;
                Ok(HttpResponse::text(format!("{first:?} {more} {rest:?}")))
            }
            "/bad-header" => Ok(HttpResponse {
                status: 200,
                headers: BTreeMap::from([("x-a".into(), "1\r\nSet-Cookie: a=b".into())]),
                body: None,
            }),
            "/bad-status" => Ok(HttpResponse {
                status: 1000,
                headers: BTreeMap::new(),
                body: None,
            }),
            "/binary" => Ok(HttpResponse {
                status: 200,
                headers: BTreeMap::new(),
                body: req.body,
            }),
            _ => Err(PluginError::not_found(format!("no route {}", req.path))),
        }
    }

    async fn kv(&self, ctx: &Context, op: KvOp) -> Result<Option<String>, PluginError> {
        if op
            == (KvOp::Get {
                key: "stall".into(),
            })
        {
            let _guard = OnDrop(self.dropped.clone());
            std::future::pending::<()>().await;
        }
        toru_plugin_sdk::default_kv(ctx, op).await
    }

    async fn shutdown(&self, ctx: &Context) {
        // Storage still works in the shutdown hook.
        if ctx.storage.set("bye", "saved").await.is_ok() {
            self.shut_down.store(true, Ordering::SeqCst);
        }
    }
}

fn get(key: &str) -> KvOp {
    KvOp::Get { key: key.into() }
}

#[tokio::test]
async fn default_kv_keeps_values_in_the_hosts_storage() {
    let host = Harness::start(Probe::default()).await.unwrap();
    assert_eq!(host.kv(get("color")).await.unwrap(), None);
    let set = KvOp::Set {
        key: "color".into(),
        value: "blue".into(),
    };
    assert_eq!(host.kv(set).await.unwrap().as_deref(), Some("blue"));
    assert_eq!(host.storage()["color"], "blue");
    assert_eq!(host.storage()["started"], "yes");
    let old = host
        .kv(KvOp::Delete {
            key: "color".into(),
        })
        .await
        .unwrap();
    assert_eq!(old.as_deref(), Some("blue"));
    assert!(!host.storage().contains_key("color"));
    // An empty key is refused by the host's storage, and the error reaches the caller.
    let e = host.kv(get("")).await.unwrap_err();
    assert_eq!(e.code, "invalid_argument");
    host.shutdown().await.unwrap();
}

#[tokio::test]
async fn what_was_stored_before_a_restart_is_read_back() {
    let stored = BTreeMap::from([("color".to_owned(), "green".to_owned())]);
    let host = Harness::with_storage(Probe::default(), stored)
        .await
        .unwrap();
    assert_eq!(
        host.kv(get("color")).await.unwrap().as_deref(),
        Some("green")
    );
    host.shutdown().await.unwrap();
}

#[tokio::test]
async fn requests_are_handled_concurrently() {
    let plugin = Probe {
        barrier: Some(Arc::new(Barrier::new(2))),
        ..Probe::default()
    };
    let host = Harness::start(plugin).await.unwrap();
    let meet = || HttpRequest {
        method: "GET".into(),
        path: "/meet".into(),
        ..HttpRequest::default()
    };
    // Each call waits for the other: served one at a time, neither would return.
    let (a, b) = tokio::join!(host.call(meet()), host.call(meet()));
    assert_eq!(a.unwrap().body.as_deref(), Some(&b"met"[..]));
    assert_eq!(b.unwrap().status, 200);
}

#[tokio::test]
async fn a_cancelled_request_is_dropped_and_the_plugin_keeps_serving() {
    let dropped = Arc::new(AtomicBool::new(false));
    let plugin = Probe {
        dropped: dropped.clone(),
        ..Probe::default()
    };
    let host = Arc::new(Harness::start(plugin).await.unwrap());
    let stalled = {
        let host = host.clone();
        tokio::spawn(async move { host.request(kv_envelope("stuck-1", &get("stall"))).await })
    };
    // Wait until the handler runs (its future exists), then cancel it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        host.ping().await.unwrap();
        host.send(cancel_envelope("stuck-1")).unwrap();
        if dropped.load(Ordering::SeqCst) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never cancelled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.ping().await.unwrap();
    assert_eq!(
        host.kv(get("started")).await.unwrap().as_deref(),
        Some("yes")
    );
    // The cancelled request is never answered: later requests were, it was not.
    host.ping().await.unwrap();
    assert!(!stalled.is_finished(), "a cancelled request was answered");
    stalled.abort();
}

#[tokio::test]
async fn handler_errors_and_binary_bodies_reach_the_caller() {
    let host = Harness::start(Probe::default()).await.unwrap();
    let req = |path: &str, body: Option<Vec<u8>>| HttpRequest {
        method: "POST".into(),
        path: path.into(),
        headers: BTreeMap::new(),
        body,
    };
    let e = host.call(req("/teapot", None)).await.unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.message.as_str()),
        ("failed_precondition", "no tea")
    );
    assert_eq!(
        host.call(req("/nope", None)).await.unwrap_err().code,
        "not_found"
    );
    for (path, what) in [
        (
            "/bad-header",
            "the value of \"x-a\" contains a line break or NUL",
        ),
        ("/bad-status", "status 1000 is not an HTTP status"),
    ] {
        let e = host.call(req(path, None)).await.unwrap_err();
        assert_eq!(e.code, "internal", "{path}");
        assert!(
            e.message.starts_with("torud would refuse this answer: ") && e.message.contains(what),
            "{path}: {}",
            e.message
        );
    }
    let bytes = vec![0, 255, 10, 159];
    let echoed = host
        .call(req("/binary", Some(bytes.clone())))
        .await
        .unwrap();
    assert_eq!(echoed.body, Some(bytes));
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_then_runs_the_hook() {
    let shut_down = Arc::new(AtomicBool::new(false));
    let plugin = Probe {
        shut_down: shut_down.clone(),
        ..Probe::default()
    };
    let host = Arc::new(Harness::start(plugin).await.unwrap());
    let slow = {
        let host = host.clone();
        tokio::spawn(async move {
            host.call(HttpRequest {
                path: "/slow".into(),
                ..HttpRequest::default()
            })
            .await
        })
    };
    // The ping is answered after the slow call was read, so the call is in flight.
    host.ping().await.unwrap();
    host.shutdown().await.unwrap();
    let answer = slow.await.unwrap().unwrap();
    assert_eq!(answer.body.as_deref(), Some(&b"slow"[..]));
    assert_eq!(host.storage()["slow"], "done");
    assert!(shut_down.load(Ordering::SeqCst));
    assert_eq!(host.storage()["bye"], "saved");
}

#[tokio::test]
async fn a_failing_init_stops_the_plugin_with_its_reason() {
    let plugin = Probe {
        fail_init: true,
        ..Probe::default()
    };
    match Harness::start(plugin).await {
        Err(HarnessError::Stopped(reason)) => {
            assert!(reason.contains("no configuration"), "{reason}")
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("started despite a failing init"),
    }
}

#[tokio::test]
async fn storage_lists_keys_in_pages() {
    let stored: BTreeMap<String, String> = ["k1", "k2", "k3", "x"]
        .iter()
        .map(|k| (k.to_string(), String::new()))
        .collect();
    let host = Harness::with_storage(Probe::default(), stored)
        .await
        .unwrap();
    let answer = host
        .call(HttpRequest {
            path: "/list".into(),
            ..HttpRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(
        answer.body.as_deref(),
        Some(&br#"["k1", "k2"] true ["k3"]"#[..])
    );
}
