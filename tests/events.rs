//! `WatchEvents`: replay after a cursor, then live, with no gap and no duplicate, across a
//! daemon restart; and the plugin filter.

mod common;

use std::time::Duration;

use common::*;
use torud_api::pb;
use torud_api::pb::PluginState;

#[tokio::test]
async fn watch_after_seq_returns_exactly_the_missed_events_then_live_ones() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    let mut all = Events::watch(&mut client, Some(0)).await;
    all.wait_added(&["hello"]).await;
    for _ in 0..2 {
        enable(&mut client, "hello").await;
        disable(&mut client, "hello").await;
    }
    // Everything so far: added + 2 × (starting, running, stopping, stopped).
    while all.seen.len() < 9 {
        all.next_within(SECS10)
            .await
            .expect("the first nine events");
    }
    let seqs: Vec<u64> = all.seen.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<u64>>());

    let cursor = all.seen[3].seq;
    let mut resumed = Events::watch(&mut client, Some(cursor)).await;
    for want in &all.seen[4..] {
        let got = resumed.next_within(SECS10).await.expect("replayed event");
        assert_eq!(&got, want);
    }
    assert!(
        resumed
            .next_within(Duration::from_millis(200))
            .await
            .is_none(),
        "nothing beyond the replay yet"
    );
    enable(&mut client, "hello").await;
    let live = resumed.next_within(SECS10).await.expect("a live event");
    assert_eq!(live.seq, 10);
    assert_eq!(live.to_state, PluginState::Starting as i32);

    // Across a restart: numbering continues and a cursor resumes exactly.
    let mut filtered = Events::watch(&mut client, None).await;
    let _ = &mut filtered;
    assert_eq!(d.stop().await.code(), Some(0));
    d.start().await;
    let mut client = d.client().await;
    let mut after = Events::watch(&mut client, Some(10)).await;
    let first = after
        .next_within(SECS10)
        .await
        .expect("events after the cursor");
    assert_eq!(first.seq, 11);
    let ready = after
        .wait_state("hello", PluginState::Running, SECS10)
        .await;
    let mut seqs: Vec<u64> = after.seen.iter().map(|e| e.seq).collect();
    seqs.dedup();
    assert_eq!(
        seqs,
        (11..=ready.seq).collect::<Vec<u64>>(),
        "no gap, no duplicate"
    );
}

#[tokio::test]
async fn watch_filters_by_plugin() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.install_fixture("other", "normal", &[]);
    d.start().await;
    let mut client = d.client().await;
    let req = pb::WatchEventsRequest {
        after_seq: Some(0),
        plugin_ids: vec!["other".into()],
    };
    let mut stream = client.watch_events(req).await.unwrap().into_inner();
    let mut all = Events::watch(&mut client, Some(0)).await;
    all.wait_added(&["hello", "other"]).await;
    enable(&mut client, "hello").await;
    enable(&mut client, "other").await;
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let event = tokio::time::timeout(SECS10, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .event
            .unwrap();
        ids.push((event.plugin_id, event.kind, event.to_state));
    }
    assert!(ids.iter().all(|(id, _, _)| id == "other"), "{ids:?}");
    let err = client
        .watch_events(pb::WatchEventsRequest {
            after_seq: None,
            plugin_ids: vec!["bad/id".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_replay_reports_events_missing_from_the_log_as_a_gap() {
    let mut d = Daemon::new(&[]);
    d.install_hello("hello");
    d.start().await;
    let mut client = d.client().await;
    let mut all = Events::watch(&mut client, Some(0)).await;
    all.wait_added(&["hello"]).await;
    enable(&mut client, "hello").await;
    disable(&mut client, "hello").await;
    // added, starting, running, stopping, stopped.
    while all.seen.len() < 5 {
        all.next_within(SECS10)
            .await
            .expect("the first five events");
    }
    assert_eq!(d.stop().await.code(), Some(0));

    // Events 3 and 4 go missing from the log, as if they could never be stored.
    let events_dir = d.data_dir.join("events");
    let segment = std::fs::read_dir(&events_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&segment).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("{\"seq\":3,") && !l.starts_with("{\"seq\":4,"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&segment, kept).unwrap();

    d.start().await;
    let mut client = d.client().await;
    let mut replay = Events::watch(&mut client, Some(0)).await;
    while replay.seen.len() < 3 {
        replay.next_within(SECS10).await.expect("the events kept");
    }
    let seqs: Vec<u64> = replay.seen.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 5]);
    assert_eq!(replay.gaps.len(), 1, "{:?}", replay.gaps);
    let gap = &replay.gaps[0];
    assert_eq!((gap.first_seq, gap.last_seq), (3, 4));
    assert!(
        gap.reason.contains("not in the event log"),
        "{}",
        gap.reason
    );

    // From inside the hole, and with a filter that matches none of the kept events, the
    // gap is still reported.
    let req = pb::WatchEventsRequest {
        after_seq: Some(3),
        plugin_ids: vec!["someone-else".into()],
    };
    let mut stream = client.watch_events(req).await.unwrap().into_inner();
    let first = tokio::time::timeout(SECS10, stream.message())
        .await
        .expect("a gap message")
        .unwrap()
        .unwrap();
    let gap = first.gap.expect("a gap first");
    assert_eq!((gap.first_seq, gap.last_seq), (4, 4));

    // toructl shows the gap too, in both outputs.
    let toructl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_toructl"))
            .args(["--addr", &d.addr])
            .arg("--data-dir")
            .arg(&d.data_dir)
            .args(args)
            .env_remove("TORUD_ADDR")
            .env_remove("TORUD_TOKEN")
            .env_remove("TORUD_DATA_DIR")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = toructl(&["events"]);
    assert!(table.contains("GAP: events 3 to 4 are missing"), "{table}");
    let json = toructl(&["-o", "json", "events"]);
    let gap_line: serde_json::Value = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v.get("gap").is_some())
        .expect("a gap line");
    assert_eq!(gap_line["gap"]["first_seq"], 3);
    assert_eq!(gap_line["gap"]["last_seq"], 4);
    d.stop().await;
}
