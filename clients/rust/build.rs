//! Generates the `toru.v1` messages, service traits and clients from `proto/toru/v1/*.proto`
//! (the workspace's `proto/`) with a vendored `protoc`, so a fresh machine needs no system
//! protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("../../proto");
    let mut protos: Vec<PathBuf> = std::fs::read_dir(proto_dir.join("toru/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Messages that do not decode are INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::codec::Codec")
        .compile_with_config(
            config,
            &protos,
            &[proto_dir.clone(), protoc_bin_vendored::include_path()?],
        )?;
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    Ok(())
}
