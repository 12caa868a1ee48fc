//! Drop events (audit mode's would-drops too): the record, its line and its log entry.

use std::collections::BTreeMap;

use guard_common::{
    events::{DROP_AUDITED, PacketEvent},
    reason::Reason,
};
use serde::{Deserialize, Serialize};

use super::{
    Clock, Kind, Record, Seen,
    summary::{Fields, More, Summarised, Summary, log_more, log_summary},
};

/// A drop as the operator reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropRecord {
    #[serde(flatten)]
    pub seen: Seen,
    pub reason: String,
    /// Audit mode waived the drop: the packet passed.
    pub audited: bool,
    pub iface: Option<String>,
}

impl DropRecord {
    pub fn from_event(
        e: &PacketEvent,
        names: &BTreeMap<u32, String>,
        ifaces: &BTreeMap<u32, String>,
        clock: &Clock,
    ) -> Self {
        DropRecord {
            seen: Seen::from_event(e, names, clock),
            reason: Reason::from_u32(u32::from(e.reason)).map_or("unknown", Reason::name).into(),
            audited: e.flags & DROP_AUDITED != 0,
            iface: super::iface(e, ifaces),
        }
    }
}

impl Record for DropRecord {
    const KIND: Kind =
        Kind { route: "/drops", command: "drops", singular: "drop", plural: "drops" };

    fn time(&self) -> f64 {
        self.seen.time
    }

    /// What was dropped, bound for what, and why.
    fn line(&self) -> String {
        let verb = if self.audited { "would drop (audit)" } else { "dropped" };
        format!("{verb} {}: {}", self.seen.describe(self.iface.as_deref(), " port"), self.reason)
    }
}

/// Logs a drop: the sentence for people, then the same as stable key=value fields (JSON keys
/// under `--log-format json`) for log tools. deploy/fail2ban/filter.d/container-guard-drops.conf
/// parses them: keep the names and their order.
pub fn log(r: &DropRecord) {
    super::log_seen!(
        "guard::drops",
        &r.seen,
        reason = %r.reason,
        audited = r.audited,
        iface = %r.iface.as_deref().unwrap_or("-"),
        "{}",
        r.line()
    );
}

impl Summarised for DropRecord {
    fn fields(&self) -> Fields<'_> {
        let (seen, reason, iface) = (&self.seen, &self.reason, self.iface.as_deref());
        Fields { seen, reason, detail: self.audited.to_string(), iface }
    }

    fn log(&self) {
        log(self);
    }

    /// `dropped 57 more from SRC in 10s (destination ports: ...): closed,rate_limited` and
    /// the fields; fail2ban's filter counts it as one failure.
    fn log_summary(s: &Summary) {
        let verb = match s.detail.one().map(String::as_str) {
            Some("false") => "dropped",
            Some(_) => "would drop (audit)",
            None => "dropped or would drop (audit)",
        };
        let audited = s.detail.one().map(|d| d == "true");
        log_summary!("guard::drops", s, audited = audited, s.sentence(verb, &s.reasons.join(", ")));
    }

    fn log_more(more: &More) {
        log_more!("guard::drops", more, Self::KIND);
    }
}

#[cfg(test)]
mod tests {
    use guard_common::events::DROP_PUBLISHED;

    use super::*;
    use crate::telemetry::events::tests::{event, logged, seen};

    #[test]
    fn drop_lines_carry_stable_key_value_fields_for_log_tools() {
        let record = DropRecord {
            seen: seen("203.0.113.9", 40000, "10.0.0.5", 5432),
            reason: "closed".into(),
            audited: false,
            iface: Some("eth0".into()),
        };
        let line = logged(|| log(&record));
        // What the fail2ban filter's failregex expects, in this order.
        let fields = "src=203.0.113.9 sport=40000 dst=10.0.0.5 dport=5432 proto=tcp \
                      container=db port=5432 path=published reason=closed audited=false iface=eth0";
        assert!(line.contains("INFO guard::drops: dropped tcp 203.0.113.9:40000"), "{line}");
        assert!(line.trim_end().ends_with(fields), "{line}");
    }

    #[test]
    fn records_name_the_container_and_port() {
        let event = event(Reason::Closed, DROP_PUBLISHED);
        let names = BTreeMap::from([(7, "db".to_string())]);
        let ifaces = BTreeMap::from([(5, "eth0".to_string())]);
        let record = DropRecord::from_event(&event, &names, &ifaces, &Clock::new());
        assert_eq!(
            record.line(),
            "dropped tcp 10.251.1.2:40000 -> 10.251.1.1:15432 (container db port 5432/tcp, published) on eth0: closed"
        );
        let json = serde_json::to_string(&record).unwrap();
        // The fields in the order they always had (flattening keeps it).
        let keys = ["time", "src", "sport", "dst", "dport", "proto", "container"];
        let keys = keys.iter().chain(&["container_port", "path", "reason", "audited", "iface"]);
        let at: Vec<usize> = keys.map(|k| json.find(&format!("\"{k}\":")).unwrap()).collect();
        assert!(at.is_sorted(), "{json}");
        let back: DropRecord = serde_json::from_str(&json).unwrap();
        // Floats survive JSON to within an ulp or so, not to the bit.
        assert!((back.seen.time - record.seen.time).abs() < 1e-3);
        let time = record.seen.time;
        assert_eq!(DropRecord { seen: Seen { time, ..back.seen }, ..back }, record);
        let audited = PacketEvent { flags: DROP_AUDITED, target: 0, ..event };
        let line = DropRecord::from_event(&audited, &names, &ifaces, &Clock::new()).line();
        assert!(line.starts_with("would drop (audit) tcp"), "{line}");
    }
}
