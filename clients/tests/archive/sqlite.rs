//! SQLite: the subscriber killed with SIGKILL mid-stream loses nothing and duplicates
//! nothing.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_subscriber_killed_mid_stream_keeps_exactly_the_1000_articles() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("data/articles.db").display());
    kill_mid_stream_loses_nothing(&url, "archive-sqlite-kill").await;
}

/// The acknowledgement waits for the commit: with the database locked by another
/// process, the subscriber receives five articles but cannot store them; killed then,
/// it has acknowledged none, so the broker delivers all five again to the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_before_its_row_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("articles.db");
    let url = format!("sqlite:{}", path.display());
    let broker = TestBroker::start().await;
    let mut args = broker.subscriber_args("archive-sqlite-locked");
    args.extend(["--archive".into(), url.clone()]);
    let mut sub = SubscriberProcess::spawn(&args);
    sub.wait_for_line(&["subscribed"]).await;

    let lock = rusqlite::Connection::open(&path).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let published = publish(
        &broker,
        "archive-locked-pub",
        5,
        std::time::Duration::from_millis(1),
    )
    .await
    .unwrap();
    for _ in 0..5 {
        sub.wait_for_line(&["[", "] ", " — "]).await; // the article, printed on receipt
    }
    sub.sigkill();
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    let url: clients::ArchiveUrl = url.parse().unwrap();
    let mut store = open(&url).await;
    assert_eq!(store.count().await.unwrap(), 0, "nothing could be stored");
    let mut sub = SubscriberProcess::spawn(&args);
    assert_eq!(wait_rows(&mut store, 5).await, 5);
    sub.stop();
    let stored: std::collections::HashSet<String> = all_ids(&mut store).await.into_iter().collect();
    assert_eq!(stored, published, "the broker still had all five");
}
