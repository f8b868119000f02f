//! Which database: `sqlite:PATH` (also `sqlite://PATH` or a bare path) or
//! `postgres://user:password@host:port/db[?sslmode=require&sslrootcert=FILE]`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// An archive's location. `Display` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub enum ArchiveUrl {
    /// An SQLite file, created on first use.
    Sqlite(PathBuf),
    /// A PostgreSQL server.
    Postgres(PgUrl),
}

/// A `postgres://` URL as the user wrote it.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl(String);

impl FromStr for ArchiveUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("the archive URL is empty: use sqlite:PATH or postgres://user:password@host:port/db".into());
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(ArchiveUrl::Postgres(PgUrl(s.to_owned())));
        }
        if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(format!("{s:?} names no file: use sqlite:data/articles.db"));
            }
            return Ok(ArchiveUrl::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "unknown archive kind {scheme:?} in {}: use sqlite:PATH or postgres://user:password@host:port/db",
                redact(s)
            ));
        }
        Ok(ArchiveUrl::Sqlite(PathBuf::from(s)))
    }
}

impl fmt::Display for ArchiveUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchiveUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            ArchiveUrl::Postgres(url) => f.write_str(&url.redacted()),
        }
    }
}

impl fmt::Debug for ArchiveUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PgUrl {
    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }

    /// `sslrootcert=FILE` (libpq's name), which tokio-postgres does not parse itself.
    pub(crate) fn root_cert(&self) -> Option<PathBuf> {
        let (_, query) = self.0.split_once('?')?;
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix("sslrootcert="))
            .map(PathBuf::from)
    }

    /// The URL without `sslrootcert`, for tokio-postgres.
    pub(crate) fn without_root_cert(&self) -> String {
        let Some((base, query)) = self.0.split_once('?') else {
            return self.0.clone();
        };
        let rest: Vec<&str> = query
            .split('&')
            .filter(|kv| !kv.starts_with("sslrootcert="))
            .collect();
        if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        }
    }
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split_once(':').map_or(user_info, |(u, _)| u);
            let hidden = if user_info.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_recognised() {
        assert_eq!(
            "sqlite:data/articles.db".parse::<ArchiveUrl>().unwrap(),
            ArchiveUrl::Sqlite("data/articles.db".into())
        );
        assert_eq!(
            "sqlite:///tmp/a.db".parse::<ArchiveUrl>().unwrap(),
            ArchiveUrl::Sqlite("/tmp/a.db".into())
        );
        assert_eq!(
            "archive.db".parse::<ArchiveUrl>().unwrap(),
            ArchiveUrl::Sqlite("archive.db".into()),
            "a bare path is SQLite, the default kind"
        );
        assert!(matches!(
            "postgresql://u:p@h:5432/db".parse::<ArchiveUrl>().unwrap(),
            ArchiveUrl::Postgres(_)
        ));
        for bad in ["", "sqlite:", "mysql://u:secret@h/db"] {
            let err = bad.parse::<ArchiveUrl>().unwrap_err();
            assert!(!err.contains("secret"), "{err}");
            assert!(err.contains("sqlite:"), "{err}");
        }
    }

    #[test]
    fn the_password_is_never_shown() {
        let url: ArchiveUrl = "postgres://news:s3cr:et@db.local:5432/news?sslmode=require"
            .parse()
            .unwrap();
        assert_eq!(
            url.to_string(),
            "postgres://news:***@db.local:5432/news?sslmode=require"
        );
        assert_eq!(format!("{url:?}"), url.to_string());
        let no_password: ArchiveUrl = "postgres://news@h/db".parse().unwrap();
        assert_eq!(no_password.to_string(), "postgres://news@h/db");
    }

    #[test]
    fn sslrootcert_is_taken_out_for_tokio_postgres() {
        let url = PgUrl("postgres://u:p@h/db?sslmode=require&sslrootcert=certs/pg.crt".into());
        assert_eq!(url.root_cert(), Some(PathBuf::from("certs/pg.crt")));
        assert_eq!(
            url.without_root_cert(),
            "postgres://u:p@h/db?sslmode=require"
        );
        let only = PgUrl("postgres://u:p@h/db?sslrootcert=x".into());
        assert_eq!(only.without_root_cert(), "postgres://u:p@h/db");
        assert_eq!(PgUrl("postgres://h/db".into()).root_cert(), None);
    }
}
