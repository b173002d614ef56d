//! Crash-and-restart soak: many SIGKILL → restart cycles through the real daemon must leak
//! no file descriptors, leave no zombies and keep memory flat.

mod common;

use std::time::Duration;

use common::*;
use torud_api::pb::PluginState;

/// Kills the plugin and waits for its restart; returns the new pid.
async fn cycle(events: &mut Events, victim: u32) -> u32 {
    signal(victim, libc::SIGKILL);
    let running = events
        .wait_state("hello", PluginState::Running, SECS10)
        .await;
    events.seen.clear();
    running.details["pid"].parse().unwrap()
}

/// Children of `pid` that are zombies (exited, never reaped).
fn zombie_children(pid: u32) -> usize {
    children(pid)
        .into_iter()
        .filter(|c| process_gone(*c))
        .count()
}

#[tokio::test]
async fn a_thousand_crash_restart_cycles_leak_nothing() {
    let mut d = Daemon::new(&[
        "--backoff-base",
        "1ms",
        "--backoff-max",
        "1ms",
        "--max-failures",
        "1000000",
        "--stable-window",
        "1h",
    ]);
    d.install_hello("hello");
    d.start().await;
    let daemon = d.pid();
    let mut client = d.client().await;
    let mut events = Events::watch(&mut client, Some(0)).await;
    events.wait_added(&["hello"]).await;
    let mut pid = enable(&mut client, "hello").await.pid;
    events
        .wait_state("hello", PluginState::Running, SECS10)
        .await;
    for _ in 0..50 {
        pid = cycle(&mut events, pid).await;
    }
    let (fds_before, rss_before) = (daemon_fds(daemon), rss_kib(daemon));
    for _ in 0..1000 {
        pid = cycle(&mut events, pid).await;
    }
    // The last crash's cleanup finishes right after its restart; give it its deadline.
    wait_until("no zombie children", Duration::from_secs(5), || {
        zombie_children(daemon) == 0
    })
    .await;
    let (fds_after, rss_after) = (daemon_fds(daemon), rss_kib(daemon));
    eprintln!(
        "soak: 1000 cycles; daemon fds {fds_before} -> {fds_after}; RSS {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(
        fds_after <= fds_before + 4,
        "file descriptors leaked: {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "memory grew: {rss_before} KiB -> {rss_after} KiB"
    );
    let plugin = get(&mut client, "hello").await;
    assert_eq!(state_of(&plugin), PluginState::Running);
    assert_eq!(plugin.restart_count, 1050);
}
