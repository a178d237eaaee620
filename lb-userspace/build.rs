//! Builds the eBPF object (lb-ebpf) with the nightly toolchain and
//! bpf-linker, so that `xdplb` embeds the exact dataplane it was built with.
//! `cargo xtask setup` installs what this needs.
//!
//! Like aya-build, but into one shared target directory (`target/ebpf`), so
//! the dev, test and release builds of this crate share one eBPF build, and
//! quietly: the nested cargo's output is shown only when it fails.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    for dir in ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-common/src", "lb-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let target_dir = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let ebpf_target = target_dir.join("ebpf");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--package", "lb-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--target-dir"])
        .arg(&ebpf_target)
        .current_dir(&root)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        );
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS"] {
        cmd.env_remove(key);
    }
    let out = cmd.output().expect("could not run `rustup run nightly cargo`; run `cargo xtask setup`");
    if !out.status.success() {
        panic!(
            "building the eBPF program failed (run `cargo xtask setup` if bpf-linker or rust-src is missing):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let object = ebpf_target.join("bpfel-unknown-none/release/lb-ebpf");
    let dest = PathBuf::from(env::var("OUT_DIR").unwrap()).join("lb-ebpf");
    std::fs::copy(&object, &dest).unwrap_or_else(|e| panic!("copying {} failed: {e}", object.display()));
}
