//! The pipeline every user of the desired state runs: target ids → desired state; the plan
//! (a [`diff`](super::tables::diff) against what the kernel holds) and its apply follow.
//! One [`Reconciler`] for the agent, `guard status`, `scan`, `explain`, the verdict tests and
//! the bench, so they cannot drift apart: its [`Reconciler::desired_state`] is total, every
//! input (the interfaces' roles and the denied sources included) goes in, and nobody edits
//! the result afterwards.

use std::{collections::BTreeMap, net::IpAddr};

use guard_common::maps::ContainerId;

use crate::{
    policy::{Cidr, file::PolicyFile, snapshot::Snapshot},
    state::{
        desired::{self, Desired},
        identities::Identities,
        tables::TableSet,
    },
};

/// Everything the desired state is computed from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Docker's networks and containers.
    pub snapshot: &'a Snapshot,
    /// Every address of every host interface.
    pub host_addrs: &'a [IpAddr],
    /// The policy in force.
    pub policy: &'a PolicyFile,
    /// Every interface's role for the kernel (`IFACE_*` by ifindex): the agent decides them
    /// from its flags, the policy file and the interfaces it finds. An interface not named is
    /// taken for the bridge of a network not seen yet.
    pub interfaces: &'a BTreeMap<u32, u32>,
    /// Sources denied besides the policy file's own `deny`: deny files, `guard ban`, CrowdSec.
    pub denied: &'a [Cidr],
    /// The denials the kernel holds, kept as well: where the agent could not take the ban
    /// lock, a `guard ban` made meanwhile must not be undone.
    pub kernel_denials: Option<&'a TableSet>,
    /// Open nothing: the snapshot is not Docker's word yet (the agent has not synced), or no
    /// policy file that parsed is known.
    pub closed: bool,
}

impl<'a> Inputs<'a> {
    /// The inputs with nothing beside the snapshot, the host and the policy: no interface
    /// named, nothing denied besides the policy's own list, openings as the policy says.
    pub fn new(snapshot: &'a Snapshot, host_addrs: &'a [IpAddr], policy: &'a PolicyFile) -> Self {
        static NONE: BTreeMap<u32, u32> = BTreeMap::new();
        Inputs {
            snapshot,
            host_addrs,
            policy,
            interfaces: &NONE,
            denied: &[],
            kernel_denials: None,
            closed: false,
        }
    }
}

/// Target ids and the desired state that uses them. Ids only grow while a reconciler lives
/// (see [`crate::state::identities`]), so keep one for as long as the maps it fills.
#[derive(Debug, Default)]
pub struct Reconciler {
    ids: Identities,
}

impl Reconciler {
    /// Continues the target ids the kernel holds (`TableSet::identities`): the maps of a
    /// running or previous agent keep their numbering.
    pub fn adopt(pinned: impl IntoIterator<Item = (u32, ContainerId)>) -> Self {
        Reconciler { ids: Identities::adopt(pinned) }
    }

    /// What every map must hold for `inputs`. Every running container gets a target id (a
    /// known one keeps its own); those gone are forgotten.
    pub fn desired_state(&mut self, inputs: &Inputs) -> Desired {
        let snapshot = inputs.snapshot;
        let targets = self.ids.assign(snapshot.containers.iter().map(|c| c.id.as_str()));
        let desired = desired::desired_state(snapshot, inputs.host_addrs, &targets, inputs.policy);
        finish(desired, inputs)
    }

    /// The desired state when `tables` (what a previous agent left in the maps, its last
    /// sync) stand in for a snapshot: the same closing, denials and interface roles as
    /// [`Reconciler::desired_state`], on those tables.
    pub fn kept(&self, tables: TableSet, inputs: &Inputs) -> Desired {
        finish(Desired { tables, ..Desired::default() }, inputs)
    }
}

/// The inputs beside the snapshot, in the desired state.
fn finish(mut desired: Desired, inputs: &Inputs) -> Desired {
    let tables = &mut desired.tables;
    if inputs.closed {
        tables.close_openings();
    }
    tables.deny(inputs.denied.iter().copied());
    if let Some(kernel) = inputs.kernel_denials {
        tables.keep_denied(kernel);
    }
    tables.uplinks = inputs.interfaces.clone();
    desired
}
