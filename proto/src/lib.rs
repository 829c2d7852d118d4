//! etcd v3 API types and gRPC service traits generated from etcd's own `.proto` files.
#![forbid(unsafe_code)]
#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

/// `mvccpb`: KeyValue and Event.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// `authpb`: users and roles (referenced by rpc.proto).
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// `etcdserverpb`: the KV, Watch, Lease, Cluster, Maintenance and Auth services.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
