//! The key-economy targets, asserted on the deterministic simulator at a fixed seed.
//!
//! Every run is a pure computation in virtual time (no sockets, no sleeps): the figures below
//! are the same on every machine. `docs/key-economy.md` explains the method and holds the
//! full table (`cargo run --release --example simulate`).

use std::time::Duration;

use key_cycle_proxy::simulate::{DEFAULT_SEED, Policy, Report, Scenario, Workload, run};

// The figures `docs/key-economy.md` quotes for seed 2026 in its "Targets" table, as printed
// there. Each test checks that the simulator still prints them: a change to the
// attempt policy or the pool that moves one must update the docs and these constants
// together (`cargo run --release --example simulate` prints the tables).

/// 80% Poisson, tiered pool: goodput, 4 decimals.
const POISSON_80_GOODPUT: f64 = 1.0;
/// 80% Poisson, tiered pool: wasted calls, in percent with 2 decimals.
const POISSON_80_WASTED_PCT: f64 = 0.00;
/// 240 rpm key's traffic ÷ 30 rpm key's, 2 decimals.
const SHARE_240_TO_30: f64 = 8.10;
/// 150% Poisson: goodput, 4 decimals.
const POISSON_150_GOODPUT: f64 = 0.9894;
/// 150% Poisson: wasted calls, in percent with 2 decimals.
const POISSON_150_WASTED_PCT: f64 = 0.01;
/// 150% Poisson: upstream calls per request, 3 decimals.
const POISSON_150_CALLS: f64 = 1.000;
/// 150% Poisson: requests the proxy refused itself, in percent with 1 decimal.
const POISSON_150_REFUSED_PCT: f64 = 33.1;
/// 150% Poisson, the original round robin: wasted calls in percent, 2 decimals.
const NAIVE_150_WASTED_PCT: f64 = 82.19;
/// 150% Poisson, the original round robin: calls per request, 3 decimals.
const NAIVE_150_CALLS: f64 = 3.761;
/// Organization throttle: upstream 429s per key per episode, 2 decimals.
const ORG_429_PER_KEY_EPISODE: f64 = 0.93;
/// Token scenario at 80%: goodput, 4 decimals.
const TOKENS_80_GOODPUT: f64 = 1.0;

/// Asserts that `value` prints as `quoted` with `decimals` decimals.
fn assert_quoted(what: &str, value: f64, quoted: f64, decimals: usize) {
    assert_eq!(
        format!("{value:.decimals$}"),
        format!("{quoted:.decimals$}"),
        "{what}: the simulator gives {value}, docs/key-economy.md quotes {quoted}"
    );
}

fn kcp(scenario: &Scenario) -> Report {
    run(scenario, Policy::Kcp, DEFAULT_SEED)
}

fn key(report: &Report, rpm: u32) -> &key_cycle_proxy::simulate::report::KeyReport {
    report
        .keys
        .iter()
        .find(|k| k.rpm == rpm)
        .expect("the tiered pool has this key")
}

#[test]
fn at_80_percent_poisson_load_nothing_is_lost_or_wasted() {
    let r = kcp(&Scenario::tiered(Workload::Poisson, 0.8));
    assert_quoted("goodput", r.goodput(), POISSON_80_GOODPUT, 4);
    assert_quoted("wasted %", r.wasted() * 100.0, POISSON_80_WASTED_PCT, 2);
    assert_eq!(r.client_429, 0);
    assert!(r.wait_p99 < Duration::from_secs(1), "{:?}", r.wait_p99);
}

#[test]
fn traffic_follows_the_learned_limits() {
    let r = kcp(&Scenario::tiered(Workload::Poisson, 0.8));
    let (large, small) = (key(&r, 240), key(&r, 30));
    let ratio = large.successes as f64 / small.successes as f64;
    assert_quoted("240 rpm : 30 rpm", ratio, SHARE_240_TO_30, 2);
    assert!(
        (6.0..=10.0).contains(&ratio),
        "the target: 8× ± 25%, got {ratio}"
    );
    // Nothing was configured: the limits come from the provider's headers.
    for k in [large, small] {
        let learned = k.learned.expect("kcp reports what it learned");
        assert_eq!(learned.limit_requests, Some(u64::from(k.rpm)));
        assert_eq!(learned.pace_factor, 1.0, "no 429, no cut");
        let pace = learned.pace_rps.expect("a learned limit sets a pace");
        assert!((pace - f64::from(k.rpm) / 60.0).abs() < 1e-6, "pace {pace}");
        // The provider's bucket holds 3 s of the rate: the estimate never exceeds it.
        let remaining = learned.remaining_requests.expect("reported");
        assert!(remaining as f64 <= f64::from(k.rpm) / 20.0, "{remaining}");
        let reset = learned.reset_requests_secs.expect("reported");
        assert!((0.0..=3.0).contains(&reset), "reset {reset}");
    }
}

#[test]
fn at_150_percent_the_excess_is_refused_without_burning_calls() {
    let scenario = Scenario::tiered(Workload::Poisson, 1.5);
    let r = kcp(&scenario);
    assert_quoted("goodput", r.goodput(), POISSON_150_GOODPUT, 4);
    assert_quoted("wasted %", r.wasted() * 100.0, POISSON_150_WASTED_PCT, 2);
    assert_quoted("calls/request", r.calls_per_request(), POISSON_150_CALLS, 3);
    // About a third of the demand cannot be served: it gets a 429 from the proxy itself,
    // at once rather than after waiting in vain.
    assert_quoted("refused %", r.refused() * 100.0, POISSON_150_REFUSED_PCT, 1);
    assert_eq!(r.refused_after_p50, Duration::ZERO, "refused at once");
    // No standing queue: the requests that are served hardly wait (target: p50 ≤ 250 ms).
    assert!(
        r.wait_p50 <= Duration::from_millis(250),
        "served p50 {:?}",
        r.wait_p50
    );
    // The original behaviour serves as much but pays for it in upstream calls.
    let naive = run(&scenario, Policy::NaiveRoundRobin, DEFAULT_SEED);
    assert_quoted(
        "naive wasted %",
        naive.wasted() * 100.0,
        NAIVE_150_WASTED_PCT,
        2,
    );
    assert_quoted(
        "naive calls/request",
        naive.calls_per_request(),
        NAIVE_150_CALLS,
        3,
    );
}

#[test]
fn an_organization_throttle_costs_fewer_than_two_calls_per_key_per_episode() {
    let r = kcp(&Scenario::org_throttle());
    assert_eq!(r.episodes, 5);
    let per_key = r.wasted_per_key_per_episode().expect("episodes happened");
    assert_quoted(
        "429s per key per episode",
        per_key,
        ORG_429_PER_KEY_EPISODE,
        2,
    );
    assert!(per_key < 2.0, "the target: fewer than 2, got {per_key}");
    // Most of what a proxy could serve around the episodes is served: the recovery after
    // each episode (one probe, then the keys' pace) costs the rest, and so does the wait
    // queue's delay control, which answers excess at once rather than let it wait out an
    // episode's end (a perfect proxy would have held those requests for up to max_wait).
    assert!(r.goodput() >= 0.94, "goodput {}", r.goodput());
    // Requests arriving early in an episode are refused at once, not after a wait.
    assert_eq!(r.refused_after_p50, Duration::ZERO);
}

#[test]
fn token_limits_are_learned_and_respected() {
    let r = kcp(&Scenario::tokens(0.8));
    assert_quoted("goodput", r.goodput(), TOKENS_80_GOODPUT, 4);
    assert_eq!(r.upstream_429, 0, "0.00% wasted");
    let learned = key(&r, 240).learned.expect("kcp reports what it learned");
    assert_eq!(learned.limit_tokens, Some(120_000));
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let scenario = Scenario::org_throttle().for_minutes(3);
    for policy in [Policy::Kcp, Policy::NaiveRoundRobin] {
        let first = run(&scenario, policy, 7);
        assert_eq!(first, run(&scenario, policy, 7), "{policy:?}");
        assert_ne!(first, run(&scenario, policy, 8), "{policy:?}");
    }
}
