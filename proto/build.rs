//! Compiles the .proto files with protox (pure Rust), so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/darkcore/agent/v1/agent.proto"];
    let descriptors = protox::compile(protos, ["proto"])?;
    // Credentials print redacted (see lib.rs), so a `{:?}` of a task never leaks them.
    tonic_prost_build::configure()
        .skip_debug([".darkcore.agent.v1.RegistryCredential"])
        // Small per-stream buffers: the operator holds one stream per device (see codec.rs).
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors)?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
