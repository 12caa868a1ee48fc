//! Test-bed helpers shared by the privileged test tiers.
//!
//! Every resource a test creates (namespace, veth, Docker network, container, agent, host
//! setting) is an RAII guard that undoes itself on drop, so a failing assertion leaves the
//! machine as it was. Names carry the `guard-e2e-` / `ge2e-` prefixes so that leftovers of a
//! run that was killed outright (no drops) can be found and removed by
//! [`prepare_test_bed`] at the start of the next one.

pub mod agent;
pub mod cmd;
pub mod docker;
pub mod host;
pub mod netns;
pub mod probe;

/// Checks what the privileged tiers need and removes leftovers of crashed runs. Call it
/// first in every test: a test bed that is not there must fail loudly, never skip.
pub fn prepare_test_bed() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root (namespaces, veths, XDP): run them with `cargo xtask test`"
    );
    for tool in ["ip", "iptables"] {
        assert!(
            cmd::find_in_path(tool).is_some(),
            "`{tool}` not found: apt-get install -y iproute2 iptables"
        );
    }
    docker::require_daemon_and_image();
    host::ensure_bpffs();
    remove_leftovers();
}

/// Removes what a run killed before its drops ran may have left: containers and networks
/// first (they hold the bridge), then namespaces, host-side veths and agent pin dirs.
fn remove_leftovers() {
    docker::remove_leftovers();
    netns::remove_leftovers();
    agent::remove_leftover_pins();
}
