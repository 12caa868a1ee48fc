//! Which opening let a source into a container port: the rule `guard explain` names for a pass,
//! and the access log for each flow it lets in. One finder, so the two always name the same
//! rule for the same packet.

use std::net::IpAddr;

use guard_common::reason::Reason;

use crate::{
    policy::{Opening, PortSpec, Proto, Sources},
    state::doors,
};

/// The opening of `openings` that lets `src` into `port` (`None`: a port-less packet, or a
/// protocol without ports), among those open to everyone (`everyone`) or to listed sources.
/// The most specific first: a port's own, then its protocol's every port (`*/udp`), then every
/// port (`*`), the only one that opens port-less packets.
pub fn find(
    openings: &[Opening],
    port: Option<(u16, Option<Proto>)>,
    src: IpAddr,
    everyone: bool,
) -> Option<&Opening> {
    let specificity = |o: &&Opening| match o.ports {
        PortSpec::Range { .. } => 0,
        PortSpec::EveryPortOf(_) => 1,
        PortSpec::All => 2,
    };
    let mut candidates: Vec<&Opening> = openings.iter().collect();
    candidates.sort_by_key(specificity);
    candidates.into_iter().find(|o| {
        let covers = match port {
            Some((p, Some(proto))) => o.ports.covers(proto, p),
            _ => o.ports == PortSpec::All,
        };
        covers
            && match &o.sources {
                Sources::Everyone => everyone,
                Sources::Listed(cidrs) => !everyone && cidrs.iter().any(|c| c.contains(src)),
            }
    })
}

/// The rule behind a pass that an opening decided (`Exposed`, `AllowedSource`) for `src` into
/// `target`'s `port`, as the operator wrote it (`label guard.expose (*/udp)`); `None` for any
/// other reason. An engine door is opened by its membership, not by a container's openings.
pub fn rule(
    reason: Reason,
    target: u32,
    openings: &[Opening],
    port: Option<(u16, Option<Proto>)>,
    src: IpAddr,
) -> Option<String> {
    let everyone = match reason {
        Reason::AllowedSource if doors::name(target).is_some() => {
            return Some("the swarm's nodes, and [management] cluster and admin prefixes".into());
        }
        Reason::Exposed => true,
        Reason::AllowedSource => false,
        _ => return None,
    };
    // The maps and the policy the rule is read from can differ for a moment (a label just
    // removed): then the kind of rule is all there is to say.
    let fallback = if everyone { "an expose rule" } else { "an allow rule" };
    Some(find(openings, port, src, everyone).map_or(fallback.into(), named))
}

/// A rule as the operator wrote it: where, and which ports (`label guard.expose (*/udp)`).
fn named(opening: &Opening) -> String {
    format!("{} ({})", opening.rule, opening.ports)
}

#[cfg(test)]
mod tests {
    use guard_common::maps::door;

    use super::*;

    fn opening(ports: PortSpec, sources: Sources, rule: &str) -> Opening {
        Opening { ports, sources, rule: rule.into() }
    }

    #[test]
    fn the_most_specific_opening_names_the_rule() {
        let office = Sources::Listed(vec!["10.8.0.0/24".parse().unwrap()]);
        let openings = [
            opening(PortSpec::All, Sources::Everyone, "label guard.expose"),
            opening(PortSpec::EveryPortOf(Proto::Udp), Sources::Everyone, "file rule \"udp\""),
            opening(
                PortSpec::Range { proto: Proto::Tcp, first: 5432, last: 5432 },
                office,
                "label guard.allow.office",
            ),
        ];
        let src = "10.8.0.9".parse().unwrap();
        let rule = |reason, port| rule(reason, 7, &openings, port, src).unwrap();
        assert_eq!(
            rule(Reason::Exposed, Some((53, Some(Proto::Udp)))),
            "file rule \"udp\" (*/udp)"
        );
        assert_eq!(rule(Reason::Exposed, None), "label guard.expose (*)");
        assert_eq!(
            rule(Reason::AllowedSource, Some((5432, Some(Proto::Tcp)))),
            "label guard.allow.office (5432/tcp)"
        );
        let elsewhere = "192.0.2.1".parse().unwrap();
        let port = Some((5432, Some(Proto::Tcp)));
        assert_eq!(
            super::rule(Reason::AllowedSource, 7, &openings, port, elsewhere).unwrap(),
            "an allow rule",
            "no listed source matches: the kind of rule"
        );
        assert_eq!(super::rule(Reason::Closed, 7, &openings, port, src), None);
        assert!(
            super::rule(Reason::AllowedSource, door::CONTROL, &[], port, src)
                .unwrap()
                .contains("swarm's nodes")
        );
    }
}
