//! Points `include_bytes_aligned!` at the traffic generator object (`phantom-bench-gen`), which
//! phantom-daemon's build script builds with the daemon's own eBPF object.

fn main() -> Result<(), String> {
    const DIR: &str = "DEP_PHANTOM_EBPF_OUT_DIR";
    println!("cargo::rerun-if-env-changed={DIR}");
    let dir = std::env::var(DIR)
        .map_err(|_| format!("{DIR} is not set: phantom-daemon's build script names it"))?;
    println!("cargo::rustc-env=PHANTOM_BENCH_GEN={dir}/phantom-bench-gen");
    Ok(())
}
