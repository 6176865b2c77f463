fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc and the well-known types come from Debian (protobuf-compiler, libprotobuf-dev);
    // `cargo xtask setup` installs them.
    tonic_prost_build::configure().compile_protos(
        &["proto/workload.proto", "proto/tether/node.proto", "proto/tether/admin.proto", "proto/tether/tpm.proto"],
        &["proto", "/usr/include"],
    )?;
    Ok(())
}
