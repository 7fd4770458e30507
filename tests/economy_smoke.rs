//! The whole-server economy benchmark's code path (`cargo bench --bench economy -- --smoke`),
//! run in-process against the real service: every request is answered and the counts of the
//! client and of the provider agree. Nothing here is about time; the figures are the bench's.

mod support;

use std::time::Duration;

use key_cycle_proxy::economy::{self, Plan, Pool, Shape};
use support::proxy_harness::start_proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smoke_plan_answers_every_request_and_the_counts_add_up() {
    let pool = Pool::start().await.expect("mock provider starts");
    let url = pool.url();
    let keys = pool
        .keys()
        .iter()
        .map(|k| (k.key.expose(), url.clone(), vec!["others"]))
        .collect();
    let proxy = start_proxy(keys, |_| {}).await;
    let plan = Plan::smoke();

    let figures = tokio::time::timeout(
        Duration::from_secs(120),
        economy::run(proxy.addr, &pool, &plan),
    )
    .await
    .expect("the smoke plan ends by itself");

    let names: Vec<&str> = figures.iter().map(|f| f.scenario).collect();
    assert_eq!(names, ["80%", "150%", "burst"]);
    for (f, scenario) in figures.iter().zip(&plan.scenarios) {
        assert!(f.requests > 0, "{}: no requests", f.scenario);
        assert_eq!(f.unanswered, 0, "{}: unanswered requests", f.scenario);
        assert_eq!(f.other, 0, "{}: answers other than 200 or 429", f.scenario);
        // Each served request is exactly one success at the provider, and reached it.
        assert_eq!(f.upstream_served(), f.served as u64, "{}", f.scenario);
        assert!(f.upstream.requests >= f.served, "{}", f.scenario);
        assert!(f.upstream.requests <= f.requests, "{}", f.scenario);
        assert!(f.upstream.calls >= f.upstream.requests, "{}", f.scenario);
        if scenario.shape == Shape::Burst {
            // The pool's full buckets: 720 rpm × 5 s.
            assert_eq!(f.requests, 60);
        }
    }
    let table = economy::table(&figures);
    println!("{table}");
    assert!(table.starts_with("| scenario | measure | target | measured | met |\n"));
    for name in names {
        assert!(table.contains(&format!("| {name} | requests: ")), "{table}");
    }
    assert!(table.contains("| burst | served within 1 s |"), "{table}");
}
