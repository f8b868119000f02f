//! Parsing of received payloads: JSON articles, the `Título: … | Contenido: …` text that
//! Mosquitto users type on the command line, and anything else as raw bytes.

use serde::Serialize;

use crate::article::Article;
use crate::topic::parse_article_topic;

/// Longest raw text kept for display.
const MAX_RAW_CHARS: usize = 500;

/// What a received payload turned out to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Payload {
    /// A JSON article (newspaper/section filled from the topic when missing).
    Article(Article),
    /// `Título: <title> | Contenido: <content>`.
    Plain { title: String, content: String },
    /// Anything else; `text` is a lossy UTF-8 rendering, truncated for display.
    Raw { text: String, valid_utf8: bool },
}

impl Payload {
    /// Parses `bytes` received on `topic`. Never fails and never panics.
    pub fn parse(topic: &str, bytes: &[u8]) -> Payload {
        if let Ok(mut article) = serde_json::from_slice::<Article>(bytes) {
            if let Some((newspaper, section)) = parse_article_topic(topic) {
                if article.newspaper.is_empty() {
                    article.newspaper = newspaper.to_owned();
                }
                if article.section.is_empty() {
                    article.section = section.to_owned();
                }
            }
            return Payload::Article(article);
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => match parse_plain(text) {
                Some((title, content)) => Payload::Plain { title, content },
                None => Payload::Raw {
                    text: truncate_chars(text, MAX_RAW_CHARS),
                    valid_utf8: true,
                },
            },
            Err(_) => Payload::Raw {
                text: truncate_chars(&String::from_utf8_lossy(bytes), MAX_RAW_CHARS),
                valid_utf8: false,
            },
        }
    }

    /// The article id, when there is a non-empty one to deduplicate on.
    pub fn article_id(&self) -> Option<&str> {
        match self {
            Payload::Article(a) if !a.id.is_empty() => Some(&a.id),
            _ => None,
        }
    }
}

/// Parses `Título: <title> | Contenido: <content>`, leniently: any case, `Titulo` without
/// accent, any spaces around `:` and `|`. The title must not be empty.
pub fn parse_plain(text: &str) -> Option<(String, String)> {
    let text = text.trim_start_matches('\u{feff}').trim();
    let rest = strip_key(text, "título").or_else(|| strip_key(text, "titulo"))?;
    // The title ends at the first '|' that is followed by "Contenido:".
    for (pos, _) in rest.match_indices('|') {
        if let Some(content) = strip_key(&rest[pos + 1..], "contenido") {
            let title = rest[..pos].trim();
            if title.is_empty() {
                return None;
            }
            return Some((title.to_owned(), content.trim().to_owned()));
        }
    }
    None
}

/// Strips leading spaces, `key` (case-insensitively), spaces and a `:`; returns the rest.
fn strip_key<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    let s = s.trim_start();
    let mut chars = s.char_indices();
    for k in key.chars() {
        let (_, c) = chars.next()?;
        if !c.to_lowercase().eq(k.to_lowercase()) {
            return None;
        }
    }
    let rest = match chars.next() {
        Some((i, _)) => &s[i..],
        None => "",
    };
    rest.trim_start().strip_prefix(':')
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Makes untrusted text safe for a one-line terminal display: line breaks and tabs become
/// spaces, other control characters are escaped (no terminal escape sequences get through).
pub fn sanitize_for_display(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "articulos/eldiario/futbol";

    fn plain(title: &str, content: &str) -> Payload {
        Payload::Plain {
            title: title.into(),
            content: content.into(),
        }
    }

    #[test]
    fn json_article_is_parsed_and_completed_from_topic() {
        let p = Payload::parse(
            TOPIC,
            r#"{"id":"42","title":"El Alavés en descenso","content":"El Alavés pelea por no descender."}"#
                .as_bytes(),
        );
        let Payload::Article(a) = &p else {
            panic!("{p:?}")
        };
        assert_eq!(a.title, "El Alavés en descenso");
        assert_eq!(
            (a.newspaper.as_str(), a.section.as_str()),
            ("eldiario", "futbol")
        );
        assert_eq!(p.article_id(), Some("42"));
    }

    #[test]
    fn json_article_keeps_its_own_newspaper() {
        let p = Payload::parse(
            TOPIC,
            br#"{"id":"1","newspaper":"marca","section":"futbol","title":"t","content":"c","published_at":"2024-01-01T00:00:00Z","extra":true}"#,
        );
        assert!(
            matches!(&p, Payload::Article(a) if a.newspaper == "marca" && a.published_at.starts_with("2024"))
        );
    }

    #[test]
    fn titulo_contenido_variants() {
        let expected = plain("El Alavés en descenso", "El Alavés pelea por no descender.");
        for text in [
            "Título: El Alavés en descenso | Contenido: El Alavés pelea por no descender.",
            "Titulo: El Alavés en descenso | Contenido: El Alavés pelea por no descender.",
            "Título:El Alavés en descenso|Contenido:El Alavés pelea por no descender.",
            "  TÍTULO :  El Alavés en descenso   |   contenido :   El Alavés pelea por no descender.\n",
            "titulo: El Alavés en descenso |Contenido : El Alavés pelea por no descender.",
        ] {
            assert_eq!(Payload::parse(TOPIC, text.as_bytes()), expected, "{text:?}");
        }
    }

    #[test]
    fn pipes_inside_title_or_content_are_kept() {
        assert_eq!(
            parse_plain("Título: Madrid | Barça | Contenido: 2 | 1 al descanso"),
            Some(("Madrid | Barça".into(), "2 | 1 al descanso".into()))
        );
        assert_eq!(
            parse_plain("Título: Sin contenido | Contenido:"),
            Some(("Sin contenido".into(), String::new()))
        );
    }

    #[test]
    fn malformed_plain_text_is_raw() {
        for text in [
            "hola mundo",
            "Título: sin separador",
            "Título:  | Contenido: falta el título",
            "Contenido: x | Título: y",
            "Títulos: x | Contenido: y",
            "",
        ] {
            assert_eq!(
                parse_plain(text),
                None,
                "{text:?} must not parse as Título|Contenido"
            );
            assert!(
                matches!(
                    Payload::parse(TOPIC, text.as_bytes()),
                    Payload::Raw {
                        valid_utf8: true,
                        ..
                    }
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn json_that_is_not_an_article_is_raw() {
        for text in [
            r#"{"foo":1}"#,
            "[1,2,3]",
            "\"texto\"",
            "42",
            r#"{"title":"t"}"#,
        ] {
            let p = Payload::parse(TOPIC, text.as_bytes());
            assert_eq!(
                p,
                Payload::Raw {
                    text: text.into(),
                    valid_utf8: true
                }
            );
            assert_eq!(p.article_id(), None);
        }
    }

    #[test]
    fn invalid_utf8_and_binary_garbage_do_not_panic() {
        let p = Payload::parse(TOPIC, b"T\xc3tulo: \xff\xfe | Contenido: x");
        assert!(
            matches!(&p, Payload::Raw { valid_utf8: false, text } if text.contains('\u{fffd}'))
        );

        // Every short byte string, plus some long ones: parsing must always return.
        for a in 0..=255u8 {
            for b in [0u8, 0x80, 0xc3, 0xff, b'{', b'|', b':'] {
                let _ = Payload::parse(TOPIC, &[a, b, a]);
            }
        }
        let long = vec![0xffu8; 10_000];
        let Payload::Raw { text, .. } = Payload::parse("x", &long) else {
            panic!("binary must be raw")
        };
        assert_eq!(
            text.chars().count(),
            MAX_RAW_CHARS + 1,
            "truncated with an ellipsis"
        );
    }

    #[test]
    fn empty_id_is_not_used_for_dedupe() {
        let p = Payload::parse(TOPIC, br#"{"title":"t","content":"c"}"#);
        assert!(matches!(p, Payload::Article(_)));
        assert_eq!(p.article_id(), None);
    }

    #[test]
    fn display_sanitising_removes_control_characters() {
        assert_eq!(sanitize_for_display("a\nb\tc"), "a b c");
        assert_eq!(sanitize_for_display("x\u{1b}[31my"), "x\\u{1b}[31my");
        assert_eq!(sanitize_for_display("ñandú"), "ñandú");
    }
}
