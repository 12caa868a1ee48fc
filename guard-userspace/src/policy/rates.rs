//! Per-source limits on new flows to an opened container port: the operator's words
//! (`100/s burst 200`) and the kernel's ([`RateLimit`]).
//!
//! A limit counts new flows (a TCP SYN, the first packet of a UDP, SCTP or ICMP echo flow) per
//! source address, an IPv6 source by its /64, and only where an opening let them in: it never
//! opens anything, and a limit on a port nothing opens has no effect (see
//! [`guard_common::ratelimit`] for the bucket and its approximation).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use guard_common::{maps::PortKey, ratelimit::RateLimit};

use crate::policy::{PortSpec, Proto};

const SECOND_NS: u64 = 1_000_000_000;
const MINUTE_NS: u64 = 60 * SECOND_NS;

/// The period a rate counts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Per {
    Second,
    Minute,
}

impl Per {
    const fn ns(self) -> u64 {
        match self {
            Per::Second => SECOND_NS,
            Per::Minute => MINUTE_NS,
        }
    }

    const fn unit(self) -> &'static str {
        match self {
            Per::Second => "s",
            Per::Minute => "m",
        }
    }
}

/// `flows` new flows per source every `per`, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Limit {
    pub flows: u32,
    pub per: Per,
    pub burst: u32,
}

/// A limit on some container ports, and where it was said (for status and explain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateRule {
    pub ports: PortSpec,
    pub limit: Limit,
    /// e.g. `label guard.ratelimit`, `file rule "web"`.
    pub rule: String,
}

const EXAMPLE: &str = "e.g. 100/s burst 200 or 30/m";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateProblem {
    #[error("{0:?} has no rate: write PORT RATE [burst N], e.g. 443/tcp 100/s burst 200")]
    MissingRate(String),
    #[error("bad rate {0:?}: write N/s (new flows a second) or N/m (a minute), {EXAMPLE}")]
    BadRate(String),
    #[error("unknown unit in rate {0:?}: write N/s (new flows a second) or N/m (a minute)")]
    UnknownUnit(String),
    #[error(
        "rate {0:?} lets no new flow in: a limit needs at least 1/s or 1/m (to close a port, remove its opening)"
    )]
    ZeroRate(String),
    #[error("rate {0:?} is more than one new flow a nanosecond: write at most 1000000000/s")]
    TooFast(String),
    #[error("'burst' needs a number of flows from 1 up, e.g. 443/tcp 100/s burst 200")]
    MissingBurst,
    #[error(
        "bad burst {0:?}: write a whole number of flows from 1 up, e.g. burst 200 (at most 584 years' worth of the rate)"
    )]
    BadBurst(String),
    #[error("unexpected {0:?} after the rate: write PORT RATE [burst N], {EXAMPLE}")]
    Trailing(String),
    #[error(
        "* cannot be limited (port-less traffic has no flows to count): limit */tcp, */udp or */sctp, or single ports"
    )]
    AllPorts,
    #[error("{0} is limited twice: give each port one limit")]
    Twice(String),
}

/// `rate` as written (`100/s`, `30/m`) and the burst (`None`: the rate's count of flows).
pub fn parse_limit(rate: &str, burst: Option<u64>) -> Result<Limit, RateProblem> {
    let text = rate.trim();
    let (count, unit) = text.split_once('/').ok_or_else(|| RateProblem::BadRate(text.into()))?;
    let per = match unit.trim().to_ascii_lowercase().as_str() {
        "s" => Per::Second,
        "m" => Per::Minute,
        _ => return Err(RateProblem::UnknownUnit(text.into())),
    };
    let flows: u32 = count.trim().parse().map_err(|_| RateProblem::BadRate(text.into()))?;
    if flows == 0 {
        return Err(RateProblem::ZeroRate(text.into()));
    }
    let burst = match burst {
        None => flows,
        Some(b) => u32::try_from(b)
            .ok()
            .filter(|b| *b > 0)
            .ok_or_else(|| RateProblem::BadBurst(b.to_string()))?,
    };
    let limit = Limit { flows, per, burst };
    // The kernel's own bounds: a flow a nanosecond at most, a burst within its clock.
    match RateLimit::new(flows, per.ns(), burst) {
        Some(_) => Ok(limit),
        None if u64::from(flows) > per.ns() => Err(RateProblem::TooFast(text.into())),
        None => Err(RateProblem::BadBurst(burst.to_string())),
    }
}

/// `rules` as one label or file rule said them, refused if one names `*` (which stands for
/// port-less traffic too: no flows to count, and the kernel keys limits by protocol) or
/// limits one port twice (which one was meant cannot be told; across labels and file rules,
/// the later says the last word).
pub fn checked(rules: Vec<RateRule>) -> Result<Vec<RateRule>, RateProblem> {
    let mut seen: BTreeSet<(Proto, u16)> = BTreeSet::new();
    let mut every_port = BTreeSet::new();
    for rule in &rules {
        let twice = || RateProblem::Twice(rule.ports.to_string());
        match rule.ports {
            PortSpec::All => return Err(RateProblem::AllPorts),
            PortSpec::EveryPortOf(proto) => {
                if !every_port.insert(proto) {
                    return Err(twice());
                }
            }
            PortSpec::Range { proto, first, last } => {
                if let Some(port) = (first..=last).find(|port| !seen.insert((proto, *port))) {
                    return Err(RateProblem::Twice(format!("{port}/{proto}")));
                }
            }
        }
    }
    Ok(rules)
}

impl Limit {
    pub fn to_kernel(self) -> RateLimit {
        RateLimit::new(self.flows, self.per.ns(), self.burst)
            .expect("limits are checked against the kernel's bounds when parsed")
    }

    /// The limit the kernel holds, in the operator's words where they are exact (a rate a
    /// second, else a minute), else rounded to flows a second.
    pub fn from_kernel(kernel: RateLimit) -> Limit {
        let interval = kernel.interval_ns.max(1);
        let burst = u32::try_from(kernel.burst_ns / interval).unwrap_or(u32::MAX);
        for per in [Per::Second, Per::Minute] {
            let flows = (per.ns() + interval / 2) / interval;
            if flows > 0 && per.ns() / flows == interval {
                let flows = u32::try_from(flows).unwrap_or(u32::MAX);
                return Limit { flows, per, burst };
            }
        }
        let flows = ((SECOND_NS + interval / 2) / interval).max(1);
        Limit { flows: u32::try_from(flows).unwrap_or(u32::MAX), per: Per::Second, burst }
    }

    /// For `guard explain`: "limited to 100 new flows/s per source, burst 200".
    pub fn sentence(&self, v6_source: bool) -> String {
        let per = match self.per {
            Per::Second => "s",
            Per::Minute => "min",
        };
        let source = if v6_source { "per source /64" } else { "per source" };
        format!("limited to {} new flows/{per} {source}, burst {}", self.flows, self.burst)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} burst {}", self.flows, self.per.unit(), self.burst)
    }
}

impl fmt::Display for RateRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.ports, self.limit)
    }
}

/// The limit the kernel applies to new flows to `port` of `proto` at `target`, and the key it
/// is found under: the port's own, else its protocol's every-port limit (`*/udp`), whose one
/// bucket per source then covers every such port.
pub fn in_force(
    rates: &BTreeMap<PortKey, RateLimit>,
    target: u32,
    proto: u8,
    port: u16,
) -> Option<(PortKey, RateLimit)> {
    [PortKey::new(target, proto, port), PortKey::every_port_of(target, proto)]
        .into_iter()
        .find_map(|key| rates.get(&key).map(|limit| (key, *limit)))
}

/// The rule that sets the limit of `port` of `proto`, as the kernel looks it up (the port's
/// own, else every port of its protocol); the later of two says the last word.
pub fn rule_for(rules: &[RateRule], proto: Proto, port: Option<u16>) -> Option<&RateRule> {
    let own = port.and_then(|port| {
        rules
            .iter()
            .rev()
            .find(|r| matches!(r.ports, PortSpec::Range { .. }) && r.ports.covers(proto, port))
    });
    own.or_else(|| rules.iter().rev().find(|r| r.ports == PortSpec::EveryPortOf(proto)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(first: u16, last: u16) -> PortSpec {
        PortSpec::Range { proto: Proto::Tcp, first, last }
    }

    #[test]
    fn rates_per_second_and_minute_with_and_without_burst() {
        let l = parse_limit("100/s", Some(200)).unwrap();
        assert_eq!(l, Limit { flows: 100, per: Per::Second, burst: 200 });
        assert_eq!(l.to_string(), "100/s burst 200");
        assert_eq!(l.to_kernel(), RateLimit::new(100, SECOND_NS, 200).unwrap());
        let m = parse_limit(" 30 / M ", None).unwrap();
        assert_eq!(m, Limit { flows: 30, per: Per::Minute, burst: 30 }, "burst: the rate's count");
        assert_eq!(m.to_kernel().interval_ns, 2 * SECOND_NS);
        assert_eq!(parse_limit("1/m", None).unwrap().burst, 1);
    }

    #[test]
    fn bad_limits_say_what_to_write() {
        use RateProblem::*;
        let cases: [(&str, Option<u64>, RateProblem); 9] = [
            ("100", None, BadRate("100".into())),
            ("x/s", None, BadRate("x/s".into())),
            ("-1/s", None, BadRate("-1/s".into())),
            ("100/h", None, UnknownUnit("100/h".into())),
            ("100/sec", None, UnknownUnit("100/sec".into())),
            ("0/s", None, ZeroRate("0/s".into())),
            ("2000000000/s", None, TooFast("2000000000/s".into())),
            ("10/s", Some(0), BadBurst("0".into())),
            ("10/s", Some(1 << 40), BadBurst((1u64 << 40).to_string())),
        ];
        for (rate, burst, want) in cases {
            assert_eq!(parse_limit(rate, burst), Err(want), "{rate} burst {burst:?}");
        }
        let message = parse_limit("100/h", None).unwrap_err().to_string();
        assert!(message.contains("N/s") && message.contains("N/m"), "{message}");
        assert!(parse_limit("1000000000/s", Some(u32::MAX.into())).is_ok());
    }

    #[test]
    fn every_port_and_ranges_yes_star_and_doubles_no() {
        let limit = parse_limit("10/s", None).unwrap();
        let rules = |ports: Vec<PortSpec>| {
            checked(
                ports
                    .into_iter()
                    .map(|ports| RateRule { ports, limit, rule: "x".into() })
                    .collect(),
            )
        };
        let udp = PortSpec::EveryPortOf(Proto::Udp);
        let ok = rules(vec![tcp(443, 443), udp]).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].to_string(), "*/udp 10/s burst 10");
        assert_eq!(rules(vec![PortSpec::All]), Err(RateProblem::AllPorts));
        assert_eq!(
            rules(vec![tcp(8000, 8010), tcp(8005, 8005)]),
            Err(RateProblem::Twice("8005/tcp".into()))
        );
        assert_eq!(rules(vec![udp, udp]), Err(RateProblem::Twice("*/udp".into())));
        // A port's own limit beside its protocol's is no double: the port's wins.
        let dns = PortSpec::Range { proto: Proto::Udp, first: 53, last: 53 };
        assert!(rules(vec![udp, dns]).is_ok());
    }

    #[test]
    fn the_kernel_s_limit_reads_back_as_written() {
        for (rate, burst) in [("100/s", 200), ("7/s", 7), ("30/m", 5), ("1/m", 1), ("999/s", 1)] {
            let limit = parse_limit(rate, Some(burst)).unwrap();
            assert_eq!(Limit::from_kernel(limit.to_kernel()), limit, "{rate}");
        }
        let l = parse_limit("100/s", Some(200)).unwrap();
        assert_eq!(l.sentence(false), "limited to 100 new flows/s per source, burst 200");
        let m = parse_limit("30/m", None).unwrap();
        assert_eq!(m.sentence(true), "limited to 30 new flows/min per source /64, burst 30");
    }

    #[test]
    fn a_port_s_own_limit_comes_before_its_protocol_s() {
        let mut rates = BTreeMap::new();
        let own = RateLimit::new(10, SECOND_NS, 10).unwrap();
        let every = RateLimit::new(50, SECOND_NS, 50).unwrap();
        rates.insert(PortKey::new(3, 17, 53), own);
        rates.insert(PortKey::every_port_of(3, 17), every);
        assert_eq!(in_force(&rates, 3, 17, 53), Some((PortKey::new(3, 17, 53), own)));
        assert_eq!(in_force(&rates, 3, 17, 54), Some((PortKey::every_port_of(3, 17), every)));
        assert_eq!(in_force(&rates, 3, 6, 53), None);
        assert_eq!(in_force(&rates, 4, 17, 53), None);

        let limit = |n| parse_limit(&format!("{n}/s"), None).unwrap();
        let list = vec![
            RateRule {
                ports: PortSpec::EveryPortOf(Proto::Udp),
                limit: limit(50),
                rule: "a".into(),
            },
            RateRule {
                ports: PortSpec::Range { proto: Proto::Udp, first: 53, last: 53 },
                limit: limit(10),
                rule: "b".into(),
            },
            RateRule {
                ports: PortSpec::EveryPortOf(Proto::Udp),
                limit: limit(60),
                rule: "c".into(),
            },
        ];
        assert_eq!(rule_for(&list, Proto::Udp, Some(53)).unwrap().rule, "b");
        assert_eq!(rule_for(&list, Proto::Udp, Some(54)).unwrap().rule, "c", "the later wins");
        assert_eq!(rule_for(&list, Proto::Udp, None).unwrap().rule, "c");
        assert!(rule_for(&list, Proto::Tcp, Some(53)).is_none());
    }
}
