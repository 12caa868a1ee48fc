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
    /// A frame the filter cannot read far enough to judge (more VLAN tags than it walks, an
    /// IPv6 extension-header chain longer than it walks, a transport header without its
    /// ports): fail closed, whatever the destination (see [`crate::parse`]).
    Unreadable = 8,
    /// Would have been dropped, but answers a flow the host or a container started (flow
    /// memory): replies are never dropped.
    Reply = 9,
    /// Would have been dropped, but the source is trusted by the policy file (inside).
    TrustedSource = 10,
    /// A later fragment: judged by its first fragment, without which it is never delivered.
    LaterFragment = 11,
    /// IPv6 from an IPv4-mapped source (`::ffff:a.b.c.d`), which would pass for IPv4.
    MappedSource = 12,
    /// From an uplink, with the address of a container on this host as its source: forged.
    /// Such a packet could otherwise plant a flow in flow memory on the container's behalf.
    SpoofedSource = 13,
    /// Bound for a container or network the agent has not listed: seen at a hook where the
    /// packet can only be container-bound (a Docker bridge, or a container's answer leaving
    /// through an uplink). Networks are closed from their first packet, even while the agent
    /// is away or has not synced yet.
    UnseenNetwork = 14,
    /// To one of the engine's own management ports (Swarm's overlay, gossip and control
    /// ports, the Docker API on tcp) from a source that is neither a node of the swarm nor in
    /// the operator's `cluster`/`admin` prefixes (see [`crate::maps::door`]).
    ManagementPort = 15,
    /// Container-bound from a source the operator denied (a ban, the policy file's `deny`, a
    /// deny file): whatever opens the port. Its replies to flows started inside still pass.
    Denied = 16,
    /// A new flow (a TCP SYN, a UDP/SCTP/ICMP flow's first packet) to an opened port, over that
    /// port's rate limit for its source (`guard.ratelimit`): decided after the opening, by the
    /// XDP filter's per-source bucket (see [`crate::ratelimit`]). The flows it admitted go on.
    RateLimited = 17,
}

impl Reason {
    pub const COUNT: u32 = 18;

    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::NotIp,
        Reason::MalformedIp,
        Reason::NotContainerBound,
        Reason::Exposed,
        Reason::AllowedSource,
        Reason::Closed,
        Reason::UnassignedAddr,
        Reason::LoopbackDst,
        Reason::Unreadable,
        Reason::Reply,
        Reason::TrustedSource,
        Reason::LaterFragment,
        Reason::MappedSource,
        Reason::SpoofedSource,
        Reason::UnseenNetwork,
        Reason::ManagementPort,
        Reason::Denied,
        Reason::RateLimited,
    ];

    #[inline(always)]
    pub const fn verdict(self) -> Verdict {
        match self {
            Reason::NotIp
            | Reason::MalformedIp
            | Reason::NotContainerBound
            | Reason::Exposed
            | Reason::AllowedSource
            | Reason::Reply
            | Reason::TrustedSource
            | Reason::LaterFragment => Verdict::Pass,
            Reason::Closed
            | Reason::UnassignedAddr
            | Reason::LoopbackDst
            | Reason::Unreadable
            | Reason::MappedSource
            | Reason::SpoofedSource
            | Reason::UnseenNetwork
            | Reason::ManagementPort
            | Reason::Denied
            | Reason::RateLimited => Verdict::Drop,
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
            Reason::Unreadable => "unreadable",
            Reason::Reply => "reply",
            Reason::TrustedSource => "trusted_source",
            Reason::LaterFragment => "later_fragment",
            Reason::MappedSource => "mapped_source",
            Reason::SpoofedSource => "spoofed_source",
            Reason::UnseenNetwork => "unseen_network",
            Reason::ManagementPort => "management_port",
            Reason::Denied => "denied",
            Reason::RateLimited => "rate_limited",
        }
    }

    /// An opening (a label or policy rule) let the packet in: what a rate limit counts and the
    /// access log reports (see [`crate::arrivals`]).
    #[inline(always)]
    pub const fn is_opening(self) -> bool {
        matches!(self, Reason::Exposed | Reason::AllowedSource)
    }

    /// Closed only because nothing opened it (no rule, no reply): what a trusted source, and
    /// a flow started from inside, may still pass.
    #[inline(always)]
    pub const fn closes_by_default(self) -> bool {
        matches!(
            self,
            Reason::Closed
                | Reason::UnassignedAddr
                | Reason::UnseenNetwork
                | Reason::ManagementPort
        )
    }

    pub fn from_u32(v: u32) -> Option<Reason> {
        Self::ALL.get(v as usize).copied()
    }
}

/// The per-CPU counter array: one slot per reason as enforced, then one per reason that
/// would have dropped but passed in audit mode.
pub const COUNTER_SLOTS: u32 = 2 * Reason::COUNT;

/// What the program did with a packet: the reason, and whether a drop was waived by audit
/// mode (`audited` implies the reason's verdict is drop, and the packet passed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    pub audited: bool,
}

impl Decision {
    #[inline(always)]
    pub const fn verdict(self) -> Verdict {
        if self.audited { Verdict::Pass } else { self.reason.verdict() }
    }

    /// The counter slot this decision is counted in.
    #[inline(always)]
    pub const fn counter_slot(self) -> u32 {
        self.reason as u32 + if self.audited { Reason::COUNT } else { 0 }
    }

    /// The decision counted in `slot` (see [`Decision::counter_slot`]).
    pub fn from_counter_slot(slot: u32) -> Option<Decision> {
        let reason = Reason::from_u32(slot % Reason::COUNT)?;
        (slot < COUNTER_SLOTS).then_some(Decision { reason, audited: slot >= Reason::COUNT })
    }

    pub const fn enforced(reason: Reason) -> Decision {
        Decision { reason, audited: false }
    }
}

const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as u32 == i as u32, "Reason::ALL must be in discriminant order");
        i += 1;
    }
};
