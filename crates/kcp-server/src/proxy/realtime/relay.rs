//! Frames both ways between a client's WebSocket and its upstream's, until either side closes.
//!
//! Each direction is one pump: it reads a message from one side and writes it to the other.
//! Data frames (text, binary) and close frames pass through; pings and pongs do not, since
//! each hop answers its own peer's pings (tungstenite does so while reading). A close frame
//! from one side goes to the other, and the pump keeps reading until the side that closed
//! has seen its close acknowledged, so both closing handshakes complete. A side that goes
//! away without a close frame gets the other side a close frame from kcp.
//!
//! When the drain begins, kcp sends both sides a close frame (`1001 going away`) and gives
//! them [`Relay::close_wait`] to answer; whatever is left then is cut. After one side has
//! closed, the other gets the same bounded time.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// One side closed (or went away) and the other followed within the close wait.
    Closed,
    /// The drain closed it, and both sides answered within the close wait.
    Drained,
    /// A side did not finish closing within the close wait and was cut.
    Cut,
}

/// What went through a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Payload bytes sent to the client.
    pub to_client: u64,
    /// Payload bytes sent to the upstream.
    pub to_upstream: u64,
    /// How it ended.
    pub ending: Ending,
}

/// The frame copy of one session.
#[derive(Debug, Clone, Copy)]
pub struct Relay {
    /// How long a side gets to finish closing once the other side or the drain closed.
    pub close_wait: Duration,
}

impl Relay {
    /// Copies frames between `client` and `upstream` until both are closed, or until `drain`
    /// resolves and both have been closed.
    pub async fn run<C, U>(self, client: C, upstream: U, drain: impl Future<Output = ()>) -> Relayed
    where
        C: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
        U: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
    {
        let (client_tx, client_rx) = client.split();
        let (upstream_tx, upstream_rx) = upstream.split();
        let (stopping, stop) = watch::channel(false);
        let to_upstream = AtomicU64::new(0);
        let to_client = AtomicU64::new(0);
        let up = pump(client_rx, upstream_tx, stop.clone(), &to_upstream);
        let down = pump(upstream_rx, client_tx, stop, &to_client);
        tokio::pin!(up, down, drain);
        let wait = self.close_wait;
        let finished = tokio::select! {
            () = &mut up => tokio::time::timeout(wait, &mut down).await.is_ok(),
            () = &mut down => tokio::time::timeout(wait, &mut up).await.is_ok(),
            () = &mut drain => {
                stopping.send_replace(true);
                let both = async { tokio::join!(&mut up, &mut down) };
                let drained = tokio::time::timeout(wait, both).await.is_ok();
                return Relayed {
                    to_client: to_client.load(Ordering::Relaxed),
                    to_upstream: to_upstream.load(Ordering::Relaxed),
                    ending: if drained { Ending::Drained } else { Ending::Cut },
                };
            }
        };
        Relayed {
            to_client: to_client.load(Ordering::Relaxed),
            to_upstream: to_upstream.load(Ordering::Relaxed),
            ending: if finished {
                Ending::Closed
            } else {
                Ending::Cut
            },
        }
    }
}

/// The close frame the drain sends.
fn going_away() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "the proxy is shutting down".into(),
    }))
}

/// Copies messages from `rx` to `tx` until `rx` ends, counting payload bytes in `bytes`;
/// sends `tx` a close frame when `stop` turns true, or when `rx` ends without one.
async fn pump<R, W>(mut rx: R, mut tx: W, mut stop: watch::Receiver<bool>, bytes: &AtomicU64)
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    W: Sink<Message, Error = WsError> + Unpin,
{
    let mut closed = false;
    loop {
        tokio::select! {
            message = rx.next() => match message {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(message)) => {
                    let close = message.is_close();
                    bytes.fetch_add(message.len() as u64, Ordering::Relaxed);
                    if closed {
                        continue;
                    }
                    closed = close;
                    if tx.send(message).await.is_err() {
                        // The other side is gone; its own pump closes this side.
                        return;
                    }
                }
                Some(Err(_)) | None => {
                    if !closed {
                        let _ = tx.close().await;
                    }
                    return;
                }
            },
            () = stopped(&mut stop), if !closed => {
                closed = true;
                let _ = tx.send(going_away()).await;
            }
        }
    }
}

/// Resolves once `stop` turns true (never if its sender is gone without that).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;

    type Socket = WebSocketStream<DuplexStream>;

    const WAIT: Duration = Duration::from_secs(3);

    /// Two connected WebSockets: the relay's end (in `role`) and the peer's.
    async fn pair(role: Role) -> (Socket, Socket) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let peer_role = match role {
            Role::Server => Role::Client,
            Role::Client => Role::Server,
        };
        (
            WebSocketStream::from_raw_socket(near, role, None).await,
            WebSocketStream::from_raw_socket(far, peer_role, None).await,
        )
    }

    async fn next(socket: &mut Socket) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a frame in time")
            .and_then(Result::ok)
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_that_goes_away_gets_the_other_side_a_close_frame() {
        let (client, mut client_peer) = pair(Role::Server).await;
        let (upstream, upstream_peer) = pair(Role::Client).await;
        let relay = tokio::spawn(async move {
            let relay = Relay { close_wait: WAIT };
            relay.run(client, upstream, std::future::pending()).await
        });
        drop(upstream_peer);
        assert!(matches!(
            next(&mut client_peer).await,
            Some(Message::Close(_))
        ));
        assert_eq!(next(&mut client_peer).await, None, "then the session ends");
        let relayed = relay.await.expect("no panic");
        assert_eq!(relayed.ending, Ending::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_closes_both_sides_and_cuts_one_that_never_answers() {
        let (client, mut client_peer) = pair(Role::Server).await;
        let (upstream, _silent_upstream) = pair(Role::Client).await;
        let (drain, drained) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(async move {
            let relay = Relay { close_wait: WAIT };
            let drain = async {
                let _ = drained.await;
            };
            relay.run(client, upstream, drain).await
        });
        let started = tokio::time::Instant::now();
        drain.send(()).expect("the relay listens");
        match next(&mut client_peer).await {
            Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected a close frame, got {other:?}"),
        }
        // The client answers; the upstream never reads, so the relay waits out its close wait.
        assert_eq!(next(&mut client_peer).await, None);
        let relayed = relay.await.expect("no panic");
        assert_eq!(relayed.ending, Ending::Cut);
        assert_eq!(started.elapsed(), WAIT);
    }
}
