//! Topic rights: which topics a device may publish to and which filters it
//! may subscribe to, from the `[[broker.acl]]` rules.
//!
//! A rule names users (`"*"` for every authenticated device) and grants them
//! MQTT topic filters to publish to and to subscribe with. `{user}` in a
//! filter stands for the device's user name (or its client certificate's
//! CN); it must be a whole level (`sensors/{user}/#`, not `sensors/x{user}`),
//! and it is the only placeholder. User names are 1 to 64 characters of
//! `[A-Za-z0-9_.-]`, so a substituted name can never add a level or a
//! wildcard. MQTT has no `..`: `sensors/alice/../bob` is a topic four levels
//! deep under `sensors/alice/`.
//!
//! - **Publish**: the topic must be a valid topic name (not empty, no
//!   wildcard, no NUL) and match one granted filter, with MQTT 3.1.1
//!   matching: `sensors/alice/#` also matches `sensors/alice` itself, and a
//!   filter starting with a wildcard never matches a topic starting with `$`
//!   (so `#` does not grant `$SYS/...` or `$edgefn/...`).
//! - **Subscribe**: every topic the requested filter can match must be
//!   matched by ONE granted filter (the grant *covers* the request):
//!   `a/+/c` covers `a/b/c` and `a/+/c` but not `a/#`; `a/#` covers `a`,
//!   `a/#` and `a/b/+`. A union of grants is not combined (`a` and `a/+/#`
//!   granted together do not cover `a/#`): grant `a/#` instead.
//! - **Shared subscriptions** (`$share/GROUP/FILTER`, MQTT 5) are allowed
//!   when FILTER is covered: a member receives a share of what FILTER
//!   matches, never more. Devices allowed the same FILTER can join each
//!   other's group and so take a share of its messages; give each device
//!   its own prefix if that matters.
//!
//! Without `[[broker.acl]]` the default is one rule: every device may
//! publish under `sensors/{user}/#` and subscribe to nothing.

use serde::Deserialize;

use crate::topic::{TopicFilter, validate_topic_name};

/// The only placeholder a filter may contain.
const USER_PLACEHOLDER: &str = "{user}";

/// One `[[broker.acl]]` table: the rights it grants and to whom.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// Whom the rule applies to: user names (as in the password file, or a
    /// client certificate's CN), or `"*"` for every authenticated device.
    #[serde(default = "default_users")]
    pub users: Vec<String>,
    /// Topic filters these users may publish to, so a device can write only
    /// its own topics (`sensors/{user}/#`) and cannot pose as another one.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters these users may subscribe with (a subscription must be
    /// covered by one of them), so a device reads only what it is granted.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

fn default_users() -> Vec<String> {
    vec!["*".to_owned()]
}

/// The rules used when the configuration has no `[[broker.acl]]`: every
/// device may publish under `sensors/{user}/#` and read nothing.
pub fn default_rules() -> Vec<AclRule> {
    vec![AclRule {
        users: default_users(),
        publish: vec!["sensors/{user}/#".to_owned()],
        subscribe: Vec::new(),
    }]
}

pub use super::passwd::check_user_name;

/// Validates rules; pushes `(key, reason)` for every problem, with keys like
/// `broker.acl[2].publish[0]`.
pub fn validate(rules: &[AclRule], problems: &mut Vec<(String, String)>) {
    for (i, rule) in rules.iter().enumerate() {
        let key = format!("broker.acl[{i}]");
        if rule.users.is_empty() {
            problems.push((
                format!("{key}.users"),
                "is empty, so the rule applies to no one: name users, or `*` for every device"
                    .to_owned(),
            ));
        }
        for (j, user) in rule.users.iter().enumerate() {
            if user != "*"
                && let Err(reason) = check_user_name(user)
            {
                problems.push((
                    format!("{key}.users[{j}]"),
                    format!("`{}` {reason}", user.escape_debug()),
                ));
            }
        }
        for (field, filters) in [("publish", &rule.publish), ("subscribe", &rule.subscribe)] {
            for (j, filter) in filters.iter().enumerate() {
                if let Err(reason) = check_filter(filter) {
                    problems.push((format!("{key}.{field}[{j}]"), reason));
                }
            }
        }
    }
}

/// Checks one granted filter: placeholders, then MQTT filter syntax.
fn check_filter(filter: &str) -> Result<(), String> {
    if filter.starts_with("$share/") {
        return Err(format!(
            "`{filter}`: grant the filter itself; a shared subscription is judged by its filter"
        ));
    }
    for level in filter.split('/') {
        if level == USER_PLACEHOLDER {
            continue;
        }
        if level.contains(USER_PLACEHOLDER) {
            return Err(format!(
                "`{filter}`: `{{user}}` must be a whole level (as in `sensors/{{user}}/#`)"
            ));
        }
        if level.contains(['{', '}']) {
            return Err(format!(
                "`{filter}`: `{{user}}` is the only placeholder, and `{{` and `}}` may appear only in it"
            ));
        }
    }
    TopicFilter::parse(&filter.replace(USER_PLACEHOLDER, "user"))
        .map(drop)
        .map_err(|e| format!("`{filter}` is not a valid MQTT topic filter: {e}"))
}

/// The compiled rights of one logged-in user (placeholders substituted).
#[derive(Debug, Clone)]
pub struct Rights {
    /// Everything is allowed (loopback and the gateway's own clients).
    all: bool,
    /// Filters the user may publish to.
    publish: Vec<TopicFilter>,
    /// Filters a subscription must be covered by.
    subscribe: Vec<TopicFilter>,
}

impl Rights {
    /// The rights `rules` grant `user`. A user name that is not valid (see
    /// [`check_user_name`]) gets no rights at all.
    pub fn for_user(rules: &[AclRule], user: &str) -> Rights {
        let mut rights = Rights {
            all: false,
            publish: Vec::new(),
            subscribe: Vec::new(),
        };
        if check_user_name(user).is_err() {
            return rights;
        }
        let compile = |filters: &[String], out: &mut Vec<TopicFilter>| {
            for f in filters {
                // Levels are replaced one by one so `{user}` inside a longer
                // level (refused by `validate`) is never substituted.
                let substituted = f
                    .split('/')
                    .map(|l| if l == USER_PLACEHOLDER { user } else { l })
                    .collect::<Vec<_>>()
                    .join("/");
                if check_filter(f).is_ok()
                    && let Ok(parsed) = TopicFilter::parse(&substituted)
                {
                    out.push(parsed);
                }
            }
        };
        for rule in rules
            .iter()
            .filter(|r| r.users.iter().any(|u| u == "*" || u == user))
        {
            compile(&rule.publish, &mut rights.publish);
            compile(&rule.subscribe, &mut rights.subscribe);
        }
        rights
    }

    /// Every valid topic and filter: for anonymous loopback clients and the
    /// gateway's own clients.
    pub fn everything() -> Rights {
        Rights {
            all: true,
            publish: Vec::new(),
            subscribe: Vec::new(),
        }
    }

    /// Whether the user may publish to `topic`: a valid topic name (not
    /// empty, no wildcard, no NUL) that a granted filter matches.
    pub fn may_publish(&self, topic: &str) -> bool {
        validate_topic_name(topic).is_ok()
            && (self.all || self.publish.iter().any(|f| f.matches(topic)))
    }

    /// Whether the user may subscribe with `filter`: a valid filter every
    /// topic of which one granted filter matches. `$share/GROUP/FILTER` is
    /// judged by FILTER. Invalid filters are refused.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let Some(inner) = unshare(filter) else {
            return false;
        };
        let Ok(requested) = TopicFilter::parse(inner) else {
            return false;
        };
        self.all || self.subscribe.iter().any(|g| covers(g, &requested))
    }
}

/// The filter of a shared subscription (`$share/GROUP/FILTER`), or the
/// filter itself if it is not one; `None` if it is a malformed one (empty
/// group, a wildcard in the group, or no filter).
fn unshare(filter: &str) -> Option<&str> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Some(filter);
    };
    let (group, inner) = rest.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return None;
    }
    Some(inner)
}

/// Whether every topic `requested` matches is matched by `granted`.
fn covers(granted: &TopicFilter, requested: &TopicFilter) -> bool {
    let wildcard = |l: &str| l == "+" || l == "#";
    let mut g = granted.as_str().split('/').peekable();
    let mut r = requested.as_str().split('/').peekable();
    // A grant starting with a wildcard does not match `$` topics, which a
    // request starting with a `$` literal level asks for.
    if g.peek().is_some_and(|l| wildcard(l))
        && r.peek().is_some_and(|l| l.starts_with('$') && !wildcard(l))
    {
        return false;
    }
    loop {
        match (g.next(), r.next()) {
            (None, None) => return true,
            // `#` matches the parent level and everything below it.
            (Some("#"), _) => return true,
            // The request reaches levels the grant does not (or stops
            // where the grant needs more), or is deeper without limit.
            (None, Some(_)) | (Some(_), None) | (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(_), Some("+")) => return false,
            (Some(a), Some(b)) if a != b => return false,
            (Some(_), Some(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(users: &[&str], publish: &[&str], subscribe: &[&str]) -> AclRule {
        let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        AclRule {
            users: own(users),
            publish: own(publish),
            subscribe: own(subscribe),
        }
    }

    fn problems(rules: &[AclRule]) -> Vec<(String, String)> {
        let mut p = Vec::new();
        validate(rules, &mut p);
        p
    }

    /// `(granted, requested, expected)` for [`Rights::may_subscribe`] and
    /// `(granted, topic, expected)` for [`Rights::may_publish`], as alice.
    fn check(table: &[(&str, &str, bool)], subscribe: bool) {
        for &(granted, asked, expected) in table {
            let rules = [rule(&["*"], &[granted], &[granted])];
            assert!(
                problems(&rules).is_empty(),
                "{granted}: {:?}",
                problems(&rules)
            );
            let rights = Rights::for_user(&rules, "alice");
            let got = if subscribe {
                rights.may_subscribe(asked)
            } else {
                rights.may_publish(asked)
            };
            assert_eq!(got, expected, "granted `{granted}`, asked `{asked}`");
        }
    }

    #[test]
    fn publish_stays_within_the_granted_prefix() {
        check(
            &[
                ("sensors/{user}/#", "sensors/alice/t", true),
                ("sensors/{user}/#", "sensors/alice/a/b/c", true),
                // MQTT: `#` also matches the parent level.
                ("sensors/{user}/#", "sensors/alice", true),
                // No `..` in MQTT: just a level below alice's prefix.
                ("sensors/{user}/#", "sensors/alice/../bob", true),
                ("sensors/{user}/#", "sensors/../bob", false),
                ("sensors/{user}/#", "sensors/bob/t", false),
                ("sensors/{user}/#", "sensors/alice2/x", false),
                ("sensors/{user}/#", "sensors/alic", false),
                ("sensors/{user}/#", "sensors/Alice/t", false),
                ("sensors/{user}/#", "sensors//alice/t", false),
                ("sensors/{user}/#", "/sensors/alice/t", false),
                ("sensors/{user}/#", "sensors", false),
                // Not topic names: wildcards, empty, NUL.
                ("sensors/{user}/#", "sensors/alice/#", false),
                ("sensors/{user}/#", "sensors/alice/+", false),
                ("sensors/{user}/#", "", false),
                ("sensors/{user}/#", "sensors/alice/a\0b", false),
                ("sensors/{user}/+", "sensors/alice/t", true),
                ("sensors/{user}/+", "sensors/alice/", true),
                ("sensors/{user}/+", "sensors/alice/t/u", false),
                ("sensors/{user}", "sensors/alice", true),
                ("sensors/{user}", "sensors/alice/t", false),
                ("sensors//x", "sensors//x", true),
                ("sensors//x", "sensors/x", false),
                ("sensors/+/x", "sensors//x", true),
                // `#` and `+` first never match `$` topics.
                ("#", "anything/at/all", true),
                ("#", "$SYS/broker/load", false),
                ("#", "$edgefn/deadletter/f", false),
                ("+/#", "$SYS/x", false),
                ("$SYS/#", "$SYS/x", true),
            ],
            false,
        );
    }

    #[test]
    fn subscriptions_must_be_covered_by_one_grant() {
        check(
            &[
                ("a/+/c", "a/b/c", true),
                ("a/+/c", "a/+/c", true),
                ("a/+/c", "a/#", false),
                ("a/+/c", "a/b/#", false),
                ("a/+/c", "a/+/+", false),
                ("a/+/c", "a/b", false),
                ("a/#", "a/#", true),
                ("a/#", "a/b/+", true),
                ("a/#", "a", true),
                ("a/#", "a/+/c/#", true),
                ("a/#", "#", false),
                ("a/#", "+/b", false),
                ("a/#", "ab", false),
                ("a", "a", true),
                ("a", "a/#", false),
                ("a/+/#", "a", false),
                ("a/+/#", "a/b", true),
                ("a/+/#", "a/#", false),
                ("commands/{user}/#", "commands/alice/#", true),
                ("commands/{user}/#", "commands/alice/x/+", true),
                ("commands/{user}/#", "commands/+/x", false),
                ("commands/{user}/#", "commands/#", false),
                ("commands/{user}/#", "commands/bob/#", false),
                ("commands/{user}/#", "commands/alice2/#", false),
                ("commands/{user}/#", "#", false),
                ("commands/{user}/#", "+/#", false),
                ("commands/{user}/#", "+/alice/#", false),
                ("sensors//x", "sensors//x", true),
                ("sensors//x", "sensors/+/x", false),
                ("sensors/+/x", "sensors//x", true),
                // `#` granted covers everything but `$` topics.
                ("#", "#", true),
                ("#", "+/b", true),
                ("#", "$SYS/#", false),
                ("#", "$SYS/broker", false),
                ("+/#", "$edgefn/deadletter/+", false),
                ("$SYS/#", "$SYS/broker/+", true),
                // Invalid filters are refused.
                ("#", "", false),
                ("#", "a/#/b", false),
                ("#", "a+/b", false),
                ("#", "a/b#", false),
                ("#", "a\0", false),
            ],
            true,
        );
    }

    #[test]
    fn shared_subscriptions_are_judged_by_their_filter() {
        check(
            &[
                ("commands/{user}/#", "$share/g/commands/alice/#", true),
                ("commands/{user}/#", "$share/g/commands/alice/+", true),
                ("commands/{user}/#", "$share/g/commands/bob/#", false),
                ("commands/{user}/#", "$share/g/#", false),
                ("#", "$share/g/#", true),
                ("#", "$share/g/$SYS/#", false),
                // Malformed shares: empty or wildcard group, no filter.
                ("#", "$share//a", false),
                ("#", "$share/+/a", false),
                ("#", "$share/g#/a", false),
                ("#", "$share/g", false),
                ("#", "$share/g/", false),
            ],
            true,
        );
    }

    #[test]
    fn rules_apply_to_their_users_only() {
        let rules = [
            rule(&["*"], &["sensors/{user}/#"], &[]),
            rule(&["ops"], &["commands/#"], &["sensors/#", "alerts/#"]),
            rule(&["alice", "bob"], &[], &["commands/{user}/#"]),
        ];
        assert!(problems(&rules).is_empty());
        let alice = Rights::for_user(&rules, "alice");
        assert!(alice.may_publish("sensors/alice/t"));
        assert!(!alice.may_publish("commands/alice/x"));
        assert!(alice.may_subscribe("commands/alice/#"));
        assert!(!alice.may_subscribe("sensors/#"));
        let ops = Rights::for_user(&rules, "ops");
        assert!(ops.may_publish("commands/alice/x"));
        assert!(ops.may_publish("sensors/ops/x"));
        assert!(!ops.may_publish("sensors/alice/x"));
        assert!(ops.may_subscribe("sensors/+/t"));
        assert!(!ops.may_subscribe("commands/ops/#"));
        // Users are matched exactly, case included.
        let carol = Rights::for_user(&rules, "Alice");
        assert!(!carol.may_subscribe("commands/Alice/#"));
        assert!(carol.may_publish("sensors/Alice/x"));
    }

    #[test]
    fn invalid_user_names_get_no_rights() {
        let rules = [rule(&["*"], &["#", "sensors/{user}/#"], &["#"])];
        for user in ["", "+", "#", "a/b", "$SYS", "*", "a b", &"a".repeat(65)] {
            let rights = Rights::for_user(&rules, user);
            assert!(!rights.may_publish("sensors/x"), "{user:?}");
            assert!(!rights.may_subscribe("x"), "{user:?}");
        }
    }

    #[test]
    fn default_rules_let_devices_write_their_own_prefix_and_read_nothing() {
        let rules = default_rules();
        assert!(problems(&rules).is_empty());
        let alice = Rights::for_user(&rules, "alice");
        assert!(alice.may_publish("sensors/alice/temperature"));
        assert!(!alice.may_publish("sensors/bob/temperature"));
        assert!(!alice.may_publish("alerts/x"));
        for filter in ["#", "sensors/alice/#", "sensors/alice/temperature"] {
            assert!(!alice.may_subscribe(filter), "{filter}");
        }
        let rule: AclRule = toml::from_str("publish = [\"x\"]").unwrap();
        assert_eq!(rule.users, ["*"]);
        assert!(rule.subscribe.is_empty());
        assert!(toml::from_str::<AclRule>("topics = [\"x\"]").is_err());
    }

    #[test]
    fn everything_allows_every_valid_topic_and_filter() {
        let all = Rights::everything();
        for ok in ["a", "$SYS/x", "$edgefn/deadletter/f"] {
            assert!(all.may_publish(ok), "{ok}");
        }
        for ok in ["#", "$SYS/#", "$share/g/#"] {
            assert!(all.may_subscribe(ok), "{ok}");
        }
        assert!(!all.may_publish("a/#"));
        assert!(!all.may_publish(""));
        assert!(!all.may_subscribe("a/#/b"));
    }

    #[test]
    fn validation_names_each_bad_entry() {
        let rules = [
            rule(&["*"], &["sensors/{user}/#"], &[]),
            rule(&[], &[], &[]),
            rule(
                &["alice", "a/b", "", "+", "*"],
                &[
                    "",
                    "a/#/b",
                    "a/b+",
                    "x/{user}y/z",
                    "{client}/x",
                    "a}",
                    "{user}",
                ],
                &["sensors/#", "a#", "$share/g/a"],
            ),
        ];
        let got = problems(&rules);
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "broker.acl[1].users",
                "broker.acl[2].users[1]",
                "broker.acl[2].users[2]",
                "broker.acl[2].users[3]",
                "broker.acl[2].publish[0]",
                "broker.acl[2].publish[1]",
                "broker.acl[2].publish[2]",
                "broker.acl[2].publish[3]",
                "broker.acl[2].publish[4]",
                "broker.acl[2].publish[5]",
                "broker.acl[2].subscribe[1]",
                "broker.acl[2].subscribe[2]",
            ],
            "{got:#?}"
        );
        let reason = |k: &str| &got.iter().find(|(key, _)| key == k).unwrap().1;
        assert!(reason("broker.acl[2].publish[3]").contains("whole level"));
        assert!(reason("broker.acl[2].publish[4]").contains("only placeholder"));
        assert!(reason("broker.acl[2].publish[1]").contains("`#`"));
    }

    #[test]
    fn user_names_follow_the_password_file_rule() {
        for ok in ["alice", "a", "dev-01.barn_7", &"x".repeat(64)] {
            assert!(check_user_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a+",
            "#",
            "a b",
            "$x",
            "é",
            "a:b",
            &"x".repeat(65),
        ] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
    }
}
