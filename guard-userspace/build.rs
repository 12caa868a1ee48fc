//! Builds the XDP program (guard-ebpf) with nightly + bpf-linker and leaves the object in
//! OUT_DIR, where src/kernel/loader.rs embeds it. `AYA_BUILD_SKIP=1` skips this for lint-only runs.
use std::path::Path;

fn main() -> aya_build::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
    let workspace = Path::new(&manifest_dir).parent().expect("crate lives in the workspace");
    let ebpf_dir = workspace.join("guard-ebpf");
    // aya-build watches the eBPF crate itself; the object also depends on guard-common.
    println!("cargo:rerun-if-changed={}", workspace.join("guard-common/src").display());
    commit(workspace);
    let ebpf = aya_build::Package {
        name: "guard-ebpf",
        root_dir: ebpf_dir.to_str().expect("workspace path is UTF-8"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

/// `GUARD_COMMIT` for `guard version` and `guard_build_info`: the workspace's commit, or
/// "unknown" where there is no git checkout (an image built from a copy of the sources).
fn commit(workspace: &Path) {
    let commit = std::process::Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=GUARD_COMMIT={commit}");
    // Only paths that exist: a missing one would make cargo run this script on every build.
    for path in [".git/HEAD", ".git/refs/heads"] {
        let path = workspace.join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
