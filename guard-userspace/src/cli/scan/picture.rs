//! What `guard scan` found, as plain data: the rows (one per address, port and protocol an
//! outside host can aim at), the hooks that should run and whether they do, the interfaces
//! guard does not judge. The table and `--json` are two renderings of one [`Exposure`].

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cli::reach::Reach;

/// What an outside packet to a row's address and port reaches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A container port, through a published host port or by the container's address.
    Container,
    /// A listening socket of the host that guard does not judge (sshd...).
    HostService,
    /// The engine's own port (Swarm's, the Docker API on tcp), which guard judges.
    EngineDoor,
}

/// One address, port and protocol on one guarded interface, and who outside reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The guarded interface the probes arrived on.
    pub iface: String,
    pub address: String,
    /// 0 with `any_port`: every port of the container that no rule of its own names.
    pub port: u16,
    pub proto: String,
    /// "published" (a host port Docker publishes), "direct" (the container's own address) or
    /// "host" (a host socket).
    pub path: String,
    pub kind: Kind,
    /// The container's name, the door's name or the process's name ("?" when unknown).
    pub name: String,
    /// The container port behind a published one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_port: Option<u16>,
    /// The host process listening on the address and port, if any (docker-proxy...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// Who outside reaches it, as the loaded programs decide (and where a hook is missing,
    /// what gets through without it).
    pub reach: Reach,
    /// Who the policy (Docker's labels and the policy file) says should.
    pub policy: Reach,
    /// The rules behind it, or why guard does not judge it.
    pub why: Vec<String>,
    /// Set when the kernel does not do what the policy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<String>,
}

impl Row {
    /// "203.0.113.5:8080/tcp", "[fd00::5]:53/udp", "172.17.0.2:*".
    pub fn endpoint(&self) -> String {
        let host = if self.address.contains(':') {
            format!("[{}]", self.address)
        } else {
            self.address.clone()
        };
        if self.port == 0 {
            format!("{host}:*")
        } else {
            format!("{host}:{}/{}", self.port, self.proto)
        }
    }
}

/// A program guard should have on an interface, and whether the kernel runs it there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookCheck {
    pub hook: String,
    pub iface: String,
    /// "xdp link", "tcx", "netlink", or "missing".
    pub state: String,
    /// What is open while it is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opens: Option<String>,
}

impl HookCheck {
    pub fn missing(&self) -> bool {
        self.state == "missing"
    }
}

/// An interface guard does not judge, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unguarded {
    pub iface: String,
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exposure {
    pub pin_dir: String,
    pub mode: String,
    /// Where the policy compared with comes from.
    pub policy: String,
    pub rows: Vec<Row>,
    pub hooks: Vec<HookCheck>,
    pub unguarded: Vec<Unguarded>,
    /// Sources the policy file trusts: treated as inside, they reach every container port.
    pub trusted_sources: Vec<String>,
    /// What could not be read, and so is not compared.
    pub notes: Vec<String>,
}

impl Exposure {
    /// Why the kernel's picture is not the policy's: a missing hook, a row in drift.
    pub fn drift(&self) -> Vec<String> {
        let hooks = self.hooks.iter().filter(|h| h.missing()).map(|h| {
            format!(
                "{} is not attached to {}: {}",
                h.hook,
                h.iface,
                h.opens.as_deref().unwrap_or("")
            )
        });
        let rows = self
            .rows
            .iter()
            .filter_map(|r| Some(format!("{} ({}): {}", r.endpoint(), r.name, r.drift.as_ref()?)));
        hooks.chain(rows).collect()
    }

    /// `guard scan`'s exit status: 0 when the kernel does what the policy says, 1 on drift.
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.drift().is_empty())
    }
}

/// The table for people.
pub fn render(e: &Exposure) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "guard scan of {} (mode {}); policy: {}", e.pin_dir, e.mode, e.policy);
    for note in &e.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out.push('\n');
    let mut rows = vec![["IFACE", "TARGET", "WHAT", "OUTSIDE", "WHY"].map(String::from)];
    for r in &e.rows {
        let what = match (&r.kind, r.container_port) {
            (Kind::Container, Some(p)) if p != r.port => format!("container {} port {p}", r.name),
            (Kind::Container, _) => format!("container {}", r.name),
            (Kind::EngineDoor, _) => format!("engine door {}", r.name),
            (Kind::HostService, _) => format!("host: {}", r.name),
        };
        let outside = match &r.drift {
            Some(_) => format!("{} [policy: {}]", r.reach.text(), r.policy.text()),
            None => r.reach.text(),
        };
        rows.push([r.iface.clone(), r.endpoint(), what, outside, r.why.join(", ")]);
    }
    let widths: Vec<usize> =
        (0..5).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for row in &rows {
        let line: Vec<String> =
            row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push('\n');
    for h in &e.hooks {
        let _ = writeln!(out, "hook {:<15} {:<16} {}", h.hook, h.iface, h.state);
    }
    for u in &e.unguarded {
        let _ = writeln!(out, "not guarded: {} ({})", u.iface, u.why);
    }
    if !e.trusted_sources.is_empty() {
        let _ = writeln!(
            out,
            "trusted sources (reach every container port): {}",
            e.trusted_sources.join(", ")
        );
    }
    let drift = e.drift();
    if drift.is_empty() {
        out.push_str("\nno drift: the kernel lets in what the policy opens and nothing else\n");
    }
    for d in drift {
        let _ = writeln!(out, "DRIFT: {d}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn row(port: u16, reach: Reach, policy: Reach) -> Row {
        Row {
            iface: "eth0".into(),
            address: "203.0.113.5".into(),
            port,
            proto: "tcp".into(),
            path: "published".into(),
            kind: Kind::Container,
            name: "web".into(),
            container_port: Some(80),
            process: Some("docker-proxy".into()),
            reach,
            policy,
            why: vec!["label guard.expose".into()],
            drift: None,
        }
    }

    #[test]
    fn reach_widens_only_when_someone_new_gets_in() {
        let listed =
            |s: &[&str]| Reach::from_probes(false, s.iter().map(ToString::to_string).collect());
        assert_eq!(listed(&[]), Reach::nobody());
        assert_eq!(Reach::from_probes(true, vec!["10.0.0.0/8".into()]), Reach::everyone());
        assert!(Reach::everyone().wider_than(&listed(&["10.0.0.0/8"])));
        assert!(listed(&["10.0.0.0/8"]).wider_than(&Reach::nobody()));
        assert!(listed(&["10.0.0.0/8", "192.0.2.7/32"]).wider_than(&listed(&["10.0.0.0/8"])));
        assert!(!listed(&["10.0.0.0/8"]).wider_than(&listed(&["10.0.0.0/8", "192.0.2.7/32"])));
        assert!(!Reach::nobody().wider_than(&Reach::nobody()));
        assert!(!listed(&["10.0.0.0/8"]).wider_than(&Reach::everyone()));
    }

    #[test]
    fn who_reaches_a_target_keeps_its_words_and_its_json() {
        let listed = Reach::from_probes(false, vec!["192.0.2.7/32".into(), "10.0.0.0/8".into()]);
        let json = |r: &Reach| serde_json::to_string(r).unwrap();
        assert_eq!(json(&Reach::nobody()), r#"{"who":"nobody"}"#);
        assert_eq!(json(&Reach::everyone()), r#"{"who":"everyone"}"#);
        assert_eq!(json(&listed), r#"{"who":"listed","sources":["10.0.0.0/8","192.0.2.7/32"]}"#);
        assert_eq!(serde_json::from_str::<Reach>(&json(&listed)).unwrap(), listed);
        assert_eq!(Reach::nobody().text(), "nobody");
        assert_eq!(Reach::everyone().text(), "everyone");
        assert_eq!(listed.text(), "10.0.0.0/8, 192.0.2.7/32");
    }

    #[test]
    fn the_json_shape_is_stable() {
        let mut r = row(8080, Reach::everyone(), Reach::nobody());
        r.drift = Some("open to everyone, the policy opens it to nobody".into());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "iface": "eth0", "address": "203.0.113.5", "port": 8080, "proto": "tcp",
                "path": "published", "kind": "container", "name": "web", "container_port": 80,
                "process": "docker-proxy", "reach": {"who": "everyone"},
                "policy": {"who": "nobody"}, "why": ["label guard.expose"],
                "drift": "open to everyone, the policy opens it to nobody"
            })
        );
        assert_eq!(r.endpoint(), "203.0.113.5:8080/tcp");
        let back: Row = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn drift_and_missing_hooks_exit_1_and_are_said() {
        let mut e = Exposure {
            rows: vec![row(8080, Reach::everyone(), Reach::everyone())],
            ..Default::default()
        };
        assert_eq!(e.exit_code(), 0);
        assert!(render(&e).contains("no drift"));
        e.hooks.push(HookCheck {
            hook: "xdp".into(),
            iface: "eth0".into(),
            state: "missing".into(),
            opens: Some("nothing arriving on eth0 is judged at XDP".into()),
        });
        assert_eq!(e.exit_code(), 1);
        assert!(render(&e).contains("DRIFT: xdp is not attached to eth0"), "{}", render(&e));
        e.hooks.clear();
        e.rows[0].drift = Some("closed while the policy opens it to everyone".into());
        assert_eq!(e.exit_code(), 1);
        assert!(render(&e).contains("[policy: everyone]"), "{}", render(&e));
    }
}
