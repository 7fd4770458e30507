//! End-to-end: two replicas share one real Redis (`redis-server`, started here on a free
//! loopback port) and one mock upstream. What one replica learns about a key, the other
//! applies without calling the key; with Redis gone both keep serving.
//!
//! These tests need Debian's `redis-server` on the PATH (`.ci/run` installs it) and FAIL
//! without it.

mod support;

use http::{Method, StatusCode};
use key_cycle_proxy::core::{DisableReason, KeyStatus, Secret};
use key_cycle_proxy::server::clock;
use support::cluster::{Redis, connected, join, until};
use support::proxy_harness::{Proxy, start_proxy};
use support::{Behaviour, KEY_A, KEY_B, MockUpstream};

/// A replica named `replica` with keys A and B on `mock`, sharing through `redis`.
async fn replica(mock: &MockUpstream, redis: &Redis, replica: &str) -> Proxy {
    start_proxy(
        vec![
            (KEY_A, mock.url(), vec!["others"]),
            (KEY_B, mock.url(), vec!["others"]),
        ],
        |config| {
            join(config, redis, replica);
            config.observability.admin_token = Some(Secret::new(ADMIN));
        },
    )
    .await
}

/// The replicas' admin token.
const ADMIN: &str = "admin-token-cluster-3c1d";

/// The name `proxy` gives the key with secret `key` (as the admin API takes it).
fn name_of(proxy: &Proxy, key: &str) -> String {
    proxy
        .app
        .pool()
        .snapshot(clock::now())
        .into_iter()
        .find(|k| k.fingerprint == Secret::new(key).fingerprint())
        .expect("key in pool")
        .name
}

/// An operator disables (`disable`) or enables `key` through `proxy`'s admin API.
async fn operator(proxy: &Proxy, key: &str, disable: bool) {
    let action = if disable { "disable" } else { "enable" };
    let path = format!("/admin/keys/{}/{action}", name_of(proxy, key));
    let reply = proxy.admin(Method::POST, &path, Some(ADMIN)).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
}

/// Two connected replicas on one mock and one Redis.
async fn cluster() -> (MockUpstream, Redis, Proxy, Proxy) {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let a = replica(&mock, &redis, "a").await;
    let b = replica(&mock, &redis, "b").await;
    until("both replicas reach redis", || {
        connected(&a) && connected(&b)
    })
    .await;
    (mock, redis, a, b)
}

/// Sends chats through `proxy` until key A was called once (B serves the rest); all 200.
async fn hit_key_a_once(mock: &MockUpstream, proxy: &Proxy) {
    for _ in 0..8 {
        let reply = proxy.chat("gpt-4o").await;
        assert_eq!(reply.status, StatusCode::OK);
        if mock.calls_for(KEY_A) == 1 {
            return;
        }
    }
    panic!("key A was never chosen");
}

/// Replica b learns that key A rests (one call to it was made, through a) and serves six
/// requests on key B without calling A.
async fn b_keeps_key_a_resting(mock: &MockUpstream, b: &Proxy) {
    until("replica b sees key A resting", || {
        b.key_status(KEY_A).0 == KeyStatus::Cooling
    })
    .await;
    let before_b = mock.calls_for(KEY_B);
    for _ in 0..6 {
        assert_eq!(b.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 1, "b never calls the resting key");
    assert_eq!(mock.calls_for(KEY_B), before_b + 6);
}

#[tokio::test]
async fn a_key_rate_limited_through_one_replica_is_not_tried_through_the_other() {
    let (mock, _redis, a, b) = cluster().await;
    mock.set(KEY_A, Behaviour::rate_limited_secs(30));
    hit_key_a_once(&mock, &a).await;
    assert_eq!(a.key_status(KEY_A).0, KeyStatus::Cooling);
    b_keeps_key_a_resting(&mock, &b).await;
}

#[tokio::test]
async fn a_key_revoked_through_one_replica_is_disabled_on_the_other() {
    let (mock, _redis, a, b) = cluster().await;
    mock.set(KEY_A, Behaviour::Unauthorized);
    hit_key_a_once(&mock, &a).await;
    until("replica b disables key A", || {
        b.key_status(KEY_A) == (KeyStatus::Disabled, Some(DisableReason::Unauthorized))
    })
    .await;
    for _ in 0..4 {
        assert_eq!(b.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 1);
    let health = b.get("/health").await.json();
    assert_eq!(health["cluster"]["replica"], "b");
    assert_eq!(health["cluster"]["redis_connected"], true);
}

#[tokio::test]
async fn with_redis_killed_requests_still_succeed_and_sharing_resumes_after_a_restart() {
    let (mock, mut redis, a, b) = cluster().await;
    redis.kill();
    until("both replicas see redis gone", || {
        !connected(&a) && !connected(&b)
    })
    .await;
    let health = a.get("/health").await.json();
    assert_eq!(health["cluster"]["redis_connected"], false);
    let metrics = support::observe::scrape(&a).await;
    assert!(
        metrics.contains("kcp_cluster_connected 0"),
        "gauge reads 0 while redis is down"
    );
    for proxy in [&a, &b] {
        for _ in 0..5 {
            assert_eq!(proxy.chat("gpt-4o").await.status, StatusCode::OK);
        }
    }
    assert_eq!(
        mock.calls().len(),
        10,
        "each request made one upstream call"
    );

    redis.restart().await;
    until("both replicas reach redis again", || {
        connected(&a) && connected(&b)
    })
    .await;
    mock.set(KEY_B, Behaviour::rate_limited_secs(30));
    let before = mock.calls_for(KEY_B);
    for _ in 0..8 {
        assert_eq!(a.chat("gpt-4o").await.status, StatusCode::OK);
        if mock.calls_for(KEY_B) > before {
            break;
        }
    }
    assert_eq!(mock.calls_for(KEY_B), before + 1, "a met the 429 once");
    until("replica b sees key B resting", || {
        b.key_status(KEY_B).0 == KeyStatus::Cooling
    })
    .await;
}

#[tokio::test]
async fn a_replica_that_starts_later_learns_what_the_others_know() {
    let redis = Redis::start().await;
    let mock = MockUpstream::start().await;
    let a = replica(&mock, &redis, "a").await;
    until("a reaches redis", || connected(&a)).await;
    mock.set(KEY_A, Behaviour::rate_limited_secs(30));
    hit_key_a_once(&mock, &a).await;
    // b was not listening when a shared the rest: it asks when it joins.
    let b = replica(&mock, &redis, "b").await;
    until("b learns that key A rests", || {
        b.key_status(KEY_A).0 == KeyStatus::Cooling
    })
    .await;
    for _ in 0..4 {
        assert_eq!(b.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 1, "b never calls the resting key");
}

#[tokio::test]
async fn a_key_brought_back_by_a_re_check_on_one_replica_is_back_on_the_other() {
    let (mock, _redis, a, b) = cluster().await;
    mock.set(KEY_A, Behaviour::Unauthorized);
    hit_key_a_once(&mock, &a).await;
    until("replica b disables key A", || {
        b.key_status(KEY_A).0 == KeyStatus::Disabled
    })
    .await;
    // The key is valid again; a's background re-check (made due now) finds it so.
    mock.set(KEY_A, Behaviour::Ok);
    let name = a
        .app
        .pool()
        .snapshot(key_cycle_proxy::server::clock::now())
        .into_iter()
        .find(|k| k.fingerprint == key_cycle_proxy::core::Secret::new(KEY_A).fingerprint())
        .expect("key A")
        .name;
    assert_eq!(
        a.app
            .pool()
            .recheck_now(&name, key_cycle_proxy::server::clock::now()),
        Some(true)
    );
    until("replica a re-checked key A", || {
        a.key_status(KEY_A).0 == KeyStatus::Available
    })
    .await;
    until("replica b has key A back", || {
        b.key_status(KEY_A).0 == KeyStatus::Available
    })
    .await;
    assert_eq!(mock.calls_for(KEY_A), 2, "one 401, one re-check, both by a");
}

#[tokio::test]
async fn an_operators_disable_through_one_replica_holds_everywhere_until_an_operator_enables_it() {
    let (mock, redis, a, b) = cluster().await;
    operator(&a, KEY_A, true).await;
    let manual = (KeyStatus::Disabled, Some(DisableReason::Manual));
    until("replica b has key A disabled by the operator", || {
        b.key_status(KEY_A) == manual
    })
    .await;
    for _ in 0..6 {
        assert_eq!(b.chat("gpt-4o").await.status, StatusCode::OK);
    }
    assert_eq!(mock.calls_for(KEY_A), 0, "b never calls the disabled key");
    assert_eq!(mock.calls_for(KEY_B), 6);
    // A replica that starts later finds the operator's disable in the cluster's record.
    let c = replica(&mock, &redis, "c").await;
    until("replica c has key A disabled by the operator", || {
        c.key_status(KEY_A) == manual
    })
    .await;
    // Nothing but an operator brings it back: it is never re-checked.
    let probe = |p: &Proxy| {
        p.app
            .pool()
            .snapshot(clock::now())
            .into_iter()
            .find(|k| k.fingerprint == Secret::new(KEY_A).fingerprint())
            .expect("key A")
            .next_probe_secs
    };
    assert_eq!((probe(&a), probe(&b), probe(&c)), (None, None, None));
    // Redis restarted without its data: the replicas write their operator disables back
    // into the cluster's record rather than taking its emptiness for an enable.
    let mut redis = redis;
    redis.kill();
    until("the replicas see redis gone", || {
        !connected(&a) && !connected(&b) && !connected(&c)
    })
    .await;
    redis.restart().await;
    let record = format!("HKEYS {}:operator-disabled", redis.namespace());
    let fingerprint = Secret::new(KEY_A).fingerprint();
    let rewritten = async {
        while !redis.query(&record).await.contains(&fingerprint) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(support::proxy_harness::WAIT, rewritten)
        .await
        .expect("the record is written back");
    until("all three reach redis again", || {
        connected(&a) && connected(&b) && connected(&c)
    })
    .await;
    for p in [&a, &b, &c] {
        assert_eq!(p.key_status(KEY_A), manual);
    }
    // An operator enables it through another replica: all three have it back.
    operator(&b, KEY_A, false).await;
    until("replicas a and c have key A back", || {
        a.key_status(KEY_A).0 == KeyStatus::Available
            && c.key_status(KEY_A).0 == KeyStatus::Available
    })
    .await;
    assert_eq!(b.key_status(KEY_A).0, KeyStatus::Available);
    hit_key_a_once(&mock, &c).await;
    assert_eq!(mock.calls_for(KEY_A), 1);
}

#[tokio::test]
async fn an_operators_enable_elsewhere_makes_a_provider_disabled_key_due_for_its_recheck() {
    let (mock, _redis, a, b) = cluster().await;
    mock.set(KEY_A, Behaviour::Unauthorized);
    hit_key_a_once(&mock, &a).await;
    until("replica b disables key A", || {
        b.key_status(KEY_A) == (KeyStatus::Disabled, Some(DisableReason::Unauthorized))
    })
    .await;
    // The operator fixed the key and puts it back through a: a uses it at once; b leaves
    // it to the provider, re-checking it now rather than at its scheduled time.
    mock.set(KEY_A, Behaviour::Ok);
    operator(&a, KEY_A, false).await;
    assert_eq!(a.key_status(KEY_A).0, KeyStatus::Available);
    until("replica b re-checked key A and has it back", || {
        b.key_status(KEY_A).0 == KeyStatus::Available
    })
    .await;
    assert_eq!(
        mock.calls_for(KEY_A),
        2,
        "one 401 through a, one re-check by b"
    );
}

#[tokio::test]
async fn a_503_rest_through_one_replica_is_kept_by_the_other() {
    let (mock, _redis, a, b) = cluster().await;
    mock.set(
        KEY_A,
        Behaviour::Status {
            status: 503,
            body: r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}"#
                .into(),
            headers: vec![("retry-after".into(), "30".into())],
        },
    );
    hit_key_a_once(&mock, &a).await;
    b_keeps_key_a_resting(&mock, &b).await;
}
