//! The status page in a real browser: headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`, installed by `.ci/run`). Fails, never skips, when they
//! are missing. Set `KCP_UPDATE_SCREENSHOT=1` to refresh `docs/status-page.png`.

mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use key_cycle_proxy::core::Secret;
use serde_json::json;
use support::proxy_harness::{Proxy, loaded_config, start_loaded};
use support::{Behaviour, MockUpstream};

const TOKEN: &str = "browser-admin-token-5e8a";
const WAIT: Duration = Duration::from_secs(20);
const KEYS: [(&str, &str); 4] = [
    ("primary", "sk-browser-primary-0a1b2c3d4e5f"),
    ("secondary", "sk-browser-secondary-9f8e7d6c"),
    ("busy", "sk-browser-busy-13579bdf2468"),
    ("revoked", "sk-browser-revoked-2468ace013"),
];

/// chromedriver on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) must be installed");
        let url = format!("http://127.0.0.1:{port}");
        tokio::time::timeout(WAIT, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("chromedriver listens");
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,900"],
        }),
    );
    ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a headless Chromium session (Debian package chromium)")
}

async fn start() -> (MockUpstream, Proxy) {
    let mock = MockUpstream::start().await;
    let url = format!("{}/v1", mock.url());
    let mut loaded = loaded_config(
        KEYS.iter()
            .map(|(_, k)| (*k, url.clone(), vec!["others"]))
            .collect(),
        |config| config.observability.admin_token = Some(Secret::new(TOKEN)),
    );
    for (key, (name, _)) in loaded.keys.iter_mut().zip(KEYS) {
        key.name = Some(name.to_owned());
    }
    mock.set(
        KEYS[0].1,
        Behaviour::OkWithLimits {
            limit_requests: 10_000,
            remaining_requests: 9_990,
            reset_requests: "6ms".to_owned(),
            limit_tokens: 2_000_000,
            remaining_tokens: 1_999_000,
            reset_tokens: "30ms".to_owned(),
        },
    );
    mock.set(KEYS[3].1, Behaviour::Unauthorized);
    (mock, start_loaded(loaded).await)
}

/// The `data-status` of the key row named `name`, once it equals `want`.
async fn wait_status(page: &Client, name: &str, want: &str) {
    let selector = format!("tr.key-row[data-name=\"{name}\"]");
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(row) = page.find(Locator::Css(&selector)).await {
                if row.attr("data-status").await.ok().flatten().as_deref() == Some(want) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "row {name} never showed {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_keys_cooling_and_disables_a_key_on_click() {
    let (mock, proxy) = start().await;
    let driver = Driver::start().await;
    let page = browser(&driver).await;
    // Credentials in the URL answer the Basic challenge; the page's fetches reuse them.
    let addr = proxy.metrics_addr;
    page.goto(&format!("http://admin:{TOKEN}@{addr}/"))
        .await
        .expect("page loads");

    let rows = tokio::time::timeout(WAIT, async {
        loop {
            let rows = page
                .find_all(Locator::Css("tr.key-row"))
                .await
                .expect("query rows");
            if !rows.is_empty() {
                return rows.len();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the page renders key rows");
    assert_eq!(rows, KEYS.len());
    let names = page
        .find_all(Locator::Css("tr.key-row .name"))
        .await
        .expect("names");
    let mut shown = Vec::new();
    for name in names {
        shown.push(name.text().await.expect("text"));
    }
    assert_eq!(shown, ["primary", "secondary", "busy", "revoked"]);

    // The mock rate-limits `busy` for 30 s on its next call; traffic reaches it in turn.
    mock.script(KEYS[2].1, vec![Behaviour::rate_limited_secs(30)]);
    for _ in 0..8 {
        proxy.chat("gpt-4o-mini").await;
    }
    wait_status(&page, "busy", "cooling").await;
    wait_status(&page, "revoked", "disabled").await;
    let detail = page
        .find(Locator::Css(
            "tr.key-row[data-name=\"busy\"] .state + .detail",
        ))
        .await
        .expect("cooling detail")
        .text()
        .await
        .expect("text");
    assert!(detail.starts_with("until "), "{detail}");

    page.find(Locator::Css(
        "button[data-action=\"disable\"][data-name=\"primary\"]",
    ))
    .await
    .expect("disable button")
    .click()
    .await
    .expect("click");
    wait_status(&page, "primary", "disabled").await;
    let keys = proxy
        .app
        .pool()
        .snapshot(key_cycle_proxy::server::clock::now());
    let primary = keys.iter().find(|k| k.name == "primary").expect("primary");
    assert_eq!(primary.status, key_cycle_proxy::core::KeyStatus::Disabled);

    let html = page.source().await.expect("page source");
    for (_, secret) in KEYS {
        assert!(!html.contains(secret), "a secret is on the rendered page");
    }
    let png = page.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).expect("target dir");
    std::fs::write(target.join("status-page.png"), &png).expect("write screenshot");
    if std::env::var_os("KCP_UPDATE_SCREENSHOT").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::write(docs, &png).expect("write docs screenshot");
    }
    page.close().await.expect("close the browser");
}
