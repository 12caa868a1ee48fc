//! The swarm stage of the e2e tier, `e2e[swarm docker 28.5.2]`: tests/tests/swarm.rs on a real
//! multi-node Docker Swarm of Docker 28 daemons (the unpacked engine of `engines`), each in a
//! network namespace of its own.
//!
//! A stage of its own, not part of the Docker 28 swap: the nodes are extra dockerds with their
//! own namespaces, bridges, iptables, containerd and state under /var/tmp/ge2e-swarm, so they
//! run beside the machine's dockerd 20.10, which stays up and lends them the test image (and
//! the agent's image for the stack test). Nothing is swapped, so the stage costs only its
//! tests, takes the ordinary test-bed lock (in the tests) and shows its own time in the summary.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use crate::docker::TEST_IMAGE;
use crate::engines::{self, selected_by};
use crate::test::{Outcome, run_counted};

/// The tests of tests/tests/swarm.rs, run in this order.
pub(crate) const SWARM_TESTS: &[&str] = &[
    "without_guard_a_vxlan_frame_from_outside_reaches_an_overlay_container",
    "with_guard_the_overlay_is_closed_to_outside_and_the_swarm_keeps_working",
    "docker_api_on_tcp_is_closed_from_outside_and_open_from_an_admin_prefix",
    "audit_mode_and_enforce_false_leave_the_doors_open_and_counted",
    "the_stack_runs_one_agent_per_node_and_each_protects_its_node",
];

/// What the tests read to find the unpacked Docker 28 (tests/src/swarm.rs).
const ROOT_VAR: &str = "GUARD_TEST_DOCKER28_ROOT";

/// Fetches Docker 28 if needed and runs [`SWARM_TESTS`] (those `extra`'s filters leave).
pub fn run_swarm(extra: &[String], guard_bin: &Path) -> Result<Outcome> {
    let label = format!("e2e[swarm docker {}]", engines::DOCKER28_SERVER);
    let names: Vec<&str> =
        SWARM_TESTS.iter().copied().filter(|name| selected_by(name, extra)).collect();
    if names.is_empty() {
        println!("xtask: no swarm test matches {extra:?}: the swarm stage is skipped");
        return Ok(Outcome::none(label));
    }
    let started = Instant::now();
    let root = engines::fetch_docker28()?;
    let flags = extra.iter().filter(|a| a.starts_with('-'));
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--no-fail-fast", "-p", "tests", "--test", "swarm"])
        .args(["--", "--test-threads=1", "--exact"])
        .args(flags)
        .args(&names)
        .env("GUARD_BIN", guard_bin)
        .env("GUARD_TEST_IMAGE", TEST_IMAGE)
        .env(ROOT_VAR, &root);
    let mut outcome = run_counted(label, cmd)?;
    outcome.secs = Some(started.elapsed().as_secs());
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_swarm_test_is_run_and_every_name_is_a_test() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/tests/swarm.rs");
        let source = std::fs::read_to_string(file).expect("tests/tests/swarm.rs");
        let defined: Vec<&str> = source
            .split("#[test]")
            .skip(1)
            .filter_map(|rest| rest.trim_start().strip_prefix("fn ")?.split('(').next())
            .collect();
        let mut listed = SWARM_TESTS.to_vec();
        listed.sort_unstable();
        let mut defined_sorted = defined.clone();
        defined_sorted.sort_unstable();
        assert_eq!(listed, defined_sorted, "SWARM_TESTS and the tests in {file} differ");
    }
}
