//! The plugin side of the host's durable storage: a [`Storage`] handle that sends `storage`
//! requests on the plugin's connection and waits for the host's answers, matched by
//! `request_id`.
//!
//! The namespace is never sent: the host serves the connection's own plugin. This module
//! knows nothing of how the host stores data.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::storage_wire::{read_answer, StorageAnswer, StorageError, StorageOp};
use crate::wire::Envelope;

/// Longest wait for the host's answer to a storage request.
const STORAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The plugin's durable key-value storage, kept by the host. Cheap to clone; every method
/// is one round trip to the host, and a write is durable when it returns.
#[derive(Clone)]
pub struct Storage {
    inner: Option<Arc<Link>>,
}

/// The connection storage requests travel on.
pub(crate) struct Link {
    /// Weak, so that a `Storage` kept by the plugin never holds a closed connection open.
    out: mpsc::WeakUnboundedSender<Envelope>,
    pending: Pending,
    next_id: AtomicU64,
}

/// Storage requests waiting for the host's answer, by `request_id`. The mutex is held only
/// to insert or remove an entry, never across `.await`.
#[derive(Default, Clone)]
pub(crate) struct Pending(Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>);

impl Pending {
    /// Hands the host's answer to its waiter; false when nobody waits for it.
    pub(crate) fn deliver(&self, answer: Envelope) -> bool {
        let id = answer.request_id.clone().unwrap_or_default();
        let waiter = self.0.lock().expect("storage table poisoned").remove(&id);
        waiter.is_some_and(|w| w.send(answer).is_ok())
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("connected", &self.inner.is_some())
            .finish()
    }
}

impl Storage {
    /// Storage over a connection whose writer takes `out`; answers go to `pending`.
    pub(crate) fn connected(out: mpsc::UnboundedSender<Envelope>, pending: Pending) -> Self {
        Storage {
            inner: Some(Arc::new(Link {
                out: out.downgrade(),
                pending,
                next_id: AtomicU64::new(1),
            })),
        }
    }

    /// Storage that refuses everything (no host connection).
    pub fn unavailable() -> Self {
        Storage { inner: None }
    }

    /// Runs one operation on the host.
    pub async fn apply(&self, op: StorageOp) -> Result<StorageAnswer, StorageError> {
        let link = self.inner.as_ref().ok_or_else(|| {
            StorageError::new("unavailable", "no host connection to keep storage on")
        })?;
        let id = format!("storage-{}", link.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        link.pending
            .0
            .lock()
            .expect("storage table poisoned")
            .insert(id.clone(), tx);
        let gone = || StorageError::new("unavailable", "the host connection closed");
        let sent = link
            .out
            .upgrade()
            .is_some_and(|out| out.send(op.to_envelope(id.clone())).is_ok());
        if !sent {
            link.pending
                .0
                .lock()
                .expect("storage table poisoned")
                .remove(&id);
            return Err(gone());
        }
        let answer = tokio::time::timeout(STORAGE_TIMEOUT, rx).await;
        link.pending
            .0
            .lock()
            .expect("storage table poisoned")
            .remove(&id);
        match answer {
            Ok(Ok(answer)) => read_answer(&op, &answer.payload),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(StorageError::new(
                "unavailable",
                format!("the host did not answer a storage request within {STORAGE_TIMEOUT:?}"),
            )),
        }
    }

    async fn value(&self, op: StorageOp) -> Result<Option<String>, StorageError> {
        match self.apply(op).await? {
            StorageAnswer::Value(v) => Ok(v),
            StorageAnswer::Keys { .. } => Err(StorageError::new("internal", "unexpected answer")),
        }
    }

    /// The value of `key`, or `None`.
    pub async fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        self.value(StorageOp::Get { key: key.into() }).await
    }

    /// Sets `key` to `value`, durably; returns the previous value.
    pub async fn set(&self, key: &str, value: &str) -> Result<Option<String>, StorageError> {
        self.value(StorageOp::Set {
            key: key.into(),
            value: value.into(),
        })
        .await
    }

    /// Removes `key`, durably; returns the previous value.
    pub async fn delete(&self, key: &str) -> Result<Option<String>, StorageError> {
        self.value(StorageOp::Delete { key: key.into() }).await
    }

    /// Up to `limit` keys starting with `prefix`, in order, after `after` (empty for the
    /// first page); and whether more remain.
    pub async fn list(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<(Vec<String>, bool), StorageError> {
        let op = StorageOp::List {
            prefix: prefix.into(),
            after: after.into(),
            limit,
        };
        match self.apply(op).await? {
            StorageAnswer::Keys { keys, more } => Ok((keys, more)),
            StorageAnswer::Value(_) => Err(StorageError::new("internal", "unexpected answer")),
        }
    }
}
