//! Behaviour of the key pool through its public API, on a manual clock.

use std::collections::HashMap;
use std::time::Duration;

use kcp_core::{
    Demand, DisableReason, KeyPool, KeySpec, KeyStatus, NoKey, Outcome, PoolConfig,
    RateLimitHeaders, Secret, SplitMix64, StateChange, Strategy, Time, UpstreamFailure,
};
use proptest::prelude::*;

const URL: &str = "https://api.openai.com/v1";

fn key(name: &str, models: &[&str]) -> KeySpec {
    KeySpec::new(Secret::new(format!("sk-{name}-secret")), URL)
        .with_name(name)
        .with_models(models.iter().copied())
}

fn pool(keys: Vec<KeySpec>, strategy: Strategy) -> KeyPool {
    KeyPool::new(
        keys,
        PoolConfig {
            strategy,
            ..PoolConfig::default()
        },
    )
    .expect("valid pool")
}

fn ok() -> Outcome {
    Outcome::Success {
        latency: Duration::from_millis(100),
        limits: RateLimitHeaders::default(),
    }
}

fn pick(
    pool: &KeyPool,
    model: Option<&str>,
    now: Time,
    rng: &mut SplitMix64,
) -> Result<String, NoKey> {
    let demand = Demand {
        model,
        ..Demand::default()
    };
    pool.select(&demand, now, rng).map(|lease| {
        let id = lease.id().to_string();
        lease.record(ok(), now);
        id
    })
}

/// Selects until the pool hands out a lease on the key `name` (dropping the others); fails
/// after 32 rounds of the pool (a rotation reaches every key in one round, a random two-choice
/// draw in a few), rather than looping forever on a pool that never offers the key.
fn lease_on(pool: &KeyPool, name: &str, now: Time, rng: &mut SplitMix64) -> kcp_core::Lease {
    let bound = 32 * pool.snapshot(now).len();
    let mut seen = Vec::new();
    for _ in 0..bound {
        let lease = pool.select(&Demand::default(), now, rng).expect("key");
        if lease.id().as_str() == name {
            return lease;
        }
        seen.push(lease.id().as_str().to_owned());
    }
    panic!("no lease on {name} in {bound} selections: {seen:?}");
}

fn status_of(pool: &KeyPool, name: &str, now: Time) -> KeyStatus {
    pool.snapshot(now)
        .into_iter()
        .find(|s| s.name == name)
        .expect("key exists")
        .status
}

#[test]
fn routes_by_model_with_fallback_and_says_why_not() {
    let p = pool(
        vec![key("a", &["gpt-4o"]), key("b", &["others"])],
        Strategy::RoundRobin,
    );
    let mut rng = SplitMix64::new(1);
    for _ in 0..5 {
        assert_eq!(
            pick(&p, Some("gpt-4o"), Time::ZERO, &mut rng).as_deref(),
            Ok("a")
        );
        assert_eq!(
            pick(&p, Some("whisper-1"), Time::ZERO, &mut rng).as_deref(),
            Ok("b")
        );
    }
    let only = pool(vec![key("a", &["gpt-4o"])], Strategy::RoundRobin);
    assert_eq!(
        pick(&only, Some("gpt-3.5-turbo"), Time::ZERO, &mut rng),
        Err(NoKey::NoRoute)
    );
    // A request without a model may use any key.
    assert_eq!(pick(&only, None, Time::ZERO, &mut rng).as_deref(), Ok("a"));
}

#[test]
fn rate_limited_key_rests_exactly_as_asked_then_returns() {
    let p = pool(
        vec![key("a", &["others"]), key("b", &["others"])],
        Strategy::RoundRobin,
    );
    let mut rng = SplitMix64::new(1);
    let t0 = Time::from_secs(100);
    let lease = p.select(&Demand::default(), t0, &mut rng).expect("a key");
    let limited = lease.id().to_string();
    let changes = lease.record(
        Outcome::RateLimited {
            limits: RateLimitHeaders {
                retry_after: Some(Duration::from_secs(20)),
                ..Default::default()
            },
        },
        t0,
    );
    assert!(changes.iter().any(|c| c
        == StateChange::Cooling {
            until: t0 + Duration::from_secs(20)
        }));
    assert_eq!(status_of(&p, &limited, t0), KeyStatus::Cooling);
    for _ in 0..10 {
        assert_ne!(
            pick(&p, None, t0 + Duration::from_secs(19), &mut rng).expect("other key"),
            limited
        );
    }
    let back = t0 + Duration::from_secs(20);
    assert_eq!(status_of(&p, &limited, back), KeyStatus::Available);
    let seen: Vec<String> = (0..4)
        .map(|_| pick(&p, None, back, &mut rng).expect("key"))
        .collect();
    assert!(seen.contains(&limited));
}

#[test]
fn busy_pool_reports_the_first_free_instant_and_exclusion_exhausts() {
    let p = pool(
        vec![key("a", &["others"]), key("b", &["others"])],
        Strategy::RoundRobin,
    );
    let mut rng = SplitMix64::new(1);
    let t0 = Time::from_secs(10);
    for secs in [30, 7] {
        let lease = p.select(&Demand::default(), t0, &mut rng).expect("key");
        lease.record(
            Outcome::RateLimited {
                limits: RateLimitHeaders {
                    retry_after: Some(Duration::from_secs(secs)),
                    ..Default::default()
                },
            },
            t0,
        );
    }
    assert_eq!(
        pick(&p, None, t0, &mut rng),
        Err(NoKey::Busy {
            until: t0 + Duration::from_secs(7)
        })
    );
    let later = t0 + Duration::from_secs(60);
    let exclude = [0, 1];
    let demand = Demand {
        exclude: &exclude,
        ..Demand::default()
    };
    assert_eq!(
        p.select(&demand, later, &mut rng).err(),
        Some(NoKey::Exhausted)
    );
}

#[test]
fn rejected_key_is_disabled_probed_and_restored() {
    let p = pool(vec![key("a", &["others"])], Strategy::RoundRobin);
    let mut rng = SplitMix64::new(1);
    let t0 = Time::from_secs(5);
    let lease = p.select(&Demand::default(), t0, &mut rng).expect("key");
    let changes = lease.record(
        Outcome::KeyRejected {
            reason: DisableReason::Unauthorized,
        },
        t0,
    );
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, StateChange::Disabled { .. }))
    );
    assert_eq!(pick(&p, None, t0, &mut rng), Err(NoKey::AllDisabled));
    assert!(p.due_probes(t0 + Duration::from_secs(59)).is_empty());
    let due = t0 + Duration::from_secs(60);
    assert_eq!(p.due_probes(due), vec![0]);
    // A failed re-check waits twice as long.
    let probe = p.probe(0, due).expect("due");
    assert!(probe.is_probe());
    assert!(p.probe(0, due).is_none(), "one re-check at a time");
    probe.record(
        Outcome::KeyRejected {
            reason: DisableReason::Unauthorized,
        },
        due,
    );
    assert!(p.due_probes(due + Duration::from_secs(119)).is_empty());
    let again = due + Duration::from_secs(120);
    let probe = p.probe(0, again).expect("due again");
    assert!(
        probe
            .record(ok(), again)
            .iter()
            .any(|c| c == StateChange::Enabled)
    );
    assert_eq!(pick(&p, None, again, &mut rng).as_deref(), Ok("a"));
}

#[test]
fn circuit_opens_after_five_failures_and_lets_exactly_one_trial_through() {
    let p = pool(vec![key("a", &["others"])], Strategy::RoundRobin);
    let mut rng = SplitMix64::new(1);
    let t0 = Time::from_secs(1);
    let fail = || Outcome::Upstream {
        failure: UpstreamFailure::Status(502),
        retry_after: None,
    };
    for i in 0..5 {
        let lease = p
            .select(&Demand::default(), t0, &mut rng)
            .expect("closed circuit");
        let opened = lease
            .record(fail(), t0)
            .iter()
            .any(|c| matches!(c, StateChange::CircuitOpened { .. }));
        assert_eq!(opened, i == 4);
    }
    assert_eq!(status_of(&p, "a", t0), KeyStatus::CircuitOpen);
    let Err(NoKey::Unreachable { until }) = p.select(&Demand::default(), t0, &mut rng) else {
        panic!("open circuit must refuse, as unreachable")
    };
    let trial = p
        .select(&Demand::default(), until, &mut rng)
        .expect("one trial");
    assert!(
        p.select(&Demand::default(), until, &mut rng).is_err(),
        "only one trial"
    );
    assert!(
        trial
            .record(ok(), until)
            .iter()
            .any(|c| c == StateChange::CircuitClosed)
    );
    assert!(p.select(&Demand::default(), until, &mut rng).is_ok());
}

#[test]
fn dropped_lease_counts_as_cancelled_and_frees_the_slot() {
    let p = pool(vec![key("a", &["others"])], Strategy::RoundRobin);
    let mut rng = SplitMix64::new(1);
    let lease = p
        .select(&Demand::default(), Time::ZERO, &mut rng)
        .expect("key");
    assert_eq!(p.snapshot(Time::ZERO)[0].in_flight, 1);
    drop(lease);
    let snap = &p.snapshot(Time::ZERO)[0];
    assert_eq!(snap.in_flight, 0);
    assert_eq!(snap.outcomes.cancelled, 1);
}

#[test]
fn reload_keeps_state_of_keys_still_present() {
    let p = pool(
        vec![key("a", &["others"]), key("b", &["others"])],
        Strategy::RoundRobin,
    );
    p.set_disabled("a", true, Time::ZERO).expect("a exists");
    let mut rng = SplitMix64::new(1);
    pick(&p, None, Time::ZERO, &mut rng).expect("b");
    let renamed_b = key("b", &["gpt-4o"]).with_weight(3);
    let next = p
        .rebuild(
            vec![key("a", &["others"]), renamed_b, key("c", &["others"])],
            PoolConfig::default(),
        )
        .expect("valid");
    let snaps: HashMap<String, _> = next
        .snapshot(Time::ZERO)
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    assert_eq!(snaps["a"].status, KeyStatus::Disabled);
    assert_eq!(snaps["b"].outcomes.success, 1);
    assert_eq!(snaps["b"].models, vec!["gpt-4o"]);
    assert_eq!(snaps["c"].outcomes.success, 0);
}

#[test]
fn home_key_is_stable_and_fails_over_only_when_disabled() {
    let p = pool(
        vec![key("a", &["others"]), key("b", &["others"])],
        Strategy::RoundRobin,
    );
    for _ in 0..5 {
        let lease = p.select_home(&Demand::default(), Time::ZERO).expect("home");
        assert_eq!(lease.id().as_str(), "a");
        lease.record(ok(), Time::ZERO);
    }
    let lease = p.select_home(&Demand::default(), Time::ZERO).expect("home");
    lease.record(
        Outcome::RateLimited {
            limits: RateLimitHeaders::default(),
        },
        Time::ZERO,
    );
    assert!(
        matches!(
            p.select_home(&Demand::default(), Time::ZERO),
            Err(NoKey::Busy { .. })
        ),
        "a cooling home key is waited for, not replaced"
    );
    p.set_disabled("a", true, Time::ZERO);
    let lease = p
        .select_home(&Demand::default(), Time::ZERO)
        .expect("failover");
    assert_eq!(lease.id().as_str(), "b");
}

#[test]
fn health_weighting_sends_less_to_a_failing_key() {
    let p = pool(
        vec![key("good", &["others"]), key("sick", &["others"])],
        Strategy::RoundRobinHealthWeighted,
    );
    let mut rng = SplitMix64::new(7);
    let now = Time::from_secs(1);
    // Four upstream failures: below the circuit threshold, but health drops to 60%.
    for _ in 0..4 {
        lease_on(&p, "sick", now, &mut rng).record(
            Outcome::Upstream {
                failure: UpstreamFailure::Timeout,
                retry_after: None,
            },
            now,
        );
    }
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..2000 {
        let lease = p.select(&Demand::default(), now, &mut rng).expect("key");
        *counts.entry(lease.id().to_string()).or_default() += 1;
        drop(lease);
    }
    // Weighted by health 1000 : 600, the sick key carries 0.6 / 1.6 of the traffic.
    let share = f64::from(counts["sick"]) / 2000.0;
    assert!((0.32..=0.43).contains(&share), "{counts:?}");
}

/// Least latency over keys of 50, 100 and 400 ms listed in `order`: 300 selections with
/// every lease held open, by key.
fn least_latency_counts(order: [&str; 3]) -> HashMap<String, u32> {
    let p = pool(
        order.iter().map(|name| key(name, &["others"])).collect(),
        Strategy::LeastLatency,
    );
    let mut rng = SplitMix64::new(3);
    let now = Time::from_secs(1);
    let latencies = [("fast", 50), ("mid", 100), ("slow", 400)];
    for (name, ms) in latencies {
        lease_on(&p, name, now, &mut rng).record(
            Outcome::Success {
                latency: Duration::from_millis(ms),
                limits: RateLimitHeaders::default(),
            },
            now,
        );
    }
    // Hold leases open so in-flight counts grow, as under real concurrent load.
    let mut held = Vec::new();
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..300 {
        let lease = p.select(&Demand::default(), now, &mut rng).expect("key");
        *counts.entry(lease.id().to_string()).or_default() += 1;
        held.push(lease);
    }
    counts
}

#[test]
fn least_latency_spreads_load_instead_of_pinning_the_fastest_key() {
    // Whatever the order of the keys, the latency decides: listing the slow key first must
    // not make it the favourite.
    for order in [["fast", "mid", "slow"], ["slow", "mid", "fast"]] {
        let counts = least_latency_counts(order);
        assert!(
            counts["fast"] > counts["mid"] && counts["mid"] > counts["slow"],
            "{order:?}: {counts:?}"
        );
        assert!(counts["fast"] < 250, "load must spread: {counts:?}");
        assert!(counts.get("slow").copied().unwrap_or(0) > 0, "{counts:?}");
        // In-flight requests cost their key its latency each: at the end the costs
        // (latency × (in flight + 1)) are level, so the shares go inversely to latency.
        let fast_to_slow = f64::from(counts["fast"]) / f64::from(counts["slow"]);
        assert!(
            (5.0..=11.0).contains(&fast_to_slow),
            "{order:?}: {counts:?}"
        );
    }
}

#[test]
fn learned_rate_weights_traffic() {
    let p = pool(
        vec![key("small", &["others"]), key("large", &["others"])],
        Strategy::RoundRobinHealthWeighted,
    );
    let mut rng = SplitMix64::new(11);
    let now = Time::from_secs(1);
    for (name, rpm) in [("small", 30), ("large", 240)] {
        lease_on(&p, name, now, &mut rng).record(
            Outcome::Success {
                latency: Duration::from_millis(100),
                limits: RateLimitHeaders {
                    limit_requests: Some(rpm),
                    remaining_requests: Some(rpm - 1),
                    ..Default::default()
                },
            },
            now,
        );
    }
    let snap = p.snapshot(now);
    assert_eq!(snap[1].limits.limit_requests, Some(240));
    // Over two virtual minutes, one request every 250 ms (about 40% of the pair's capacity).
    let mut counts: HashMap<String, u32> = HashMap::new();
    for step in 0..480u64 {
        let t = now + Duration::from_millis(250 * step);
        if let Ok(lease) = p.select(&Demand::default(), t, &mut rng) {
            *counts.entry(lease.id().to_string()).or_default() += 1;
            lease.record(ok(), t);
        }
    }
    let ratio = f64::from(counts["large"]) / f64::from(counts["small"]);
    assert!((5.0..=11.0).contains(&ratio), "{counts:?} ratio {ratio}");
}

#[test]
fn concurrent_select_and_record_keep_in_flight_exact() {
    let p = std::sync::Arc::new(pool(
        (0..16)
            .map(|i| key(&format!("k{i}"), &["others"]))
            .collect(),
        Strategy::RoundRobinHealthWeighted,
    ));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(t);
                for i in 0..5000u64 {
                    let now = Time::from_millis(i);
                    if let Ok(lease) = p.select(&Demand::default(), now, &mut rng) {
                        lease.record(ok(), now);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let snaps = p.snapshot(Time::from_secs(10));
    assert!(snaps.iter().all(|s| s.in_flight == 0));
    assert_eq!(
        snaps.iter().map(|s| s.outcomes.success).sum::<u64>(),
        20_000
    );
}

/// In a pool larger than one selection window, equal keys still get equal shares over time.
#[test]
fn health_weighted_large_pool_shares_evenly() {
    let n = 200;
    let p = pool(
        (0..n).map(|i| key(&format!("k{i}"), &["others"])).collect(),
        Strategy::RoundRobinHealthWeighted,
    );
    let mut rng = SplitMix64::new(5);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 * n {
        *counts
            .entry(pick(&p, None, Time::ZERO, &mut rng).expect("key"))
            .or_default() += 1;
    }
    assert_eq!(counts.len(), n);
    assert!(
        counts.values().all(|&c| (398..=402).contains(&c)),
        "{counts:?}"
    );
}

proptest! {
    /// Over k·n picks of n available keys, plain round robin gives each key k ± 1.
    #[test]
    fn round_robin_is_fair(n in 1usize..20, k in 1usize..20, seed in any::<u64>()) {
        let p = pool((0..n).map(|i| key(&format!("k{i}"), &["others"])).collect(), Strategy::RoundRobin);
        let mut rng = SplitMix64::new(seed);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..k * n {
            *counts.entry(pick(&p, None, Time::ZERO, &mut rng).expect("key")).or_default() += 1;
        }
        prop_assert_eq!(counts.len(), n);
        prop_assert!(counts.values().all(|&c| c + 1 >= k && c <= k + 1), "{:?}", counts);
    }

    /// Health-weighted rotation over equally healthy, equally weighted keys is as fair,
    /// whether the pool fits one selection window or not.
    #[test]
    fn health_weighted_is_fair_when_keys_are_equal(n in 1usize..40, k in 1usize..20, seed in any::<u64>()) {
        let p = pool((0..n).map(|i| key(&format!("k{i}"), &["others"])).collect(), Strategy::RoundRobinHealthWeighted);
        let mut rng = SplitMix64::new(seed);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..k * n {
            *counts.entry(pick(&p, None, Time::ZERO, &mut rng).expect("key")).or_default() += 1;
        }
        prop_assert_eq!(counts.len(), n, "every key is picked: {:?}", counts);
        prop_assert!(counts.values().all(|&c| c + 1 >= k && c <= k + 1), "{:?}", counts);
    }
}

#[test]
fn late_outcomes_neither_stretch_an_open_circuit_nor_let_a_second_trial_through() {
    let p = pool(vec![key("a", &["others"])], Strategy::RoundRobin);
    let mut rng = SplitMix64::new(1);
    let t0 = Time::from_secs(1);
    let fail = || Outcome::Upstream {
        failure: UpstreamFailure::Status(502),
        retry_after: None,
    };
    // Eleven requests in flight when the provider blips; one answers only much later.
    let mut leases: Vec<_> = (0..11)
        .map(|_| p.select(&Demand::default(), t0, &mut rng).expect("closed"))
        .collect();
    let late = leases.pop().expect("eleven");
    let mut opened = Vec::new();
    for lease in leases {
        for change in lease.record(fail(), t0).iter() {
            if let StateChange::CircuitOpened { until } = change {
                opened.push(until);
            }
        }
    }
    assert_eq!(opened.len(), 1, "only the fifth failure opens: {opened:?}");
    let until = opened[0];
    assert!(until <= t0 + kcp_core::BASE_OPEN);
    let straggler = p.select(&Demand::default(), t0, &mut rng);
    assert!(straggler.is_err(), "open circuit takes nothing");
    // The trial goes; an outcome of another lease must not open the gate for a second one.
    let trial = p
        .select(&Demand::default(), until, &mut rng)
        .expect("trial");
    assert!(
        late.record(fail(), until).is_empty(),
        "a late failure changes nothing"
    );
    assert!(
        p.select(&Demand::default(), until, &mut rng).is_err(),
        "one trial at a time"
    );
    assert!(
        trial
            .record(ok(), until)
            .iter()
            .any(|c| c == StateChange::CircuitClosed)
    );
}

#[test]
fn a_key_rejected_again_soon_after_its_recheck_waits_twice_as_long() {
    let p = pool(vec![key("a", &["others"])], Strategy::RoundRobin);
    let mut rng = SplitMix64::new(1);
    let quota = || Outcome::KeyRejected {
        reason: DisableReason::Unauthorized,
    };
    let t0 = Time::from_secs(10);
    p.select(&Demand::default(), t0, &mut rng)
        .expect("key")
        .record(quota(), t0);
    // The re-check succeeds, but the key is rejected again soon after (a flapping key).
    let due = t0 + Duration::from_secs(60);
    p.probe(0, due).expect("due").record(ok(), due);
    let again = due + Duration::from_secs(1);
    p.select(&Demand::default(), again, &mut rng)
        .expect("back in rotation")
        .record(quota(), again);
    assert!(p.due_probes(again + Duration::from_secs(119)).is_empty());
    assert_eq!(p.due_probes(again + Duration::from_secs(120)), vec![0]);
}

#[test]
fn an_operator_disable_survives_a_recheck_in_flight() {
    let p = pool(vec![key("a", &["others"])], Strategy::RoundRobin);
    let mut rng = SplitMix64::new(1);
    let t0 = Time::from_secs(1);
    p.select(&Demand::default(), t0, &mut rng)
        .expect("key")
        .record(
            Outcome::KeyRejected {
                reason: DisableReason::Unauthorized,
            },
            t0,
        );
    let due = t0 + Duration::from_secs(60);
    let probe = p.probe(0, due).expect("due");
    p.set_disabled("a", true, due);
    probe.record(ok(), due);
    assert_eq!(status_of(&p, "a", due), KeyStatus::Disabled);
    assert!(p.due_probes(due + Duration::from_secs(86_400)).is_empty());
}

#[test]
fn a_key_picked_twice_before_limits_are_learned_is_not_starved_after() {
    let p = pool(
        (0..4).map(|i| key(&format!("k{i}"), &["others"])).collect(),
        Strategy::RoundRobinHealthWeighted,
    );
    let mut rng = SplitMix64::new(9);
    let t0 = Time::from_secs(1);
    // A burst at startup: five requests before any answer, so one key holds two.
    let first: Vec<_> = (0..5)
        .map(|_| p.select(&Demand::default(), t0, &mut rng).expect("key"))
        .collect();
    let learned = || Outcome::Success {
        latency: Duration::from_millis(5),
        limits: RateLimitHeaders {
            limit_requests: Some(1_000_000),
            remaining_requests: Some(999_999),
            ..Default::default()
        },
    };
    for lease in first {
        lease.record(learned(), t0);
    }
    let mut counts: HashMap<String, u32> = HashMap::new();
    for i in 0..4000u64 {
        let now = t0 + Duration::from_micros(i * 100);
        let lease = p.select(&Demand::default(), now, &mut rng).expect("key");
        *counts.entry(lease.id().to_string()).or_default() += 1;
        lease.record(learned(), now);
    }
    assert!(
        counts.values().all(|&c| (900..=1100).contains(&c)),
        "{counts:?} {:?}",
        p.snapshot(t0)[0]
    );
}

#[test]
fn snapshot_and_counts_report_each_keys_state() {
    let p = pool(
        vec![
            key("cool", &["others"]),
            key("gone", &["others"]),
            key("fast", &["others"]),
            key("idle", &["others"]),
            key("open", &["others"]),
        ],
        Strategy::RoundRobin,
    );
    let mut rng = SplitMix64::new(1);
    let t0 = Time::from_secs(100);
    lease_on(&p, "cool", t0, &mut rng).record(
        Outcome::RateLimited {
            limits: RateLimitHeaders {
                retry_after: Some(Duration::from_secs(30)),
                ..RateLimitHeaders::default()
            },
        },
        t0,
    );
    lease_on(&p, "gone", t0, &mut rng).record(
        Outcome::KeyRejected {
            reason: DisableReason::Unauthorized,
        },
        t0,
    );
    lease_on(&p, "fast", t0, &mut rng).record(
        Outcome::Success {
            latency: Duration::from_millis(250),
            limits: RateLimitHeaders::default(),
        },
        t0,
    );
    let now = t0 + Duration::from_secs(10);
    // Five failures a second ago open the circuit for at least 2.5 s.
    let failed = now - Duration::from_secs(1);
    for _ in 0..5 {
        lease_on(&p, "open", failed, &mut rng).record(
            Outcome::Upstream {
                failure: UpstreamFailure::Status(502),
                retry_after: None,
            },
            failed,
        );
    }
    let snapshot = p.snapshot(now);
    let of = |name: &str| {
        snapshot
            .iter()
            .find(|k| k.name == name)
            .unwrap_or_else(|| panic!("{name} in the snapshot"))
    };
    let cool = of("cool");
    assert_eq!(
        (cool.status, cool.blocked_secs),
        (KeyStatus::Cooling, Some(20.0))
    );
    assert_eq!(cool.outcomes.rate_limited, 1);
    let gone = of("gone");
    assert_eq!(gone.status, KeyStatus::Disabled);
    assert_eq!(gone.disabled_reason, Some(DisableReason::Unauthorized));
    assert_eq!(gone.blocked_secs, None, "no end to a disable");
    assert_eq!(
        gone.next_probe_secs,
        Some(50.0),
        "a minute after the rejection"
    );
    let fast = of("fast");
    assert_eq!(fast.status, KeyStatus::Available);
    assert_eq!(fast.blocked_secs, Some(0.0));
    let latency = fast.latency_ms.expect("a latency sample");
    // Decayed over 10 s with a 10 s time constant: 250 ms / e.
    assert!(
        (latency - 250.0 / std::f64::consts::E).abs() < 1e-6,
        "{latency}"
    );
    assert_eq!(of("idle").latency_ms, None);
    assert_eq!(of("idle").next_probe_secs, None);
    assert_eq!(of("open").status, KeyStatus::CircuitOpen);

    let counts = p.counts(now);
    assert_eq!(
        (
            counts.total,
            counts.available,
            counts.cooling,
            counts.disabled,
            counts.circuit_open,
            counts.limited,
            counts.throttled
        ),
        (5, 2, 1, 1, 1, 0, 0)
    );
    assert_eq!(p.throttled_groups(now), 0);
    let labels: Vec<&str> = KeyStatus::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(
        labels,
        [
            "available",
            "cooling",
            "limited",
            "circuit_open",
            "throttled",
            "disabled"
        ]
    );
}

#[test]
fn snapshot_shows_a_paced_key_as_limited_and_counts_throttled_groups() {
    let org = |name: &str, rpm: Option<u32>| {
        let mut spec = key(name, &["others"]);
        if let Some(rpm) = rpm {
            spec = spec.with_rpm(rpm);
        }
        spec.organization = Some("org-shared".to_owned());
        spec
    };
    let paced = |name: &str| org(name, Some(60));
    let p = pool(
        vec![paced("a"), paced("b"), paced("c")],
        Strategy::RoundRobin,
    );
    let mut rng = SplitMix64::new(1);
    let t0 = Time::from_secs(100);
    // 60 rpm: one request a second; a first one spends the key's pace.
    lease_on(&p, "a", t0, &mut rng).record(ok(), t0);
    let a = p
        .snapshot(t0)
        .into_iter()
        .find(|k| k.name == "a")
        .expect("a");
    assert_eq!(a.status, KeyStatus::Limited);
    assert_eq!(a.blocked_secs, Some(1.0));
    assert_eq!(p.counts(t0).limited, 1);
    assert_eq!(p.throttled_groups(t0), 0);

    // Two of the organization's three keys get a 429 at once: the whole group rests.
    let unpaced = |name: &str| org(name, None);
    let p = pool(
        vec![unpaced("a"), unpaced("b"), unpaced("c")],
        Strategy::RoundRobin,
    );
    let later = t0 + Duration::from_secs(10);
    let limited = || Outcome::RateLimited {
        limits: RateLimitHeaders {
            retry_after: Some(Duration::from_secs(20)),
            ..RateLimitHeaders::default()
        },
    };
    let a = lease_on(&p, "a", later, &mut rng);
    let b = lease_on(&p, "b", later, &mut rng);
    a.record(limited(), later);
    b.record(limited(), later);
    assert_eq!(p.throttled_groups(later), 1);
    let c = p
        .snapshot(later)
        .into_iter()
        .find(|k| k.name == "c")
        .expect("c");
    assert_eq!(
        (c.status, c.blocked_secs),
        (KeyStatus::Throttled, Some(20.0))
    );
    // After the rest one probe goes; its success lifts the throttle.
    let after = later + Duration::from_secs(21);
    assert_eq!(
        p.throttled_groups(after),
        1,
        "until the probe says otherwise"
    );
    let probe = p
        .select(&Demand::default(), after, &mut rng)
        .expect("the probe");
    probe.record(ok(), after);
    assert_eq!(p.throttled_groups(after), 0);
}
