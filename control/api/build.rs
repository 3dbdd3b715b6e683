//! Compiles the control plane's protobuf services (system `protoc`) and keeps their file
//! descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "../proto/tier0/control/v1/common.proto",
        "../proto/tier0/control/v1/namespace.proto",
        "../proto/tier0/control/v1/cluster.proto",
        "../proto/tier0/control/v1/snapshot.proto",
        "../proto/tier0/control/v1/admin.proto",
        "../proto/tier0/control/v1/orchestration.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tier0_control_descriptor.bin"))
        .compile_protos(&protos, &["../proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
