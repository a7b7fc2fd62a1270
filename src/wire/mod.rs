//! HTTP/2 and gRPC plumbing under the call path: batched socket I/O, the
//! body pump and keepalive, a cheap timer, and gRPC's wire helpers
//! (`grpc-timeout`, `grpc-status`, status responses).

pub mod grpc;
pub mod io;
pub mod stream;
pub mod timer;
