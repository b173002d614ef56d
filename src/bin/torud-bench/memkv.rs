//! `torud-bench kv-plugin` (hidden): an SDK plugin (protocol 2) whose KV lives in its own
//! memory, the twin of the go-plugin peer's plugin (an in-memory map behind a lock), so
//! that `forward --peer` compares the same plugin-side work on both sides. The example
//! plugin, by contrast, keeps its values in the daemon's durable storage: one more round
//! trip per call, which go-plugin's plugin does not make.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;

use toru_plugin_sdk::{Context, HttpRequest, HttpResponse, KvOp, Metadata, Plugin, PluginError};

/// The plugin: one map, its lock held only for the lookup or the update.
#[derive(Default)]
struct MemKv {
    values: Mutex<HashMap<String, String>>,
}

impl Plugin for MemKv {
    fn metadata(&self) -> Metadata {
        Metadata {
            description: Some("torud-bench's in-memory KV plugin".into()),
            ..Metadata::new("hello", "In-memory KV (benchmark)", "1", "/hello")
        }
    }

    async fn call(&self, _ctx: &Context, _: HttpRequest) -> Result<HttpResponse, PluginError> {
        Err(PluginError::not_found("this plugin serves KV only"))
    }

    async fn kv(&self, _ctx: &Context, op: KvOp) -> Result<Option<String>, PluginError> {
        let mut values = self.values.lock().expect("values poisoned");
        Ok(match op {
            KvOp::Get { key } => values.get(&key).cloned(),
            KvOp::Set { key, value } => {
                values.insert(key, value.clone());
                Some(value)
            }
            KvOp::Delete { key } => values.remove(&key),
        })
    }
}

/// Serves the plugin (the SDK's `serve`: `--metadata`, the socket, the handshake).
pub(crate) fn serve() -> ExitCode {
    toru_plugin_sdk::serve(MemKv::default())
}
