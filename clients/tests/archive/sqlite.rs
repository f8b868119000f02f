//! SQLite: the subscriber killed with SIGKILL mid-stream loses nothing and duplicates
//! nothing.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_subscriber_killed_mid_stream_keeps_exactly_the_1000_articles() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("data/articles.db").display());
    kill_mid_stream_loses_nothing(&url, "archive-sqlite-kill").await;
}
