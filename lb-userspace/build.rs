//! Builds the eBPF object (lb-ebpf) with the nightly toolchain and
//! bpf-linker, so that `xdplb` embeds the exact dataplane it was built with.
//! `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../lb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: "../lb-ebpf", ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
