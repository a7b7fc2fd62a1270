//! Compiles the protos with protox (pure Rust), so no system `protoc` is
//! needed, and keeps the admin API's descriptors for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/agentmesh/demo/v1/agent.proto",
        "proto/agentmesh/admin/v1/admin.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    // Reflection lists what the admin port serves: the admin API only.
    let admin = protox::compile(["proto/agentmesh/admin/v1/admin.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("admin_descriptors.bin"),
        prost::Message::encode_to_vec(&admin),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    link_layout();
    Ok(())
}

/// Release builds for x86-64 Linux, which Rust links with its own lld
/// since 1.90, are linked with relative relocations packed (RELR, glibc
/// 2.36 or later) and, unless profile-guided, with the sidecar's functions
/// that run side by side at the front of the code, hottest first
/// (scripts/symbol-order.txt, made by scripts/symbol-order). Both only
/// change how the binary lies in memory: idle, the pages it keeps
/// resident. AGENTMESH_LINK_LAYOUT=0 leaves them out (for a linker without
/// these options).
fn link_layout() {
    println!("cargo:rerun-if-env-changed=AGENTMESH_LINK_LAYOUT");
    let var = |name| std::env::var(name).unwrap_or_default();
    if var("PROFILE") != "release"
        || var("TARGET") != "x86_64-unknown-linux-gnu"
        || var("AGENTMESH_LINK_LAYOUT") == "0"
        || !rustc_links_with_lld(&var("RUSTC"))
    {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    // A profile-guided build lays out its code by its own profile (and its
    // functions' names differ from a plain build's, so the list would not
    // find them).
    if var("CARGO_ENCODED_RUSTFLAGS").contains("profile-") {
        return;
    }
    let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("scripts/symbol-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Names from another version of a dependency are passed over.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Whether rustc is 1.90 or later, whose default linker on x86-64 Linux is
/// its own lld.
fn rustc_links_with_lld(rustc: &str) -> bool {
    let Ok(out) = std::process::Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let mut parts = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
