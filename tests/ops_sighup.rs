//! End-to-end: the server's signal handling, with real signals sent to this test process.
//!
//! Alone in its own test binary: the signals go to the whole process, so nothing else may be
//! listening for them. SIGHUP reloads the config file; SIGTERM drains and stops the server.

mod support;

use http::StatusCode;
use key_cycle_proxy::server::ops::serve::Server;
use key_cycle_proxy::server::ops::signals::Signals;
use support::config_file::{ConfigFile, config_toml};
use support::proxy_harness::{WAIT, client, read, send_with};
use support::{KEY_A, KEY_B, MockUpstream};

fn signal(name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name}");
}

fn chat(addr: std::net::SocketAddr) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","messages":[]}"#.into())
        .expect("request")
}

#[tokio::test]
async fn sighup_reloads_the_config_and_sigterm_stops_the_server() {
    let mock = MockUpstream::start().await;
    let file = ConfigFile::new(&config_toml(&mock.url(), &[("alpha", KEY_A)], ""));
    let signals = Signals::new().expect("install the handlers before any signal is sent");
    let server = Server::bind_app(file.app()).await.expect("proxy starts");
    let (addr, app) = (server.local_addr(), server.app());
    let shutdown = signals.until_shutdown(server.app());
    let running = tokio::spawn(server.run(shutdown));
    let client = client();
    assert_eq!(
        read(send_with(&client, chat(addr)).await).await.status,
        StatusCode::OK
    );

    let mut reloads = app.subscribe_reloads();
    file.write(&config_toml(
        &mock.url(),
        &[("alpha", KEY_A), ("beta", KEY_B)],
        "",
    ));
    signal("HUP");
    tokio::time::timeout(WAIT, reloads.changed())
        .await
        .expect("SIGHUP reloads within the bound")
        .expect("the app is alive");
    assert_eq!(app.pool().len(), 2, "the new key is in the pool");
    for _ in 0..2 {
        assert_eq!(
            read(send_with(&client, chat(addr)).await).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(mock.calls_for(KEY_B), 1, "and serves");

    signal("TERM");
    let stopped = tokio::time::timeout(WAIT, running)
        .await
        .expect("SIGTERM stops the server")
        .expect("no panic");
    assert!(stopped.is_ok(), "{stopped:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
