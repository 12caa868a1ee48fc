//! Builds the XDP program (guard-ebpf) with nightly + bpf-linker and leaves the object in
//! OUT_DIR, where src/loader.rs embeds it. `AYA_BUILD_SKIP=1` skips this for lint-only runs.
use std::path::Path;

fn main() -> aya_build::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
    let workspace = Path::new(&manifest_dir).parent().expect("crate lives in the workspace");
    let ebpf_dir = workspace.join("guard-ebpf");
    // aya-build watches the eBPF crate itself; the object also depends on guard-common.
    println!("cargo:rerun-if-changed={}", workspace.join("guard-common/src").display());
    let ebpf = aya_build::Package {
        name: "guard-ebpf",
        root_dir: ebpf_dir.to_str().expect("workspace path is UTF-8"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
