//! Builds the eBPF object with the pinned nightly and bpf-linker, for `include_bytes_aligned!`.

/// The dated nightly that compiles the eBPF crate. bpf-linker is built against this
/// toolchain's LLVM by scripts/bootstrap.sh; change both together.
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-30";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../ebpf");
    let ebpf_dir = ebpf_dir.canonicalize()?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("eBPF crate path is not UTF-8"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "phantom-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )?;
    // Every binary of the eBPF crate lands in OUT_DIR; crates that depend on this one (the
    // bench embeds the traffic generator, `phantom-bench-gen`) read the directory from
    // DEP_PHANTOM_EBPF_OUT_DIR (`links` in Cargo.toml).
    println!("cargo::metadata=out_dir={}", std::env::var("OUT_DIR")?);
    Ok(())
}
