// Compiles proto/cairn/v1/store.proto (inside this crate, so that it is packaged) with protox (pure Rust: no protoc to install).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto";
    println!("cargo:rerun-if-changed={proto}/cairn/v1/store.proto");
    let fds = protox::compile(["cairn/v1/store.proto"], [proto])?;
    // `bytes` fields as `Bytes`: payloads are sliced out of the received buffer, not copied.
    tonic_prost_build::configure()
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
