//! End-to-end: a real SIGTERM during a Realtime session closes it cleanly on both sides within
//! the grace period, and the server stops.
//!
//! Alone in its own test binary: the signal goes to the whole process, so nothing else may be
//! listening for it.

mod support;

use key_cycle_proxy::core::Secret;
use key_cycle_proxy::server::ops::serve::Server;
use key_cycle_proxy::server::ops::signals::Signals;
use support::KEY_A;
use support::proxy_harness::{WAIT, loaded_config};
use support::realtime::{
    CLIENT_TOKEN, GREETING, MODEL, RealtimeUpstream, closed_going_away, next as next_frame,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn sigterm_closes_an_open_session_on_both_sides_and_stops_the_server() {
    let upstream = RealtimeUpstream::start().await;
    let mut loaded = loaded_config(vec![(KEY_A, upstream.url(), vec![MODEL])], |config| {
        config.server.graceful_shutdown_seconds = 3;
    });
    loaded.client_keys = vec![Secret::new(CLIENT_TOKEN)];
    let signals = Signals::new().expect("install the handlers before any signal is sent");
    let server = Server::bind(loaded).await.expect("proxy starts");
    let addr = server.local_addr();
    let shutdown = signals.until_shutdown(server.app());
    let running = tokio::spawn(server.run(shutdown));

    let url = format!("ws://{addr}/v1/realtime?model={MODEL}");
    let mut request = url.into_client_request().expect("request");
    let token = format!("Bearer {CLIENT_TOKEN}").parse().expect("value");
    request.headers_mut().insert("authorization", token);
    let (mut client, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .expect("the session opens");
    assert_eq!(next_frame(&mut client).await, Message::text(GREETING));

    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM");

    closed_going_away(&mut client).await;
    let stopped = tokio::time::timeout(WAIT, running)
        .await
        .expect("SIGTERM stops the server")
        .expect("no panic");
    assert!(
        stopped.is_ok(),
        "drained within the grace period: {stopped:?}"
    );
    let closes = upstream.closes();
    assert_eq!(closes.len(), 1, "the upstream got a close frame");
    assert_eq!(closes[0].as_ref().map(|f| f.code), Some(CloseCode::Away));
}
