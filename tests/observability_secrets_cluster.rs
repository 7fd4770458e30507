//! End-to-end proof that the Redis password of `[cluster]` leaks nowhere: at `trace` level,
//! with every line of this test binary captured, two replicas share key state through a real
//! `redis-server --requirepass` reached with the password in `redis_url`, and a third
//! replica holding a WRONG password in its url fails to connect and logs that. No password,
//! right or wrong, and no pool key may appear in the logs, the metrics, `/health`, the admin
//! API, the effective config (`--check-config`), the start errors of broken urls, or the
//! `Debug` output of the running state.
//!
//! Needs Debian's `redis-server` on the PATH (`.ci/run` installs it) and FAILS without it.

mod support;

use std::fmt::Write as _;

use http::{Method, StatusCode};
use key_cycle_proxy::core::{DisableReason, KeyStatus, Secret};
use key_cycle_proxy::server::app::App;
use key_cycle_proxy::server::cluster::ClusterSection;
use key_cycle_proxy::server::config;
use support::MockUpstream;
use support::cluster::{Redis, connected, until};
use support::observe::{capture_logs, scrape};
use support::proxy_harness::{Proxy, start_proxy};
use support::secrets::{assert_absent, chain, record, secret};

/// A replica named `replica` with `keys` on `mock`, reaching `redis` through `redis_url`.
async fn replica(
    mock: &MockUpstream,
    redis: &Redis,
    redis_url: &str,
    replica: &str,
    keys: &[&str],
    admin: &str,
) -> Proxy {
    let keys = keys
        .iter()
        .map(|key| (*key, mock.url(), vec!["others"]))
        .collect();
    start_proxy(keys, |config| {
        config.keys.rotation_strategy = key_cycle_proxy::core::Strategy::RoundRobin;
        config.observability.admin_token = Some(Secret::new(admin));
        config.cluster = Some(ClusterSection {
            redis_url: Secret::new(redis_url),
            namespace: redis.namespace(),
            replica_id: Some(replica.to_owned()),
            ..ClusterSection::default()
        });
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_reaches_no_log_metric_health_or_error() {
    let logs = capture_logs("trace");
    let password = secret("redispw", "right");
    let wrong = secret("redispw", "wrong");
    let admin = secret("admin", "cluster");
    let revoked = secret("sk-live", "cluster-revoked");
    let ok = secret("sk-live", "cluster-ok");
    let secrets = vec![
        password.clone(),
        wrong.clone(),
        admin.clone(),
        revoked.clone(),
        ok.clone(),
    ];
    let mut seen = String::new();

    let redis = Redis::start_with_password(&password).await;
    let mock = MockUpstream::start().await;
    mock.set(&revoked, support::Behaviour::Unauthorized);
    let url = redis.url_with_password(&password);
    let keys = [revoked.as_str(), ok.as_str()];
    let a = replica(&mock, &redis, &url, "a", &keys, &admin).await;
    let b = replica(&mock, &redis, &url, "b", &keys, &admin).await;
    let wrong_url = redis.url_with_password(&wrong);
    let c = replica(&mock, &redis, &wrong_url, "c", &keys, &admin).await;
    until("replicas a and b reach redis", || {
        connected(&a) && connected(&b)
    })
    .await;
    until("replica c logs that redis refused it", || {
        logs.text().lines().any(|line| {
            line.contains("cluster: redis unreachable") && line.contains(r#""replica":"c""#)
        })
    })
    .await;
    assert!(!connected(&c), "a wrong password does not connect");

    // A key revoked through a serves, then b learns it through Redis.
    let reply = a.chat("gpt-4o").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    record(&mut seen, &reply);
    assert_eq!(mock.calls_for(&revoked), 1);
    until("replica b sees the key revoked", || {
        b.key_status(&revoked) == (KeyStatus::Disabled, Some(DisableReason::Unauthorized))
    })
    .await;
    assert_eq!(
        mock.calls_for(&revoked),
        1,
        "b never called the revoked key"
    );
    assert_eq!(
        c.key_status(&revoked).0,
        KeyStatus::Available,
        "c shares nothing"
    );

    // Everything a replica shows: metrics, health, admin, the effective config, Debug.
    let mut metrics = String::new();
    for proxy in [&a, &b, &c] {
        metrics.push_str(&scrape(proxy).await);
        for url in [proxy.url("/health"), proxy.metrics_url("/health")] {
            let health = proxy.get_url(&url).await;
            assert_eq!(health.status, StatusCode::OK, "{url}: {}", health.text());
            record(&mut seen, &health);
        }
        let keys = proxy.admin(Method::GET, "/admin/keys", Some(&admin)).await;
        assert_eq!(keys.status, StatusCode::OK, "{}", keys.text());
        record(&mut seen, &keys);
        let loaded = &proxy.app.generation().config;
        let _ = writeln!(seen, "{}", config::render_effective(loaded));
        let _ = writeln!(seen, "{loaded:?}\n{:?}", proxy.app);
        let _ = writeln!(seen, "{:?}", proxy.app.cluster);
    }
    assert!(
        metrics.contains("kcp_cluster_connected 1") && metrics.contains("kcp_cluster_connected 0"),
        "scrapes of connected and refused replicas"
    );
    let health = c.get_url(&c.url("/health")).await;
    assert_eq!(health.json()["cluster"]["redis_connected"], false);

    // Broken urls holding the password: the checks and start errors name no secret.
    for broken in [
        format!("redis://:{password}@127.0.0.1:notaport"),
        format!("redis://:{password}@"),
        format!("http://:{password}@127.0.0.1:6379"),
        format!("redis://:{password}@127.0.0.1:6379/notadb"),
    ] {
        let section = ClusterSection {
            redis_url: Secret::new(broken.as_str()),
            ..ClusterSection::default()
        };
        let _ = writeln!(seen, "{section:?}");
        for (field, message, fix) in section.problems() {
            let _ = writeln!(seen, "{field}: {message} ({fix})");
        }
        let mut loaded = a.app.generation().config.clone();
        loaded.config.cluster = Some(section);
        match App::new(loaded) {
            Ok(app) => {
                let _ = writeln!(seen, "{app:?}\n{:?}", app.cluster);
            }
            Err(error) => {
                let _ = writeln!(seen, "{error:?}\n{}", chain(&error));
            }
        }
    }

    drop(c.stop().await);
    drop(b.stop().await);
    drop(a.stop().await);

    let lines = logs.json_lines();
    assert!(
        lines.iter().any(|l| l["level"] == "TRACE"),
        "trace lines are captured"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "cluster: redis connection failed"),
        "the refused connection's error path logged"
    );
    for (place, text) in [
        ("logs", logs.text()),
        ("client, admin and Debug output", seen),
        ("metrics", metrics),
    ] {
        assert_absent(place, &text, &secrets);
    }
}
