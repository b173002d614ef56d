//! The checker's steps on a ready plugin's link: heartbeat, KV (set, get, delete, absent,
//! and whether the value reached the host's durable storage), call, and for protocol 2,
//! concurrent requests and cancel. Each step adds its outcome to the report.
//! It knows nothing of the plugin's process.

use std::time::{Duration, Instant};

use toru_plugin_sdk::storage_wire::{StorageAnswer, StorageOp};
use toru_plugin_sdk::wire::HttpCall;
use toru_plugin_sdk::{Envelope, KvOp, MessageType};

use super::{ms, Outcome, Report};
use crate::plugin::link::{new_request_id, Link, LinkError};
use crate::store::storage::Namespace;

/// The key the KV steps use.
const KEY: &str = "torud-check";

/// Heartbeat, KV, call, and (protocol 2) concurrency and cancel steps.
pub(super) async fn run(
    report: &mut Report,
    link: &Link,
    protocol: u32,
    limit: Duration,
    storage: Option<&Namespace>,
) {
    if protocol >= 2 {
        heartbeat(report, link, limit).await;
    } else {
        report.add(
            "heartbeat",
            Outcome::Skip("protocol 1 has no heartbeat".into()),
        );
    }
    kv(report, link, limit, storage).await;
    call(report, link, limit).await;
    if protocol >= 2 {
        concurrency(report, link, limit).await;
        cancel(report, link, limit).await;
    } else {
        for name in ["concurrency", "cancel"] {
            report.add(
                name,
                Outcome::Skip("protocol 1 has one message per connection".into()),
            );
        }
    }
}

/// The `heartbeat` step: `ping` answered with `pong`.
async fn heartbeat(report: &mut Report, link: &Link, limit: Duration) {
    let sent = Instant::now();
    let outcome = match link.ping(limit).await {
        Ok(()) => {
            report.supports.push("heartbeat".into());
            Outcome::Pass(format!("pong {} after ping", ms(sent.elapsed())))
        }
        Err(e) => Outcome::Fail(format!(
            "ping: {e}; answer ping with pong carrying its request_id"
        )),
    };
    report.add("heartbeat", outcome);
}

/// The `kv` steps: a value set, read back, deleted, and then absent; and whether the
/// value reached the host's durable storage.
async fn kv(report: &mut Report, link: &Link, limit: Duration, storage: Option<&Namespace>) {
    let value = format!("value-{}", new_request_id());
    let set = match link
        .kv(
            &KvOp::Set {
                key: KEY.into(),
                value: value.clone(),
            },
            limit,
        )
        .await
    {
        Ok(_) => Outcome::Pass(format!("set {KEY:?}")),
        Err(e) => Outcome::Fail(format!("{e}")),
    };
    if !report.add("kv set", set) {
        return;
    }
    let got = match link.kv(&KvOp::Get { key: KEY.into() }, limit).await {
        Ok(Some(v)) if v == value => Outcome::Pass("read back the value set".into()),
        Ok(other) => Outcome::Fail(format!("read {other:?} back after setting {value:?}")),
        Err(e) => Outcome::Fail(e.to_string()),
    };
    report.add("kv get", got);
    if let Some(ns) = storage {
        if stored_durably(ns, &value).await {
            report
                .supports
                .push("durable storage (KV kept by the host)".into());
        }
    }
    let deleted = match link.kv(&KvOp::Delete { key: KEY.into() }, limit).await {
        Ok(Some(v)) if v == value => Outcome::Pass("answered the old value".into()),
        Ok(None) => {
            Outcome::Pass("deleted (answered null; the host cannot tell the key existed)".into())
        }
        Ok(Some(other)) => {
            Outcome::Fail(format!("answered {other:?}; answer the old value or null"))
        }
        Err(e) => Outcome::Fail(e.to_string()),
    };
    report.add("kv delete", deleted);
    let gone = match link.kv(&KvOp::Get { key: KEY.into() }, limit).await {
        Ok(None) => Outcome::Pass("a deleted key reads as null".into()),
        Ok(Some(v)) => Outcome::Fail(format!(
            "a deleted key still reads {v:?}; answer null for an absent key"
        )),
        Err(e) => Outcome::Fail(e.to_string()),
    };
    report.add("kv absent", gone);
}

/// Whether the host's storage namespace holds `value` under [`KEY`]: the plugin keeps its
/// KV in the host's durable storage.
async fn stored_durably(ns: &Namespace, value: &str) -> bool {
    let op = StorageOp::Get { key: KEY.into() };
    matches!(ns.apply(op).await, Ok(StorageAnswer::Value(Some(v))) if v == value)
}

/// The `call` step: an HTTP call answered, with a response or an error.
async fn call(report: &mut Report, link: &Link, limit: Duration) {
    let call = HttpCall {
        method: "GET".into(),
        path: "/torud-check?probe=1".into(),
        headers: vec![("x-torud-check".into(), "1".into())],
        body: None,
    };
    let sent = Instant::now();
    let outcome = match link.call(&call, limit).await {
        Ok(answer) => Outcome::Pass(format!(
            "status {} with {} body bytes, {} after the call",
            answer.status,
            answer.body.len(),
            ms(sent.elapsed())
        )),
        Err(LinkError::Refused { code, message }) => {
            Outcome::Pass(format!("answered an error ({code}: {message})"))
        }
        Err(e) => Outcome::Fail(e.to_string()),
    };
    report.add("call", outcome);
}

/// Requests the `concurrency` step keeps in flight at once.
const CONCURRENT: usize = 16;

/// The `concurrency` step: [`CONCURRENT`] requests in flight at once, all answered.
async fn concurrency(report: &mut Report, link: &Link, limit: Duration) {
    let many = (0..CONCURRENT).map(|i| {
        let key = format!("torud-check-{i}");
        async move { link.kv(&KvOp::Get { key }, limit).await }
    });
    let failed: Vec<String> = futures::future::join_all(many)
        .await
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    let outcome = match failed.first() {
        None => Outcome::Pass(format!(
            "{CONCURRENT} requests in flight at once, all answered"
        )),
        Some(first) => Outcome::Fail(format!(
            "{} of {CONCURRENT} concurrent requests failed: {first}",
            failed.len()
        )),
    };
    report.add("concurrency", outcome);
}

/// The `cancel` step: a cancel for a request the plugin already answered (or never saw)
/// is ignored, and the plugin still serves.
async fn cancel(report: &mut Report, link: &Link, limit: Duration) {
    let cancel = Envelope::bare(MessageType::Cancel, new_request_id());
    let outcome = match link.notify(&cancel).await {
        Ok(()) => match link.ping(limit).await {
            Ok(()) => {
                report.supports.push("cancel".into());
                Outcome::Pass("a cancel for an unknown request was ignored; still serving".into())
            }
            Err(e) => Outcome::Fail(format!("after a cancel: {e}")),
        },
        Err(e) => Outcome::Fail(format!("sending cancel: {e}")),
    };
    report.add("cancel", outcome);
}
