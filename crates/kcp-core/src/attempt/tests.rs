//! The attempt policy in virtual time: every rule, with exact calls, keys and answers.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::key::KeySpec;
use crate::outcome::UpstreamFailure;
use crate::pool::{PoolConfig, Strategy};
use crate::ratelimit_headers::RateLimitHeaders;
use crate::rng::SplitMix64;
use crate::secret::Secret;
use crate::snapshot::KeyStatus;

fn pool(names: &[&str]) -> KeyPool {
    let specs = names
        .iter()
        .map(|n| {
            KeySpec::new(Secret::new(format!("sk-{n}")), "https://api.example/v1").with_name(*n)
        })
        .collect();
    let config = PoolConfig {
        strategy: Strategy::RoundRobin,
        ..PoolConfig::default()
    };
    KeyPool::new(specs, config).expect("valid pool")
}

fn post(model: &'static str) -> ClientRequest<'static> {
    ClientRequest {
        model: Some(model),
        scope: Some(model),
        tokens: 10,
        replay: Replay::of("POST", false),
        home: false,
    }
}

fn status(status: u16) -> Answer<'static> {
    Answer::Reply(Reply {
        status,
        ..Reply::default()
    })
}

fn with_error(status: u16, code: Option<&'static str>, message: &'static str) -> Answer<'static> {
    Answer::Reply(Reply {
        status,
        error: ErrorBody {
            code,
            kind: None,
            message: Some(message),
        },
        ..Reply::default()
    })
}

/// Drives one attempt to its end: `answer(key name, call number)` plays the provider.
/// Returns the keys called in order and how the attempt ended.
struct Run {
    calls: Vec<String>,
    end: End,
    slept: Vec<Duration>,
    stats: Stats,
}

#[derive(Debug, PartialEq)]
enum End {
    Delivered(u16),
    GaveUp(GiveUp),
}

fn drive(
    pool: &KeyPool,
    request: ClientRequest<'_>,
    policy: RetryPolicy,
    mut now: Time,
    mut answer: impl FnMut(&str, usize) -> Answer<'static>,
) -> Run {
    let queue = WaitQueue::new(policy.max_queue);
    let mut rng = SplitMix64::new(7);
    let mut attempt = Attempt::new(request, policy);
    let mut calls = Vec::new();
    let mut slept = Vec::new();
    for _ in 0..100 {
        match attempt.next(pool, &queue, now, &mut rng) {
            Next::Send(lease) => {
                let name = lease.id().as_str().to_owned();
                calls.push(name.clone());
                let reply = answer(&name, calls.len());
                let verdict = attempt.on_answer(lease, &reply, now);
                if verdict.action == Action::Deliver {
                    let Answer::Reply(r) = reply else {
                        panic!("a failure is never delivered")
                    };
                    return Run {
                        calls,
                        end: End::Delivered(r.status),
                        slept,
                        stats: attempt.stats(),
                    };
                }
            }
            Next::Sleep(d) => {
                slept.push(d);
                now = now + d;
            }
            Next::Wait(wait) => {
                slept.push(wait.until.saturating_since(now));
                now = wait.until.max(now);
            }
            Next::GiveUp(why) => {
                return Run {
                    calls,
                    end: End::GaveUp(why),
                    slept,
                    stats: attempt.stats(),
                };
            }
        }
    }
    panic!("the attempt did not end within 100 steps")
}

const T0: Time = Time::from_secs(100);

#[test]
fn a_connect_failure_before_the_write_is_retried_on_another_key() {
    let p = pool(&["a", "b"]);
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, |key, _| {
        if key == "a" {
            Answer::Failed {
                failure: UpstreamFailure::Connect,
                reached: false,
            }
        } else {
            status(200)
        }
    });
    assert_eq!(run.calls, ["a", "b"]);
    assert_eq!(run.end, End::Delivered(200));
    assert_eq!(run.stats.retries, 1);
    assert_eq!(run.slept.len(), 1, "one backoff slept before the retry");
    assert!(run.slept[0] <= Backoff::default().ceiling(0));
}

#[test]
fn a_post_that_may_have_reached_the_provider_is_not_sent_again() {
    let p = pool(&["a", "b"]);
    let timeout = |_: &str, _| Answer::Failed {
        failure: UpstreamFailure::Timeout,
        reached: true,
    };
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, timeout);
    assert_eq!(run.calls, ["a"], "one call: a second could bill twice");
    assert_eq!(run.end, End::GaveUp(GiveUp::LastAnswer));

    let keyed = ClientRequest {
        replay: Replay::of("POST", true),
        ..post("m")
    };
    let run = drive(&p, keyed, RetryPolicy::default(), T0, timeout);
    assert_eq!(
        run.calls.len(),
        4,
        "Idempotency-Key: retried up to max_retries"
    );
    let get = ClientRequest {
        replay: Replay::of("GET", false),
        ..post("m")
    };
    let run = drive(&p, get, RetryPolicy::default(), T0, timeout);
    assert_eq!(run.calls.len(), 4, "GET may be replayed");
    assert_eq!(Replay::of("DELETE", false), Replay::Safe);
    assert_eq!(Replay::of("HEAD", false), Replay::Safe);
    assert_eq!(Replay::of("PATCH", false), Replay::BeforeSend);
}

#[test]
fn answered_5xx_are_retried_up_to_max_retries_then_passed_through() {
    let p = pool(&["a", "b", "c"]);
    let policy = RetryPolicy {
        max_retries: 2,
        ..RetryPolicy::default()
    };
    let run = drive(&p, post("m"), policy, T0, |_, _| status(500));
    assert_eq!(run.calls.len(), 3, "first call and two retries");
    assert_eq!(run.end, End::GaveUp(GiveUp::LastAnswer));
    assert_eq!(run.slept.len(), 2, "a backoff before each retry");
    assert_eq!(run.stats.retries, 2);
}

#[test]
fn key_failovers_cost_no_retry() {
    let p = pool(&["a", "b", "c", "d"]);
    let policy = RetryPolicy {
        max_retries: 0,
        ..RetryPolicy::default()
    };
    let run = drive(&p, post("m"), policy, T0, |key, _| match key {
        "a" => status(401),
        "b" => status(402),
        "c" => with_error(
            429,
            Some("insufficient_quota"),
            "You exceeded your current quota",
        ),
        _ => status(200),
    });
    assert_eq!(run.calls, ["a", "b", "c", "d"]);
    assert_eq!(run.end, End::Delivered(200));
    assert_eq!((run.stats.retries, run.stats.key_failovers), (0, 3));
}

#[test]
fn a_forbidden_model_is_refused_per_key_and_never_disables_a_key() {
    let p = pool(&["a", "b", "c"]);
    let forbidden = |_: &str, _| {
        with_error(
            403,
            Some("model_not_found"),
            "Project does not have access to model `o3`",
        )
    };
    let run = drive(&p, post("o3"), RetryPolicy::default(), T0, forbidden);
    assert_eq!(run.calls, ["a", "b", "c"], "each key asked once");
    assert_eq!(
        run.end,
        End::GaveUp(GiveUp::LastAnswer),
        "the provider's own answer"
    );
    assert!(p.due_probes(T0 + Duration::from_secs(7200)).is_empty());
    for key in p.snapshot(T0) {
        assert_eq!(key.status, KeyStatus::Available, "{}", key.name);
        assert_eq!(key.refused.len(), 1);
        assert_eq!(key.refused[0].0, "o3");
    }
    // Other models are served by every key.
    let mut served = Vec::new();
    for _ in 0..3 {
        let run = drive(&p, post("gpt-4o"), RetryPolicy::default(), T0, |_, _| {
            status(200)
        });
        assert_eq!(run.end, End::Delivered(200));
        served.extend(run.calls);
    }
    served.sort();
    assert_eq!(served, ["a", "b", "c"]);
    // The model itself is answered without a call until the marks run out...
    let run = drive(&p, post("o3"), RetryPolicy::default(), T0, |_, _| {
        status(200)
    });
    assert_eq!(
        (run.calls.len(), run.end),
        (0, End::GaveUp(GiveUp::Refused))
    );
    // ...then the next request re-checks it.
    let later = T0 + crate::refusal::FIRST_REST;
    let run = drive(&p, post("o3"), RetryPolicy::default(), later, |_, _| {
        status(200)
    });
    assert_eq!((run.calls.len(), run.end), (1, End::Delivered(200)));
}

#[test]
fn a_403_about_the_key_disables_only_that_key() {
    let p = pool(&["a", "b"]);
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, |key, _| {
        if key == "a" {
            with_error(403, None, "Your API key has been revoked.")
        } else {
            status(200)
        }
    });
    assert_eq!(
        (run.calls, run.end),
        (vec!["a".into(), "b".into()], End::Delivered(200))
    );
    assert_eq!(p.snapshot(T0)[0].status, KeyStatus::Disabled);
}

#[test]
fn a_request_too_large_for_a_key_goes_to_one_whose_limit_fits_or_is_answered_once() {
    let p = pool(&["small", "big"]);
    // "big" is known to take 100k tokens a minute.
    let mut rng = SplitMix64::new(1);
    let big_limits = RateLimitHeaders {
        limit_tokens: Some(100_000),
        ..Default::default()
    };
    let demand = Demand::default();
    let mut lease = p.select(&demand, T0, &mut rng).expect("a key");
    if lease.id().as_str() != "big" {
        lease.record(Outcome::Cancelled, T0);
        lease = p.select(&demand, T0, &mut rng).expect("a key");
    }
    lease.record(
        Outcome::Success {
            latency: Duration::ZERO,
            limits: big_limits,
        },
        T0,
    );
    let too_large = |key: &str, _| {
        if key == "small" {
            with_error(
                429,
                Some("rate_limit_exceeded"),
                "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000.",
            )
        } else {
            status(200)
        }
    };
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, too_large);
    assert_eq!(run.end, End::Delivered(200));
    assert_eq!(run.calls.last().map(String::as_str), Some("big"));
    assert_eq!(
        p.snapshot(T0)[0].status,
        KeyStatus::Available,
        "too large is not a rate limit: the key does not rest"
    );

    // No key large enough: the provider's answer, once, no fan-out.
    let q = pool(&["a", "b", "c"]);
    let run = drive(&q, post("m"), RetryPolicy::default(), T0, |_, _| {
        with_error(
            429,
            None,
            "Request too large: Limit 30000, Requested 50000.",
        )
    });
    assert_eq!(run.calls.len(), 1);
    assert_eq!(run.end, End::GaveUp(GiveUp::LastAnswer));
    assert!(
        q.snapshot(T0)
            .iter()
            .all(|k| k.status == KeyStatus::Available)
    );
}

#[test]
fn only_keys_of_a_known_organization_throttle_together() {
    let p = pool(&["a", "b", "c"]);
    let mut rng = SplitMix64::new(3);
    let limited = || Outcome::RateLimited {
        limits: Default::default(),
    };
    let grouped = |p: &KeyPool, t: Time, rng: &mut SplitMix64| {
        let mut throttled = false;
        for _ in 0..3 {
            let Ok(lease) = p.select(&Demand::default(), t, rng) else {
                break;
            };
            throttled |= lease
                .record(limited(), t)
                .iter()
                .any(|c| matches!(c, StateChange::GroupThrottled { .. }));
        }
        throttled
    };
    assert!(
        !grouped(&p, T0, &mut rng),
        "unknown organizations are never grouped"
    );

    // The provider names one organization for all three keys: now they are a group.
    let q = pool(&["a", "b", "c"]);
    let queue = WaitQueue::new(8);
    for _ in 0..3 {
        let mut attempt = Attempt::new(post("m"), RetryPolicy::default());
        let Next::Send(lease) = attempt.next(&q, &queue, T0, &mut rng) else {
            panic!("a key is free")
        };
        let ok = Answer::Reply(Reply {
            status: 200,
            organization: Some("org-shared"),
            ..Reply::default()
        });
        attempt.on_answer(lease, &ok, T0);
    }
    let later = T0 + Duration::from_secs(60);
    assert!(
        grouped(&q, later, &mut rng),
        "three keys of one organization"
    );
}

#[test]
fn a_503_retry_after_rests_the_key_briefly_and_the_request_moves_on() {
    let p = pool(&["a", "b"]);
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, |key, _| {
        if key == "a" {
            let limits = RateLimitHeaders {
                retry_after: Some(Duration::from_secs(86_400)),
                ..RateLimitHeaders::default()
            };
            Answer::Reply(Reply {
                status: 503,
                limits,
                ..Reply::default()
            })
        } else {
            status(200)
        }
    });
    assert_eq!(run.calls, ["a", "b"]);
    assert_eq!(run.end, End::Delivered(200));
    let a = &p.snapshot(T0)[0];
    let rest = a.blocked_secs.expect("resting");
    assert!(
        rest > 0.0 && rest <= 2.0,
        "rests at most retry_max_backoff, not a day: {rest}"
    );
}

#[test]
fn unreachable_keys_give_up_as_unavailable_not_rate_limited() {
    let p = pool(&["a"]);
    let refused = |_: &str, _| Answer::Failed {
        failure: UpstreamFailure::Connect,
        reached: false,
    };
    for _ in 0..2 {
        drive(&p, post("m"), RetryPolicy::default(), T0, refused);
    }
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, |_, _| {
        status(200)
    });
    assert_eq!(run.calls.len(), 0);
    assert!(
        matches!(run.end, End::GaveUp(GiveUp::Unreachable { retry_after }) if retry_after > Duration::ZERO),
        "{:?}",
        run.end
    );
}

#[test]
fn a_quota_key_is_rechecked_by_one_real_request_not_by_the_probe() {
    let p = pool(&["a"]);
    let quota = |_: &str, _| with_error(429, Some("insufficient_quota"), "quota");
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, quota);
    assert_eq!(run.end, End::GaveUp(GiveUp::NoKeys));
    let due = T0 + Duration::from_secs(60);
    assert!(
        p.due_probes(due).is_empty(),
        "GET /v1/models would answer 200 on an empty quota"
    );
    let early = drive(
        &p,
        post("m"),
        RetryPolicy::default(),
        due - Duration::from_secs(1),
        |_, _| status(200),
    );
    assert_eq!(early.calls.len(), 0, "not before the backoff");
    // After the backoff exactly one real request goes; it fails, and the wait doubles.
    let run = drive(&p, post("m"), RetryPolicy::default(), due, quota);
    assert_eq!(run.calls, ["a"]);
    let run = drive(
        &p,
        post("m"),
        RetryPolicy::default(),
        due + Duration::from_secs(119),
        quota,
    );
    assert_eq!(run.calls.len(), 0);
    // The next one succeeds: the key is back.
    let back = due + Duration::from_secs(120);
    let run = drive(&p, post("m"), RetryPolicy::default(), back, |_, _| {
        status(200)
    });
    assert_eq!((run.calls.len(), run.end), (1, End::Delivered(200)));
    assert_eq!(p.snapshot(back)[0].status, KeyStatus::Available);
}

#[test]
fn an_unauthorized_key_is_rechecked_by_the_probe() {
    let p = pool(&["a"]);
    drive(&p, post("m"), RetryPolicy::default(), T0, |_, _| {
        status(401)
    });
    assert_eq!(p.due_probes(T0 + Duration::from_secs(60)), vec![0]);
}

#[test]
fn a_rate_limited_pool_waits_for_the_first_key_within_max_wait() {
    let p = pool(&["a", "b"]);
    let retry_in = |secs: u64| {
        let limits = RateLimitHeaders {
            retry_after: Some(Duration::from_secs(secs)),
            ..RateLimitHeaders::default()
        };
        Answer::Reply(Reply {
            status: 429,
            limits,
            ..Reply::default()
        })
    };
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, |key, n| {
        match (key, n) {
            ("a", 1) => retry_in(2),
            ("b", 2) => retry_in(3),
            _ => status(200),
        }
    });
    assert_eq!(run.calls, ["a", "b", "a"]);
    assert_eq!(run.end, End::Delivered(200));
    assert_eq!(
        run.slept,
        [Duration::from_secs(2)],
        "waited for the first key to free"
    );
    assert_eq!(run.stats.waits, 1);

    // A rest beyond max_wait: a 429 at once, with an honest retry-after.
    let q = pool(&["a"]);
    let run = drive(&q, post("m"), RetryPolicy::default(), T0, |_, _| {
        retry_in(60)
    });
    assert_eq!(
        run.end,
        End::GaveUp(GiveUp::Busy {
            retry_after: Duration::from_secs(60)
        })
    );
}

#[test]
fn waits_are_bounded_in_number_and_by_the_queue() {
    let p = pool(&["a"]);
    let policy = RetryPolicy {
        max_waits: 2,
        ..RetryPolicy::default()
    };
    let short = |_: &str, _| {
        let limits = RateLimitHeaders {
            retry_after: Some(Duration::from_millis(40)),
            ..RateLimitHeaders::default()
        };
        Answer::Reply(Reply {
            status: 429,
            limits,
            ..Reply::default()
        })
    };
    let run = drive(&p, post("m"), policy, T0, short);
    assert_eq!(
        run.calls.len(),
        3,
        "first call and one after each of two waits"
    );
    assert!(matches!(run.end, End::GaveUp(GiveUp::Busy { .. })));

    let full = WaitQueue::new(0);
    let mut attempt = Attempt::new(post("m"), RetryPolicy::default());
    let mut rng = SplitMix64::new(1);
    let q = pool(&["a"]);
    let Next::Send(lease) = attempt.next(&q, &full, T0, &mut rng) else {
        panic!("free key")
    };
    attempt.on_answer(lease, &short("a", 1), T0);
    assert!(matches!(
        attempt.next(&q, &full, T0, &mut rng),
        Next::GiveUp(GiveUp::Busy { .. })
    ));
    assert!(Arc::strong_count(&full) == 1, "no slot held");
}

#[test]
fn no_route_and_request_errors_end_at_once() {
    let specs = vec![
        KeySpec::new(Secret::new("sk-a"), "https://h/v1")
            .with_name("a")
            .with_models(["gpt-4o"]),
    ];
    let p = KeyPool::new(specs, PoolConfig::default()).expect("pool");
    let run = drive(&p, post("other"), RetryPolicy::default(), T0, |_, _| {
        status(200)
    });
    assert_eq!(
        (run.calls.len(), run.end),
        (0, End::GaveUp(GiveUp::NoRoute))
    );
    let run = drive(&p, post("gpt-4o"), RetryPolicy::default(), T0, |_, _| {
        status(400)
    });
    assert_eq!((run.calls.len(), run.end), (1, End::Delivered(400)));
    let run = drive(&p, post("gpt-4o"), RetryPolicy::default(), T0, |_, _| {
        with_error(404, None, "No such File object: file-x")
    });
    assert_eq!((run.calls.len(), run.end), (1, End::Delivered(404)));
}

fn success_with(remaining: u64, limit: u64) -> Outcome {
    Outcome::Success {
        latency: Duration::from_millis(100),
        limits: RateLimitHeaders {
            limit_requests: Some(limit),
            remaining_requests: Some(remaining),
            reset_requests: Some(
                Duration::from_secs(60) * (limit - remaining) as u32 / limit as u32,
            ),
            ..RateLimitHeaders::default()
        },
    }
}

/// Leases the only key of `p` as often as it lets at `now`, holding the leases.
fn burst(p: &KeyPool, now: Time, rng: &mut SplitMix64) -> Vec<Lease> {
    let mut leases = Vec::new();
    while let Ok(lease) = p.select(&Demand::default(), now, rng) {
        leases.push(lease);
        assert!(leases.len() <= 1000, "bounded");
    }
    leases
}

#[test]
fn a_reported_remainder_is_spent_at_once_and_no_more() {
    let p = pool(&["a"]);
    let mut rng = SplitMix64::new(5);
    // A 60 rpm key says 40 requests are left.
    let lease = p.select(&Demand::default(), T0, &mut rng).expect("free");
    lease.record(success_with(40, 60), T0);
    let leases = burst(&p, T0, &mut rng);
    assert_eq!(
        leases.len(),
        40,
        "the whole reported remainder, not a one-second pace burst"
    );
    // In flight counts: nothing more until the bucket refills (one a second).
    assert!(p.select(&Demand::default(), T0, &mut rng).is_err());
    let refilled = burst(&p, T0 + Duration::from_secs(1), &mut rng);
    assert_eq!(refilled.len(), 1);
}

#[test]
fn after_a_429_the_remainder_is_not_trusted_beyond_the_pace() {
    let p = pool(&["a"]);
    let mut rng = SplitMix64::new(5);
    let lease = p.select(&Demand::default(), T0, &mut rng).expect("free");
    lease.record(success_with(40, 60), T0);
    let lease = p.select(&Demand::default(), T0, &mut rng).expect("trusted");
    let limited = Outcome::RateLimited {
        limits: RateLimitHeaders {
            retry_after: Some(Duration::from_secs(1)),
            ..RateLimitHeaders::default()
        },
    };
    lease.record(limited, T0);
    let later = T0 + Duration::from_secs(2);
    let lease = p
        .select(&Demand::default(), later, &mut rng)
        .expect("rested");
    lease.record(success_with(40, 60), later);
    let leases = burst(&p, later, &mut rng);
    assert!(
        leases.len() <= 1,
        "paced at the (halved) learned rate, not the reported 40: {}",
        leases.len()
    );
}

#[test]
fn a_request_larger_than_a_keys_token_limit_never_goes_to_it() {
    let p = pool(&["small", "big"]);
    let mut rng = SplitMix64::new(9);
    // Each key learns its token limit from one answer.
    for _ in 0..2 {
        let lease = p.select(&Demand::default(), T0, &mut rng).expect("free");
        let limit = if lease.id().as_str() == "small" {
            1_000
        } else {
            100_000
        };
        let limits = RateLimitHeaders {
            limit_tokens: Some(limit),
            ..RateLimitHeaders::default()
        };
        lease.record(
            Outcome::Success {
                latency: Duration::ZERO,
                limits,
            },
            T0,
        );
    }
    let big_request = ClientRequest {
        tokens: 5_000,
        ..post("m")
    };
    for i in 0..4 {
        let now = T0 + Duration::from_secs(i);
        let run = drive(&p, big_request, RetryPolicy::default(), now, |_, _| {
            status(200)
        });
        assert_eq!(run.calls, ["big"], "never the 1k-token key");
    }
    let huge = ClientRequest {
        tokens: 500_000,
        ..post("m")
    };
    let run = drive(&p, huge, RetryPolicy::default(), T0, |_, _| status(200));
    assert_eq!(
        (run.calls.len(), run.end),
        (0, End::GaveUp(GiveUp::TooLarge))
    );
}

/// A source of randomness that always draws its largest value: a backoff is then just below
/// its ceiling, so which retry's ceiling applies shows.
struct Highest;

impl Random for Highest {
    fn next_u64(&mut self) -> u64 {
        u64::MAX
    }
}

#[test]
fn each_retry_sleeps_below_its_own_ceiling_and_every_call_is_counted() {
    let p = pool(&["a"]);
    let policy = RetryPolicy::default();
    let queue = WaitQueue::new(policy.max_queue);
    let mut attempt = Attempt::new(post("m"), policy);
    let mut slept = Vec::new();
    let mut now = T0;
    let end = loop {
        match attempt.next(&p, &queue, now, &mut Highest) {
            Next::Send(lease) => {
                let verdict = attempt.on_answer(lease, &status(500), now);
                assert_eq!(verdict.action, Action::Keep);
            }
            Next::Sleep(d) => {
                slept.push(d);
                now = now + d;
            }
            other => break other,
        }
        assert!(slept.len() <= 10, "bounded");
    };
    assert!(matches!(end, Next::GiveUp(GiveUp::LastAnswer)), "{end:?}");
    // Retry n (from 0) sleeps just below ceiling(n): 50, 100, 200 ms.
    let ceilings: Vec<Duration> = (0..3).map(|r| policy.backoff.ceiling(r)).collect();
    assert_eq!(slept.len(), 3);
    for (d, c) in slept.iter().zip(&ceilings) {
        assert!(
            *d <= *c && *d > *c - Duration::from_millis(1),
            "{d:?} vs {c:?}"
        );
    }
    let stats = attempt.stats();
    assert_eq!(stats.calls, 4, "the first call and three retries");
    assert_eq!(stats.retries, 3);
    assert_eq!(stats.backoff, slept.iter().sum::<Duration>());
}

#[test]
fn a_home_request_whose_model_is_refused_gets_the_answer_after_one_call() {
    let p = pool(&["a", "b"]);
    let home = ClientRequest {
        home: true,
        ..post("m")
    };
    let run = drive(&p, home, RetryPolicy::default(), T0, |_, _| status(403));
    assert_eq!(run.calls, ["a"], "objects live on the home key only");
    assert_eq!(run.end, End::Delivered(403));
    assert_eq!(run.stats.calls, 1);
    assert!(p.snapshot(T0)[0].refused.is_empty(), "nothing marked");
}

#[test]
fn a_too_large_answer_teaches_the_key_the_limit_its_message_quotes() {
    let p = pool(&["a"]);
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, |_, _| {
        with_error(
            429,
            None,
            "Request too large: Limit 30000, Requested 50000.",
        )
    });
    assert_eq!(run.end, End::GaveUp(GiveUp::LastAnswer));
    assert_eq!(p.snapshot(T0)[0].limits.limit_tokens, Some(30_000));
}

/// Rests the key `name` of `p` for `rest` from `now` (a 429 with `Retry-After`).
fn rest_key(p: &KeyPool, name: &str, rest: Duration, now: Time) {
    let mut rng = SplitMix64::new(1);
    let mut exclude = Vec::new();
    for _ in 0..p.snapshot(now).len() {
        let demand = Demand {
            exclude: &exclude,
            ..Demand::default()
        };
        let lease = p.select(&demand, now, &mut rng).expect("a free key");
        if lease.id().as_str() == name {
            let limits = RateLimitHeaders {
                retry_after: Some(rest),
                ..RateLimitHeaders::default()
            };
            lease.record(Outcome::RateLimited { limits }, now);
            return;
        }
        exclude.push(lease.index());
        lease.record(Outcome::Cancelled, now);
    }
    panic!("no key {name}");
}

#[test]
fn a_failed_key_is_tried_again_when_the_others_rest_beyond_the_wait() {
    let no_backoff = RetryPolicy {
        backoff: Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
        },
        ..RetryPolicy::default()
    };
    let fails_once = |key: &str, n: usize| {
        if (key, n) == ("a", 1) {
            status(500)
        } else {
            status(200)
        }
    };
    // b rests a minute, longer than max_wait: the retry goes back to a at once.
    let p = pool(&["a", "b"]);
    rest_key(&p, "b", Duration::from_secs(60), T0);
    let run = drive(&p, post("m"), no_backoff, T0, fails_once);
    assert_eq!(run.calls, ["a", "a"]);
    assert_eq!(run.end, End::Delivered(200));
    assert_eq!(run.slept, [Duration::ZERO], "the backoff only, no wait");

    // b frees exactly when the request's wait runs out: the request waits for it rather
    // than going back to the key that failed.
    let q = pool(&["a", "b"]);
    let max_wait = no_backoff.max_wait;
    rest_key(&q, "b", max_wait, T0);
    let run = drive(&q, post("m"), no_backoff, T0, fails_once);
    assert_eq!(
        run.slept,
        [Duration::ZERO, max_wait],
        "backoff, then the wait"
    );
    assert_eq!(run.stats.waits, 1);
    assert_eq!(run.end, End::Delivered(200));
}

#[test]
fn with_the_queue_full_a_failed_key_is_tried_again_rather_than_waited_out() {
    let policy = RetryPolicy {
        backoff: Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
        },
        max_queue: 0,
        ..RetryPolicy::default()
    };
    // b frees in 3 s, within max_wait, but the request cannot wait: no place in the queue.
    let p = pool(&["a", "b"]);
    rest_key(&p, "b", Duration::from_secs(3), T0);
    let run = drive(&p, post("m"), policy, T0, |key, n| {
        if (key, n) == ("a", 1) {
            status(500)
        } else {
            status(200)
        }
    });
    assert_eq!(run.calls, ["a", "a"]);
    assert_eq!(run.end, End::Delivered(200));
}

#[test]
fn a_kept_refusal_is_answered_rather_than_waiting_for_a_resting_key() {
    let p = pool(&["a", "b"]);
    let run = drive(&p, post("m"), RetryPolicy::default(), T0, |key, _| {
        if key == "a" {
            let limits = RateLimitHeaders {
                retry_after: Some(Duration::from_secs(1)),
                ..RateLimitHeaders::default()
            };
            Answer::Reply(Reply {
                status: 429,
                limits,
                ..Reply::default()
            })
        } else {
            status(403)
        }
    });
    assert_eq!(run.calls, ["a", "b"]);
    assert_eq!(run.end, End::GaveUp(GiveUp::LastAnswer), "b's 403, at once");
    assert!(run.slept.is_empty());
    assert_eq!(run.stats.key_failovers, 2, "a 429 and a refusal");
}

#[test]
fn a_key_that_answered_for_no_scope_is_not_asked_again_in_the_round() {
    // A request that names no scope: a refusal marks nothing on the key, so only the
    // round's exclusion keeps it from being asked again and again.
    let p = pool(&["a"]);
    let unscoped = ClientRequest {
        model: None,
        scope: None,
        ..post("m")
    };
    let run = drive(&p, unscoped, RetryPolicy::default(), T0, |_, _| status(403));
    assert_eq!(run.calls, ["a"]);
    assert_eq!(run.end, End::GaveUp(GiveUp::LastAnswer));
    assert_eq!(run.stats.key_failovers, 1);
}

#[test]
fn a_home_request_rate_limited_waits_for_its_home_key() {
    let p = pool(&["a", "b"]);
    let home = ClientRequest {
        home: true,
        ..post("m")
    };
    let run = drive(&p, home, RetryPolicy::default(), T0, |_, n| {
        if n == 1 {
            let limits = RateLimitHeaders {
                retry_after: Some(Duration::from_secs(2)),
                ..RateLimitHeaders::default()
            };
            Answer::Reply(Reply {
                status: 429,
                limits,
                ..Reply::default()
            })
        } else {
            status(200)
        }
    });
    assert_eq!(run.calls, ["a", "a"]);
    assert_eq!(run.slept, [Duration::from_secs(2)]);
    assert_eq!(run.end, End::Delivered(200));
    assert_eq!((run.stats.key_failovers, run.stats.waits), (1, 1));
}

#[test]
fn a_retry_waits_for_an_untried_key_that_frees_within_the_wait() {
    let no_backoff = RetryPolicy {
        backoff: Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
        },
        ..RetryPolicy::default()
    };
    let p = pool(&["a", "b"]);
    rest_key(&p, "b", Duration::from_secs(3), T0);
    let run = drive(&p, post("m"), no_backoff, T0, |key, n| {
        if (key, n) == ("a", 1) {
            status(500)
        } else {
            status(200)
        }
    });
    assert_eq!(run.slept, [Duration::ZERO, Duration::from_secs(3)]);
    assert_eq!(run.calls.len(), 2);
    assert_eq!((run.stats.retries, run.stats.waits), (1, 1));
    assert_eq!(run.end, End::Delivered(200));
}
