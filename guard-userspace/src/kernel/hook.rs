//! The catalogue of hooks: for each place guard runs a program, its entry points in
//! guard-ebpf (one per framing), where on an interface it attaches and which interfaces get
//! it. Loading, pinning, attaching, `guard status`, `guard scan` and `guard unload` all ask
//! here rather than naming programs or sides themselves.

use aya::programs::TcAttachType;

use crate::host::interfaces::{Framing, Link};

/// Where on an interface a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// XDP on an uplink's ingress: the filter.
    Xdp,
    /// TCX on an uplink's egress: flow memory for the host's masqueraded flows.
    TcEgress,
    /// TCX on a Docker bridge's egress: the gate after NAT.
    BridgeGate,
    /// TCX on a Docker bridge's ingress: flow memory for the flows containers start.
    BridgeIngress,
}

/// Which interfaces a hook's program goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The host's uplinks: their programs read the link's own framing.
    Uplink,
    /// The engine's bridges (always Ethernet).
    Bridge,
}

/// Where on an interface a hook's program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    /// XDP, on ingress before an skb exists.
    Xdp,
    /// TC (a TCX link, or a clsact filter) on ingress.
    TcIngress,
    /// TC on egress.
    TcEgress,
}

/// What the catalogue says of one hook.
struct Entry {
    /// Its name in pins, logs, metrics and status.
    name: &'static str,
    class: Class,
    point: AttachPoint,
    /// Its entry point for Ethernet links.
    ethernet: &'static str,
    /// Its entry point for L3 links (uplinks only: bridges are Ethernet).
    ip: Option<&'static str>,
}

impl Hook {
    /// In the order they are attached: each recorder of outbound flows before the filter that
    /// lets their replies through, so a flow that starts while the agent attaches (at boot)
    /// keeps its replies.
    pub const ALL: [Hook; 4] = [Hook::TcEgress, Hook::Xdp, Hook::BridgeIngress, Hook::BridgeGate];

    /// Every entry point of the object that runs at a hook: the hook and the framing it
    /// reads. Uplinks get the variant of their link's framing; Docker's bridges are Ethernet.
    pub const PROGRAMS: [(Hook, Framing); 6] = [
        (Hook::Xdp, Framing::Ethernet),
        (Hook::Xdp, Framing::Ip),
        (Hook::TcEgress, Framing::Ethernet),
        (Hook::TcEgress, Framing::Ip),
        (Hook::BridgeGate, Framing::Ethernet),
        (Hook::BridgeIngress, Framing::Ethernet),
    ];

    const fn entry(self) -> Entry {
        match self {
            Hook::Xdp => Entry {
                name: "xdp",
                class: Class::Uplink,
                point: AttachPoint::Xdp,
                ethernet: "guard_xdp",
                ip: Some("guard_xdp_ip"),
            },
            Hook::TcEgress => Entry {
                name: "tc-egress",
                class: Class::Uplink,
                point: AttachPoint::TcEgress,
                ethernet: "guard_tc_egress",
                ip: Some("guard_tc_egress_ip"),
            },
            Hook::BridgeGate => Entry {
                name: "bridge-gate",
                class: Class::Bridge,
                point: AttachPoint::TcEgress,
                ethernet: "guard_tc_gate",
                ip: None,
            },
            Hook::BridgeIngress => Entry {
                name: "bridge-ingress",
                class: Class::Bridge,
                point: AttachPoint::TcIngress,
                ethernet: "guard_tc_bridge_in",
                ip: None,
            },
        }
    }

    pub const fn name(self) -> &'static str {
        self.entry().name
    }

    /// The interfaces this hook's program goes on.
    pub const fn class(self) -> Class {
        self.entry().class
    }

    pub const fn attach_point(self) -> AttachPoint {
        self.entry().point
    }

    /// Whether the program is an XDP program (else a TC classifier).
    pub const fn is_xdp(self) -> bool {
        matches!(self.attach_point(), AttachPoint::Xdp)
    }

    /// The entry point in guard-ebpf that runs at this hook for links of `framing` (on a
    /// bridge, always its Ethernet one).
    pub const fn program(self, framing: Framing) -> &'static str {
        let entry = self.entry();
        match (framing, entry.ip) {
            (Framing::Ip, Some(ip)) => ip,
            _ => entry.ethernet,
        }
    }

    /// The entry points that run at this hook, one per framing.
    pub fn programs(self) -> Vec<&'static str> {
        Self::PROGRAMS
            .iter()
            .filter(|(h, _)| *h == self)
            .map(|(hook, framing)| hook.program(*framing))
            .collect()
    }

    /// The framing of the program that runs at this hook on `link`: on an uplink, the link's
    /// own; Docker's bridges are Ethernet. `None`: a link type guard cannot read.
    pub fn framing_on(self, link: &Link) -> Option<Framing> {
        match self.class() {
            Class::Uplink => link.framing(),
            Class::Bridge => Some(Framing::Ethernet),
        }
    }

    /// What a link of this hook pinned and attached is, as `guard status` and `guard scan`
    /// say it.
    pub const fn link_kind(self) -> &'static str {
        if self.is_xdp() { "xdp link" } else { "tcx" }
    }
}

impl Class {
    /// The hooks on such an interface, as `guard scan` and `guard status` list them: the
    /// one that judges first, then its flow memory.
    pub const fn hooks(self) -> [Hook; 2] {
        match self {
            Class::Uplink => [Hook::Xdp, Hook::TcEgress],
            Class::Bridge => [Hook::BridgeGate, Hook::BridgeIngress],
        }
    }

    /// Why a hook of this class leaves an interface that no longer wants it.
    pub const fn left(self) -> &'static str {
        match self {
            Class::Uplink => "no longer an uplink",
            Class::Bridge => "no longer an engine's bridge",
        }
    }
}

impl AttachPoint {
    /// The side of the interface a TC program runs on (XDP's side is ingress, but it has no
    /// clsact slot: asked anyway, egress, as guard always answered).
    pub const fn tc_side(self) -> TcAttachType {
        match self {
            AttachPoint::TcIngress => TcAttachType::Ingress,
            AttachPoint::Xdp | AttachPoint::TcEgress => TcAttachType::Egress,
        }
    }
}

/// The names of every TC entry point: what guard's clsact filters run (see
/// [`crate::tc_filter`]), and so how its filters are told from other tools'.
pub fn tc_program_names() -> Vec<&'static str> {
    Hook::PROGRAMS.iter().filter(|(h, _)| !h.is_xdp()).map(|(h, f)| h.program(*f)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_class_lists_its_own_hooks_and_every_hook_once() {
        let mut listed: Vec<Hook> =
            [Class::Uplink, Class::Bridge].into_iter().flat_map(Class::hooks).collect();
        for class in [Class::Uplink, Class::Bridge] {
            assert!(class.hooks().iter().all(|h| h.class() == class), "{class:?}");
        }
        listed.sort();
        let mut all = Hook::ALL.to_vec();
        all.sort();
        assert_eq!(listed, all);
    }

    #[test]
    fn entry_points_are_named_as_guard_ebpf_names_them() {
        let names: Vec<&str> = Hook::PROGRAMS.iter().map(|(h, f)| h.program(*f)).collect();
        assert_eq!(
            names,
            [
                "guard_xdp",
                "guard_xdp_ip",
                "guard_tc_egress",
                "guard_tc_egress_ip",
                "guard_tc_gate",
                "guard_tc_bridge_in"
            ]
        );
        assert_eq!(Hook::BridgeGate.program(Framing::Ip), "guard_tc_gate");
        assert_eq!(
            tc_program_names(),
            ["guard_tc_egress", "guard_tc_egress_ip", "guard_tc_gate", "guard_tc_bridge_in"]
        );
    }
}
