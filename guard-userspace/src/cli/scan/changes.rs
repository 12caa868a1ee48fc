//! What changed between two exposure pictures, one change per target (a container port, a
//! host service, an engine door) however many addresses lead to it: starting a container with
//! `guard.expose=80` is one change, whether it is reached by its own address, through a
//! published port on every host address, or both.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::picture::{Exposure, Kind, Row};
use crate::cli::reach::{Reach, Who};

/// What a change is about: the same container port keeps its key across addresses.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TargetKey {
    kind: Kind,
    name: String,
    proto: String,
    port: u16,
}

/// Who reaches one target, over every row that leads to it.
#[derive(Clone, Debug, Default)]
struct Target {
    reach: Reach,
    addresses: BTreeSet<String>,
    rules: BTreeSet<String>,
}

/// One target whose reach from outside changed: the webhook's body and the WARN event's fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// "opened" (someone outside gets in who did not) or "closed".
    pub direction: String,
    pub kind: Kind,
    /// The container's name, the process's, or the engine door's.
    pub name: String,
    /// The container port (for containers), else the port listened on; 0: every port.
    pub port: u16,
    pub proto: String,
    /// Who outside reaches it now, and who did before.
    pub reach: Reach,
    pub before: Reach,
    /// Where outside hosts reach it now (or reached it, when closed).
    pub addresses: Vec<String>,
    /// The labels and policy rules that open it, or why guard does not judge it.
    pub rules: Vec<String>,
}

impl Change {
    /// One line for people: "container web 80/tcp opened to everyone (label guard.expose)".
    pub fn summary(&self) -> String {
        let what = match self.kind {
            Kind::Container => "container",
            Kind::HostService => "host service",
            Kind::EngineDoor => "engine door",
        };
        let port =
            if self.port == 0 { "*".into() } else { format!("{}/{}", self.port, self.proto) };
        let to = if self.direction == "opened" {
            format!("opened to {}", self.reach.text())
        } else {
            format!("closed (now {}, was {})", self.reach.text(), self.before.text())
        };
        let rules = if self.rules.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.rules.join(", "))
        };
        format!("{what} {} {port} {to}{rules}", self.name)
    }
}

fn key(row: &Row) -> TargetKey {
    let port = match row.kind {
        Kind::Container => row.container_port.unwrap_or(row.port),
        _ => row.port,
    };
    TargetKey { kind: row.kind.clone(), name: row.name.clone(), proto: row.proto.clone(), port }
}

fn targets(e: &Exposure) -> BTreeMap<TargetKey, Target> {
    let mut targets: BTreeMap<TargetKey, Target> = BTreeMap::new();
    for row in &e.rows {
        let t = targets
            .entry(key(row))
            .or_insert_with(|| Target { reach: Reach::nobody(), ..Default::default() });
        t.reach = union(&t.reach, &row.reach);
        if row.reach.is_open() {
            t.addresses.insert(row.endpoint());
        }
        t.rules.extend(row.why.iter().cloned());
    }
    targets
}

fn union(a: &Reach, b: &Reach) -> Reach {
    if a.who == Who::Everyone || b.who == Who::Everyone {
        return Reach::everyone();
    }
    Reach::listed(a.sources.iter().chain(&b.sources).cloned().collect())
}

/// How many targets outside reaches: open to everyone, to listed sources, host services.
pub fn exposed_targets(e: &Exposure) -> (usize, usize, usize) {
    let targets = targets(e);
    let count =
        |f: &dyn Fn(&TargetKey, &Target) -> bool| targets.iter().filter(|(k, t)| f(k, t)).count();
    let judged = |k: &TargetKey| k.kind != Kind::HostService;
    (
        count(&|k, t| judged(k) && t.reach.who == Who::Everyone),
        count(&|k, t| judged(k) && t.reach.who == Who::Listed),
        count(&|k, t| !judged(k) && t.reach.is_open()),
    )
}

/// The changes from `before` to `now`, opened ones first.
pub fn changes(before: &Exposure, now: &Exposure) -> Vec<Change> {
    let (old, new) = (targets(before), targets(now));
    let keys: BTreeSet<&TargetKey> = old.keys().chain(new.keys()).collect();
    let closed = Target { reach: Reach::nobody(), ..Default::default() };
    let mut changes: Vec<Change> = keys
        .into_iter()
        .filter_map(|k| {
            let (was, is) = (old.get(k).unwrap_or(&closed), new.get(k).unwrap_or(&closed));
            let direction = if is.reach.wider_than(&was.reach) {
                "opened"
            } else if was.reach.wider_than(&is.reach) {
                "closed"
            } else {
                return None;
            };
            let shown = if direction == "opened" { is } else { was };
            Some(Change {
                direction: direction.into(),
                kind: k.kind.clone(),
                name: k.name.clone(),
                port: k.port,
                proto: k.proto.clone(),
                reach: is.reach.clone(),
                before: was.reach.clone(),
                addresses: shown.addresses.iter().cloned().collect(),
                rules: shown.rules.iter().cloned().collect(),
            })
        })
        .collect();
    changes.sort_by_key(|c| c.direction != "opened");
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, address: &str, port: u16, container_port: u16, reach: Reach) -> Row {
        Row {
            iface: "eth0".into(),
            address: address.into(),
            port,
            proto: "tcp".into(),
            path: if port == container_port { "direct" } else { "published" }.into(),
            kind: Kind::Container,
            name: name.into(),
            container_port: Some(container_port),
            process: None,
            policy: reach.clone(),
            reach,
            why: vec!["label guard.expose".into()],
            drift: None,
        }
    }

    fn picture(rows: Vec<Row>) -> Exposure {
        Exposure { rows, ..Default::default() }
    }

    #[test]
    fn a_new_exposed_container_is_one_opened_change_over_all_its_addresses() {
        let before = picture(vec![]);
        let now = picture(vec![
            row("web", "203.0.113.5", 8080, 80, Reach::everyone()),
            row("web", "172.17.0.2", 80, 80, Reach::everyone()),
            row("db", "203.0.113.5", 5432, 5432, Reach::nobody()),
        ]);
        let c = changes(&before, &now);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!((c[0].direction.as_str(), c[0].name.as_str(), c[0].port), ("opened", "web", 80));
        assert_eq!(c[0].addresses, ["172.17.0.2:80/tcp", "203.0.113.5:8080/tcp"]);
        assert_eq!(c[0].rules, ["label guard.expose"]);
        assert_eq!(c[0].summary(), "container web 80/tcp opened to everyone (label guard.expose)");
        // The same picture again: nothing.
        assert!(changes(&now, &now).is_empty());
        // Gone: closed, with where it was reached.
        let c = changes(&now, &before);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].direction.as_str(), c[0].reach.who), ("closed", Who::Nobody));
        assert_eq!(c[0].addresses.len(), 2);
    }

    #[test]
    fn narrowing_closes_and_a_new_source_opens() {
        let listed =
            |s: &[&str]| Reach::from_probes(false, s.iter().map(ToString::to_string).collect());
        let at = |r: Reach| picture(vec![row("db", "203.0.113.5", 5432, 5432, r)]);
        let c = changes(&at(Reach::everyone()), &at(listed(&["10.0.0.0/8"])));
        assert_eq!(c[0].direction, "closed");
        let c = changes(&at(listed(&["10.0.0.0/8"])), &at(listed(&["10.0.0.0/8", "192.0.2.7/32"])));
        assert_eq!((c.len(), c[0].direction.as_str()), (1, "opened"));
        // A closed row that stays closed, or a closed row appearing, is no change.
        assert!(changes(&picture(vec![]), &at(Reach::nobody())).is_empty());
    }

    #[test]
    fn the_json_shape_is_stable() {
        let c = changes(
            &picture(vec![]),
            &picture(vec![row("web", "172.17.0.2", 80, 80, Reach::everyone())]),
        );
        assert_eq!(
            serde_json::to_value(&c[0]).unwrap(),
            serde_json::json!({
                "direction": "opened", "kind": "container", "name": "web", "port": 80,
                "proto": "tcp", "reach": {"who": "everyone"}, "before": {"who": "nobody"},
                "addresses": ["172.17.0.2:80/tcp"], "rules": ["label guard.expose"]
            })
        );
    }
}
