//! Fuzzing `RateLimitHeaders::parse` on stable Rust with proptest: arbitrary names and bytes
//! never panic, and well-formed values (counts, Go durations, `retry-after-ms`) parse to the
//! value a reference computes independently.
//!
//! Fast by default (256 cases per property); `KCP_FUZZ_CASES=1000000 cargo test -p kcp-core
//! --release --test fuzz_headers -- --nocapture` runs a long session and prints how long it took.

use std::time::{Duration, Instant};

use kcp_core::RateLimitHeaders;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Cases per property: `KCP_FUZZ_CASES`, else 256.
fn cases() -> u32 {
    std::env::var("KCP_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

/// Runs `test` over `strategy` for [`cases`] cases, printing the time taken in a long run.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let cases = cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    if let Err(error) = runner.run(&strategy, test) {
        panic!("{name}: {error}");
    }
    if std::env::var_os("KCP_FUZZ_CASES").is_some() {
        eprintln!("{name}: {cases} cases in {:.1?}", started.elapsed());
    }
}

const NOW: Duration = Duration::from_secs(1_700_000_000);

const NAMES: [&str; 9] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "retry-after",
    "retry-after-ms",
    "content-type",
];

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(NAMES.to_vec()).prop_map(str::to_owned),
        proptest::sample::select(NAMES.to_vec()).prop_map(|n| n.to_ascii_uppercase()),
        ".{0,40}",
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48),
        "[0-9hmsuµμn.\\- ]{0,24}".prop_map(String::into_bytes),
        "[A-Za-z]{3}, [0-9]{2} [A-Za-z]{3} [0-9]{4} [0-9:]{8} GMT".prop_map(String::into_bytes),
    ]
}

#[test]
fn arbitrary_headers_never_panic() {
    let headers = proptest::collection::vec((name(), value()), 0..12);
    fuzz("arbitrary headers", headers, |headers| {
        let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
        let parsed = RateLimitHeaders::parse(pairs, NOW);
        let known = headers
            .iter()
            .any(|(n, _)| NAMES[..8].iter().any(|k| k.eq_ignore_ascii_case(n)));
        if !known {
            prop_assert!(parsed.is_empty());
        }
        Ok(())
    });
}

/// A Go duration string and its value by an independent reference: each unit at most once,
/// largest first, integer amounts.
fn go_duration() -> impl Strategy<Value = (String, Duration)> {
    let units: [(&str, u64); 6] = [
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    proptest::collection::vec(proptest::option::of(0u64..10_000), 6).prop_filter_map(
        "at least one unit",
        move |amounts| {
            let mut text = String::new();
            let mut nanos: u128 = 0;
            for ((unit, scale), amount) in units.iter().zip(amounts) {
                if let Some(amount) = amount {
                    text.push_str(&format!("{amount}{unit}"));
                    nanos += u128::from(amount) * u128::from(*scale);
                }
            }
            let nanos = u64::try_from(nanos).ok()?;
            (!text.is_empty()).then(|| (text, Duration::from_nanos(nanos)))
        },
    )
}

#[test]
fn well_formed_values_match_the_reference() {
    let strategy = (
        any::<u64>(),
        any::<u64>(),
        go_duration(),
        0u64..100_000_000,
        0u32..1000,
    );
    fuzz(
        "well-formed values",
        strategy,
        |(limit, remaining, (reset, expected), ms, frac)| {
            let limit_text = limit.to_string();
            let remaining_text = format!(" {remaining} ");
            let ms_text = format!("{ms}.{frac:03}");
            let headers = [
                ("X-RateLimit-Limit-Requests", limit_text.as_bytes()),
                ("x-ratelimit-remaining-tokens", remaining_text.as_bytes()),
                ("x-ratelimit-reset-tokens", reset.as_bytes()),
                ("retry-after-ms", ms_text.as_bytes()),
                ("retry-after", b"120".as_slice()),
            ];
            let parsed = RateLimitHeaders::parse(headers, NOW);
            prop_assert_eq!(parsed.limit_requests, Some(limit));
            prop_assert_eq!(parsed.remaining_tokens, Some(remaining));
            prop_assert_eq!(parsed.reset_tokens, Some(expected));
            let want = Duration::from_micros(ms * 1_000 + u64::from(frac));
            prop_assert_eq!(parsed.retry_after, Some(want));
            prop_assert_eq!(parsed.reset_requests, None);
            Ok(())
        },
    );
}
