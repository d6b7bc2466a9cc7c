//! Generates the Rust types and gRPC stubs of `trainyard.v1`, plus the encoded file
//! descriptor set that the coordinator serves through gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "trainyard/v1/common.proto",
        "trainyard/v1/job.proto",
        "trainyard/v1/worker.proto",
        "trainyard/v1/cluster.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("trainyard_v1_descriptor.bin"))
        .type_attribute(".", "#[allow(missing_docs)]")
        .compile_protos(&protos, &["."])?;
    Ok(())
}
