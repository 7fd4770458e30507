//! Raw TCP for the tests that speak below HTTP: malformed heads, abusive clients.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::proxy_harness::WAIT;

/// Reads `tcp` until the server closes it, bounded by [`WAIT`]: what was read, and whether the
/// server closed the connection in time.
pub async fn read_to_close(tcp: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut read = Vec::new();
    let closed = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (read, closed)
}
