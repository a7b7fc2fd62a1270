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
    Ok(())
}
