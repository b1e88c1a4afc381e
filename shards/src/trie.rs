//! [`TopicTrie`]: topic filters to values, matched against topic names with MQTT wildcards.
//!
//! Owner: one shard (not `Send`-shared). Used twice per shard: as the trie slice (filters of the
//! shard's own sessions -> subscribers) and as the interest table (filters -> shards).
//!
//! Invariants:
//! - A node exists only while it or a descendant holds a non-empty value: [`TopicTrie::remove_if`]
//!   prunes empty branches, so memory follows the live filter set.
//! - Matching follows MQTT-4.7: `+` matches exactly one level, `#` the parent level and every level
//!   below it, and a topic whose first level starts with `$` is not matched by a filter whose first
//!   level is a wildcard (MQTT-4.7.2-1).
//! - Matching visits each value at most once per topic (a filter occupies exactly one node slot).

use std::collections::HashMap;

/// A node: exact children, a `+` child, and the values of the filter ending here and of the filter
/// ending here with `/#`.
#[derive(Debug)]
struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    plus: Option<Box<Node<V>>>,
    value: Option<V>,
    hash_value: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node { children: HashMap::new(), plus: None, value: None, hash_value: None }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.value.is_none() && self.hash_value.is_none()
    }
}

/// Topic filters mapped to values of type `V`.
#[derive(Debug)]
pub struct TopicTrie<V> {
    root: Node<V>,
    filter_count: usize,
}

impl<V> Default for TopicTrie<V> {
    fn default() -> Self {
        TopicTrie { root: Node::default(), filter_count: 0 }
    }
}

impl<V> TopicTrie<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of filters holding a value.
    pub fn filter_count(&self) -> usize {
        self.filter_count
    }

    /// The value of `filter`, created with `make` if absent. `filter` must be a valid filter.
    pub fn get_or_insert_with(&mut self, filter: &str, make: impl FnOnce() -> V) -> &mut V {
        let (node, is_hash) = Self::walk_create(&mut self.root, filter);
        let slot = if is_hash { &mut node.hash_value } else { &mut node.value };
        if slot.is_none() {
            self.filter_count += 1;
        }
        slot.get_or_insert_with(make)
    }

    /// The value of `filter`, if present.
    pub fn get_mut(&mut self, filter: &str) -> Option<&mut V> {
        let (levels, is_hash) = split_filter(filter);
        let mut node = &mut self.root;
        for level in levels {
            node = if level == "+" { node.plus.as_deref_mut()? } else { node.children.get_mut(level)? };
        }
        if is_hash {
            node.hash_value.as_mut()
        } else {
            node.value.as_mut()
        }
    }

    /// Applies `edit` to the value of `filter` (if present) and removes the value when `edit`
    /// returns true, pruning empty nodes. Returns whether the value was removed.
    pub fn remove_if(&mut self, filter: &str, edit: impl FnOnce(&mut V) -> bool) -> bool {
        let (levels, is_hash) = split_filter(filter);
        let levels: Vec<&str> = levels.collect();
        let removed = Self::remove_rec(&mut self.root, &levels, is_hash, edit);
        if removed {
            self.filter_count -= 1;
        }
        removed
    }

    fn remove_rec(
        node: &mut Node<V>,
        levels: &[&str],
        is_hash: bool,
        edit: impl FnOnce(&mut V) -> bool,
    ) -> bool {
        let Some((first, rest)) = levels.split_first() else {
            let slot = if is_hash { &mut node.hash_value } else { &mut node.value };
            let remove = match slot.as_mut() {
                Some(value) => edit(value),
                None => false,
            };
            if remove {
                *slot = None;
            }
            return remove;
        };
        if *first == "+" {
            let Some(child) = node.plus.as_deref_mut() else { return false };
            let removed = Self::remove_rec(child, rest, is_hash, edit);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        } else {
            let Some(child) = node.children.get_mut(*first) else { return false };
            let removed = Self::remove_rec(child, rest, is_hash, edit);
            if child.is_empty() {
                node.children.remove(*first);
            }
            removed
        }
    }

    fn walk_create<'a>(root: &'a mut Node<V>, filter: &str) -> (&'a mut Node<V>, bool) {
        let (levels, is_hash) = split_filter(filter);
        let mut node = root;
        for level in levels {
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        (node, is_hash)
    }

    /// Calls `visit(filter_is_wildcard, value)` for the value of every filter matching `topic`.
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&V)) {
        let dollar = topic.starts_with('$');
        let levels: LevelsVec<'_> = topic.split('/').collect();
        Self::match_rec(&self.root, &levels, dollar, &mut visit);
    }

    /// Like [`TopicTrie::for_each_match`] with mutable access (round-robin cursors live in values).
    pub fn for_each_match_mut(&mut self, topic: &str, mut visit: impl FnMut(&mut V)) {
        let dollar = topic.starts_with('$');
        let levels: LevelsVec<'_> = topic.split('/').collect();
        Self::match_rec_mut(&mut self.root, &levels, dollar, &mut visit);
    }

    fn match_rec(node: &Node<V>, levels: &[&str], skip_wild: bool, visit: &mut impl FnMut(&V)) {
        if !skip_wild {
            if let Some(value) = &node.hash_value {
                visit(value);
            }
        }
        let Some((first, rest)) = levels.split_first() else {
            if let Some(value) = &node.value {
                visit(value);
            }
            return;
        };
        if let Some(child) = node.children.get(*first) {
            Self::match_rec(child, rest, false, visit);
        }
        if !skip_wild {
            if let Some(child) = &node.plus {
                Self::match_rec(child, rest, false, visit);
            }
        }
    }

    fn match_rec_mut(node: &mut Node<V>, levels: &[&str], skip_wild: bool, visit: &mut impl FnMut(&mut V)) {
        if !skip_wild {
            if let Some(value) = &mut node.hash_value {
                visit(value);
            }
        }
        let Some((first, rest)) = levels.split_first() else {
            if let Some(value) = &mut node.value {
                visit(value);
            }
            return;
        };
        if let Some(child) = node.children.get_mut(*first) {
            Self::match_rec_mut(child, rest, false, visit);
        }
        if !skip_wild {
            if let Some(child) = &mut node.plus {
                Self::match_rec_mut(child, rest, false, visit);
            }
        }
    }
}

/// Topic levels collected without allocating for topics of up to 16 levels.
type LevelsVec<'a> = smallvec_lite::Levels<'a>;

/// Splits a filter into the levels before a trailing `#`, and whether it ends in `#`. A bare `#`
/// has no levels; every other filter has at least one (possibly empty) level.
fn split_filter(filter: &str) -> (impl Iterator<Item = &str>, bool) {
    let (prefix, is_hash) = if filter == "#" {
        (None, true)
    } else {
        match filter.strip_suffix("/#") {
            Some(prefix) => (Some(prefix), true),
            None => (Some(filter), false),
        }
    };
    (prefix.into_iter().flat_map(|p| p.split('/')), is_hash)
}

mod smallvec_lite {
    //! A fixed-capacity vector of topic levels that spills to the heap only for deep topics.

    /// Levels of one topic; at most 16 inline. Lives on the stack for one match only, so the size
    /// difference between the variants costs nothing.
    #[allow(clippy::large_enum_variant)]
    pub enum Levels<'a> {
        Inline { len: usize, items: [&'a str; 16] },
        Heap(Vec<&'a str>),
    }

    impl<'a> FromIterator<&'a str> for Levels<'a> {
        fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
            let mut items = [""; 16];
            let mut len = 0;
            let mut iter = iter.into_iter();
            for item in iter.by_ref() {
                if len == items.len() {
                    let mut heap = items.to_vec();
                    heap.push(item);
                    heap.extend(iter);
                    return Levels::Heap(heap);
                }
                items[len] = item;
                len += 1;
            }
            Levels::Inline { len, items }
        }
    }

    impl<'a> std::ops::Deref for Levels<'a> {
        type Target = [&'a str];
        fn deref(&self) -> &[&'a str] {
            match self {
                Levels::Inline { len, items } => &items[..*len],
                Levels::Heap(heap) => heap,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(filters: &[&str], topic: &str) -> Vec<String> {
        let mut trie = TopicTrie::new();
        for filter in filters {
            *trie.get_or_insert_with(filter, String::new) = filter.to_string();
        }
        let mut found = Vec::new();
        trie.for_each_match(topic, |value| found.push(value.clone()));
        found.sort();
        found
    }

    #[test]
    fn spec_examples() {
        let all = [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/+",
            "/+",
            "sport/+",
            "sport/tennis/+",
            "+/tennis/#",
        ];
        assert_eq!(
            matches(&all, "sport/tennis/player1"),
            ["#", "+/tennis/#", "sport/#", "sport/tennis/+", "sport/tennis/player1/#"]
        );
        assert_eq!(matches(&all, "sport"), ["#", "+", "sport/#"]);
        assert_eq!(matches(&all, "sport/"), ["#", "+/+", "sport/#", "sport/+"]);
        assert_eq!(matches(&all, "/finance"), ["#", "+/+", "/+"]);
        assert_eq!(
            matches(&["sport/tennis/player1/#"], "sport/tennis/player1/ranking/wimbledon"),
            ["sport/tennis/player1/#"]
        );
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        let all = ["#", "+/monitor/Clients", "$SYS/#", "$SYS/monitor/+"];
        assert_eq!(matches(&all, "$SYS/monitor/Clients"), ["$SYS/#", "$SYS/monitor/+"]);
        assert_eq!(matches(&all, "a/monitor/Clients"), ["#", "+/monitor/Clients"]);
    }

    #[test]
    fn remove_prunes_nodes() {
        let mut trie: TopicTrie<u32> = TopicTrie::new();
        *trie.get_or_insert_with("a/+/c/#", || 0) += 1;
        *trie.get_or_insert_with("a/b", || 0) += 1;
        assert_eq!(trie.filter_count(), 2);
        assert!(trie.remove_if("a/+/c/#", |_| true));
        assert!(!trie.remove_if("a/+/c/#", |_| true));
        assert!(trie.root.children["a"].plus.is_none());
        assert!(trie.remove_if("a/b", |_| true));
        assert!(trie.root.is_empty());
        assert_eq!(trie.filter_count(), 0);
    }

    #[test]
    fn deep_topics_spill_to_heap() {
        let filter = (0..40).map(|i| i.to_string()).collect::<Vec<_>>().join("/");
        assert_eq!(
            matches(&[&filter, "0/#"], &filter),
            [filter.clone(), "0/#".to_string()]
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
    }

    mod model {
        //! The trie against a naive model: a list of (filter, value) matched one by one with
        //! `shardmq_protocol::topic::matches`, under random inserts, removals and lookups.

        use std::collections::BTreeMap;

        use proptest::prelude::*;
        use shardmq_protocol::topic;

        use super::super::TopicTrie;

        /// Small alphabets so that filters and topics collide often.
        fn level() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("a".to_string()),
                Just("b".to_string()),
                Just(String::new()),
                Just("$s".to_string())
            ]
        }

        fn topic_name() -> impl Strategy<Value = String> {
            prop::collection::vec(level(), 1..5)
                .prop_map(|levels| levels.join("/"))
                .prop_filter("a valid topic name", |name| topic::validate_topic_name(name).is_ok())
        }

        fn filter() -> impl Strategy<Value = String> {
            let filter_level = prop_oneof![3 => level(), 1 => Just("+".to_string())];
            (prop::collection::vec(filter_level, 1..5), any::<bool>())
                .prop_map(|(levels, hash)| {
                    let mut filter = levels.join("/");
                    if hash {
                        filter.push_str("/#");
                    }
                    filter
                })
                .prop_filter("a valid filter", |filter| topic::validate_topic_filter(filter).is_ok())
        }

        #[derive(Debug, Clone)]
        enum Op {
            Insert(String, u32),
            Remove(String),
            Match(String),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => (prop_oneof![filter(), Just("#".to_string())], 0u32..100).prop_map(|(f, v)| Op::Insert(f, v)),
                1 => filter().prop_map(Op::Remove),
                3 => topic_name().prop_map(Op::Match),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn trie_agrees_with_naive_matching(ops in prop::collection::vec(op(), 1..60)) {
                let mut trie: TopicTrie<(String, u32)> = TopicTrie::new();
                let mut model: BTreeMap<String, u32> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Insert(filter, value) => {
                            prop_assert!(topic::validate_topic_filter(&filter).is_ok(), "{}", filter);
                            *trie.get_or_insert_with(&filter, || (filter.clone(), 0)) = (filter.clone(), value);
                            model.insert(filter, value);
                        }
                        Op::Remove(filter) => {
                            let removed = trie.remove_if(&filter, |_| true);
                            prop_assert_eq!(removed, model.remove(&filter).is_some());
                        }
                        Op::Match(topic_name) => {
                            let mut found = Vec::new();
                            trie.for_each_match(&topic_name, |(filter, value)| found.push((filter.clone(), *value)));
                            found.sort();
                            let expected: Vec<(String, u32)> = model
                                .iter()
                                .filter(|(filter, _)| topic::matches(filter, &topic_name))
                                .map(|(filter, value)| (filter.clone(), *value))
                                .collect();
                            prop_assert_eq!(found, expected, "topic {:?}", topic_name);
                        }
                    }
                    prop_assert_eq!(trie.filter_count(), model.len());
                }
            }
        }
    }
}
