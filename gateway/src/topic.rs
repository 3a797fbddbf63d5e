//! MQTT topic names and topic filters, with the matching rules of MQTT 3.1.1
//! (section 4.7) and MQTT 5 (section 4.7).
//!
//! A [`TopicFilter`] is parsed once, when the configuration is validated, so
//! matching an event's topic is a walk over pre-split levels with no
//! allocation.

use std::fmt;

/// Why a topic name or filter was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty topics are not allowed by the MQTT specification.
    #[error("a topic must not be empty")]
    Empty,
    /// Longer than MQTT's 65,535-byte string limit.
    #[error("a topic must be at most 65535 bytes long")]
    TooLong,
    /// The NUL character is forbidden in MQTT strings.
    #[error("a topic must not contain the NUL character")]
    Nul,
    /// A topic name (not a filter) contained `+` or `#`.
    #[error("a topic name must not contain the wildcards `+` or `#`")]
    WildcardInName,
    /// `#` was not alone in the last level.
    #[error("`#` must be the last level of a filter and stand alone in it (as in `a/#`)")]
    MisplacedMultiLevel,
    /// `+` shared a level with other characters.
    #[error("`+` must stand alone in its level (as in `a/+/b`)")]
    MisplacedSingleLevel,
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks that `name` is a valid topic name to publish on.
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// One level of a parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    /// A literal level that must match exactly.
    Literal(String),
    /// `+`: exactly one level, of any content (including empty).
    Single,
    /// `#`: this level and every level below, including none.
    Multi,
}

/// A validated MQTT topic filter such as `sensors/+/temperature` or `alerts/#`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    raw: String,
    levels: Vec<Level>,
}

impl TopicFilter {
    /// Parses and validates a filter.
    pub fn parse(raw: &str) -> Result<Self, TopicError> {
        check_common(raw)?;
        let parts: Vec<&str> = raw.split('/').collect();
        let last = parts.len() - 1;
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "#" if i == last => Level::Multi,
                "#" => return Err(TopicError::MisplacedMultiLevel),
                "+" => Level::Single,
                p if p.contains('#') => return Err(TopicError::MisplacedMultiLevel),
                p if p.contains('+') => return Err(TopicError::MisplacedSingleLevel),
                p => Level::Literal(p.to_owned()),
            };
            levels.push(level);
        }
        Ok(Self {
            raw: raw.to_owned(),
            levels,
        })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `topic` (a topic name, not a filter) matches this filter.
    ///
    /// Follows the specification: a filter starting with a wildcard does not
    /// match topics starting with `$` (such as `$SYS/...`).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$')
            && matches!(self.levels.first(), Some(Level::Single | Level::Multi))
        {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Multi => return true,
                Level::Single => {
                    if topic_levels.next().is_none() {
                        return false;
                    }
                }
                Level::Literal(expected) => match topic_levels.next() {
                    Some(actual) if actual == expected => {}
                    _ => return false,
                },
            }
        }
        topic_levels.next().is_none()
    }
}

impl TopicFilter {
    /// Whether some topic name matches both filters.
    pub fn overlaps(&self, other: &TopicFilter) -> bool {
        let wild_first =
            |f: &TopicFilter| matches!(f.levels.first(), Some(Level::Single | Level::Multi));
        let dollar_first = |f: &TopicFilter| matches!(f.levels.first(), Some(Level::Literal(l)) if l.starts_with('$'));
        // A wildcard first level never matches `$` topics.
        if (wild_first(self) && dollar_first(other)) || (wild_first(other) && dollar_first(self)) {
            return false;
        }
        let mut a = self.levels.iter();
        let mut b = other.levels.iter();
        loop {
            match (a.next(), b.next()) {
                (None, None) => return true,
                (Some(Level::Multi), _) | (_, Some(Level::Multi)) => return true,
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(Level::Literal(x)), Some(Level::Literal(y))) if x != y => return false,
                _ => {}
            }
        }
    }

    /// The narrowest filter (in this simple lattice) that matches every
    /// topic either filter matches: equal literal levels stay, differing
    /// levels become `+`, and a `#` in either ends the join with `#`.
    fn join(&self, other: &TopicFilter) -> TopicFilter {
        let mut levels = Vec::new();
        let mut a = self.levels.iter();
        let mut b = other.levels.iter();
        loop {
            match (a.next(), b.next()) {
                (None, None) => break,
                (Some(Level::Multi), _)
                | (_, Some(Level::Multi))
                | (None, Some(_))
                | (Some(_), None) => {
                    levels.push(Level::Multi);
                    break;
                }
                (Some(Level::Literal(x)), Some(Level::Literal(y))) if x == y => {
                    levels.push(Level::Literal(x.clone()))
                }
                _ => levels.push(Level::Single),
            }
        }
        let raw = levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Single => "+",
                Level::Multi => "#",
            })
            .collect::<Vec<_>>()
            .join("/");
        TopicFilter { raw, levels }
    }
}

/// Subscriptions for a set of trigger filters such that **no topic matches
/// two of them**: overlapping filters are merged into a broader one. Some
/// brokers (rumqttd among them) deliver a message once per matching
/// subscription, so overlapping subscriptions would hand the gateway
/// duplicates. The broader subscription may bring messages no function
/// wants; the router drops (and acknowledges) those.
pub fn disjoint_subscriptions(filters: &[TopicFilter]) -> Vec<TopicFilter> {
    let mut out: Vec<TopicFilter> = Vec::new();
    for f in filters {
        let mut merged = f.clone();
        // Absorb every existing subscription the new one overlaps, until
        // the result overlaps none of the rest.
        while let Some(i) = out.iter().position(|o| o.overlaps(&merged)) {
            let o = out.swap_remove(i);
            merged = if o == merged { o } else { o.join(&merged) };
        }
        out.push(merged);
    }
    out.sort_by(|a, b| a.raw.cmp(&b.raw));
    out
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// A set of filters; matches when any of them does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterSet(Vec<TopicFilter>);

impl FilterSet {
    /// Wraps already-validated filters.
    pub fn new(filters: Vec<TopicFilter>) -> Self {
        Self(filters)
    }

    /// Whether any filter matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.0.iter().any(|f| f.matches(topic))
    }

    /// The filters in the set.
    pub fn filters(&self) -> &[TopicFilter] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> bool {
        match TopicFilter::parse(filter) {
            Ok(f) => f.matches(topic),
            Err(e) => panic!("filter {filter:?} should parse: {e}"),
        }
    }

    // The examples of MQTT 3.1.1 section 4.7.1 and 4.7.2.
    #[test]
    fn multi_level_wildcard_spec_examples() {
        assert!(m("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(m("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(m(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        assert!(m("sport/#", "sport"));
        assert!(m("#", "sport/tennis"));
        assert!(!m("sport/tennis/player1/#", "sport/tennis/player2"));
        assert_eq!(
            TopicFilter::parse("sport/tennis#"),
            Err(TopicError::MisplacedMultiLevel)
        );
        assert_eq!(
            TopicFilter::parse("sport/tennis/#/ranking"),
            Err(TopicError::MisplacedMultiLevel)
        );
    }

    #[test]
    fn single_level_wildcard_spec_examples() {
        assert!(m("sport/tennis/+", "sport/tennis/player1"));
        assert!(m("sport/tennis/+", "sport/tennis/player2"));
        assert!(!m("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!m("sport/+", "sport"));
        assert!(m("sport/+", "sport/"));
        assert!(m("+/+", "/finance"));
        assert!(m("/+", "/finance"));
        assert!(!m("+", "/finance"));
        assert!(TopicFilter::parse("+").is_ok());
        assert!(TopicFilter::parse("+/tennis/#").is_ok());
        assert!(TopicFilter::parse("sport/+/player1").is_ok());
        assert_eq!(
            TopicFilter::parse("sport+"),
            Err(TopicError::MisplacedSingleLevel)
        );
    }

    #[test]
    fn dollar_topics_spec_examples() {
        assert!(!m("#", "$SYS/monitor/Clients"));
        assert!(!m("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(m("$SYS/#", "$SYS/monitor/Clients"));
        assert!(m("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(m("$edgefn/deadletter/+", "$edgefn/deadletter/threshold"));
    }

    #[test]
    fn literal_levels_are_exact_and_case_sensitive() {
        assert!(m("sensors/a/temperature", "sensors/a/temperature"));
        assert!(!m("sensors/a/temperature", "sensors/A/temperature"));
        assert!(!m("sensors/a", "sensors/a/temperature"));
        assert!(!m("sensors/a/temperature", "sensors/a"));
        assert!(m("sensors/+/temperature", "sensors/s1/temperature"));
        assert!(!m("sensors/+/temperature", "sensors/s1/humidity"));
    }

    fn subs(filters: &[&str]) -> Vec<String> {
        let parsed: Vec<TopicFilter> = filters
            .iter()
            .filter_map(|f| TopicFilter::parse(f).ok())
            .collect();
        disjoint_subscriptions(&parsed)
            .iter()
            .map(|f| f.as_str().to_owned())
            .collect()
    }

    #[test]
    fn overlapping_triggers_become_one_subscription() {
        assert_eq!(subs(&["order/#", "order/a/#"]), ["order/#"]);
        assert_eq!(
            subs(&["sensors/+/temperature", "sensors/s1/temperature"]),
            ["sensors/+/temperature"]
        );
        assert_eq!(subs(&["a/+/c", "a/b/+"]), ["a/+/+"]);
        assert_eq!(subs(&["a/b", "a/b"]), ["a/b"]);
        assert_eq!(subs(&["a/b", "a/b/c", "x/#"]), ["a/b", "a/b/c", "x/#"]);
        assert_eq!(subs(&["#", "$SYS/x"]), ["#", "$SYS/x"]);
        assert_eq!(subs(&["a/b/c", "a/+/e"]), ["a/+/e", "a/b/c"]);
        assert_eq!(subs(&["a/b/c", "a/+/d", "a/x/#"]), ["a/+/#"]);
        assert_eq!(subs(&["a/b/c", "a/c/b", "a/+/b"]), ["a/+/b", "a/b/c"]);
        // A merge that overlaps an earlier subscription absorbs it too.
        assert_eq!(subs(&["a/b/1", "a/c/2", "a/+/#"]), ["a/+/#"]);
    }

    #[test]
    fn merged_subscriptions_still_match_every_trigger() {
        let triggers = [
            "order/#",
            "order/a/#",
            "a/+/c",
            "a/b/+",
            "sensors/s1/temperature",
        ];
        let parsed: Vec<TopicFilter> = triggers
            .iter()
            .filter_map(|f| TopicFilter::parse(f).ok())
            .collect();
        let subs = disjoint_subscriptions(&parsed);
        for topic in [
            "order/a/1",
            "order/b",
            "a/x/c",
            "a/b/y",
            "sensors/s1/temperature",
        ] {
            assert_eq!(
                subs.iter().filter(|s| s.matches(topic)).count(),
                1,
                "{topic}"
            );
        }
    }

    #[test]
    fn invalid_filters_and_names() {
        assert_eq!(TopicFilter::parse(""), Err(TopicError::Empty));
        assert_eq!(TopicFilter::parse("a\0b"), Err(TopicError::Nul));
        assert_eq!(
            TopicFilter::parse(&"a".repeat(70_000)),
            Err(TopicError::TooLong)
        );
        assert_eq!(
            validate_topic_name("a/+/b"),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(validate_topic_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert!(validate_topic_name("alerts/s1/temperature").is_ok());
    }
}
