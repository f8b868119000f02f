//! `subscriber archive list` and `subscriber archive stats`, the real binary, checked
//! against rows the test stored itself.

use std::process::{Command, Output};

use clients::archive::{parse_time, render_list, render_stats, ListQuery, Record};
use clients::{ArchiveUrl, Store};

fn record(id: &str, newspaper: &str, section: &str, published: &str) -> Record {
    Record {
        id: id.into(),
        newspaper: newspaper.into(),
        section: section.into(),
        title: format!("Título {id}"),
        content: format!("Contenido {id}"),
        published_at: parse_time(published).unwrap(),
        topic: format!("articulos/{newspaper}/{section}"),
        received_at: parse_time(published).unwrap() + time::Duration::SECOND,
    }
}

fn archive(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_subscriber"))
        .arg("archive")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn ids(json_lines: &str) -> Vec<String> {
    json_lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn list_and_stats_show_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("articles.db");
    let url = ArchiveUrl::Sqlite(path.clone());
    let arg = format!("sqlite:{}", path.display());
    let rows = vec![
        record("1", "as", "futbol", "2024-11-23T10:00:00Z"),
        record("2", "eldiario", "futbol", "2024-11-24T09:00:00Z"),
        record("3", "as", "futbol", "2024-11-25T08:00:00Z"),
        record("4", "as", "baloncesto", "2024-11-25T12:00:00Z"),
        record("5", "eldiario", "tecnologia", "2024-11-26T07:30:00+01:00"),
    ];
    let mut store = Store::open(&url, true).await.unwrap();
    assert_eq!(store.insert(&rows).await.unwrap(), 5);
    assert_eq!(
        store.insert(&rows[..2]).await.unwrap(),
        0,
        "a redelivery changes nothing"
    );

    // Newest first, every column.
    let all = stdout(&archive(&["list", "--archive", &arg, "--json"]));
    assert_eq!(ids(&all), ["5", "4", "3", "2", "1"]);
    let first: serde_json::Value = serde_json::from_str(all.lines().next().unwrap()).unwrap();
    assert_eq!(first["published_at"], "2024-11-26T06:30:00.000Z");
    assert_eq!(first["received_at"], "2024-11-26T06:30:01.000Z");
    assert_eq!(first["topic"], "articulos/eldiario/tecnologia");
    assert_eq!(first["title"], "Título 5");

    let futbol = stdout(&archive(&[
        "list",
        "--archive",
        &arg,
        "--json",
        "--section",
        "futbol",
        "--limit",
        "2",
    ]));
    assert_eq!(ids(&futbol), ["3", "2"]);
    let as_since = stdout(&archive(&[
        "list",
        "--archive",
        &arg,
        "--json",
        "--newspaper",
        "as",
        "--since",
        "2024-11-24",
    ]));
    assert_eq!(ids(&as_since), ["4", "3"]);

    // Text: what render_list prints for the same query.
    let text = stdout(&archive(&[
        "list",
        "--archive",
        &arg,
        "--section",
        "futbol",
    ]));
    let query = ListQuery {
        section: Some("futbol".into()),
        limit: 20,
        ..Default::default()
    };
    assert_eq!(text, render_list(&store.list(&query).await.unwrap(), false));
    assert!(
        text.starts_with("2024-11-25T08:00:00.000Z  as/futbol  Título 3 — Contenido 3\n"),
        "{text}"
    );

    let stats = stdout(&archive(&["stats", "--archive", &arg]));
    assert_eq!(
        stats,
        "\
newspaper  section     articles  first                     last
as         baloncesto         1  2024-11-25T12:00:00.000Z  2024-11-25T12:00:00.000Z
as         futbol             2  2024-11-23T10:00:00.000Z  2024-11-25T08:00:00.000Z
eldiario   futbol             1  2024-11-24T09:00:00.000Z  2024-11-24T09:00:00.000Z
eldiario   tecnologia         1  2024-11-26T06:30:00.000Z  2024-11-26T06:30:00.000Z
total                         5
"
    );
    let json = stdout(&archive(&["stats", "--archive", &arg, "--json"]));
    assert_eq!(json, render_stats(&store.stats().await.unwrap(), true));
}

#[test]
fn reading_a_missing_archive_or_a_bad_url_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("sqlite:{}", dir.path().join("nothing.db").display());
    let out = archive(&["stats", "--archive", &missing]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no archive at") && err.contains("nothing.db"),
        "{err}"
    );
    assert!(
        !dir.path().join("nothing.db").exists(),
        "reading must not create it"
    );

    let out = archive(&["list", "--archive", "mysql://u:secret@h/db"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown archive kind") && !err.contains("secret"),
        "{err}"
    );

    let out = archive(&["list", "--since", "ayer"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a date"));
}
