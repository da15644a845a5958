fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/zds.proto"], &["proto"])?;
    tonic_prost_build::configure().compile_protos(&["proto/ca.proto"], &["proto"])?;
    // xDS: the client is ztunnel's, the server the e2e control-plane double's.
    tonic_prost_build::configure().compile_protos(&["proto/xds.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(
            &["proto/workload.proto", "proto/authorization.proto"],
            &["proto"],
        )?;
    Ok(())
}
