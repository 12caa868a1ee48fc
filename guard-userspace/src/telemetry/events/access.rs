//! Access events, the access log: the first packet of each flow from outside that an opening
//! let in (a TCP SYN, the first packet of a UDP, SCTP or ICMP echo flow), as a record that
//! names who reached which container port, by which path, and the rule that opened it.

use std::{collections::BTreeMap, sync::Arc};

use guard_common::{events::PacketEvent, reason::Reason};
use serde::{Deserialize, Serialize};

use super::{
    Clock, Kind, Record, Seen,
    summary::{Fields, More, Summarised, Summary, log_more, log_summary},
};
use crate::{policy::Opening, policy::Proto, state::openings};

/// Each container's openings by target id, as the agent last applied them: what names the rule.
pub type Openings = Arc<BTreeMap<u32, Vec<Opening>>>;

/// An access as the operator reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccessRecord {
    #[serde(flatten)]
    pub seen: Seen,
    /// Why it passed: `exposed` (open to everyone) or `allowed_source` (a listed source).
    pub reason: String,
    /// The rule that opened it, as `guard explain` names it (`label guard.expose (80/tcp)`).
    pub rule: String,
    pub iface: Option<String>,
}

impl AccessRecord {
    /// The rule is read from the openings the agent applies now: an event read moments after
    /// a policy change may name the rule that replaced the one that let it in.
    pub fn from_event(
        e: &PacketEvent,
        names: &BTreeMap<u32, String>,
        ifaces: &BTreeMap<u32, String>,
        openings: &BTreeMap<u32, Vec<Opening>>,
        clock: &Clock,
    ) -> Self {
        let seen = Seen::from_event(e, names, clock);
        let reason = Reason::from_u32(u32::from(e.reason));
        let port = (e.container_port != 0).then(|| (e.container_port, Proto::from_number(e.proto)));
        let theirs = openings.get(&e.target).map_or(&[][..], Vec::as_slice);
        let rule = reason
            .and_then(|r| openings::rule(r, e.target, theirs, port, seen.src))
            .unwrap_or_else(|| "unknown".into());
        AccessRecord {
            seen,
            reason: reason.map_or("unknown", Reason::name).into(),
            rule,
            iface: super::iface(e, ifaces),
        }
    }
}

impl Record for AccessRecord {
    const KIND: Kind =
        Kind { route: "/access", command: "access", singular: "access", plural: "accesses" };

    fn time(&self) -> f64 {
        self.seen.time
    }

    /// Who got in, to what, and by which rule. No bare word of it is a field's name (as
    /// `port` would be): logfmt parsers read the sentence's words as keys too, and one that
    /// came before its field could shadow it (Loki stops at the first once it has all the
    /// labels a query needs).
    fn line(&self) -> String {
        format!("let in {}: {}", self.seen.describe(self.iface.as_deref(), ""), self.rule)
    }
}

/// Logs an access: the sentence for people, then the same as stable key=value fields (JSON
/// keys under `--log-format json`) for log shippers; the README shows how to ship them. Keep
/// the names and their order. The rule is the one value with spaces: logged as a string, it
/// is quoted in text (`rule="label guard.expose (80/tcp)"`, logfmt) and plain in JSON.
pub fn log(r: &AccessRecord) {
    super::log_seen!(
        "guard::access",
        &r.seen,
        reason = %r.reason,
        rule = r.rule.as_str(),
        iface = %r.iface.as_deref().unwrap_or("-"),
        "{}",
        r.line()
    );
}

impl Summarised for AccessRecord {
    fn fields(&self) -> Fields<'_> {
        let (seen, reason, iface) = (&self.seen, &self.reason, self.iface.as_deref());
        Fields { seen, reason, detail: self.rule.clone(), iface }
    }

    fn log(&self) {
        log(self);
    }

    /// `let in 57 more from SRC in 10s (destination ports: ...): RULE` and the fields.
    fn log_summary(s: &Summary) {
        let rule = s.detail.one().map_or("several rules", String::as_str);
        log_summary!(
            "guard::access",
            s,
            rule = s.detail.one().map(String::as_str),
            s.sentence("let in", rule)
        );
    }

    fn log_more(more: &More) {
        log_more!("guard::access", more, Self::KIND);
    }
}

#[cfg(test)]
mod tests {
    use guard_common::events::DROP_PUBLISHED;

    use super::*;
    use crate::{
        policy::{PortSpec, Sources},
        telemetry::events::tests::{event, logged, seen},
    };

    fn openings() -> BTreeMap<u32, Vec<Opening>> {
        let office = Sources::Listed(vec!["10.251.1.0/24".parse().unwrap()]);
        let tcp = |port| PortSpec::Range { proto: Proto::Tcp, first: port, last: port };
        BTreeMap::from([(
            7,
            vec![
                Opening {
                    ports: tcp(80),
                    sources: Sources::Everyone,
                    rule: "label guard.expose".into(),
                },
                Opening { ports: tcp(5432), sources: office, rule: "file rule \"office\"".into() },
            ],
        )])
    }

    #[test]
    fn records_name_the_container_port_path_and_rule() {
        let names = BTreeMap::from([(7, "db".to_string())]);
        let ifaces = BTreeMap::from([(5, "eth0".to_string())]);
        let allowed = event(Reason::AllowedSource, DROP_PUBLISHED);
        let record =
            AccessRecord::from_event(&allowed, &names, &ifaces, &openings(), &Clock::new());
        assert_eq!(
            record.line(),
            "let in tcp 10.251.1.2:40000 -> 10.251.1.1:15432 (container db 5432/tcp, published) on eth0: file rule \"office\" (5432/tcp)"
        );
        assert_eq!(
            (record.reason.as_str(), record.seen.path.as_deref()),
            ("allowed_source", Some("published"))
        );
        let direct = PacketEvent { container_port: 80, dport: 80, ..event(Reason::Exposed, 0) };
        let record = AccessRecord::from_event(&direct, &names, &ifaces, &openings(), &Clock::new());
        assert_eq!(
            (record.rule.as_str(), record.seen.path.as_deref()),
            ("label guard.expose (80/tcp)", Some("direct"))
        );
        let json = serde_json::to_string(&record).unwrap();
        let back: AccessRecord = serde_json::from_str(&json).unwrap();
        assert_eq!((back.rule, back.seen.container), (record.rule, Some("db".into())));
        // A container the agent no longer holds openings for still gets a record.
        let gone = PacketEvent { target: 9, ..direct };
        let record = AccessRecord::from_event(&gone, &names, &ifaces, &openings(), &Clock::new());
        assert_eq!(
            (record.rule.as_str(), record.seen.container.as_deref()),
            ("an expose rule", Some("target 9"))
        );
    }

    #[test]
    fn access_lines_carry_stable_key_value_fields_for_log_shippers() {
        let record = AccessRecord {
            seen: seen("203.0.113.9", 40000, "10.0.0.5", 15432),
            reason: "exposed".into(),
            rule: "label guard.expose (5432/tcp)".into(),
            iface: Some("eth0".into()),
        };
        let line = logged(|| log(&record));
        let fields = "src=203.0.113.9 sport=40000 dst=10.0.0.5 dport=15432 proto=tcp container=db \
                      port=5432 path=published reason=exposed rule=\"label guard.expose (5432/tcp)\" iface=eth0";
        assert!(
            line.contains("INFO guard::access: let in tcp 203.0.113.9:40000 -> 10.0.0.5:15432"),
            "{line}"
        );
        assert!(line.trim_end().ends_with(fields), "{line}");
        // No word of the sentence reads as one of the fields to a logfmt parser.
        let (sentence, _) = line.split_once(" src=").unwrap();
        let names = ["src", "sport", "dst", "dport", "proto", "container", "port", "path"];
        let names = [&names[..], &["reason", "rule", "iface"]].concat();
        assert!(sentence.split_whitespace().all(|w| !names.contains(&w)), "{sentence}");
        let json = logged_json(|| log(&record));
        let fields = &json["fields"];
        assert_eq!(json["target"], "guard::access");
        assert_eq!(fields["rule"], "label guard.expose (5432/tcp)", "plain in JSON: {json}");
        assert_eq!((&fields["port"], &fields["container"]), (&5432.into(), &"db".into()));
    }

    /// The JSON object `f` logs under `--log-format json`.
    fn logged_json(f: impl FnOnce()) -> serde_json::Value {
        let line = crate::telemetry::events::tests::logged_with(true, f);
        serde_json::from_str(&line).unwrap()
    }
}
