//! Selector hot path: select + record, route lookup, and contention.
//!
//! Run with `cargo bench --bench select`. Figures for this machine class are in
//! README.md ("Benchmarks").

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kcp_core::RouteTable;
use kcp_core::{
    Action, Answer, Attempt, ClientRequest, Demand, KeyPool, KeySpec, Next, Outcome, PoolConfig,
    RateLimitHeaders, Replay, Reply, RetryPolicy, Secret, SplitMix64, Strategy, Time, WaitQueue,
};

fn pool(n: usize, strategy: Strategy) -> KeyPool {
    let keys = (0..n)
        .map(|i| {
            KeySpec::new(
                Secret::new(format!("sk-bench-{i}")),
                "https://api.openai.com/v1",
            )
            .with_models(["gpt-4o", "others"])
        })
        .collect();
    KeyPool::new(
        keys,
        PoolConfig {
            strategy,
            ..PoolConfig::default()
        },
    )
    .expect("valid pool")
}

fn success() -> Outcome {
    Outcome::Success {
        latency: Duration::from_millis(120),
        limits: RateLimitHeaders::default(),
    }
}

fn select_record(c: &mut Criterion) {
    for strategy in [
        Strategy::RoundRobinHealthWeighted,
        Strategy::RoundRobin,
        Strategy::LeastLatency,
    ] {
        let mut group = c.benchmark_group(format!("select_record/{strategy:?}"));
        group.throughput(Throughput::Elements(1));
        for n in [1, 10, 100, 1_000, 10_000] {
            let p = pool(n, strategy);
            let mut rng = SplitMix64::new(42);
            let mut tick = 0u64;
            let demand = Demand {
                model: Some("gpt-4o"),
                ..Demand::default()
            };
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    tick += 1_000;
                    let now = Time::from_nanos(tick);
                    let lease = p.select(black_box(&demand), now, &mut rng).expect("a key");
                    black_box(lease.record(success(), now));
                })
            });
        }
        group.finish();
    }
}

/// A whole attempt of the default strategy on 1,000 keys: `Attempt::new`, `next` (select),
/// `on_answer` (classify and record) of a success: what one request costs the policy.
fn whole_attempt(c: &mut Criterion) {
    let p = pool(1_000, Strategy::RoundRobinHealthWeighted);
    let queue = WaitQueue::new(1024);
    let mut rng = SplitMix64::new(42);
    let mut tick = 0u64;
    let request = ClientRequest {
        model: Some("gpt-4o"),
        scope: Some("gpt-4o"),
        tokens: 100,
        replay: Replay::BeforeSend,
        home: false,
    };
    let answer = Answer::Reply(Reply {
        status: 200,
        latency: Duration::from_millis(120),
        ..Reply::default()
    });
    let mut group = c.benchmark_group("attempt");
    group.throughput(Throughput::Elements(1));
    group.bench_function("success/1000", |b| {
        b.iter(|| {
            tick += 1_000;
            let now = Time::from_nanos(tick);
            let mut attempt = Attempt::new(black_box(request), RetryPolicy::default());
            let Next::Send(lease) = attempt.next(&p, &queue, now, &mut rng) else {
                panic!("a key is free")
            };
            let verdict = attempt.on_answer(lease, black_box(&answer), now);
            assert_eq!(verdict.action, Action::Deliver);
        })
    });
    group.finish();
}

/// The reference: governor's keyed rate limiter over 1,000 keys, one `check_key` per
/// iteration, keys in turn (selection's job minus routing, fairness and learning).
fn governor_baseline(c: &mut Criterion) {
    use governor::{Quota, RateLimiter};
    use std::num::NonZeroU32;
    let quota = Quota::per_second(NonZeroU32::new(1_000_000).expect("non-zero"));
    let limiter = RateLimiter::dashmap(quota);
    let mut key = 0u32;
    let mut group = c.benchmark_group("baseline");
    group.throughput(Throughput::Elements(1));
    group.bench_function("governor_keyed/1000", |b| {
        b.iter(|| {
            key = (key + 1) % 1_000;
            black_box(limiter.check_key(black_box(&key)).is_ok())
        })
    });
    group.finish();
}

fn routing(c: &mut Criterion) {
    let mut models: Vec<Vec<String>> = (0..50).map(|i| vec![format!("model-{i}")]).collect();
    models.extend((0..10).map(|i| vec![format!("family-{i}-*")]));
    models.push(vec!["others".to_owned()]);
    let table = RouteTable::build(&models).expect("few globs");
    let mut group = c.benchmark_group("route_lookup");
    for (name, model) in [
        ("exact", "model-37"),
        ("glob", "family-7-mini"),
        ("fallback", "unknown-model"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(table.lookup(black_box(Some(model)))))
        });
    }
    group.finish();
}

/// Two threads selecting from one 1,000-key pool, each with its own generator: in the same
/// lane (the default, what a caller that names no lane gets), and in lanes of their own
/// (`SplitMix64::in_lane`, one lane per thread).
fn contention(c: &mut Criterion) {
    contended(c, "select_record/contended_2_threads/1000", false);
    contended(c, "select_record/contended_2_threads_own_lanes/1000", true);
}

fn contended(c: &mut Criterion, name: &str, own_lanes: bool) {
    let p = Arc::new(pool(1_000, Strategy::RoundRobinHealthWeighted));
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let handles: Vec<_> = (0..2u64)
                .map(|t| {
                    let p = p.clone();
                    std::thread::spawn(move || {
                        let lane = if own_lanes { t as usize } else { 0 };
                        let mut rng = SplitMix64::new(t).in_lane(lane);
                        // Each thread keeps its own clock so that only the pool is shared.
                        let mut tick = t;
                        for _ in 0..iters {
                            tick += 2_000;
                            let now = Time::from_nanos(tick);
                            let lease = p.select(&Demand::default(), now, &mut rng).expect("a key");
                            black_box(lease.record(success(), now));
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("bench thread");
            }
            // Both threads ran `iters` operations side by side: this is the time per
            // operation of one thread, to compare with the single-threaded figure.
            start.elapsed()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = select_record, whole_attempt, governor_baseline, routing, contention
}
criterion_main!(benches);
