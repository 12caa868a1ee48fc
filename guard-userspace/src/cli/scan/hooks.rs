//! Whether every program guard should run is attached where it should be: XDP and TC egress
//! on every uplink the agent named, the gate and its flow memory on every Docker bridge it
//! named (the interface roles in the pinned uplinks map), as the kernel holds them. A program
//! that is loaded but not attached judges nothing, so a missing hook is drift.

use std::collections::{BTreeMap, BTreeSet};

use guard_common::maps::{IFACE_DOCKER, IFACE_INSIDE, IFACE_UPLINK};

use super::picture::{HookCheck, Unguarded};
use crate::{
    host::interfaces::Link,
    kernel::hook::{Class, Hook},
    kernel::link_info::{PinnedLinkState, pinned_link_state},
    kernel::pins::Pins,
    kernel::tc_filter,
};

/// What is open while `hook` is missing on `iface`.
fn opens(hook: Hook, iface: &str) -> String {
    match hook {
        Hook::Xdp => format!(
            "nothing arriving on {iface} is judged at XDP: the engine's doors on it are open to everyone, and its container traffic is judged only by the bridges' gates (and, for TCP, its TC egress)"
        ),
        Hook::TcEgress => format!(
            "flows leaving {iface} are not remembered (their replies may be dropped) and containers' SYN-ACKs leave it unjudged: TCP to containers is judged by XDP and the gates alone"
        ),
        Hook::BridgeGate => format!(
            "packets from uplinks to containers on {iface} are judged at XDP (and, for TCP, the uplinks' TC egress) only: a container started since the agent's last pass is open there"
        ),
        Hook::BridgeIngress => {
            format!(
                "the flows containers on {iface} start are not remembered: their replies may be dropped"
            )
        }
    }
}

/// Each hook the kernel's interface roles call for, attached or not, and the interfaces guard
/// does not judge.
pub fn check(
    pins: &Pins,
    roles: &BTreeMap<u32, u32>,
    links: &[Link],
) -> anyhow::Result<(Vec<HookCheck>, Vec<Unguarded>)> {
    let mut checks = Vec::new();
    let mut unguarded = Vec::new();
    let bridges: BTreeSet<&str> = links
        .iter()
        .filter(|l| l.is_bridge && roles.get(&l.ifindex) == Some(&IFACE_DOCKER))
        .map(|l| l.name.as_str())
        .collect();
    for link in links {
        let hooks: &[Hook] = match roles.get(&link.ifindex) {
            Some(&IFACE_UPLINK) => &Class::Uplink.hooks(),
            Some(&IFACE_DOCKER) if link.is_bridge => &Class::Bridge.hooks(),
            // A container's side of a Docker bridge: its bridge is judged.
            Some(&IFACE_DOCKER) => &[],
            Some(&IFACE_INSIDE) => {
                let why = if link.name == "lo" {
                    "loopback"
                } else {
                    "trusted, or left out by --iface: nothing arriving on it is judged"
                };
                unguarded.push(Unguarded { iface: link.name.clone(), why: why.into() });
                &[]
            }
            _ if link.is_veth && link.master.as_deref().is_some_and(|m| bridges.contains(m)) => &[],
            _ => {
                unguarded.push(Unguarded {
                    iface: link.name.clone(),
                    why: "not named by the agent (it appeared since the agent's last pass): a bridge of a network it has not seen is closed, anything else passes".into(),
                });
                &[]
            }
        };
        for &hook in hooks {
            let state = attached(pins, hook, link.ifindex)?;
            checks.push(HookCheck {
                hook: hook.name().into(),
                iface: link.name.clone(),
                opens: (state == "missing").then(|| opens(hook, &link.name)),
                state: state.into(),
            });
        }
    }
    Ok((checks, unguarded))
}

/// How `hook` runs on `ifindex`, or "missing": a pinned link attached to that interface, or
/// (TC on kernels without TCX) a clsact filter in guard's slot.
fn attached(pins: &Pins, hook: Hook, ifindex: u32) -> anyhow::Result<&'static str> {
    let link = pinned_link_state(&pins.link(hook, ifindex))?;
    if link == (PinnedLinkState::Attached { ifindex }) {
        return Ok(hook.link_kind());
    }
    if !hook.is_xdp() {
        let programs = crate::kernel::hook::tc_program_names();
        if tc_filter::in_slot(ifindex, hook)?.is_some_and(|f| programs.contains(&f.name.as_str())) {
            return Ok("netlink");
        }
    }
    Ok("missing")
}
