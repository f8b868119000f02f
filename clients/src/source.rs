//! Where the publisher gets its articles: the built-in catalogue, a JSON Lines file or
//! a list, each validated before the first is sent.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::article::{Article, MAX_ARTICLE_BYTES};
use crate::catalogue::builtin_articles;

#[derive(Debug, Error)]
pub enum ArticleError {
    #[error("cannot read articles file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}: {reason} (expected one JSON article per line: {{\"newspaper\":\"marca\",\"section\":\"futbol\",\"title\":\"...\",\"content\":\"...\"}})")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("articles file {path} contains no articles")]
    Empty { path: PathBuf },
    #[error("article #{index} of the given list is invalid: {reason}")]
    InvalidInList { index: usize, reason: String },
    #[error("the article list is empty")]
    EmptyList,
}

/// Where the publisher takes its articles from (it cycles through them).
#[derive(Debug, Clone, Default)]
pub enum ArticleSource {
    /// The built-in Spanish sample catalogue.
    #[default]
    Builtin,
    /// A JSON Lines file (`--articles FILE`).
    File(PathBuf),
    /// Articles given directly (handy for tests).
    List(Vec<Article>),
}

impl ArticleSource {
    /// Loads and validates the articles; never returns an empty list.
    pub fn load(&self) -> Result<Vec<Article>, ArticleError> {
        match self {
            ArticleSource::Builtin => Ok(builtin_articles()),
            ArticleSource::File(path) => load_articles_file(path),
            ArticleSource::List(list) => {
                if list.is_empty() {
                    return Err(ArticleError::EmptyList);
                }
                for (i, article) in list.iter().enumerate() {
                    article
                        .validate()
                        .map_err(|reason| ArticleError::InvalidInList {
                            index: i + 1,
                            reason,
                        })?;
                }
                Ok(list.clone())
            }
        }
    }
}

/// Reads a JSON Lines file of articles. Blank lines are skipped; any other bad line is an
/// error naming the file and the (1-based) line number.
pub fn load_articles_file(path: &Path) -> Result<Vec<Article>, ArticleError> {
    let bytes = std::fs::read(path).map_err(|error| ArticleError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_articles(path, &bytes)
}

/// Parses JSON Lines content; `path` is only used in error messages.
pub fn parse_articles(path: &Path, bytes: &[u8]) -> Result<Vec<Article>, ArticleError> {
    let mut articles = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line_err = |reason: String| ArticleError::Line {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let text =
            std::str::from_utf8(raw).map_err(|e| line_err(format!("not valid UTF-8 ({e})")))?;
        let text = text.trim_start_matches('\u{feff}').trim();
        if text.is_empty() {
            continue;
        }
        if text.len() > MAX_ARTICLE_BYTES {
            return Err(line_err(format!(
                "article is {} bytes, the limit is {MAX_ARTICLE_BYTES}",
                text.len()
            )));
        }
        let article: Article = serde_json::from_str(text)
            .map_err(|e| line_err(format!("invalid JSON article: {e}")))?;
        article.validate().map_err(line_err)?;
        articles.push(article);
    }
    if articles.is_empty() {
        return Err(ArticleError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(articles)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_tmp(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn loads_a_good_file_skipping_blank_lines() {
        let f = write_tmp(
            "{\"id\":\"a1\",\"newspaper\":\"marca\",\"section\":\"futbol\",\"title\":\"Gol en el último minuto\",\"content\":\"El Betis gana.\",\"published_at\":\"2024-11-24T10:00:00Z\"}\n\
             \n\
             {\"newspaper\":\"elpais\",\"section\":\"economia\",\"title\":\"Suben los tipos\",\"content\":\"El BCE decide.\"}\n"
                .as_bytes(),
        );
        let articles = load_articles_file(f.path()).unwrap();
        assert_eq!(articles.len(), 2);
        assert_eq!(articles[0].id, "a1");
        assert_eq!(articles[0].title, "Gol en el último minuto");
        assert_eq!(articles[0].topic().unwrap(), "articulos/marca/futbol");
        assert_eq!(
            articles[1].id, "",
            "missing optional fields default to empty"
        );
        assert_eq!(articles[1].topic().unwrap(), "articulos/elpais/economia");
    }

    #[test]
    fn bad_json_line_error_names_file_and_line() {
        let f = write_tmp(
            b"{\"newspaper\":\"marca\",\"section\":\"futbol\",\"title\":\"t\",\"content\":\"c\"}\n\n{not json}\n",
        );
        let err = load_articles_file(f.path()).unwrap_err();
        assert!(matches!(err, ArticleError::Line { line: 3, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{}:3:", f.path().display())), "{msg}");
        assert!(msg.contains("invalid JSON article"), "{msg}");
    }

    #[test]
    fn invalid_topic_or_utf8_line_is_reported() {
        let f = write_tmp(b"{\"newspaper\":\"el/pais\",\"section\":\"futbol\",\"title\":\"t\",\"content\":\"c\"}\n");
        let err = load_articles_file(f.path()).unwrap_err();
        assert!(matches!(err, ArticleError::Line { line: 1, .. }));
        assert!(err.to_string().contains("newspaper"), "{err}");

        let f = write_tmp(b"{\"newspaper\":\"as\",\"section\":\"futbol\",\"title\":\"t\",\"content\":\"c\"}\n\xff\xfe\n");
        let err = load_articles_file(f.path()).unwrap_err();
        assert!(matches!(err, ArticleError::Line { line: 2, .. }));
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn missing_file_and_empty_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        let err = load_articles_file(&missing).unwrap_err();
        assert!(matches!(err, ArticleError::Read { .. }));
        assert!(err.to_string().contains("nope.jsonl"));

        let f = write_tmp(b"\n  \n");
        assert!(matches!(
            load_articles_file(f.path()),
            Err(ArticleError::Empty { .. })
        ));
    }

    #[test]
    fn list_source_is_validated() {
        assert!(matches!(
            ArticleSource::List(vec![]).load(),
            Err(ArticleError::EmptyList)
        ));
        let bad = Article {
            id: String::new(),
            newspaper: "marca".into(),
            section: "futbol".into(),
            title: "  ".into(),
            content: "c".into(),
            published_at: String::new(),
        };
        assert!(matches!(
            ArticleSource::List(vec![bad]).load(),
            Err(ArticleError::InvalidInList { index: 1, .. })
        ));
    }
}
