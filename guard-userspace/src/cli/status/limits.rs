//! The LIMIT column: each port's limit on new flows per source, as the kernel holds it (or,
//! without pins, as the labels and policy file say), and the new flows dropped over it.

use std::collections::BTreeMap;

use guard_common::{
    events::{DROP_RATE_LIMITED, DropKey},
    maps::PortKey,
};
use serde::Serialize;

use super::PortReport;
use crate::{
    policy::Proto,
    policy::rates::{self, Limit},
    state::desired::ContainerPolicy,
    state::tables::TableSet,
};

/// A port's limit on new flows per source.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LimitReport {
    /// `100/s burst 200`.
    pub rate: String,
    /// The label or file rule that says so (absent when Docker does not answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// What Docker and the policy file ask for, where the kernel holds something else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub differs: Option<String>,
}

/// The limit the labels and policy file set on `port` of `proto` (`None`: every port of it).
pub fn wanted(policy: &ContainerPolicy, proto: Proto, port: Option<u16>) -> Option<LimitReport> {
    rates::rule_for(&policy.limits, proto, port).map(|r| LimitReport {
        rate: r.limit.to_string(),
        rule: Some(r.rule.clone()),
        differs: None,
    })
}

/// The limit the kernel applies at `port` of `proto` (`None`: the every-port row, whose limit
/// is its protocol's alone), named and compared through what is wanted.
pub fn in_kernel(
    kernel: &TableSet,
    target: u32,
    proto: u8,
    port: Option<u16>,
    policy: Option<&ContainerPolicy>,
) -> Option<LimitReport> {
    let held = match port {
        Some(port) => rates::in_force(&kernel.rates, target, proto, port).map(|(_, l)| l),
        None => kernel.rates.get(&PortKey::every_port_of(target, proto)).copied(),
    };
    let report = |rate: String| LimitReport { rate, rule: None, differs: None };
    let Some(policy) = policy else {
        return held.map(|l| report(Limit::from_kernel(l).to_string()));
    };
    let wanted = Proto::from_number(proto).and_then(|p| rates::rule_for(&policy.limits, p, port));
    // Compared as the kernel holds them (60/m is 1/s there); said in the operator's words.
    match (held, wanted) {
        (None, None) => None,
        (Some(held), Some(wanted)) if wanted.limit.to_kernel() == held => Some(LimitReport {
            rule: Some(wanted.rule.clone()),
            ..report(wanted.limit.to_string())
        }),
        // What the kernel holds stands; what is wanted is said beside it.
        (held, wanted) => Some(LimitReport {
            rate: held.map_or("none".into(), |l| Limit::from_kernel(l).to_string()),
            rule: wanted.map(|w| w.rule.clone()),
            differs: Some(wanted.map_or("no limit".into(), |w| w.limit.to_string())),
        }),
    }
}

/// Drops over a rate limit per (target, protocol, container port), summed over paths and CPUs.
pub fn dropped(drops: &[(DropKey, u64)]) -> BTreeMap<(u32, u8, u16), u64> {
    let mut out = BTreeMap::new();
    for (key, n) in drops.iter().filter(|(k, _)| k.flags & DROP_RATE_LIMITED != 0) {
        *out.entry((key.target, key.proto, key.port)).or_default() += n;
    }
    out
}

/// Puts each port's drops over its limit on its row: a port's own, or, for a port without a
/// row, its protocol's every-port row (the limit its new flows met).
pub fn count(rows: &mut [PortReport], target: u32, dropped: &BTreeMap<(u32, u8, u16), u64>) {
    for (&(_, proto, port), n) in dropped.range((target, 0, 0)..=(target, u8::MAX, u16::MAX)) {
        let proto = Proto::from_number(proto).map_or("any", Proto::name);
        let own = rows.iter().position(|r| {
            !r.every_port
                && r.proto == proto
                && (r.port..=r.last_port.unwrap_or(r.port)).contains(&port)
        });
        let row = own.or_else(|| rows.iter().position(|r| r.every_port && r.proto == proto));
        if let Some(row) = row {
            rows[row].rate_limited += n;
        }
    }
}

impl LimitReport {
    pub fn text(&self) -> String {
        let rule = self.rule.as_ref().map(|r| format!(" ({r})")).unwrap_or_default();
        let differs = self.differs.as_ref().map(|d| format!(" [desired: {d}]")).unwrap_or_default();
        format!("{}{rule}{differs}", self.rate)
    }
}

/// The LIMIT cell of a row: its limit and what it dropped, or `-`.
pub fn cell(row: &PortReport) -> String {
    let dropped = (row.rate_limited > 0).then(|| format!("{} rate-limited", row.rate_limited));
    match (&row.limit, dropped) {
        (None, None) => "-".into(),
        (Some(limit), None) => limit.text(),
        (None, Some(dropped)) => dropped,
        (Some(limit), Some(dropped)) => format!("{}; {dropped}", limit.text()),
    }
}

#[cfg(test)]
mod tests {
    use guard_common::ratelimit::RateLimit;

    use super::*;
    use crate::{
        cli::reach::Reach, cli::status::Outside, policy::PortSpec, policy::rates::RateRule,
    };

    fn policy(limits: &[(PortSpec, &str)]) -> ContainerPolicy {
        ContainerPolicy {
            container: crate::policy::snapshot::Container {
                id: "ab".repeat(32),
                name: "web".into(),
                image: "nginx".into(),
                labels: Default::default(),
                addresses: vec![],
                published: vec![],
            },
            target: 7,
            openings: vec![],
            limits: limits
                .iter()
                .map(|(ports, rate)| RateRule {
                    ports: *ports,
                    limit: rates::parse_limit(rate, None).unwrap(),
                    rule: "label guard.ratelimit".into(),
                })
                .collect(),
            label_errors: vec![],
            mode: crate::policy::file::Mode::Enforce,
        }
    }

    fn row(port: u16, last: Option<u16>, every_port: bool) -> PortReport {
        PortReport {
            port,
            every_port,
            last_port: last,
            proto: if every_port { "udp" } else { "tcp" }.into(),
            published: vec![],
            outside: Outside::new(Reach::everyone()),
            limit: None,
            rate_limited: 0,
            paths: vec![],
        }
    }

    #[test]
    fn the_kernel_s_limit_is_named_by_its_rule_and_differences_are_marked() {
        let https = PortSpec::Range { proto: Proto::Tcp, first: 443, last: 443 };
        let wanted = policy(&[(https, "100/s"), (PortSpec::EveryPortOf(Proto::Udp), "30/m")]);
        let mut kernel = TableSet::default();
        kernel
            .rates
            .insert(PortKey::new(7, 6, 443), RateLimit::new(100, 1_000_000_000, 100).unwrap());
        let at = |port| in_kernel(&kernel, 7, 6, Some(port), Some(&wanted)).map(|l| l.text());
        assert_eq!(at(443).as_deref(), Some("100/s burst 100 (label guard.ratelimit)"));
        assert_eq!(at(80), None);
        // */udp is wanted and the kernel lacks it (an agent that has not synced).
        let udp = in_kernel(&kernel, 7, 17, Some(53), Some(&wanted)).unwrap();
        assert_eq!(udp.text(), "none (label guard.ratelimit) [desired: 30/m burst 30]");
        let every = in_kernel(&kernel, 7, 17, None, None);
        assert_eq!(every, None);
        assert_eq!(in_kernel(&kernel, 7, 6, Some(443), None).unwrap().text(), "100/s burst 100");
        // 60/m is 1/s in the kernel: the same limit, in the words it was written in.
        let minute = policy(&[(https, "60/m")]);
        kernel.rates.insert(PortKey::new(7, 6, 443), RateLimit::new(1, 1_000_000_000, 60).unwrap());
        let said = in_kernel(&kernel, 7, 6, Some(443), Some(&minute)).unwrap();
        assert_eq!(said.text(), "60/m burst 60 (label guard.ratelimit)");
    }

    #[test]
    fn drops_over_a_limit_land_on_their_port_s_row_or_their_protocol_s() {
        let drops = [
            (DropKey { target: 7, port: 443, proto: 6, flags: DROP_RATE_LIMITED }, 5),
            (DropKey { target: 7, port: 443, proto: 6, flags: DROP_RATE_LIMITED | 1 }, 2),
            (DropKey { target: 7, port: 443, proto: 6, flags: 1 }, 100),
            (DropKey { target: 7, port: 8005, proto: 6, flags: DROP_RATE_LIMITED }, 1),
            (DropKey { target: 7, port: 5000, proto: 17, flags: DROP_RATE_LIMITED }, 4),
            (DropKey { target: 8, port: 443, proto: 6, flags: DROP_RATE_LIMITED }, 9),
        ];
        let mut rows =
            vec![row(443, None, false), row(8000, Some(8010), false), row(0, None, true)];
        count(&mut rows, 7, &dropped(&drops));
        assert_eq!(rows.iter().map(|r| r.rate_limited).collect::<Vec<_>>(), [7, 1, 4]);
        rows[0].limit = wanted(
            &policy(&[(PortSpec::Range { proto: Proto::Tcp, first: 443, last: 443 }, "10/s")]),
            Proto::Tcp,
            Some(443),
        );
        assert_eq!(cell(&rows[0]), "10/s burst 10 (label guard.ratelimit); 7 rate-limited");
        assert_eq!(cell(&row(1, None, false)), "-");
    }
}
