//! Rebuild when the bpf-linker binary changes (it is an undeclared build input: cargo cannot
//! express a dependency on a binary).
fn main() {
    let bpf_linker = which::which("bpf-linker").expect(
        "bpf-linker not found on PATH: `cargo xtask test` installs it, or see README Requirements",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
