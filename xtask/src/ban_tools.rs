//! fail2ban and CrowdSec from Debian, for the bans e2e tier (tests/tests/bans.rs). The tests
//! run private instances of both (their own configuration, socket, database and loopback
//! port in a scratch directory), so the packages' own services are never wanted: installing
//! must not start them, and they stay disabled.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result};

pub const PACKAGES: &[&str] = &["fail2ban", "crowdsec"];

/// Debian's hook that invoke-rc.d and deb-systemd-invoke ask before starting a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// crowdsec's postinst registers to CrowdSec's Central API (`cscli capi register`) unless this
/// file is there and not empty; that fails without internet (and fails the install), and a
/// test bed has no business registering anyway.
const CAPI_CREDENTIALS: &str = "/etc/crowdsec/online_api_credentials.yaml";

/// Undoes what [`before_install`] set up for the install.
pub struct InstallGuard {
    wrote_policy: bool,
}

/// Prepares installing whichever of [`PACKAGES`] is missing (`missing`): no service start
/// during the install, no Central API registration.
pub fn before_install(missing: &[&str]) -> Result<InstallGuard> {
    let mut guard = InstallGuard { wrote_policy: false };
    if !missing.iter().any(|p| PACKAGES.contains(p)) {
        return Ok(guard);
    }
    if missing.contains(&"crowdsec") && !Path::new(CAPI_CREDENTIALS).exists() {
        fs::create_dir_all("/etc/crowdsec")?;
        fs::write(
            CAPI_CREDENTIALS,
            "# Written by container-guard's `cargo xtask setup` before crowdsec was installed: no\n\
             # Central API registration on a test bed. Remove it and run `cscli capi register`\n\
             # to register this machine.\n",
        )
        .with_context(|| format!("writing {CAPI_CREDENTIALS}"))?;
        println!(
            "xtask: {CAPI_CREDENTIALS} written: crowdsec's install will not register to the Central API"
        );
    }
    // A machine that has its own policy (Docker images deny every start) keeps it.
    if !Path::new(POLICY_RC_D).exists() {
        fs::write(POLICY_RC_D, policy_script())?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))?;
        guard.wrote_policy = true;
    }
    Ok(guard)
}

/// A policy-rc.d that refuses to start [`PACKAGES`]' services (101: forbidden) and lets every
/// other service do as it would without one (0).
fn policy_script() -> String {
    let services = PACKAGES.join("|");
    format!(
        "#!/bin/sh\n# container-guard's xtask, during apt-get install only\ncase \"$1\" in {services}) exit 101 ;; esac\nexit 0\n"
    )
}

impl Drop for InstallGuard {
    fn drop(&mut self) {
        if self.wrote_policy {
            let _ = fs::remove_file(POLICY_RC_D);
        }
    }
}

/// After an install: the packages enable their units for the next boot; disable them (and
/// stop them, should anything have started them) where systemd runs. Without systemd (this
/// project's test machines) nothing starts them.
pub fn keep_services_stopped() {
    if !Path::new("/run/systemd/system").is_dir() {
        return;
    }
    for package in PACKAGES {
        let unit = format!("{package}.service");
        let disabled = Command::new("systemctl")
            .args(["disable", "--now", &unit])
            .status()
            .is_ok_and(|s| s.success());
        if disabled {
            println!("xtask: {unit} disabled and stopped (the tests run their own {package})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_refuses_only_the_ban_tools() {
        let status = |service: &str| {
            Command::new("sh")
                .args(["-c", &policy_script(), "policy-rc.d", service, "start"])
                .status()
                .unwrap()
                .code()
        };
        assert_eq!(status("fail2ban"), Some(101));
        assert_eq!(status("crowdsec"), Some(101));
        assert_eq!(status("docker"), Some(0));
    }
}
