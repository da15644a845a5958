fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/zds.proto"], &["proto"])?;
    tonic_prost_build::configure().compile_protos(&["proto/ca.proto"], &["proto"])?;
    Ok(())
}
