//! Rebalancing policies: a TOML file of rules by path prefix or tag, and per-file overrides
//! in tags, deciding for each file whether and where the rebalancer may move it.
//!
//! ```toml
//! [[policy]]
//! prefix = "/datasets/imagenet"   # or: tag = "tier=hot"
//! mode = "approve"                # auto | dry-run | approve | off
//! pin = ["node-a", "node-b"]      # moves only to these nodes
//! never_move = false
//! max_bytes_per_hour = "10GiB"    # on top of the global budget
//! min_reads = 2.0                 # heat that counts as hot
//! replication = 3                 # replicas a full node never sheds below
//! ```
//!
//! A file takes the first rule whose tag it has, else the rule with the longest prefix that
//! covers it, else the defaults; then its own tags override: `tier0.rebalance=MODE`,
//! `tier0.pin=NODE,NODE`, `tier0.never-move=true` (set with `tier0 tag` or
//! `tier0 admin pin`).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::rebalance::{Mode, RebalanceConfig};

pub const TAG_MODE: &str = "tier0.rebalance";
pub const TAG_PIN: &str = "tier0.pin";
pub const TAG_NEVER_MOVE: &str = "tier0.never-move";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    policy: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Bytes {
    Count(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    prefix: Option<String>,
    tag: Option<String>,
    mode: Option<String>,
    #[serde(default)]
    never_move: bool,
    #[serde(default)]
    pin: Vec<String>,
    max_bytes_per_hour: Option<Bytes>,
    min_reads: Option<f64>,
    replication: Option<u32>,
}

/// One rule, checked.
#[derive(Clone, Debug, PartialEq)]
struct Rule {
    name: String,
    prefix: Option<String>,
    tag: Option<(String, String)>,
    mode: Option<Mode>,
    never_move: bool,
    pin: Vec<String>,
    max_bytes_per_hour: Option<u64>,
    min_reads: Option<f64>,
    replication: Option<u32>,
}

/// The rules of a policy file (none: the defaults apply everywhere).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policies {
    rules: Vec<Rule>,
}

/// What applies to one file.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    pub mode: Mode,
    pub never_move: bool,
    /// Homes allowed (empty: any).
    pub pin: Vec<String>,
    /// This rule's own budget per rolling hour, on top of the global one.
    pub max_bytes_per_hour: Option<u64>,
    pub min_reads: f64,
    /// Replicas a node over its watermark never sheds below (`None`: the file's own
    /// replication factor).
    pub replication: Option<u32>,
    /// Which rule (and tags) decided, for the audit log.
    pub source: String,
}

impl Policies {
    /// Parses a policy file; an error names the rule and field.
    pub fn parse(text: &str) -> Result<Policies, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|error| error.to_string())?;
        let mut rules = Vec::new();
        for (index, spec) in file.policy.into_iter().enumerate() {
            let name = format!("policy[{index}]");
            let tag = match &spec.tag {
                None => None,
                Some(tag) => match tag.split_once('=') {
                    Some((key, value)) if !key.is_empty() => {
                        Some((key.to_string(), value.to_string()))
                    }
                    _ => return Err(format!("{name}.tag {tag:?}: write KEY=VALUE")),
                },
            };
            match (&spec.prefix, &tag) {
                (None, None) => return Err(format!("{name}: needs a prefix or a tag")),
                (Some(_), Some(_)) => {
                    return Err(format!("{name}: a prefix or a tag, not both"));
                }
                (Some(prefix), None) if !prefix.starts_with('/') => {
                    return Err(format!("{name}.prefix {prefix:?}: an absolute path"));
                }
                _ => {}
            }
            let mode = spec
                .mode
                .as_deref()
                .map(str::parse::<Mode>)
                .transpose()
                .map_err(|error| format!("{name}.mode: {error}"))?;
            let max_bytes_per_hour = match spec.max_bytes_per_hour {
                None => None,
                Some(Bytes::Count(count)) => Some(count),
                Some(Bytes::Text(text)) => Some(
                    parse_size::parse_size(&text)
                        .map_err(|error| format!("{name}.max_bytes_per_hour {text:?}: {error}"))?,
                ),
            };
            if let Some(min) = spec.min_reads
                && !(min.is_finite() && min >= 0.0)
            {
                return Err(format!("{name}.min_reads {min}: a number, 0 or more"));
            }
            if let Some(replication) = spec.replication
                && !(1..=8).contains(&replication)
            {
                return Err(format!("{name}.replication {replication}: 1 to 8"));
            }
            for node in &spec.pin {
                crate::membership::check_node_id(node)
                    .map_err(|error| format!("{name}.pin: {error}"))?;
            }
            rules.push(Rule {
                name,
                prefix: spec.prefix.map(|p| p.trim_end_matches('/').to_string()),
                tag,
                mode,
                never_move: spec.never_move,
                pin: spec.pin,
                max_bytes_per_hour,
                min_reads: spec.min_reads,
                replication: spec.replication,
            });
        }
        Ok(Policies { rules })
    }

    /// Reads and parses a policy file.
    pub fn load(path: &std::path::Path) -> Result<Policies, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        Self::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
    }

    /// What applies to the file at `path` with `tags`, given the global `defaults`.
    pub fn effective(
        &self,
        path: &str,
        tags: &BTreeMap<String, String>,
        defaults: &RebalanceConfig,
    ) -> Effective {
        let by_tag = self.rules.iter().find(|rule| {
            rule.tag
                .as_ref()
                .is_some_and(|(key, value)| tags.get(key) == Some(value))
        });
        let by_prefix = || {
            self.rules
                .iter()
                .filter(|rule| {
                    rule.prefix.as_deref().is_some_and(|prefix| {
                        prefix.is_empty()
                            || path == prefix
                            || path
                                .strip_prefix(prefix)
                                .is_some_and(|rest| rest.starts_with('/'))
                    })
                })
                .max_by_key(|rule| rule.prefix.as_ref().map_or(0, String::len))
        };
        let rule = by_tag.or_else(by_prefix);
        let mut effective = Effective {
            mode: rule.and_then(|r| r.mode).unwrap_or(defaults.mode),
            never_move: rule.is_some_and(|r| r.never_move),
            pin: rule.map(|r| r.pin.clone()).unwrap_or_default(),
            max_bytes_per_hour: rule.and_then(|r| r.max_bytes_per_hour),
            min_reads: rule.and_then(|r| r.min_reads).unwrap_or(defaults.min_reads),
            replication: rule.and_then(|r| r.replication),
            source: rule.map_or_else(|| "defaults".to_string(), |r| r.name.clone()),
        };
        let mut overridden = Vec::new();
        if let Some(mode) = tags.get(TAG_MODE).and_then(|m| m.parse::<Mode>().ok()) {
            effective.mode = mode;
            overridden.push(TAG_MODE);
        }
        if let Some(pin) = tags.get(TAG_PIN) {
            effective.pin = pin
                .split(',')
                .map(str::trim)
                .filter(|node| !node.is_empty())
                .map(str::to_string)
                .collect();
            overridden.push(TAG_PIN);
        }
        if let Some(never) = tags.get(TAG_NEVER_MOVE) {
            effective.never_move = never == "true";
            overridden.push(TAG_NEVER_MOVE);
        }
        if !overridden.is_empty() {
            effective.source = format!("{} + tags {}", effective.source, overridden.join(", "));
        }
        effective
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_longest_prefix_or_a_tag_decides_and_file_tags_override() {
        let policies = Policies::parse(
            r#"
            [[policy]]
            prefix = "/datasets"
            mode = "dry-run"

            [[policy]]
            prefix = "/datasets/imagenet/"
            mode = "approve"
            pin = ["n1", "n2"]
            max_bytes_per_hour = "1GiB"
            min_reads = 3.0
            replication = 3

            [[policy]]
            tag = "tier=archive"
            never_move = true
            "#,
        )
        .unwrap();
        let defaults = RebalanceConfig::default();
        let none = tags(&[]);
        let deep = policies.effective("/datasets/imagenet/train/0", &none, &defaults);
        assert_eq!(
            (
                deep.mode,
                deep.pin.len(),
                deep.max_bytes_per_hour,
                deep.min_reads
            ),
            (Mode::Approve, 2, Some(1 << 30), 3.0)
        );
        assert_eq!(deep.source, "policy[1]");
        assert_eq!(deep.replication, Some(3));
        let shallow = policies.effective("/datasets/web/0", &none, &defaults);
        assert_eq!(
            (shallow.mode, shallow.source.as_str()),
            (Mode::DryRun, "policy[0]")
        );
        // "/datasets" does not cover "/datasetsX".
        let other = policies.effective("/datasetsX/0", &none, &defaults);
        assert_eq!(
            (other.mode, other.source.as_str()),
            (Mode::Auto, "defaults")
        );
        // A tag rule beats any prefix.
        let archived = policies.effective(
            "/datasets/imagenet/x",
            &tags(&[("tier", "archive")]),
            &defaults,
        );
        assert!(archived.never_move);
        assert_eq!(archived.mode, Mode::Auto);
        // The file's own tags override whatever rule applied.
        let pinned = policies.effective(
            "/datasets/web/0",
            &tags(&[
                (TAG_PIN, "n3, n4"),
                (TAG_MODE, "auto"),
                (TAG_NEVER_MOVE, "false"),
            ]),
            &defaults,
        );
        assert_eq!(pinned.pin, vec!["n3".to_string(), "n4".to_string()]);
        assert_eq!(pinned.mode, Mode::Auto);
        assert!(pinned.source.contains("tags"), "{}", pinned.source);
    }

    #[test]
    fn a_bad_policy_file_is_an_error_naming_the_rule_and_field() {
        let cases = [
            (
                "[[policy]]\nmode = \"auto\"",
                "policy[0]: needs a prefix or a tag",
            ),
            ("[[policy]]\nprefix = \"rel\"", "policy[0].prefix"),
            ("[[policy]]\nprefix = \"/a\"\ntag = \"x=y\"", "not both"),
            ("[[policy]]\ntag = \"novalue\"", "policy[0].tag"),
            (
                "[[policy]]\nprefix = \"/a\"\nmode = \"sometimes\"",
                "policy[0].mode",
            ),
            (
                "[[policy]]\nprefix = \"/a\"\nmax_bytes_per_hour = \"lots\"",
                "policy[0].max_bytes_per_hour",
            ),
            (
                "[[policy]]\nprefix = \"/a\"\npin = [\"bad node\"]",
                "policy[0].pin",
            ),
            (
                "[[policy]]\nprefix = \"/a\"\nmin_reads = -1.0",
                "policy[0].min_reads",
            ),
            ("[[policy]]\nprefix = \"/a\"\nspeed = 3", "unknown field"),
            (
                "[[policy]]\nprefix = \"/a\"\nreplication = 0",
                "policy[0].replication",
            ),
            ("not toml at all [", ""),
        ];
        for (text, needle) in cases {
            let error = Policies::parse(text).unwrap_err();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
        assert_eq!(Policies::parse("").unwrap(), Policies::default());
    }
}
