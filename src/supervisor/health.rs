//! Health checks of running plugins, scheduled together: one task per distinct health
//! interval checks every plugin registered with that interval at each tick, instead of a
//! timer, a wake-up and a check per plugin. At a thousand idle plugins the per-plugin
//! timers were most of the daemon's idle CPU.
//!
//! A running plugin's actor registers its [`Check`] and holds the [`Registration`] while
//! it runs; dropping it unregisters. At each tick:
//! - v1 plugins ([`Check::Socket`]): the host's table of listening Unix sockets is read
//!   once (on a blocking thread, shared by every schedule while younger than half its
//!   interval) and each socket looked up in it. Never a connection: a v1 plugin handles
//!   one message per connection and must not see checks.
//! - protocol-2 plugins ([`Check::Heartbeat`]): one round of heartbeats, a `ping` on each
//!   link, all driven from this task; a heartbeat still unanswered at the next tick has
//!   failed (its limit is one interval, as a plugin's own timer had), and only then is the
//!   next one sent, so at most one is in flight per plugin. Heartbeats bypass the in-flight
//!   cap ([`Link::heartbeat`]): a busy plugin is not a dead one.
//!
//! A registration hears only when its plugin's verdict changes (healthy ↔ unhealthy), on a
//! `watch` channel: an idle, healthy plugin's actor is never woken by its checks.
//!
//! Architecture invariant: this module judges and tells; it never changes a plugin's
//! state, status or events (the actor does, from the verdict), and it holds no lock across
//! `.await`. A schedule's task ends at the first tick that finds nobody registered.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::TaskTracker;

use crate::plugin::link::{Link, LinkError};
use crate::plugin::listening::ListeningSockets;

/// What is checked for one running plugin.
pub(crate) enum Check {
    /// A v1 plugin: its socket at this path is listening (from the host's table).
    Socket(PathBuf),
    /// A protocol-2 plugin: a heartbeat on its link is answered within one interval.
    Heartbeat(Link),
}

/// A plugin's health as last judged, with why it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub healthy: bool,
    pub reason: String,
}

/// The health scheduler: one per daemon, in the supervisor's [`super::Context`].
pub(crate) struct HealthChecks {
    shared: Arc<Shared>,
}

/// What the schedules' tasks share.
struct Shared {
    /// The host's listening sockets, read once per tick for every v1 plugin.
    listening: ListeningSockets,
    /// The schedule of each interval in use. Locked to find, add or end a schedule, and
    /// held while a registration joins one, so a schedule never ends with a member;
    /// never held across `.await`.
    schedules: Mutex<HashMap<Duration, Arc<Schedule>>>,
    /// The schedules' tasks.
    tasks: TaskTracker,
}

/// The plugins checked at one interval.
struct Schedule {
    interval: Duration,
    /// Locked to add, remove, list or tell members, never across `.await`.
    members: Mutex<Members>,
}

#[derive(Default)]
struct Members {
    /// The next member's key; keys are never reused.
    next: u64,
    by_key: HashMap<u64, Member>,
}

struct Member {
    check: Check,
    verdict: watch::Sender<Verdict>,
}

/// A running plugin's place in a schedule; dropping it unregisters the plugin.
pub(crate) struct Registration {
    schedule: Arc<Schedule>,
    key: u64,
    verdicts: watch::Receiver<Verdict>,
}

impl Default for HealthChecks {
    fn default() -> Self {
        HealthChecks::with_listening(ListeningSockets::default())
    }
}

impl HealthChecks {
    /// A scheduler reading the host's listening sockets through `listening` (tests give a
    /// table of their own).
    pub(crate) fn with_listening(listening: ListeningSockets) -> Self {
        HealthChecks {
            shared: Arc::new(Shared {
                listening,
                schedules: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Registers a running plugin, healthy now, to be checked every `interval` from the
    /// next tick of that interval's schedule (started here if it is the first). Call from
    /// within the runtime.
    pub(crate) fn register(&self, interval: Duration, check: Check) -> Registration {
        let (verdict, verdicts) = watch::channel(Verdict {
            healthy: true,
            reason: "ready".into(),
        });
        let mut schedules = self.shared.schedules.lock().expect("schedules poisoned");
        let schedule = schedules
            .entry(interval)
            .or_insert_with(|| {
                let schedule = Arc::new(Schedule {
                    interval,
                    members: Mutex::default(),
                });
                let task = schedule.clone().run(self.shared.clone());
                self.shared.tasks.spawn(task);
                schedule
            })
            .clone();
        let key = schedule.add(Member { check, verdict });
        drop(schedules);
        Registration {
            schedule,
            key,
            verdicts,
        }
    }

    /// How many plugins are registered at `interval`.
    #[cfg(test)]
    pub(crate) fn registered(&self, interval: Duration) -> usize {
        let schedules = self.shared.schedules.lock().expect("schedules poisoned");
        schedules
            .get(&interval)
            .map_or(0, |s| s.members().by_key.len())
    }

    /// Waits until every schedule's task has ended.
    #[cfg(test)]
    async fn all_ended(&self) {
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

impl Registration {
    /// The next verdict that differs from the last one seen; never resolves while the
    /// plugin's health stays the same.
    pub(crate) async fn changed(&mut self) -> Verdict {
        if self.verdicts.changed().await.is_err() {
            // The sender lives in the schedule as long as this registration: unreachable,
            // but a closed channel must not spin the actor's loop.
            std::future::pending::<()>().await;
        }
        self.verdicts.borrow_and_update().clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.schedule.members().by_key.remove(&self.key);
    }
}

/// The checks of one tick, by member key.
#[derive(Default)]
struct Round {
    sockets: Vec<(u64, PathBuf)>,
    links: Vec<(u64, Link)>,
}

/// One heartbeat in flight: its member's key and its outcome.
async fn beat(key: u64, link: Link) -> (u64, Result<(), LinkError>) {
    (key, link.heartbeat().await)
}

impl Schedule {
    fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().expect("health members poisoned")
    }

    fn add(&self, member: Member) -> u64 {
        let mut members = self.members();
        let key = members.next;
        members.next += 1;
        members.by_key.insert(key, member);
        key
    }

    /// Ticks every `interval` until a tick finds no member; between ticks, judges each
    /// heartbeat as its answer comes.
    async fn run(self: Arc<Self>, shared: Arc<Shared>) {
        let mut ticks = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut beats = FuturesUnordered::new();
        // The members whose heartbeat is in `beats`.
        let mut in_flight = HashSet::new();
        loop {
            tokio::select! {
                biased;
                Some((key, result)) = beats.next(), if !beats.is_empty() => {
                    in_flight.remove(&key);
                    self.judge_heartbeat(key, result);
                }
                _ = ticks.tick() => {
                    let Some(Round { sockets, links }) = self.round(&shared) else { return };
                    // Unanswered for a whole interval: failed, and dropped (which frees
                    // its entry on the link and tells the plugin to cancel it).
                    beats.clear();
                    for key in in_flight.drain() {
                        self.judge_heartbeat(key, Err(LinkError::Timeout(self.interval)));
                    }
                    for (key, link) in links {
                        in_flight.insert(key);
                        beats.push(beat(key, link));
                    }
                    if !sockets.is_empty() {
                        self.check_sockets(&shared, sockets).await;
                    }
                }
            }
        }
    }

    /// What to check this tick; `None` when nobody is registered, and then this schedule
    /// has ended (removed under the schedules' lock, so no registration can join it
    /// meanwhile).
    fn round(&self, shared: &Shared) -> Option<Round> {
        let mut schedules = shared.schedules.lock().expect("schedules poisoned");
        let members = self.members();
        if members.by_key.is_empty() {
            schedules.remove(&self.interval);
            return None;
        }
        drop(schedules);
        let mut round = Round::default();
        for (&key, member) in &members.by_key {
            match &member.check {
                Check::Socket(path) => round.sockets.push((key, path.clone())),
                Check::Heartbeat(link) => round.links.push((key, link.clone())),
            }
        }
        Some(round)
    }

    /// Looks each socket up in the host's table, read on a blocking thread unless a read
    /// younger than half the interval is at hand. A table that cannot be read changes no
    /// verdict.
    async fn check_sockets(&self, shared: &Arc<Shared>, sockets: Vec<(u64, PathBuf)>) {
        let max_age = self.interval / 2;
        let reader = shared.clone();
        let read = tokio::task::spawn_blocking(move || reader.listening.read(max_age)).await;
        let listening = match read {
            Ok(Ok(listening)) => listening,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot read the host's listening sockets");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading the host's listening sockets failed");
                return;
            }
        };
        let members = self.members();
        for (key, path) in sockets {
            let listening = listening.contains(&path);
            tell(&members, key, listening, || {
                if listening {
                    "socket accepting again"
                } else {
                    "socket not listening"
                }
                .into()
            });
        }
    }

    fn judge_heartbeat(&self, key: u64, result: Result<(), LinkError>) {
        let members = self.members();
        let healthy = result.is_ok();
        tell(&members, key, healthy, || match result {
            Ok(()) => "heartbeat answered again".into(),
            Err(e) => format!("heartbeat failed: {e}"),
        });
    }
}

/// Tells member `key` (if still registered) that it is `healthy`, when that is a change;
/// `reason` is asked for only then.
fn tell(members: &Members, key: u64, healthy: bool, reason: impl FnOnce() -> String) {
    let Some(member) = members.by_key.get(&key) else {
        return;
    };
    member.verdict.send_if_modified(|verdict| {
        if verdict.healthy == healthy {
            return false;
        }
        *verdict = Verdict {
            healthy,
            reason: reason(),
        };
        true
    });
}

#[cfg(test)]
mod tests;
