//! PostgreSQL, a real server per test: the subscriber killed mid-stream, and the
//! database stopped for 10 s mid-stream; nothing lost, nothing twice.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use clients::archive::render_stats;
use clients::ArchiveUrl;

use crate::common::*;
use crate::pg::PgServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_subscriber_killed_mid_stream_keeps_exactly_the_1000_articles() {
    let Some(pg) = PgServer::start() else { return };
    let mut store = kill_mid_stream_loses_nothing(&pg.url(), "archive-pg-kill").await;

    // `archive stats` on the same URL says the same as the table.
    let out = Command::new(env!("CARGO_BIN_EXE_subscriber"))
        .args(["archive", "stats", "--json", "--archive", &pg.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["articles"], 1_000);
    let expected = render_stats(&store.stats().await.unwrap(), true);
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_10_s_mid_stream_loses_nothing_and_keeps_the_mqtt_session() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    let broker = TestBroker::start().await;
    let mut args = broker.subscriber_args("archive-pg-down");
    args.extend(["--archive".into(), pg.url()]);
    let mut sub = SubscriberProcess::spawn(&args);
    sub.wait_for_line(&["subscribed"]).await;
    let url: ArchiveUrl = pg.url().parse().unwrap();
    let mut store = open(&url).await;

    // ~6 s of publishing; the database goes down once 200 are stored.
    let publisher = publish(
        &broker,
        "archive-pg-down-pub",
        1_000,
        Duration::from_millis(5),
    );
    wait_rows(&mut store, 200).await;
    pg.crash();
    sub.wait_for_line(&["WARN", "archive unavailable", "acknowledgements held"])
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    pg.resume();
    sub.wait_for_line(&["archive available again"]).await;

    let published = publisher.await.unwrap();
    assert_eq!(wait_rows(&mut store, 1_000).await, 1_000);
    sub.stop();
    let stored: HashSet<String> = all_ids(&mut store).await.into_iter().collect();
    assert_eq!(store.count().await.unwrap(), 1_000, "nothing twice");
    assert_eq!(stored, published, "nothing lost");

    // One WARN for the outage (the period is 30 s), one MQTT connection throughout.
    assert_eq!(sub.count_lines("archive unavailable"), 1);
    assert_eq!(sub.count_lines("still unavailable"), 0);
    assert_eq!(sub.count_lines("connection lost"), 0);
    assert_eq!(
        sub.count_lines(" connected "),
        1,
        "{:#?}",
        sub.lines.lock().unwrap()
    );
}
