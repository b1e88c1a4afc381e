//! Topic names and topic filters: validation and matching (MQTT 3.1.1 section 4.7, MQTT 5.0
//! sections 4.7 and 4.8.2), shared by the decoder, the subscription trie, the interest table and the
//! retained store.
//!
//! Owns: what a valid topic name and a valid topic filter are, how a `$share/{group}/{filter}`
//! (and, opt-in, EMQX's `$queue/{filter}`) splits into its parts, and whether a filter matches a
//! topic name. Does not own: UTF-8 well-formedness (guaranteed by [`crate::Utf8`] before these
//! functions see a string), the choice of whether shared subscriptions are enabled or which
//! protocol version allows them (the broker decides), nor the subscription trie itself.
//!
//! Invariants:
//! - Nothing here allocates or panics, whatever the input: every function is a single pass over
//!   the bytes, so each loop is bounded by the input length (at most [`TOPIC_LEN_MAX_BYTES`] for
//!   anything that passed validation).
//! - A level is the text between two `/` separators (or a separator and an end). Empty levels are
//!   levels: `a//b` has three levels and `/a` has two, the first one empty (MQTT-4.7.1 / 4.7.3).
//! - [`matches`] is defined for every pair of strings, but only meaningful for a filter that
//!   passed [`validate_topic_filter`] and is not shared (strip `$share/{group}/` with
//!   [`parse_shared`] first) and a topic that passed [`validate_topic_name`].

use std::str::Split;

use thiserror::Error;

/// The longest topic name or filter: an MQTT UTF-8 string has a two-byte length prefix
/// (MQTT-1.5.3 / MQTT-4.7.3-3).
pub const TOPIC_LEN_MAX_BYTES: usize = 65_535;

/// The level separator.
pub const LEVEL_SEPARATOR: char = '/';
/// The single-level wildcard.
pub const SINGLE_LEVEL_WILDCARD: char = '+';
/// The multi-level wildcard.
pub const MULTI_LEVEL_WILDCARD: char = '#';

/// The prefix of a shared subscription's filter (MQTT 5.0 section 4.8.2).
pub const SHARE_PREFIX: &str = "$share/";
/// The prefix of EMQX's group-less shared subscription, `$queue/{filter}`, which EMQX treats as
/// `$share/$queue/{filter}`. Only [`parse_shared_or_queue`] recognises it.
pub const QUEUE_PREFIX: &str = "$queue/";
/// The share group name [`parse_shared_or_queue`] reports for a `$queue/` filter.
pub const QUEUE_GROUP: &str = "$queue";

/// Why a string is not a valid topic name or topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TopicError {
    /// Topic names and filters are at least one character long (MQTT-4.7.3-1).
    #[error("empty topic")]
    Empty,
    /// Longer than an MQTT string can be (MQTT-4.7.3-3).
    #[error("topic of {len_bytes} bytes exceeds {TOPIC_LEN_MAX_BYTES} bytes")]
    TooLong { len_bytes: usize },
    /// U+0000 in a topic (MQTT-4.7.3-2). [`crate::Utf8`] already excludes it; this guards strings
    /// that come from elsewhere (configuration, the admin API).
    #[error("topic contains U+0000")]
    NullCharacter,
    /// A topic name contains `+` or `#` (MQTT-3.3.2-2, MQTT-4.7.0-1).
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// `#` is not alone in its level, or not in the last level (MQTT-4.7.1-2).
    #[error("'#' must be alone in the last level")]
    InvalidMultiLevelWildcard,
    /// `+` is not alone in its level (MQTT-4.7.1-3).
    #[error("'+' must be alone in its level")]
    InvalidSingleLevelWildcard,
    /// `$share//...` or `$share/`: the share name is empty (MQTT-4.8.2-1).
    #[error("empty share name")]
    EmptyShareName,
    /// The share name contains `+` or `#` (MQTT-4.8.2-2).
    #[error("share name contains a wildcard")]
    InvalidShareName,
    /// `$share/{group}` or `$share/{group}/`: nothing after the share name (MQTT 5.0 4.8.2).
    #[error("shared subscription without a topic filter")]
    EmptySharedFilter,
}

/// A shared subscription's filter split into its parts. Both borrow the original string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedFilter<'a> {
    /// The share name: non-empty, no `/`, `+` or `#`. [`QUEUE_GROUP`] for an EMQX `$queue/` filter.
    pub group: &'a str,
    /// The topic filter the group subscribes to: non-empty and valid, never itself shared.
    pub filter: &'a str,
}

/// One level of a topic filter, as the subscription trie sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterLevel<'a> {
    /// Matches exactly this level text (which may be empty).
    Literal(&'a str),
    /// `+`: matches any one level.
    SingleLevelWildcard,
    /// `#`: matches the parent level and any number of child levels.
    MultiLevelWildcard,
}

/// The levels of a topic name or filter, in order. Never empty: `""` yields one empty level,
/// `"/"` two. Allocation-free; double-ended, so a trie can also walk from the leaf.
pub fn levels(topic: &str) -> Split<'_, char> {
    topic.split(LEVEL_SEPARATOR)
}

/// The levels of a filter classified for the trie. For a filter that passed
/// [`validate_topic_filter`] (and was stripped of any `$share/{group}/`),
/// [`FilterLevel::MultiLevelWildcard`] can only be the last item.
pub fn filter_levels(filter: &str) -> impl DoubleEndedIterator<Item = FilterLevel<'_>> + Clone {
    levels(filter).map(|level| match level {
        "+" => FilterLevel::SingleLevelWildcard,
        "#" => FilterLevel::MultiLevelWildcard,
        literal => FilterLevel::Literal(literal),
    })
}

/// True for topics that start with `$` (`$SYS/...`, `$share/...`): wildcards in the first level of
/// a filter do not match them (MQTT-4.7.2-1).
pub fn is_dollar_topic(topic: &str) -> bool {
    topic.as_bytes().first() == Some(&b'$')
}

/// True when a valid filter contains a wildcard, i.e. it can match more than one topic name.
/// (In a valid filter, shared or not, `+` and `#` only ever occur as wildcards.)
pub fn is_wildcard(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// Checks a topic name, as carried by PUBLISH, a will, or a response topic: 1..=65,535 bytes, no
/// wildcard, no U+0000. Levels may be empty and a leading `$` is allowed (the broker decides
/// whether clients may publish to `$` topics).
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    check_length(name)?;
    for byte in name.bytes() {
        match byte {
            b'+' | b'#' => return Err(TopicError::WildcardInName),
            0 => return Err(TopicError::NullCharacter),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a topic filter of SUBSCRIBE or UNSUBSCRIBE: 1..=65,535 bytes, no U+0000, `#` only alone
/// in the last level, `+` only alone in its level. A filter starting with `$share/` must be a
/// well-formed shared subscription (see [`parse_shared`]).
///
/// MQTT 3.1.1 has no shared subscriptions; under it a `$share/...` filter is an ordinary one, but
/// the strict form is still what interoperating brokers accept, so this one function serves all
/// versions.
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    match parse_shared(filter)? {
        Some(_) => Ok(()), // `parse_shared` validated the inner filter.
        None => validate_plain_filter(filter),
    }
}

/// Splits `$share/{group}/{filter}` into its parts; `Ok(None)` for a filter that does not start
/// with `$share/`. Checks the whole shared filter: a non-empty group without `+` or `#` (it cannot
/// contain `/`: the first `/` after the prefix ends it), and a non-empty valid inner filter.
/// The inner filter is never itself treated as shared: in `$share/a/$share/b/c` it is the ordinary
/// filter `$share/b/c`. Does not validate an ordinary filter (use [`validate_topic_filter`]).
pub fn parse_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    check_length(filter)?;
    let (group, inner) = match rest.split_once(LEVEL_SEPARATOR) {
        Some((group, inner)) => (group, inner),
        None => (rest, ""),
    };
    if group.is_empty() {
        return Err(TopicError::EmptyShareName);
    }
    for byte in group.bytes() {
        match byte {
            b'+' | b'#' => return Err(TopicError::InvalidShareName),
            0 => return Err(TopicError::NullCharacter),
            _ => {}
        }
    }
    if inner.is_empty() {
        return Err(TopicError::EmptySharedFilter);
    }
    validate_plain_filter(inner)?;
    Ok(Some(SharedFilter { group, filter: inner }))
}

/// Like [`parse_shared`], and also accepts EMQX's `$queue/{filter}` as the shared subscription
/// `$share/$queue/{filter}` (group [`QUEUE_GROUP`]), which is how EMQX defines it. Not part of
/// either MQTT specification: to the spec `$queue/a` is an ordinary filter, so a broker calls this
/// only when configured for EMQX compatibility. An empty or invalid filter after `$queue/` is an
/// error, as it is after a share name.
pub fn parse_shared_or_queue(filter: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(inner) = filter.strip_prefix(QUEUE_PREFIX) else {
        return parse_shared(filter);
    };
    check_length(filter)?;
    if inner.is_empty() {
        return Err(TopicError::EmptySharedFilter);
    }
    validate_plain_filter(inner)?;
    Ok(Some(SharedFilter { group: QUEUE_GROUP, filter: inner }))
}

/// True when `filter` matches the topic name `topic` (MQTT-4.7):
/// - a literal level matches the same text, case-sensitively, an empty level included;
/// - `+` matches exactly one level, an empty one included (`+/+` matches `/finance`);
/// - `#` matches its parent level and any number of child levels (`sport/#` matches `sport`);
/// - a filter whose first level is `+` or `#` does not match a topic starting with `$`
///   (MQTT-4.7.2-1).
///
/// `filter` must not be a shared filter: pass [`SharedFilter::filter`] instead. Matching is total
/// (no panic, no allocation) even for invalid inputs; there `#` matches the rest of the topic
/// wherever it occurs.
pub fn matches(filter: &str, topic: &str) -> bool {
    if is_dollar_topic(topic) && matches!(filter.as_bytes().first(), Some(b'+' | b'#')) {
        return false;
    }
    let mut filter_levels = levels(filter);
    let mut topic_levels = levels(topic);
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // `#` also matches when the topic has no more levels: that is the parent-level rule.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(wanted), Some(level)) => {
                if wanted != level {
                    return false;
                }
            }
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
        }
    }
}

/// The common length check of names and filters.
fn check_length(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > TOPIC_LEN_MAX_BYTES {
        return Err(TopicError::TooLong { len_bytes: topic.len() });
    }
    Ok(())
}

/// Validates a filter that is not treated as shared (an ordinary filter, or the inner filter of a
/// shared one).
fn validate_plain_filter(filter: &str) -> Result<(), TopicError> {
    check_length(filter)?;
    let mut remaining = levels(filter).peekable();
    while let Some(level) = remaining.next() {
        let is_last = remaining.peek().is_none();
        for byte in level.bytes() {
            match byte {
                b'#' if level.len() != 1 || !is_last => return Err(TopicError::InvalidMultiLevelWildcard),
                b'+' if level.len() != 1 => return Err(TopicError::InvalidSingleLevelWildcard),
                0 => return Err(TopicError::NullCharacter),
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Topic names: (name, expected result).
    const NAME_CASES: &[(&str, Result<(), TopicError>)] = &[
        ("sport/tennis/player1", Ok(())),
        ("/", Ok(())),
        ("/finance", Ok(())),
        ("a//b", Ok(())),
        ("$SYS/broker/uptime", Ok(())),
        ("sport/tennis player1", Ok(())), // a space is a valid character (4.7.3)
        ("ACCOUNTS", Ok(())),
        ("", Err(TopicError::Empty)),
        ("sport/+", Err(TopicError::WildcardInName)),
        ("sport/#", Err(TopicError::WildcardInName)),
        ("#", Err(TopicError::WildcardInName)),
        ("a+b", Err(TopicError::WildcardInName)),
        ("a\0b", Err(TopicError::NullCharacter)),
    ];

    #[test]
    fn topic_names() {
        for (name, expected) in NAME_CASES {
            assert_eq!(validate_topic_name(name), *expected, "name {name:?}");
        }
    }

    /// Topic filters: (filter, expected result). Includes every filter example of section 4.7 of
    /// MQTT 3.1.1 and 5.0 and the shared subscription examples of MQTT 5.0 4.8.2.
    const FILTER_CASES: &[(&str, Result<(), TopicError>)] = &[
        // 4.7.1.2 multi-level wildcard.
        ("sport/tennis/player1/#", Ok(())),
        ("sport/#", Ok(())),
        ("#", Ok(())),
        ("sport/tennis#", Err(TopicError::InvalidMultiLevelWildcard)),
        ("sport/tennis/#/ranking", Err(TopicError::InvalidMultiLevelWildcard)),
        ("#/", Err(TopicError::InvalidMultiLevelWildcard)),
        ("##", Err(TopicError::InvalidMultiLevelWildcard)),
        ("a/#b", Err(TopicError::InvalidMultiLevelWildcard)),
        // 4.7.1.3 single-level wildcard.
        ("+", Ok(())),
        ("+/tennis/#", Ok(())),
        ("sport/+/player1", Ok(())),
        ("/+", Ok(())),
        ("+/+", Ok(())),
        ("+/", Ok(())),
        ("sport+", Err(TopicError::InvalidSingleLevelWildcard)),
        ("++", Err(TopicError::InvalidSingleLevelWildcard)),
        ("a/+b/c", Err(TopicError::InvalidSingleLevelWildcard)),
        ("+#", Err(TopicError::InvalidSingleLevelWildcard)), // the first offending byte decides
        // 4.7.2 / 4.7.3: dollar topics, empty levels, the empty filter.
        ("$SYS/#", Ok(())),
        ("$SYS/monitor/+", Ok(())),
        ("a//b", Ok(())),
        ("/", Ok(())),
        ("//", Ok(())),
        ("", Err(TopicError::Empty)),
        ("a\0/#", Err(TopicError::NullCharacter)),
        // 4.8.2 shared subscriptions.
        ("$share/consumer1/sport/tennis/+", Ok(())),
        ("$share/consumer2/sport/tennis/+", Ok(())),
        ("$share/consumer1//finance", Ok(())),
        ("$share/consumer1/+/+", Ok(())),
        ("$share/g/#", Ok(())),
        ("$share/g/$SYS/#", Ok(())),
        ("$share/g/$share/h/x", Ok(())), // the inner filter is an ordinary one
        ("$share/g/", Err(TopicError::EmptySharedFilter)),
        ("$share/g", Err(TopicError::EmptySharedFilter)),
        ("$share/", Err(TopicError::EmptyShareName)),
        ("$share//a", Err(TopicError::EmptyShareName)),
        ("$share/+/a", Err(TopicError::InvalidShareName)),
        ("$share/g#/a", Err(TopicError::InvalidShareName)),
        ("$share/g/a/#/b", Err(TopicError::InvalidMultiLevelWildcard)),
        ("$share/g/a+", Err(TopicError::InvalidSingleLevelWildcard)),
        // Not shared: no slash after `$share`, or a different prefix.
        ("$share", Ok(())),
        ("$sharex/g/a", Ok(())),
        ("$queue/a", Ok(())),
        ("$queue/", Ok(())),
    ];

    #[test]
    fn topic_filters() {
        for (filter, expected) in FILTER_CASES {
            assert_eq!(validate_topic_filter(filter), *expected, "filter {filter:?}");
        }
    }

    #[test]
    fn length_limit_is_65535_bytes() {
        let longest = "a".repeat(TOPIC_LEN_MAX_BYTES);
        let too_long = "a".repeat(TOPIC_LEN_MAX_BYTES + 1);
        assert_eq!(validate_topic_name(&longest), Ok(()));
        assert_eq!(validate_topic_filter(&longest), Ok(()));
        assert_eq!(validate_topic_name(&too_long), Err(TopicError::TooLong { len_bytes: 65_536 }));
        assert_eq!(validate_topic_filter(&too_long), Err(TopicError::TooLong { len_bytes: 65_536 }));
        // The limit is on the whole shared filter, not on its inner part.
        let shared = format!("$share/g/{}", "a".repeat(TOPIC_LEN_MAX_BYTES - 9));
        assert_eq!(validate_topic_filter(&shared), Ok(()));
        let shared = format!("{shared}a");
        assert_eq!(validate_topic_filter(&shared), Err(TopicError::TooLong { len_bytes: 65_536 }));
        // Multi-byte characters count in bytes: 21,845 three-byte characters fit, one more does not.
        let wide = "\u{20AC}".repeat(21_845);
        assert_eq!(validate_topic_name(&wide), Ok(()));
        assert!(validate_topic_name(&format!("{wide}a")).is_err());
    }

    #[test]
    fn shared_filters_split_into_group_and_filter() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("sport/tennis", None),
            ("$SYS/#", None),
            ("$share/consumer1/sport/tennis/+", Some(("consumer1", "sport/tennis/+"))),
            ("$share/g//finance", Some(("g", "/finance"))),
            ("$share/g/#", Some(("g", "#"))),
            ("$share/g/$share/h/x", Some(("g", "$share/h/x"))),
            ("$queue/a/b", None), // only with parse_shared_or_queue
        ];
        for (filter, expected) in cases {
            let got = parse_shared(filter).unwrap().map(|s| (s.group, s.filter));
            assert_eq!(got, *expected, "filter {filter:?}");
        }
        assert_eq!(parse_shared("$share//a"), Err(TopicError::EmptyShareName));
        assert_eq!(parse_shared("$share/g/a#"), Err(TopicError::InvalidMultiLevelWildcard));
    }

    #[test]
    fn queue_prefix_is_emqx_shared_subscription() {
        assert_eq!(
            parse_shared_or_queue("$queue/a/+"),
            Ok(Some(SharedFilter { group: QUEUE_GROUP, filter: "a/+" }))
        );
        assert_eq!(parse_shared_or_queue("$share/g/a"), Ok(Some(SharedFilter { group: "g", filter: "a" })));
        assert_eq!(parse_shared_or_queue("a/b"), Ok(None));
        assert_eq!(parse_shared_or_queue("$queue/"), Err(TopicError::EmptySharedFilter));
        assert_eq!(parse_shared_or_queue("$queue/a/#/b"), Err(TopicError::InvalidMultiLevelWildcard));
    }

    /// (filter, topic, matches). Every matching example of MQTT 3.1.1 and 5.0 section 4.7, then
    /// edge cases.
    const MATCH_CASES: &[(&str, &str, bool)] = &[
        // 4.7.1.2: "sport/tennis/player1/#" matches these three.
        ("sport/tennis/player1/#", "sport/tennis/player1", true),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", true),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", true),
        // "sport/#" also matches the singular "sport", since # includes the parent level.
        ("sport/#", "sport", true),
        ("sport/#", "sport/tennis", true),
        ("sport/#", "sports", false),
        ("#", "sport/tennis/player1", true),
        ("#", "/", true),
        // 4.7.1.3: "sport/tennis/+" matches one level only.
        ("sport/tennis/+", "sport/tennis/player1", true),
        ("sport/tennis/+", "sport/tennis/player2", true),
        ("sport/tennis/+", "sport/tennis/player1/ranking", false),
        ("sport/+", "sport", false),
        ("sport/+", "sport/", true),
        // "+/+" and "/+" match "/finance"; "+" does not.
        ("+/+", "/finance", true),
        ("/+", "/finance", true),
        ("+", "/finance", false),
        ("+/tennis/#", "sport/tennis", true),
        ("+/tennis/#", "sport/tennis/player1/ranking", true),
        ("sport/+/player1", "sport/tennis/player1", true),
        ("sport/+/player1", "sport/tennis/player2", false),
        // 4.7.2: wildcards in the first level do not match `$` topics.
        ("#", "$SYS/broker/uptime", false),
        ("+/monitor/Clients", "$SYS/monitor/Clients", false),
        ("$SYS/#", "$SYS/monitor/Clients", true),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ("$SYS/#", "$SYS", true),
        ("#", "$", false),
        ("+", "$", false),
        ("a/#", "a/$b", true), // the rule is about the first level only
        ("+/+", "a/$b", true),
        // 4.7.3: case-sensitive, spaces allowed, empty levels are levels.
        ("ACCOUNTS", "ACCOUNTS", true),
        ("ACCOUNTS", "Accounts", false),
        ("accounts", "Accounts", false),
        ("Accounts payable", "Accounts payable", true),
        ("Accounts payable", "Accounts", false),
        ("/finance", "/finance", true),
        ("/finance", "finance", false),
        ("finance", "/finance", false),
        ("a//b", "a//b", true),
        ("a/+/b", "a//b", true),
        ("a/+/b", "a/b", false),
        ("a/#", "a//b", true),
        ("+", "", true), // an empty topic has one empty level (never valid as a name, though)
        ("/", "/", true),
        ("+/+", "/", true),
        ("+", "/", false),
        // Longer filter or longer topic.
        ("a/b/c", "a/b", false),
        ("a/b", "a/b/c", false),
        ("a/b/#", "a", false),
        // Multi-byte UTF-8 compares as text.
        ("caf\u{e9}/+", "caf\u{e9}/x", true),
        ("caf\u{e9}/+", "cafe/x", false),
    ];

    #[test]
    fn matching_table() {
        for (filter, topic, expected) in MATCH_CASES {
            assert_eq!(matches(filter, topic), *expected, "filter {filter:?} topic {topic:?}");
            assert_eq!(reference_matches(filter, topic), *expected, "reference: {filter:?} {topic:?}");
        }
    }

    #[test]
    fn level_helpers() {
        assert_eq!(levels("a//b").collect::<Vec<_>>(), ["a", "", "b"]);
        assert_eq!(levels("/").collect::<Vec<_>>(), ["", ""]);
        assert_eq!(levels("a").rev().collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            filter_levels("+/a//#").collect::<Vec<_>>(),
            [
                FilterLevel::SingleLevelWildcard,
                FilterLevel::Literal("a"),
                FilterLevel::Literal(""),
                FilterLevel::MultiLevelWildcard
            ]
        );
        assert!(is_dollar_topic("$SYS/x"));
        assert!(!is_dollar_topic("a/$SYS"));
        assert!(!is_dollar_topic(""));
        assert!(is_wildcard("a/+/b"));
        assert!(is_wildcard("#"));
        assert!(is_wildcard("$share/g/a/#"));
        assert!(!is_wildcard("$share/g/a/b"));
        assert!(!is_wildcard("a//b"));
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            TopicError::TooLong { len_bytes: 70_000 }.to_string(),
            "topic of 70000 bytes exceeds 65535 bytes"
        );
    }

    /// The reference: a declarative reading of 4.7, written independently of `matches`. A filter
    /// ending in `#` matches a topic whose levels start with the filter's other levels (`+` standing
    /// for any level); any other filter matches a topic with as many levels, each equal or `+`.
    fn reference_matches(filter: &str, topic: &str) -> bool {
        let filter: Vec<&str> = filter.split('/').collect();
        let topic: Vec<&str> = topic.split('/').collect();
        if topic[0].starts_with('$') && (filter[0] == "+" || filter[0] == "#") {
            return false;
        }
        let level_matches = |(f, t): (&&str, &&str)| *f == "+" || f == t;
        match filter.split_last() {
            Some((&"#", prefix)) => {
                topic.len() >= prefix.len() && prefix.iter().zip(topic.iter()).all(level_matches)
            }
            _ => filter.len() == topic.len() && filter.iter().zip(topic.iter()).all(level_matches),
        }
    }

    /// A small alphabet of levels, so that random filters and topics often agree.
    fn topic_level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "", "$SYS", "$", "sport"])
    }

    fn topic_name() -> impl Strategy<Value = String> {
        prop::collection::vec(topic_level(), 1..6)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("empty topic name", |name| !name.is_empty())
    }

    /// Valid filters: levels or `+`, optionally ending in `#`.
    fn topic_filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![4 => topic_level(), 2 => Just("+")];
        (prop::collection::vec(level, 0..6), any::<bool>()).prop_filter_map(
            "empty filter",
            |(mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                Some(levels.join("/")).filter(|filter| !filter.is_empty())
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn matches_agrees_with_reference(filter in topic_filter(), topic in topic_name()) {
            prop_assert_eq!(validate_topic_filter(&filter), Ok(()));
            prop_assert_eq!(validate_topic_name(&topic), Ok(()));
            prop_assert_eq!(matches(&filter, &topic), reference_matches(&filter, &topic));
        }

        /// A topic name is always matched by the filter equal to it and by `#` (unless `$`), and a
        /// filter derived from it by replacing levels with `+` still matches.
        #[test]
        fn derived_filters_match(topic in topic_name(), mask in prop::collection::vec(any::<bool>(), 6)) {
            prop_assert!(matches(&topic, &topic));
            prop_assert_eq!(matches("#", &topic), !topic.starts_with('$'));
            let derived: Vec<&str> = levels(&topic)
                .zip(mask.iter())
                .enumerate()
                .map(|(i, (level, plus))| if *plus && !(i == 0 && topic.starts_with('$')) { "+" } else { level })
                .collect();
            prop_assert!(matches(&derived.join("/"), &topic));
        }

        /// Arbitrary strings never panic, a string is never both a valid name and a wildcard filter,
        /// and validation agrees with a per-level reference.
        #[test]
        fn validation_agrees_with_reference(s in "[a+#/$\u{0}]{0,8}") {
            let name = validate_topic_name(&s).is_ok();
            prop_assert_eq!(name, !s.is_empty() && !s.contains(['+', '#', '\0']));
            if !s.starts_with(SHARE_PREFIX) {
                let reference = !s.is_empty()
                    && !s.contains('\0')
                    && {
                        let all: Vec<&str> = s.split('/').collect();
                        all.iter().enumerate().all(|(i, level)| {
                            (!level.contains('#') || (*level == "#" && i == all.len() - 1))
                                && (!level.contains('+') || *level == "+")
                        })
                    };
                prop_assert_eq!(validate_topic_filter(&s).is_ok(), reference, "filter {:?}", s);
            }
            let _ = matches(&s, &s);
        }
    }
}
