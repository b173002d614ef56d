//! Readiness: the control plane's first answers reflect the whole plugins directory.
//!
//! The daemon serves as soon as its listeners are bound, while the first scan still probes
//! the plugins (each probe bounded by `--metadata-timeout`). Until that scan ends,
//! [`HoldLayer`] holds every `toru.v1` call that names or lists plugins, so a client that
//! connects early waits for a complete answer instead of getting a partial list or
//! `NOT_FOUND` for a plugin whose probe is still running. `WatchEvents` is not held (it
//! replays whatever happened, in order), nor are health and reflection (probes and
//! `grpcurl list` need them at once). The daemon's health (`""`) says `NOT_SERVING` until
//! the scan has ended and every enabled plugin has started or failed; `server.rs` flips it.
//! It knows nothing of plugins beyond the supervisor's discovery flag.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::Either;
use tokio::sync::watch;

/// The one `toru.v1` method that is never held.
const NEVER_HELD: &str = "/toru.v1.PluginService/WatchEvents";

/// Whether a call to `path` waits for the first scan.
fn held(path: &str) -> bool {
    path.starts_with("/toru.v1.") && path != NEVER_HELD
}

/// A tower layer holding plugin calls until `discovered` is `true`.
#[derive(Clone)]
pub struct HoldLayer {
    discovered: watch::Receiver<bool>,
}

impl HoldLayer {
    /// Holds calls until `discovered` (the supervisor's [`discovery`]) turns `true`.
    ///
    /// [`discovery`]: crate::supervisor::Supervisor::discovery
    pub fn new(discovered: watch::Receiver<bool>) -> Self {
        HoldLayer { discovered }
    }
}

impl<S> tower::Layer<S> for HoldLayer {
    type Service = Hold<S>;

    fn layer(&self, inner: S) -> Hold<S> {
        Hold {
            inner,
            discovered: self.discovered.clone(),
        }
    }
}

/// The service [`HoldLayer`] wraps routes in.
#[derive(Clone)]
pub struct Hold<S> {
    inner: S,
    discovered: watch::Receiver<bool>,
}

type Held<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Hold<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Held<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if *self.discovered.borrow() || !held(req.uri().path()) {
            return Either::Left(self.inner.call(req));
        }
        // The service that was made ready goes with the call; a fresh clone takes its
        // place and is made ready by the next `poll_ready`.
        let fresh = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, fresh);
        let mut discovered = self.discovered.clone();
        Either::Right(Box::pin(async move {
            // A daemon stopping before the scan ends drops the sender: answer anyway.
            let _ = discovered.wait_for(|done| *done).await;
            ready.call(req).await
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_calls_are_held_and_events_health_and_reflection_are_not() {
        for path in [
            "/toru.v1.PluginService/ListPlugins",
            "/toru.v1.PluginService/EnablePlugin",
            "/toru.v1.KvService/GetValue",
            "/toru.v1.LogService/StreamLogs",
        ] {
            assert!(held(path), "{path}");
        }
        for path in [
            "/toru.v1.PluginService/WatchEvents",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(!held(path), "{path}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_call_is_answered_when_discovery_ends() {
        use tower::{Layer, Service, ServiceExt};
        let (done, discovered) = watch::channel(false);
        let answer = tower::service_fn(|req: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(req.uri().path().to_owned())
        });
        let mut svc = HoldLayer::new(discovered).layer(answer);
        let list = http::Request::get("/toru.v1.PluginService/ListPlugins")
            .body(())
            .unwrap();
        let mut call = Box::pin(svc.ready().await.unwrap().call(list));
        let waited = tokio::time::timeout(std::time::Duration::from_secs(60), &mut call).await;
        assert!(waited.is_err(), "answered before discovery ended");
        let health = http::Request::get("/grpc.health.v1.Health/Check")
            .body(())
            .unwrap();
        assert_eq!(
            svc.ready().await.unwrap().call(health).await.unwrap(),
            "/grpc.health.v1.Health/Check"
        );
        done.send_replace(true);
        assert_eq!(call.await.unwrap(), "/toru.v1.PluginService/ListPlugins");
    }
}
