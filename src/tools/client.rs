//! Connecting a tonic client through the sidecar, in each of its ways in.
//! The demo and the tests use these; they are also the Rust snippet for
//! callers that want proxy mode without a `https_proxy` setting.

use std::io;
use std::net::SocketAddr;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Proxy mode: every connection is an HTTP `CONNECT target` tunnel through
/// the sidecar at `proxy`, as gRPC clients do when `grpc_proxy` is set.
pub async fn via_connect(
    proxy: SocketAddr,
    target: &str,
) -> Result<Channel, tonic::transport::Error> {
    let tunnel_to = target.to_string();
    Endpoint::from_shared(format!("http://{target}"))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = tunnel_to.clone();
            async move { http_connect(proxy, &target).await.map(TokioIo::new) }
        }))
        .await
}

/// Authority mode: HTTP/2 straight to the sidecar, with `:authority` set to
/// `target`.
pub async fn via_authority(
    proxy: SocketAddr,
    target: &str,
) -> Result<Channel, tonic::transport::Error> {
    let origin = Endpoint::from_shared(format!("http://{target}"))?;
    Endpoint::from_shared(format!("http://{proxy}"))?
        .origin(origin.uri().clone())
        .connect()
        .await
}

/// Local port mode, or a direct connection: plain HTTP/2 to `addr`.
pub async fn direct(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
}

/// Opens a TCP connection to `proxy` and asks it to `CONNECT` to `target`.
pub async fn http_connect(proxy: SocketAddr, target: &str) -> io::Result<TcpStream> {
    let mut tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    // Read the response head byte by byte: nothing after it may be consumed.
    let mut head = Vec::with_capacity(64);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(io::Error::other("CONNECT response head too long"));
        }
        let byte = tcp.read_u8().await?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("proxy refused CONNECT {target}: {status_line}"),
        ));
    }
    Ok(tcp)
}
