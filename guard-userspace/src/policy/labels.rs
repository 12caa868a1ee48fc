//! Container labels → openings.
//!
//! - `guard.expose=443/tcp,8443`: container ports open to everyone.
//! - `guard.allow.<name>=5432/tcp from 10.8.0.0/24, 192.0.2.7`: ports open to those sources.
//! - `guard.ratelimit=443/tcp 100/s burst 200, */udp 30/m`: per-source limits on new flows to
//!   ports an opening lets in, one `PORT RATE [burst N]` per comma-separated item (see
//!   [`crate::policy::rates`]).
//!
//! Port lists take `port`, `port/proto`, `first-last`, `first-last/proto`, `*/proto` (every port
//! of one protocol: one map entry, never a 65,535-port range) and `*` (every port of every
//! protocol, and port-less traffic such as ICMP); a bare port is tcp, as in Docker. `*` is
//! accepted by `guard.expose` as by `guard.allow.*`: the same port lists mean the same in both. A label that does not parse is rejected *whole* (never
//! half-applied) and reported: it opens nothing, and the container's other labels and rules
//! still apply.

use std::collections::BTreeMap;

use crate::{
    policy::rates::{self, RateProblem, RateRule},
    policy::{Cidr, Declared, Opening, PortSpec, Proto, Sources},
};

pub const EXPOSE: &str = "guard.expose";
pub const ALLOW_PREFIX: &str = "guard.allow.";
pub const RATELIMIT: &str = "guard.ratelimit";
const GUARD_PREFIX: &str = "guard.";

/// Longest label value accepted; anything longer is a mistake or an attack on the agent.
pub const MAX_VALUE_LEN: usize = 4096;
/// Ports one label may open one by one (each is a map entry); `*` and `*/proto` open all in one
/// entry.
pub const MAX_PORTS_PER_LABEL: u32 = 4096;
/// Sources one `guard.allow.*` label may list.
pub const MAX_SOURCES_PER_LABEL: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {label}: {problem}")]
pub struct LabelError {
    pub label: String,
    pub problem: LabelProblem,
}

impl LabelError {
    /// What the operator is told, naming the container, and exactly what was ignored.
    pub fn warning(&self, container: &str) -> String {
        // A limit that does not parse is not guessed at: its ports stay as their openings say.
        let effect = if self.label == RATELIMIT {
            "it limits nothing: the ports it names stay as their openings say, without a limit"
        } else {
            "it opens nothing"
        };
        format!(
            "container {container}: {self}; this label is ignored whole ({effect}; the container's other labels and rules still apply)"
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelProblem {
    #[error("empty value; expected ports such as 443/tcp,8000-8010/udp, */udp or *")]
    Empty,
    #[error("value is {0} bytes long, the limit is {MAX_VALUE_LEN}")]
    TooLong(usize),
    #[error("bad port {0:?}: ports are 1-65535")]
    BadPort(String),
    #[error("bad range {0:?}: expected first-last with first <= last, e.g. 8000-8010/tcp")]
    BadRange(String),
    #[error("unknown protocol {0:?}: expected tcp, udp or sctp")]
    UnknownProto(String),
    #[error(
        "opens {0} single ports, the limit is {MAX_PORTS_PER_LABEL}; use */tcp (every port of one protocol) or * (every port)"
    )]
    TooManyPorts(u32),
    #[error(
        "bad port {0:?}: * stands for every port on its own (* or */udp), not within a range or a number"
    )]
    BadWildcard(String),
    #[error("missing sources: expected PORTS from SOURCES, e.g. 5432/tcp from 10.8.0.0/24")]
    MissingFrom,
    #[error("no sources after 'from'")]
    NoSources,
    #[error("lists {0} sources, the limit is {MAX_SOURCES_PER_LABEL}")]
    TooManySources(usize),
    #[error(transparent)]
    BadSource(#[from] crate::policy::BadCidr),
    #[error("'from' is for guard.allow.<name> labels; guard.expose opens ports to everyone")]
    FromInExpose,
    #[error("guard.allow needs a name: guard.allow.<name>=PORTS from SOURCES")]
    MissingAllowName,
    #[error(transparent)]
    Rate(#[from] RateProblem),
    #[error("unknown guard label; known: guard.expose, guard.allow.<name>, guard.ratelimit")]
    Unknown,
}

/// Every opening and limit the container's labels declare, and every label that was rejected.
pub fn parse_labels(labels: &BTreeMap<String, String>) -> (Declared, Vec<LabelError>) {
    let mut declared = Declared::default();
    let mut errors = Vec::new();
    for (key, value) in labels {
        if !key.starts_with(GUARD_PREFIX) {
            continue;
        }
        match parse_label(key, value) {
            Ok(mut parsed) => {
                declared.openings.append(&mut parsed.openings);
                declared.limits.append(&mut parsed.limits);
            }
            Err(problem) => errors.push(LabelError { label: key.clone(), problem }),
        }
    }
    (declared, errors)
}

fn parse_label(key: &str, value: &str) -> Result<Declared, LabelProblem> {
    if value.len() > MAX_VALUE_LEN {
        return Err(LabelProblem::TooLong(value.len()));
    }
    let rule = format!("label {key}");
    let opens = |openings| Ok(Declared { openings, limits: Vec::new() });
    if key == EXPOSE {
        if split_from(value).is_some() {
            return Err(LabelProblem::FromInExpose);
        }
        let ports = parse_ports(value)?;
        return opens(openings(ports, Sources::Everyone, rule));
    }
    if let Some(name) = key.strip_prefix(ALLOW_PREFIX) {
        if name.trim().is_empty() {
            return Err(LabelProblem::MissingAllowName);
        }
        let (ports, sources) = split_from(value).ok_or(LabelProblem::MissingFrom)?;
        let ports = parse_ports(ports)?;
        let sources = parse_sources(sources)?;
        return opens(openings(ports, Sources::Listed(sources), rule));
    }
    if key == RATELIMIT {
        return Ok(Declared { openings: Vec::new(), limits: parse_ratelimit(value, &rule)? });
    }
    Err(LabelProblem::Unknown)
}

/// `PORT RATE [burst N]` items separated by commas: `443/tcp 100/s burst 200, */udp 30/m`.
/// Each item names one port spec (a port, a range or `*/proto`), so a comma never leaves a
/// port without its rate.
fn parse_ratelimit(value: &str, rule: &str) -> Result<Vec<RateRule>, LabelProblem> {
    let mut rules = Vec::new();
    for item in value.split(',').map(str::trim) {
        let (head, burst) = match split_word(item, "burst") {
            Some((head, burst)) => (head.trim(), Some(parse_burst(burst)?)),
            None => (item, None),
        };
        let (spec, rate) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| RateProblem::MissingRate(item.to_string()))?;
        let limit = rates::parse_limit(rate, burst)?;
        for ports in parse_ports(spec)? {
            rules.push(RateRule { ports, limit, rule: rule.to_string() });
        }
    }
    within_port_limit(&rules.iter().map(|r| r.ports).collect::<Vec<_>>())?;
    // Checked together: two limits on one port, in two items, are refused.
    Ok(rates::checked(rules)?)
}

/// The number after `burst`, and nothing after it.
fn parse_burst(text: &str) -> Result<u64, RateProblem> {
    let mut words = text.split_whitespace();
    let number = words.next().ok_or(RateProblem::MissingBurst)?;
    if let Some(extra) = words.next() {
        return Err(RateProblem::Trailing(extra.to_string()));
    }
    number.parse().map_err(|_| RateProblem::BadBurst(number.to_string()))
}

fn openings(ports: Vec<PortSpec>, sources: Sources, rule: String) -> Vec<Opening> {
    ports
        .into_iter()
        .map(|ports| Opening { ports, sources: sources.clone(), rule: rule.clone() })
        .collect()
}

/// Splits `PORTS from SOURCES` on the word `from`.
fn split_from(value: &str) -> Option<(&str, &str)> {
    split_word(value, "from")
}

/// Splits `value` around the first whole-word `word` (any case).
fn split_word<'a>(value: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    let lower = value.to_ascii_lowercase();
    let at = lower
        .match_indices(word)
        .map(|(i, _)| i)
        .find(|&i| is_word_boundary(&lower, i, i + word.len()))?;
    Some((&value[..at], &value[at + word.len()..]))
}

fn is_word_boundary(s: &str, start: usize, end: usize) -> bool {
    let before = s[..start].chars().next_back().is_none_or(char::is_whitespace);
    let after = s[end..].chars().next().is_none_or(char::is_whitespace);
    before && after
}

/// A comma-separated port list.
pub fn parse_ports(list: &str) -> Result<Vec<PortSpec>, LabelProblem> {
    if list.trim().is_empty() {
        return Err(LabelProblem::Empty);
    }
    let specs =
        list.split(',').map(|item| parse_port_item(item.trim())).collect::<Result<Vec<_>, _>>()?;
    within_port_limit(&specs)?;
    Ok(specs)
}

/// Refuses more single ports than [`MAX_PORTS_PER_LABEL`] (each is a map entry).
fn within_port_limit(specs: &[PortSpec]) -> Result<(), LabelProblem> {
    let singles: u32 = specs
        .iter()
        .filter(|s| matches!(s, PortSpec::Range { .. }))
        .map(PortSpec::port_count)
        .sum();
    if singles > MAX_PORTS_PER_LABEL {
        return Err(LabelProblem::TooManyPorts(singles));
    }
    Ok(())
}

fn parse_port_item(item: &str) -> Result<PortSpec, LabelProblem> {
    if item == "*" {
        return Ok(PortSpec::All);
    }
    if item.is_empty() {
        return Err(LabelProblem::Empty);
    }
    let (range, proto) = match item.split_once('/') {
        Some((range, proto)) => (range.trim(), proto.trim()),
        None => (item, "tcp"),
    };
    let proto: Proto = proto.parse().map_err(|()| LabelProblem::UnknownProto(proto.to_string()))?;
    if range == "*" {
        return Ok(PortSpec::EveryPortOf(proto));
    }
    if range.contains('*') {
        return Err(LabelProblem::BadWildcard(item.to_string()));
    }
    let (first, last) = match range.split_once('-') {
        Some((first, last)) => {
            let bad_range = || LabelProblem::BadRange(item.to_string());
            let first = parse_port(first.trim()).map_err(|_| bad_range())?;
            let last = parse_port(last.trim()).map_err(|_| bad_range())?;
            if first > last {
                return Err(bad_range());
            }
            (first, last)
        }
        None => {
            let port = parse_port(range)?;
            (port, port)
        }
    };
    Ok(PortSpec::Range { proto, first, last })
}

fn parse_port(s: &str) -> Result<u16, LabelProblem> {
    s.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| LabelProblem::BadPort(s.to_string()))
}

fn parse_sources(list: &str) -> Result<Vec<Cidr>, LabelProblem> {
    let items: Vec<&str> =
        list.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).collect();
    if items.is_empty() {
        return Err(LabelProblem::NoSources);
    }
    if items.len() > MAX_SOURCES_PER_LABEL {
        return Err(LabelProblem::TooManySources(items.len()));
    }
    Ok(items.into_iter().map(str::parse).collect::<Result<Vec<Cidr>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn range(proto: Proto, first: u16, last: u16) -> PortSpec {
        PortSpec::Range { proto, first, last }
    }

    fn one(key: &str, value: &str) -> Result<Vec<Opening>, LabelProblem> {
        declared(key, value).map(|d| d.openings)
    }

    fn declared(key: &str, value: &str) -> Result<Declared, LabelProblem> {
        let (declared, mut errors) = parse_labels(&labels(&[(key, value)]));
        match errors.pop() {
            Some(e) => {
                assert_eq!(declared, Declared::default(), "a rejected label must declare nothing");
                Err(e.problem)
            }
            None => Ok(declared),
        }
    }

    /// The limits of a `guard.ratelimit` value, as written back.
    fn limits(value: &str) -> Result<Vec<String>, LabelProblem> {
        let declared = declared(RATELIMIT, value)?;
        assert!(declared.openings.is_empty(), "a limit opens nothing");
        assert!(declared.limits.iter().all(|l| l.rule == "label guard.ratelimit"));
        Ok(declared.limits.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn ratelimit_forms() {
        assert_eq!(limits("443/tcp 100/s burst 200").unwrap(), ["443/tcp 100/s burst 200"]);
        assert_eq!(
            limits(" 443 100/s BURST 200 , */udp 30/m,8000-8002/sctp 5/S, 53/udp 1/m burst 1")
                .unwrap(),
            [
                "443/tcp 100/s burst 200",
                "*/udp 30/m burst 30",
                "8000-8002/sctp 5/s burst 5",
                "53/udp 1/m burst 1"
            ]
        );
        assert_eq!(limits("* / udp 10/s").unwrap(), ["*/udp 10/s burst 10"]);
    }

    #[test]
    fn every_bad_ratelimit_is_rejected_whole_with_what_to_write() {
        use {LabelProblem::Rate, RateProblem::*};
        let cases: [(&str, LabelProblem); 16] = [
            ("", Rate(MissingRate(String::new()))),
            ("443/tcp", Rate(MissingRate("443/tcp".into()))),
            ("443/tcp 100/s,", Rate(MissingRate(String::new()))),
            ("443/tcp 100/s, 80", Rate(MissingRate("80".into()))),
            ("443/tcp 100", Rate(BadRate("100".into()))),
            ("443/tcp 100/h", Rate(UnknownUnit("100/h".into()))),
            ("443/tcp 0/s", Rate(ZeroRate("0/s".into()))),
            ("443/tcp 10/s burst 0", Rate(BadBurst("0".into()))),
            ("443/tcp 10/s burst", Rate(MissingBurst)),
            ("443/tcp 10/s burst x", Rate(BadBurst("x".into()))),
            ("443/tcp 10/s burst 5 6", Rate(Trailing("6".into()))),
            ("443/icmp 10/s", LabelProblem::UnknownProto("icmp".into())),
            ("0 10/s", LabelProblem::BadPort("0".into())),
            ("* 10/s", Rate(AllPorts)),
            ("443 10/s, 443/tcp 20/s", Rate(Twice("443/tcp".into()))),
            ("1-5000 10/s", LabelProblem::TooManyPorts(5000)),
        ];
        for (value, want) in cases {
            assert_eq!(limits(value), Err(want), "{RATELIMIT}={value:?}");
        }
        let (_, errors) = parse_labels(&labels(&[(EXPOSE, "443"), (RATELIMIT, "443/tcp 100/h")]));
        let warning = errors[0].warning("web");
        for needle in
            ["guard.ratelimit", "100/h", "N/s", "N/m", "limits nothing", "without a limit"]
        {
            assert!(warning.contains(needle), "{needle:?} missing from {warning}");
        }
    }

    /// The port specs of a `guard.expose` value that parses.
    fn exposed(value: &str) -> Vec<PortSpec> {
        one(EXPOSE, value).unwrap().iter().map(|o| o.ports).collect()
    }

    #[test]
    fn expose_forms() {
        assert_eq!(
            exposed("443/tcp, 8443,53/udp , 8000-8002/sctp,*"),
            vec![
                range(Proto::Tcp, 443, 443),
                range(Proto::Tcp, 8443, 8443),
                range(Proto::Udp, 53, 53),
                range(Proto::Sctp, 8000, 8002),
                PortSpec::All,
            ]
        );
        let o = one(EXPOSE, "443").unwrap();
        assert!(o.iter().all(|o| o.sources == Sources::Everyone));
        assert_eq!(o[0].rule, "label guard.expose");
        assert_eq!(exposed("443/TCP"), [range(Proto::Tcp, 443, 443)]);
    }

    #[test]
    fn every_port_of_one_protocol() {
        let ports = exposed("*/udp, * / SCTP,*/tcp");
        let every_port = [Proto::Udp, Proto::Sctp, Proto::Tcp].map(PortSpec::EveryPortOf);
        assert_eq!(ports, every_port, "each is one opening");
        assert_eq!(ports[0].to_string(), "*/udp");
        assert_eq!(ports[0].port_count(), 1, "one map entry, not 65,535");
        let o = one("guard.allow.lan", "*/udp from 10.0.0.0/8").unwrap();
        assert_eq!(o[0].ports, PortSpec::EveryPortOf(Proto::Udp));
        assert_eq!(o[0].sources, Sources::Listed(vec!["10.0.0.0/8".parse().unwrap()]));
        // With single ports in the same label: they count against the limit, it does not.
        assert_eq!(exposed("*/udp,1-4096/tcp").len(), 2);
        // What it covers: its protocol's ports, nothing of another protocol.
        let udp = PortSpec::EveryPortOf(Proto::Udp);
        assert!(udp.covers(Proto::Udp, 1) && udp.covers(Proto::Udp, 65535));
        assert!(!udp.covers(Proto::Tcp, 53) && !udp.covers(Proto::Sctp, 53));
    }

    #[test]
    fn allow_forms() {
        let o = one("guard.allow.office", "5432/tcp from 10.8.0.0/24, 192.0.2.7").unwrap();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].ports, range(Proto::Tcp, 5432, 5432));
        assert_eq!(
            o[0].sources,
            Sources::Listed(vec!["10.8.0.0/24".parse().unwrap(), "192.0.2.7/32".parse().unwrap()])
        );
        let o = one("guard.allow.vpn", "* FROM fd00:8::/64").unwrap();
        assert_eq!(o[0].ports, PortSpec::All);
        let o = one("guard.allow.two", "80,443 from 10.0.0.0/8 10.1.0.0/16").unwrap();
        assert_eq!(o.len(), 2);
        assert!(matches!(&o[1].sources, Sources::Listed(s) if s.len() == 2));
    }

    #[test]
    fn every_bad_form_is_rejected_whole_with_its_reason() {
        use LabelProblem::*;
        type Case = (&'static str, &'static str, fn(&LabelProblem) -> bool);
        let cases: &[Case] = &[
            (EXPOSE, "", |p| *p == Empty),
            (EXPOSE, "  ", |p| *p == Empty),
            (EXPOSE, "443,", |p| *p == Empty),
            (EXPOSE, "0", |p| matches!(p, BadPort(_))),
            (EXPOSE, "65536", |p| matches!(p, BadPort(_))),
            (EXPOSE, "44x", |p| matches!(p, BadPort(_))),
            (EXPOSE, "443,abc", |p| matches!(p, BadPort(_))),
            (EXPOSE, "-5", |p| matches!(p, BadRange(_))),
            (EXPOSE, "9000-8000", |p| matches!(p, BadRange(_))),
            (EXPOSE, "1-70000", |p| matches!(p, BadRange(_))),
            (EXPOSE, "443/icmp", |p| matches!(p, UnknownProto(_))),
            (EXPOSE, "443/", |p| matches!(p, UnknownProto(_))),
            (EXPOSE, "1-65535", |p| matches!(p, TooManyPorts(65535))),
            (EXPOSE, "443 from 10.0.0.0/8", |p| *p == FromInExpose),
            (EXPOSE, "*/foo", |p| *p == UnknownProto("foo".into())),
            (EXPOSE, "*/icmp", |p| *p == UnknownProto("icmp".into())),
            (EXPOSE, "*/", |p| *p == UnknownProto(String::new())),
            (EXPOSE, "*-3/udp", |p| *p == BadWildcard("*-3/udp".into())),
            (EXPOSE, "1-*/udp", |p| *p == BadWildcard("1-*/udp".into())),
            (EXPOSE, "**/udp", |p| *p == BadWildcard("**/udp".into())),
            (EXPOSE, "5*", |p| *p == BadWildcard("5*".into())),
            (EXPOSE, "*/udp/tcp", |p| matches!(p, UnknownProto(_))),
            ("guard.allow.x", "*/udp", |p| *p == MissingFrom),
            ("guard.allow.x", "*/foo from 10.0.0.0/8", |p| *p == UnknownProto("foo".into())),
            ("guard.allow.x", "5432", |p| *p == MissingFrom),
            ("guard.allow.x", "5432 from", |p| *p == NoSources),
            ("guard.allow.x", "5432 from 10.0.0.0/33", |p| matches!(p, BadSource(_))),
            ("guard.allow.x", "5432 from 10.0.0", |p| matches!(p, BadSource(_))),
            ("guard.allow.x", "5432 from *", |p| matches!(p, BadSource(_))),
            ("guard.allow.", "5432 from 10.0.0.1", |p| *p == MissingAllowName),
            ("guard.exposed", "443", |p| *p == Unknown),
        ];
        for (key, value, expected) in cases {
            let problem = one(key, value).expect_err(&format!("{key}={value:?} must be rejected"));
            assert!(expected(&problem), "{key}={value:?} gave {problem:?}");
        }
        let huge = "1,".repeat(MAX_VALUE_LEN);
        assert!(matches!(one(EXPOSE, &huge), Err(TooLong(_))));
        let many: Vec<String> = (0..300).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
        let value = format!("80 from {}", many.join(","));
        assert!(matches!(one("guard.allow.x", &value), Err(TooManySources(300))));
    }

    #[test]
    fn a_bad_label_does_not_spoil_the_good_ones_and_others_are_ignored() {
        let (declared, errors) = parse_labels(&labels(&[
            (EXPOSE, "443"),
            ("guard.allow.bad", "5432 from nowhere"),
            ("com.docker.compose.service", "web"),
        ]));
        assert_eq!(declared.openings.len(), 1);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].label, "guard.allow.bad");
        let message = errors[0].to_string();
        assert!(message.contains("guard.allow.bad") && message.contains("nowhere"), "{message}");
    }

    #[test]
    fn from_must_be_a_word() {
        // "fromage" is not the keyword: the value has no sources, so it is rejected.
        assert!(one("guard.allow.x", "80 fromage").is_err());
        assert_eq!(split_from("80 from 10.0.0.1"), Some(("80 ", " 10.0.0.1")));
    }
}
