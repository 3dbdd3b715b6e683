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
//! high_watermark = 0.8            # this rule's data: shed from, and not copied to, nodes
//!                                 # fuller than this (default --high-watermark)
//! ```
//!
//! A file takes the first rule whose tag it has, else the rule with the longest prefix that
//! covers it, else the defaults; then its own tags override: `tier0.rebalance=MODE`,
//! `tier0.pin=NODE,NODE`, `tier0.never-move=true` (set with `tier0 tag` or
//! `tier0 admin pin`).
//!
//! An optional `[agents]` table says what agents (calls through `tier0 mcp`, marked with the
//! `x-tier0-agent` header) may change; without it they are read-only:
//!
//! ```toml
//! [agents]
//! allow = ["prestage", "snapshot", "rollback"]   # the mutating actions agents may take
//! prefixes = ["/datasets"]                       # the paths they may take them on (default: all)
//! ```

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
    agents: Option<AgentsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsSpec {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    prefixes: Vec<String>,
}

/// A mutating action an agent may be allowed to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgentAction {
    /// `Orchestration.Prestage`: copy a path to nodes (or cancel that).
    Prestage,
    /// `Snapshots.Create`.
    Snapshot,
    /// `Snapshots.Rollback`.
    Rollback,
}

impl AgentAction {
    pub const ALL: [AgentAction; 3] = [
        AgentAction::Prestage,
        AgentAction::Snapshot,
        AgentAction::Rollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentAction::Prestage => "prestage",
            AgentAction::Snapshot => "snapshot",
            AgentAction::Rollback => "rollback",
        }
    }
}

impl std::fmt::Display for AgentAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AgentAction {
    type Err = String;

    fn from_str(text: &str) -> Result<AgentAction, String> {
        AgentAction::ALL
            .into_iter()
            .find(|action| action.as_str() == text)
            .ok_or_else(|| {
                let all: Vec<&str> = AgentAction::ALL.iter().map(|a| a.as_str()).collect();
                format!("one of {}", all.join(", "))
            })
    }
}

/// What agents may change (the `[agents]` table); the default: nothing (read-only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentPolicy {
    /// The actions allowed, in order, each once.
    pub allow: Vec<AgentAction>,
    /// The paths those actions may touch, without a trailing `/` but for `/` itself (empty:
    /// every path).
    pub prefixes: Vec<String>,
}

impl AgentPolicy {
    pub fn allows(&self, action: AgentAction) -> bool {
        self.allow.contains(&action)
    }

    /// Whether `agent` may take `action` on `path` (`None`: no path to check); the refusal
    /// names the part of the policy that refused.
    pub fn check(
        &self,
        agent: &str,
        action: AgentAction,
        path: Option<&str>,
    ) -> Result<(), String> {
        if !self.allows(action) {
            let allowed = if self.allow.is_empty() {
                "none: agents are read-only".to_string()
            } else {
                let names: Vec<&str> = self.allow.iter().map(|a| a.as_str()).collect();
                format!("only {}", names.join(", "))
            };
            return Err(format!(
                "agent {agent:?} may not {action}: the agents policy ([agents] allow in the \
                 control plane's --policy file) allows {allowed}"
            ));
        }
        if let Some(path) = path
            && !self.covers(path)
        {
            return Err(format!(
                "agent {agent:?} may not {action} {path}: outside the agents policy's prefixes \
                 {} ([agents] prefixes in the control plane's --policy file)",
                self.prefixes.join(", ")
            ));
        }
        Ok(())
    }

    /// Whether `path` is at or below one of the prefixes (or there are none).
    pub fn covers(&self, path: &str) -> bool {
        self.prefixes.is_empty()
            || self.prefixes.iter().any(|prefix| {
                prefix == "/"
                    || path == prefix
                    || path
                        .strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            })
    }
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
    high_watermark: Option<f64>,
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
    high_watermark: Option<f64>,
}

/// The rules of a policy file (none: the defaults apply everywhere).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policies {
    rules: Vec<Rule>,
    agents: AgentPolicy,
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
    /// The share of a node's capacity past which the file's replicas are shed from it and
    /// none is copied to it.
    pub high_watermark: f64,
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
            if let Some(mark) = spec.high_watermark
                && !(mark > 0.0 && mark <= 1.0)
            {
                return Err(format!(
                    "{name}.high_watermark {mark}: a share of capacity, above 0, at most 1"
                ));
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
                high_watermark: spec.high_watermark,
            });
        }
        let agents = match file.agents {
            None => AgentPolicy::default(),
            Some(spec) => parse_agents(spec)?,
        };
        Ok(Policies { rules, agents })
    }

    /// The lowest high watermark of any rule, or `default`: a node past it may have
    /// replicas to shed.
    pub fn lowest_watermark(&self, default: f64) -> f64 {
        self.rules
            .iter()
            .filter_map(|rule| rule.high_watermark)
            .fold(default, f64::min)
    }

    /// What agents may change (`[agents]`; default: nothing).
    pub fn agents(&self) -> &AgentPolicy {
        &self.agents
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
            high_watermark: rule
                .and_then(|r| r.high_watermark)
                .unwrap_or(defaults.high_watermark),
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

fn parse_agents(spec: AgentsSpec) -> Result<AgentPolicy, String> {
    let mut allow = Vec::new();
    for (index, name) in spec.allow.iter().enumerate() {
        let action = name
            .parse::<AgentAction>()
            .map_err(|error| format!("agents.allow[{index}] {name:?}: {error}"))?;
        if !allow.contains(&action) {
            allow.push(action);
        }
    }
    let mut prefixes = Vec::new();
    for (index, prefix) in spec.prefixes.iter().enumerate() {
        crate::path::NsPath::parse(&format!("agents.prefixes[{index}]"), prefix)
            .map_err(|error| error.to_string())?;
        let trimmed = prefix.trim_end_matches('/');
        prefixes.push(if trimmed.is_empty() { "/" } else { trimmed }.to_string());
    }
    Ok(AgentPolicy { allow, prefixes })
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

    #[test]
    fn agents_are_read_only_unless_the_agents_table_allows_an_action() {
        let none = Policies::parse("[[policy]]\nprefix = \"/a\"\nmode = \"auto\"").unwrap();
        assert_eq!(none.agents(), &AgentPolicy::default());
        let refused = none
            .agents()
            .check("mcp", AgentAction::Snapshot, Some("/a"))
            .unwrap_err();
        assert!(refused.contains("agents are read-only"), "{refused}");
        assert!(refused.contains("[agents] allow"), "{refused}");

        let policies = Policies::parse(
            r#"
            [agents]
            allow = ["snapshot", "prestage", "snapshot"]
            prefixes = ["/datasets/", "/scratch"]
            "#,
        )
        .unwrap();
        let agents = policies.agents();
        assert_eq!(agents.allow, [AgentAction::Snapshot, AgentAction::Prestage]);
        assert_eq!(agents.prefixes, ["/datasets", "/scratch"]);
        assert!(
            agents
                .check("a", AgentAction::Snapshot, Some("/datasets"))
                .is_ok()
        );
        assert!(
            agents
                .check("a", AgentAction::Prestage, Some("/scratch/x/y"))
                .is_ok()
        );
        let outside = agents
            .check("a", AgentAction::Snapshot, Some("/datasetsX"))
            .unwrap_err();
        assert!(outside.contains("[agents] prefixes"), "{outside}");
        assert!(outside.contains("/datasetsX"), "{outside}");
        let not_listed = agents
            .check("a", AgentAction::Rollback, Some("/datasets"))
            .unwrap_err();
        assert!(
            not_listed.contains("only snapshot, prestage"),
            "{not_listed}"
        );
        // "/" covers everything.
        let everywhere =
            Policies::parse("[agents]\nallow = [\"rollback\"]\nprefixes = [\"/\"]").unwrap();
        assert!(
            everywhere
                .agents()
                .check("a", AgentAction::Rollback, Some("/x"))
                .is_ok()
        );
    }

    #[test]
    fn a_bad_agents_table_is_an_error_naming_the_field() {
        let cases = [
            (
                "[agents]\nallow = [\"prestage\", \"delete\"]",
                "agents.allow[1] \"delete\": one of prestage, snapshot, rollback",
            ),
            (
                "[agents]\nprefixes = [\"rel\"]",
                "agents.prefixes[0] \"rel\"",
            ),
            (
                "[agents]\nallow = [\"snapshot\"]\nsudo = true",
                "unknown field `sudo`",
            ),
            ("[agents]\nallow = \"snapshot\"", "allow"),
            ("[agent]\nallow = []", "unknown field `agent`"),
        ];
        for (text, needle) in cases {
            let error = Policies::parse(text).unwrap_err();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }
}
