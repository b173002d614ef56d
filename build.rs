//! Generates the gRPC code from `proto/toru/v1/*.proto` with a vendored `protoc`, so a fresh
//! machine needs no system protobuf compiler. Also writes the encoded file descriptor set
//! that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto");
    let mut protos: Vec<PathBuf> = std::fs::read_dir(proto_dir.join("toru/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Requests that do not decode are INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::api::codec::Codec")
        .file_descriptor_set_path(out_dir.join("toru_descriptor.bin"))
        .compile_with_config(
            config,
            &protos,
            &[proto_dir, protoc_bin_vendored::include_path()?],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
