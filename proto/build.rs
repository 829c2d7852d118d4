//! Compiles etcd's v3 API with protox (pure Rust), so building kubeshard needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "proto";
    println!("cargo:rerun-if-changed={root}");
    let files = [
        "etcd/api/mvccpb/kv.proto",
        "etcd/api/authpb/auth.proto",
        "etcd/api/versionpb/version.proto",
        "etcd/api/etcdserverpb/rpc.proto",
    ];
    let descriptors = protox::compile(files, [root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
