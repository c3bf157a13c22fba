//! `cfg(own_gemm)`: the targets that have our matrix micro-kernels (`kernels::gemm`) and the
//! operators built on them: x86-64, aarch64 and 32-bit ARM. Whether the CPU runs them is still
//! asked at run time (`gemm::available`).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(own_gemm)");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if matches!(arch.as_str(), "x86_64" | "aarch64" | "arm") {
        println!("cargo::rustc-cfg=own_gemm");
    }
}
