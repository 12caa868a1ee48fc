//! The operator's policy file (TOML): the mode, trusted sources and interfaces, and rules that
//! add to or replace a container's exposure without recreating it (labels are fixed at create).
//!
//! ```toml
//! mode = "enforce"                      # or "audit": count would-drops, drop nothing
//! trusted_sources = ["10.0.0.0/8"]      # treated as inside: never dropped
//! trusted_interfaces = ["wg0"]          # never filtered
//! deny = ["203.0.113.0/24"]             # may reach no container port, whatever opens it
//! deny_files = ["/etc/container-guard/deny.txt"]  # one address or prefix per line
//!
//! [management]                         # the engine's own doors (Swarm, the API on tcp)
//! cluster = ["10.1.0.0/24"]             # may reach Swarm's ports besides the nodes Docker names
//! admin = ["192.0.2.10"]                # may reach the Docker API on tcp and a manager's 2377
//!
//! [[rule]]
//! name = "office reaches the shop database"
//! match = { compose_project = "shop", compose_service = "db" }
//! allow = [{ ports = "5432/tcp", from = ["192.0.2.0/24"] }]
//! ratelimit = [{ ports = "5432/tcp", rate = "30/m", burst = 10 }]   # new flows per source
//! ```
//!
//! A file that does not parse is rejected whole, with the line and column of the problem, and
//! the policy in force stays as it was.

use std::{
    fmt, fs, io,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    policy::labels::{LabelProblem, parse_ports},
    policy::rates::{self, RateRule},
    policy::snapshot::Container,
    policy::{Cidr, Declared, Opening, Sources},
};

pub const DEFAULT_PATH: &str = "/etc/container-guard/guard.toml";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop what the policy does not allow.
    #[default]
    Enforce,
    /// Drop nothing; count and report every would-drop.
    Audit,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyFile {
    pub mode: Mode,
    pub trusted_sources: Vec<Cidr>,
    pub trusted_interfaces: Vec<String>,
    /// Sources that may reach no container port from outside, whatever opens it.
    pub deny: Vec<Cidr>,
    /// Files of such sources (one per line, `#` comments), re-read when they change.
    pub deny_files: Vec<PathBuf>,
    pub management: Management,
    pub rules: Vec<Rule>,
}

/// Who may reach the engine's own doors (README, "What it protects"), besides the
/// swarm's nodes, which the agent learns from the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct Management {
    /// `false` leaves the engine's ports to the host's firewall: guard judges none of them.
    pub enforce: bool,
    /// May reach Swarm's overlay, gossip and control ports (other nodes' networks, say).
    pub cluster: Vec<Cidr>,
    /// May reach the Docker API on tcp and a manager's control port.
    pub admin: Vec<Cidr>,
}

impl Default for Management {
    fn default() -> Self {
        Management { enforce: true, cluster: Vec::new(), admin: Vec::new() }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// `rule "NAME"` or `rule #N` (1-based), for status and explain.
    pub name: String,
    pub matcher: Matcher,
    pub openings: Vec<Opening>,
    /// Limits on new flows per source; on a port an earlier rule or a label limits too, this
    /// one is in force.
    pub limits: Vec<RateRule>,
    /// Replace the exposure (openings and limits) that labels and earlier rules gave, instead
    /// of adding to it.
    pub replace: bool,
    /// Audit mode for the matched containers only.
    pub mode: Option<Mode>,
}

/// Every given criterion must hold. Names and images take `*` wildcards.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matcher {
    pub container: Option<String>,
    pub compose_project: Option<String>,
    pub compose_service: Option<String>,
    pub image: Option<String>,
    /// `key=value`, or `key` for "has this label".
    pub label: Option<String>,
}

const COMPOSE_PROJECT: &str = "com.docker.compose.project";
const COMPOSE_SERVICE: &str = "com.docker.compose.service";

impl Matcher {
    pub fn matches(&self, c: &Container) -> bool {
        let label = |key: &str| c.labels.get(key).map(String::as_str);
        self.container.as_deref().is_none_or(|p| glob(p, &c.name))
            && self.image.as_deref().is_none_or(|p| glob(p, &c.image))
            && self.compose_project.as_deref().is_none_or(|p| label(COMPOSE_PROJECT) == Some(p))
            && self.compose_service.as_deref().is_none_or(|p| label(COMPOSE_SERVICE) == Some(p))
            && self.label.as_deref().is_none_or(|l| match l.split_once('=') {
                Some((k, v)) => label(k) == Some(v),
                None => label(l).is_some(),
            })
    }

    fn is_empty(&self) -> bool {
        *self == Matcher::default()
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else { return pattern == text };
    let Some(mut remaining) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = rest.split('*').collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return remaining.ends_with(part);
        }
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: String, line: usize, column: usize, message: String },
}

/// Reads the file at `path`; a missing file is an empty policy (the defaults).
pub fn load(path: &Path) -> Result<PolicyFile, FileError> {
    match fs::read_to_string(path) {
        Ok(text) => parse(&text, &path.display().to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PolicyFile::default()),
        Err(source) => Err(FileError::Read { path: path.display().to_string(), source }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    trusted_sources: Vec<Spanned<String>>,
    #[serde(default)]
    trusted_interfaces: Vec<String>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
    #[serde(default)]
    deny_files: Vec<Spanned<String>>,
    #[serde(default)]
    management: RawManagement,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManagement {
    #[serde(default = "yes")]
    enforce: bool,
    #[serde(default)]
    cluster: Vec<Spanned<String>>,
    #[serde(default)]
    admin: Vec<Spanned<String>>,
}

impl Default for RawManagement {
    fn default() -> Self {
        RawManagement { enforce: true, cluster: Vec::new(), admin: Vec::new() }
    }
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    #[serde(rename = "match")]
    matcher: Matcher,
    #[serde(default)]
    expose: Vec<Spanned<RawPorts>>,
    #[serde(default)]
    allow: Vec<RawAllow>,
    #[serde(default)]
    ratelimit: Vec<RawRateLimit>,
    #[serde(default)]
    replace: bool,
    mode: Option<Mode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    ports: Spanned<RawPorts>,
    from: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    ports: Spanned<RawPorts>,
    rate: Spanned<String>,
    burst: Option<Spanned<i64>>,
}

/// Ports as written: a list like a label's (`"5432/tcp, 8000-8010/udp"`), or a bare number
/// (a TCP port, as a bare number is in a label).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawPorts {
    Text(String),
    Number(i64),
}

impl RawPorts {
    fn text(&self) -> String {
        match self {
            RawPorts::Text(text) => text.clone(),
            RawPorts::Number(n) => n.to_string(),
        }
    }
}

/// serde's and toml's words for what went wrong, in the file's terms: no type names of
/// this program's, and what to write instead.
fn in_file_terms(message: &str) -> String {
    const TERMS: [(&str, &str); 6] = [
        (
            "invalid type: map, expected a sequence",
            "expected a list [...], found a table (rules are written [[rule]], not [rule])",
        ),
        (
            "expected struct RawAllow",
            "expected a table such as { ports = \"5432/tcp\", from = [\"192.0.2.0/24\"] }",
        ),
        ("expected struct RawRule", "expected a rule: [[rule]] with match = { ... }"),
        (
            "expected struct RawRateLimit",
            "expected a table such as { ports = \"443/tcp\", rate = \"100/s\", burst = 200 }",
        ),
        ("expected struct Matcher", "expected a table such as { container = \"web-*\" }"),
        (
            "data did not match any variant of untagged enum RawPorts",
            "expected ports such as \"5432/tcp\", \"8000-8010/udp, 53/udp\" or 5432",
        ),
    ];
    let mut message = message.to_owned();
    for (theirs, ours) in TERMS {
        message = message.replace(theirs, ours);
    }
    message
}

/// Parses and validates a whole file; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<PolicyFile, FileError> {
    let invalid = |span: Range<usize>, message: String| {
        let (line, column) = line_column(text, span.start);
        FileError::Invalid { path: origin.to_string(), line, column, message }
    };
    let raw: RawFile = toml::from_str(text)
        .map_err(|e| invalid(e.span().unwrap_or(0..0), in_file_terms(e.message())))?;

    let cidr = |s: &Spanned<String>| {
        s.get_ref().trim().parse::<Cidr>().map_err(|e| invalid(s.span(), e.to_string()))
    };
    let trusted_sources = raw.trusted_sources.iter().map(cidr).collect::<Result<_, _>>()?;
    let deny = raw.deny.iter().map(cidr).collect::<Result<_, _>>()?;
    let mut deny_files = Vec::new();
    for file in &raw.deny_files {
        let path = PathBuf::from(file.get_ref());
        if !path.is_absolute() {
            return Err(invalid(
                file.span(),
                format!("deny file {path:?} is not an absolute path"),
            ));
        }
        deny_files.push(path);
    }
    let management = Management {
        enforce: raw.management.enforce,
        cluster: raw.management.cluster.iter().map(cidr).collect::<Result<_, _>>()?,
        admin: raw.management.admin.iter().map(cidr).collect::<Result<_, _>>()?,
    };

    let mut rules = Vec::new();
    for (i, spanned) in raw.rules.iter().enumerate() {
        let span = spanned.span();
        let r = spanned.get_ref();
        let name = match &r.name {
            Some(n) => format!("rule {n:?}"),
            None => format!("rule #{}", i + 1),
        };
        if r.matcher.is_empty() {
            return Err(invalid(
                span,
                format!(
                    "{name} matches nothing: give match = {{ container = \"*\" }} to match every container"
                ),
            ));
        }
        if r.expose.is_empty()
            && r.allow.is_empty()
            && r.ratelimit.is_empty()
            && r.mode.is_none()
            && !r.replace
        {
            return Err(invalid(
                span,
                format!("{name} has no effect: give expose, allow, ratelimit, replace or mode"),
            ));
        }
        let origin_rule = format!("file {name}");
        let ports = |s: &Spanned<RawPorts>| {
            parse_ports(&s.get_ref().text())
                .map_err(|p: LabelProblem| invalid(s.span(), p.to_string()))
        };
        let mut openings = Vec::new();
        for spec in &r.expose {
            for ports in ports(spec)? {
                openings.push(Opening {
                    ports,
                    sources: Sources::Everyone,
                    rule: origin_rule.clone(),
                });
            }
        }
        for allow in &r.allow {
            if allow.from.is_empty() {
                return Err(invalid(
                    allow.ports.span(),
                    format!("{name}: allow needs at least one source in `from`"),
                ));
            }
            let sources: Vec<Cidr> = allow.from.iter().map(cidr).collect::<Result<_, _>>()?;
            for ports in ports(&allow.ports)? {
                openings.push(Opening {
                    ports,
                    sources: Sources::Listed(sources.clone()),
                    rule: origin_rule.clone(),
                });
            }
        }
        let mut limits = Vec::new();
        for limit in &r.ratelimit {
            let burst = match &limit.burst {
                Some(b) => Some(u64::try_from(*b.get_ref()).map_err(|_| {
                    invalid(
                        b.span(),
                        rates::RateProblem::BadBurst(b.get_ref().to_string()).to_string(),
                    )
                })?),
                None => None,
            };
            let parsed = rates::parse_limit(limit.rate.get_ref(), burst);
            let parsed = parsed.map_err(|p| invalid(limit.rate.span(), p.to_string()))?;
            for ports in ports(&limit.ports)? {
                limits.push(RateRule { ports, limit: parsed, rule: origin_rule.clone() });
            }
        }
        let limits =
            rates::checked(limits).map_err(|p| invalid(span.clone(), format!("{name}: {p}")))?;
        rules.push(Rule {
            name,
            matcher: r.matcher.clone(),
            openings,
            limits,
            replace: r.replace,
            mode: r.mode,
        });
    }
    Ok(PolicyFile {
        mode: raw.mode,
        trusted_sources,
        trusted_interfaces: raw.trusted_interfaces,
        deny,
        deny_files,
        management,
        rules,
    })
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A container's openings and limits once the file's rules have had their say, and whether it
/// is audited.
pub fn apply_rules(
    file: &PolicyFile,
    container: &Container,
    from_labels: Declared,
) -> (Declared, Mode) {
    let mut declared = from_labels;
    let mut mode = file.mode;
    for rule in file.rules.iter().filter(|r| r.matcher.matches(container)) {
        if rule.replace {
            declared = Declared::default();
        }
        declared.openings.extend(rule.openings.iter().cloned());
        declared.limits.extend(rule.limits.iter().cloned());
        if rule.mode == Some(Mode::Audit) {
            mode = Mode::Audit;
        }
    }
    (declared, mode)
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::{PortSpec, Proto};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn container(name: &str, image: &str, labels_: &[(&str, &str)]) -> Container {
        Container {
            id: "a".repeat(64),
            name: name.into(),
            image: image.into(),
            labels: labels(labels_),
            addresses: vec![],
            published: vec![],
        }
    }

    const EXAMPLE: &str = r#"
mode = "audit"
trusted_sources = ["10.0.0.0/8", "fd00:8::/64"]
trusted_interfaces = ["wg0"]

[management]
cluster = ["10.1.0.0/24"]
admin = ["192.0.2.10"]

[[rule]]
name = "office db"
match = { compose_project = "shop", compose_service = "db" }
allow = [{ ports = "5432/tcp", from = ["192.0.2.0/24", "198.51.100.7"] }]

[[rule]]
match = { image = "nginx:*" }
expose = ["443", "80/tcp"]
ratelimit = [{ ports = "443, 80", rate = "100/s", burst = 200 }, { ports = "*/udp", rate = "30/m" }]
replace = true
mode = "enforce"
"#;

    #[test]
    fn parses_the_documented_shape() {
        let f = parse(EXAMPLE, "guard.toml").unwrap();
        assert_eq!(f.mode, Mode::Audit);
        assert_eq!(f.trusted_sources.len(), 2);
        assert_eq!(f.trusted_interfaces, ["wg0"]);
        assert!(f.management.enforce, "the engine's doors are guarded unless the file says not");
        assert_eq!((f.management.cluster.len(), f.management.admin.len()), (1, 1));
        assert!(!parse("[management]\nenforce = false\n", "x").unwrap().management.enforce);
        assert_eq!(f.rules.len(), 2);
        assert_eq!(f.rules[0].name, "rule \"office db\"");
        assert_eq!(f.rules[1].name, "rule #2");
        assert_eq!(f.rules[1].openings.len(), 2);
        assert_eq!(f.rules[0].openings[0].rule, "file rule \"office db\"");
        assert_eq!(parse("", "x").unwrap(), PolicyFile::default());
    }

    #[test]
    fn rules_add_to_or_replace_label_openings() {
        let f = parse(EXAMPLE, "guard.toml").unwrap();
        let label_opening = Opening {
            ports: PortSpec::Range { proto: Proto::Tcp, first: 8080, last: 8080 },
            sources: Sources::Everyone,
            rule: "label guard.expose".into(),
        };
        let db = container(
            "shop-db-1",
            "postgres:16",
            &[(COMPOSE_PROJECT, "shop"), (COMPOSE_SERVICE, "db")],
        );
        let label_limit = RateRule {
            ports: label_opening.ports,
            limit: rates::parse_limit("5/s", None).unwrap(),
            rule: "label guard.ratelimit".into(),
        };
        let from_labels =
            Declared { openings: vec![label_opening], limits: vec![label_limit.clone()] };
        let (declared, mode) = apply_rules(&f, &db, from_labels.clone());
        assert_eq!(declared.openings.len(), 2, "added to the label's");
        assert_eq!(declared.limits, [label_limit], "the label's limit stays");
        assert_eq!(mode, Mode::Audit, "the file's mode");
        let web = container("web", "nginx:1.27", &[]);
        let (declared, _) = apply_rules(&f, &web, from_labels);
        assert_eq!(declared.openings.len(), 2);
        assert!(declared.openings.iter().all(|o| o.rule == "file rule #2"), "replaced the label's");
        let limits: Vec<String> = declared.limits.iter().map(ToString::to_string).collect();
        assert_eq!(
            limits,
            ["443/tcp 100/s burst 200", "80/tcp 100/s burst 200", "*/udp 30/m burst 30"]
        );
        assert!(declared.limits.iter().all(|l| l.rule == "file rule #2"), "replaced the label's");
        let other = container("other", "redis", &[(COMPOSE_PROJECT, "shop")]);
        assert_eq!(apply_rules(&f, &other, Declared::default()).0, Declared::default());
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let cases = [
            ("mode = \"permissive\"\n", 1, "permissive"),
            ("trusted_sources = [\"10.0.0.0/8\",\n  \"10.0.0.0/33\"]\n", 2, "10.0.0.0/33"),
            ("[management]\nadmin = [\"192.0.2.300\"]\n", 2, "192.0.2.300"),
            ("[management]\nclusters = []\n", 2, "clusters"),
            ("[[rule]]\nmatch = { container = \"db\" }\nexpose = [\"443/icmp\"]\n", 3, "icmp"),
            ("[[rule]]\nmatch = { container = \"db\" }\nexpose = [\"*/foo\"]\n", 3, "\"foo\""),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nallow = [{ ports = \"*-3/udp\", from = [\"10.0.0.0/8\"] }]\n",
                3,
                "*-3/udp",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nallow = [{ ports = \"5432\", from = [\"nowhere\"] }]\n",
                3,
                "nowhere",
            ),
            ("[[rule]]\nmatch = { contianer = \"db\" }\nexpose = [\"443\"]\n", 2, "contianer"),
            ("[[rule]]\nmatch = {}\nexpose = [\"443\"]\n", 1, "matches nothing"),
            ("[[rule]]\nmatch = { container = \"db\" }\n", 1, "no effect"),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [{ ports = \"443\", rate = \"10/h\" }]\n",
                3,
                "N/s (new flows a second) or N/m",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [{ ports = \"443\", rate = \"0/s\" }]\n",
                3,
                "at least 1/s",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [{ ports = \"443\", rate = \"10/s\", burst = 0 }]\n",
                3,
                "bad burst \"0\"",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [{ ports = \"443\", rate = \"10/s\", burst = -3 }]\n",
                3,
                "bad burst \"-3\"",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [{ ports = \"*\", rate = \"10/s\" }]\n",
                1,
                "limit */tcp, */udp or */sctp",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [{ ports = \"44x\", rate = \"10/s\" }]\n",
                3,
                "44x",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [{ ports = \"443\", rate = \"1/s\" }, { ports = \"400-500\", rate = \"2/s\" }]\n",
                1,
                "443/tcp is limited twice",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [{ ports = \"443\", rate = \"1/s\", brust = 3 }]\n",
                3,
                "brust",
            ),
            (
                "[[rule]]\nmatch = { container = \"db\" }\nratelimit = [\"443/tcp 100/s\"]\n",
                3,
                "rate = \"100/s\", burst = 200 }",
            ),
            ("expose = 443\n", 1, "expose"),
            ("mode = \n", 1, ""),
        ];
        for (text, line, needle) in cases {
            let err = parse(text, "guard.toml").expect_err(text);
            let message = err.to_string();
            assert!(message.starts_with(&format!("guard.toml:{line}:")), "{text:?} gave {message}");
            assert!(message.contains(needle), "{text:?} gave {message}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob("nginx:*", "nginx:1.27"));
        assert!(glob("*", ""));
        assert!(glob("shop-*-1", "shop-db-1"));
        assert!(!glob("shop-*-1", "shop-db-2"));
        assert!(glob("a*b*c", "a-b-b-c"));
        assert!(!glob("nginx", "nginx:1"));
    }

    #[test]
    fn the_example_file_in_the_repo_parses() {
        let text = include_str!("../../../examples/guard.toml");
        let f = parse(text, "examples/guard.toml").unwrap();
        assert_eq!((f.mode, f.rules.len(), f.trusted_sources.len()), (Mode::Enforce, 5, 2));
        let media = PortSpec::EveryPortOf(Proto::Udp);
        assert_eq!(f.rules[2].openings.iter().map(|o| o.ports).collect::<Vec<_>>(), [media]);
        assert!(f.rules[3].replace && f.rules[3].openings.is_empty());
        let limits: Vec<String> = f.rules[0].limits.iter().map(ToString::to_string).collect();
        assert_eq!(limits, ["443/tcp 100/s burst 200", "80/tcp 100/s burst 200"]);
    }

    #[test]
    fn a_missing_file_is_the_default_policy() {
        assert_eq!(load(Path::new("/nonexistent/guard.toml")).unwrap(), PolicyFile::default());
    }

    #[test]
    fn errors_speak_of_the_file_not_of_this_program() {
        let error = |text: &str| parse(text, "guard.toml").unwrap_err().to_string();
        let single = error("[rule]\nmatch = { container = \"db\" }\nexpose = [\"80\"]\n");
        assert!(single.contains("[[rule]], not [rule]"), "{single}");
        let allow = error(
            "[[rule]]\nmatch = { container = \"db\" }\nallow = [\"5432/tcp from 10.0.0.0/8\"]\n",
        );
        assert!(allow.contains("{ ports = \"5432/tcp\", from = ["), "{allow}");
        let ports = error("[[rule]]\nmatch = { container = \"db\" }\nexpose = [true]\n");
        assert!(ports.contains("expected ports such as"), "{ports}");
        for message in [single, allow, ports] {
            assert!(!message.contains("Raw") && !message.contains("struct"), "{message}");
        }
    }

    #[test]
    fn a_bare_number_is_a_tcp_port() {
        let f = parse(
            "[[rule]]\nmatch = { container = \"db\" }\nexpose = [80]\nallow = [{ ports = 5432, from = [\"10.0.0.0/8\"] }]\n",
            "guard.toml",
        )
        .unwrap();
        let ports: Vec<PortSpec> = f.rules[0].openings.iter().map(|o| o.ports).collect();
        let tcp = |port| PortSpec::Range { proto: Proto::Tcp, first: port, last: port };
        assert_eq!(ports, [tcp(80), tcp(5432)]);
        let out_of_range =
            parse("[[rule]]\nmatch = { container = \"db\" }\nexpose = [70000]\n", "guard.toml");
        assert!(out_of_range.is_err());
    }
}
