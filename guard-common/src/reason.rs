//! Why a packet got its verdict. Each reason is one slot of the per-CPU counter array, and
//! the verdict follows from the reason, so a counter can never disagree with what happened.

/// A verdict of the XDP program: let the packet continue into the stack, or drop it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): not ours.
    NotIp = 0,
    /// IP header cut short: the destination is unknown, so it cannot be container-bound.
    MalformedIp = 1,
    /// Neither a container, a Docker network nor a published port: the host's own traffic
    /// or traffic routed through it.
    NotContainerBound = 2,
    /// Container-bound, and the port is open to everyone (`guard.expose`).
    Exposed = 3,
    /// Container-bound, and the source is listed for the port (`guard.allow.*`).
    AllowedSource = 4,
    /// Container-bound with no opening for this source: the default.
    Closed = 5,
    /// Addressed to a Docker network address that no container holds.
    UnassignedAddr = 6,
    /// Addressed to 127.0.0.0/8 or ::1 from an uplink (route_localnet class of attacks).
    LoopbackDst = 7,
    /// Container-bound, but the transport header is cut short: cannot be matched, fail closed.
    MalformedL4 = 8,
    /// Would have been dropped, but answers a flow the host or a container started (flow
    /// memory): replies are never dropped.
    Reply = 9,
}

impl Reason {
    pub const COUNT: u32 = 10;

    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::NotIp,
        Reason::MalformedIp,
        Reason::NotContainerBound,
        Reason::Exposed,
        Reason::AllowedSource,
        Reason::Closed,
        Reason::UnassignedAddr,
        Reason::LoopbackDst,
        Reason::MalformedL4,
        Reason::Reply,
    ];

    #[inline(always)]
    pub const fn verdict(self) -> Verdict {
        match self {
            Reason::NotIp
            | Reason::MalformedIp
            | Reason::NotContainerBound
            | Reason::Exposed
            | Reason::AllowedSource
            | Reason::Reply => Verdict::Pass,
            Reason::Closed | Reason::UnassignedAddr | Reason::LoopbackDst | Reason::MalformedL4 => {
                Verdict::Drop
            }
        }
    }

    /// Stable snake_case name, for metrics labels, logs and `--json` output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotIp => "not_ip",
            Reason::MalformedIp => "malformed_ip",
            Reason::NotContainerBound => "not_container_bound",
            Reason::Exposed => "exposed",
            Reason::AllowedSource => "allowed_source",
            Reason::Closed => "closed",
            Reason::UnassignedAddr => "unassigned_addr",
            Reason::LoopbackDst => "loopback_dst",
            Reason::MalformedL4 => "malformed_l4",
            Reason::Reply => "reply",
        }
    }

    pub fn from_u32(v: u32) -> Option<Reason> {
        Self::ALL.get(v as usize).copied()
    }
}

const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as u32 == i as u32, "Reason::ALL must be in discriminant order");
        i += 1;
    }
};
