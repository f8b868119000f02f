//! `articulos/<newspaper>/<section>` topic building and parsing, and subscription filters.

use thiserror::Error;

/// First level of every article topic.
pub const TOPIC_ROOT: &str = "articulos";
/// What the subscriber follows by default: football from every newspaper.
pub const DEFAULT_FILTER: &str = "articulos/+/futbol";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} {value:?} must not contain '/', '+', '#' or NUL")]
    InvalidChar { what: &'static str, value: String },
    #[error(
        "invalid topic filter {0:?}: '+' and '#' must fill a whole level and '#' must be last"
    )]
    InvalidFilter(String),
}

/// Checks one topic level (newspaper, section, shared-subscription group).
pub fn validate_segment(what: &'static str, value: &str) -> Result<(), TopicError> {
    if value.is_empty() {
        return Err(TopicError::Empty { what });
    }
    if value.contains(['/', '+', '#', '\0']) {
        return Err(TopicError::InvalidChar {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// `articulos/<newspaper>/<section>`.
pub fn article_topic(newspaper: &str, section: &str) -> Result<String, TopicError> {
    validate_segment("newspaper", newspaper)?;
    validate_segment("section", section)?;
    Ok(format!("{TOPIC_ROOT}/{newspaper}/{section}"))
}

/// Splits `articulos/<newspaper>/<section>` into `(newspaper, section)`;
/// `None` for any other shape.
pub fn parse_article_topic(topic: &str) -> Option<(&str, &str)> {
    let mut levels = topic.split('/');
    let (root, newspaper, section) = (levels.next()?, levels.next()?, levels.next()?);
    if root != TOPIC_ROOT || levels.next().is_some() {
        return None;
    }
    if validate_segment("newspaper", newspaper).is_err()
        || validate_segment("section", section).is_err()
    {
        return None;
    }
    Some((newspaper, section))
}

/// Checks an MQTT subscription filter (wildcards allowed, whole levels only), by the
/// rules the broker applies.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty {
            what: "topic filter",
        });
    }
    if !mqtt_common::topic::valid_plain_filter(filter) {
        return Err(TopicError::InvalidFilter(filter.to_owned()));
    }
    Ok(())
}

/// The filter actually subscribed to: `$share/<group>/<filter>` when a group is given.
pub fn subscription_filter(filter: &str, group: Option<&str>) -> Result<String, TopicError> {
    validate_filter(filter)?;
    match group {
        None => Ok(filter.to_owned()),
        Some(group) => {
            validate_segment("group name", group)?;
            Ok(format!("$share/{group}/{filter}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_article_topics() {
        assert_eq!(
            article_topic("eldiario", "futbol").as_deref(),
            Ok("articulos/eldiario/futbol")
        );
        assert_eq!(
            article_topic("", "futbol"),
            Err(TopicError::Empty { what: "newspaper" })
        );
        assert!(matches!(
            article_topic("el/pais", "futbol"),
            Err(TopicError::InvalidChar {
                what: "newspaper",
                ..
            })
        ));
        assert!(article_topic("marca", "+").is_err());
        assert!(article_topic("marca", "fut#bol").is_err());
    }

    #[test]
    fn parses_article_topics() {
        assert_eq!(
            parse_article_topic("articulos/marca/baloncesto"),
            Some(("marca", "baloncesto"))
        );
        assert_eq!(parse_article_topic("articulos/marca"), None);
        assert_eq!(parse_article_topic("articulos/marca/futbol/extra"), None);
        assert_eq!(parse_article_topic("noticias/marca/futbol"), None);
        assert_eq!(parse_article_topic("articulos//futbol"), None);
        assert_eq!(parse_article_topic(""), None);
    }

    #[test]
    fn build_then_parse_round_trips() {
        let topic = article_topic("as", "tecnologia").unwrap();
        assert_eq!(parse_article_topic(&topic), Some(("as", "tecnologia")));
    }

    #[test]
    fn validates_filters() {
        for ok in [
            "articulos/+/futbol",
            "articulos/#",
            "#",
            "+/+/+",
            "articulos/marca/futbol",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "articulos/#/futbol",
            "articulos/fut+bol",
            "articulos/##",
            "a/b#",
        ] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shared_subscription_prefix() {
        assert_eq!(
            subscription_filter("articulos/+/futbol", Some("lectores")).as_deref(),
            Ok("$share/lectores/articulos/+/futbol")
        );
        assert_eq!(
            subscription_filter("articulos/+/futbol", None).as_deref(),
            Ok("articulos/+/futbol")
        );
        assert!(subscription_filter("articulos/+/futbol", Some("a/b")).is_err());
        assert!(subscription_filter("articulos/+/futbol", Some("")).is_err());
    }
}
