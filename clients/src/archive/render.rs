//! `archive list` and `archive stats` output: aligned text for people, JSON for tools.

use serde::Serialize;

use super::record::{format_time, Record};
use super::store::StatsRow;
use crate::payload::sanitize_for_display;

/// Longest content shown by the text listing.
const CONTENT_CHARS: usize = 80;

/// Text: one article per line, `published_at  newspaper/section  title — content`
/// (content cut at 80 characters). JSON: one object per line, every column.
pub fn render_list(records: &[Record], json: bool) -> String {
    let mut out = String::new();
    for r in records {
        if json {
            out.push_str(&serde_json::to_string(r).unwrap_or_default());
        } else {
            let content: String = r.content.chars().take(CONTENT_CHARS).collect();
            let cut = if r.content.chars().count() > CONTENT_CHARS {
                "…"
            } else {
                ""
            };
            out.push_str(&format!(
                "{}  {}/{}  {} — {}{cut}",
                format_time(r.published_at),
                sanitize_for_display(&r.newspaper),
                sanitize_for_display(&r.section),
                sanitize_for_display(&r.title),
                sanitize_for_display(&content),
            ));
        }
        out.push('\n');
    }
    out
}

#[derive(Serialize)]
struct StatsJson<'a> {
    articles: u64,
    groups: &'a [StatsRow],
}

/// Text: a table of newspaper, section, articles, first and last, and the total.
/// JSON: `{"articles": total, "groups": [{newspaper, section, articles, first, last}]}`.
pub fn render_stats(rows: &[StatsRow], json: bool) -> String {
    let total = rows.iter().map(|r| r.articles).sum();
    if json {
        let body = StatsJson {
            articles: total,
            groups: rows,
        };
        return serde_json::to_string(&body).unwrap_or_default() + "\n";
    }
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                sanitize_for_display(&r.newspaper),
                sanitize_for_display(&r.section),
                r.articles.to_string(),
                format_time(r.first),
                format_time(r.last),
            ]
        })
        .collect();
    let header = ["newspaper", "section", "articles", "first", "last"].map(String::from);
    let footer = [
        "total".into(),
        String::new(),
        total.to_string(),
        String::new(),
        String::new(),
    ];
    let all: Vec<&[String; 5]> = std::iter::once(&header)
        .chain(&cells)
        .chain(std::iter::once(&footer))
        .collect();
    let width = |i: usize| all.iter().map(|c| c[i].chars().count()).max().unwrap_or(0);
    let widths = [width(0), width(1), width(2), width(3), width(4)];
    let mut out = String::new();
    for row in all {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn at(s: &str) -> OffsetDateTime {
        crate::archive::parse_time(s).unwrap()
    }

    #[test]
    fn stats_table_is_aligned_with_a_total() {
        let rows = vec![
            StatsRow {
                newspaper: "as".into(),
                section: "futbol".into(),
                articles: 12,
                first: at("2024-11-24T21:15:00Z"),
                last: at("2024-11-24T22:15:00Z"),
            },
            StatsRow {
                newspaper: "eldiario".into(),
                section: "tecnologia".into(),
                articles: 3,
                first: at("2024-11-24T21:00:00Z"),
                last: at("2024-11-24T21:30:00Z"),
            },
        ];
        assert_eq!(
            render_stats(&rows, false),
            "\
newspaper  section     articles  first                     last
as         futbol            12  2024-11-24T21:15:00.000Z  2024-11-24T22:15:00.000Z
eldiario   tecnologia         3  2024-11-24T21:00:00.000Z  2024-11-24T21:30:00.000Z
total                        15
"
        );
        let v: serde_json::Value = serde_json::from_str(&render_stats(&rows, true)).unwrap();
        assert_eq!(v["articles"], 15);
        assert_eq!(v["groups"][1]["section"], "tecnologia");
        assert_eq!(v["groups"][0]["first"], "2024-11-24T21:15:00.000Z");
    }

    #[test]
    fn list_lines_are_safe_for_a_terminal() {
        let r = Record {
            id: "1".into(),
            newspaper: "as".into(),
            section: "futbol".into(),
            title: "Gol\u{1b}[2J".into(),
            content: "x".repeat(100),
            published_at: at("2024-11-24T21:15:00Z"),
            topic: "articulos/as/futbol".into(),
            received_at: at("2024-11-24T21:15:01Z"),
        };
        let text = render_list(std::slice::from_ref(&r), false);
        assert!(
            text.starts_with("2024-11-24T21:15:00.000Z  as/futbol  Gol\\u{1b}[2J — xxx"),
            "{text}"
        );
        assert!(text.ends_with("x…\n"));
        let v: serde_json::Value = serde_json::from_str(render_list(&[r], true).trim()).unwrap();
        assert_eq!(v["received_at"], "2024-11-24T21:15:01.000Z");
        assert_eq!(v["topic"], "articulos/as/futbol");
    }
}
