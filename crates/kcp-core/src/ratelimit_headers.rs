//! Providers' rate-limit answers, parsed leniently: OpenAI's headers (also sent by Azure and
//! Groq), Anthropic's, and Gemini's `retryDelay` in a 429 body.
//!
//! A key that hits a 429 must rest exactly as long as the provider says, and a key close to its
//! limit should be paced before it hits one. Both facts arrive in response headers:
//!
//! - `x-ratelimit-{limit,remaining}-{requests,tokens}`: integers;
//! - `x-ratelimit-reset-{requests,tokens}`: the time until the window refills, written as a Go
//!   `time.Duration` string (`"6m0s"`, `"59.6ms"`, `"1h2m3.5s"`), sometimes as bare seconds;
//! - `retry-after-ms` (OpenAI's, milliseconds) and `Retry-After` (RFC 9110 §10.2.3:
//!   delta-seconds or an HTTP-date);
//! - Anthropic's `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`, whose reset
//!   is the RFC 3339 instant the window refills (`2025-01-01T00:01:30Z`), turned into a delay
//!   from the caller's `unix_now`; they fill the same fields as OpenAI's;
//! - Gemini's 429 `RESOURCE_EXHAUSTED` body, whose `RetryInfo` detail carries a protobuf
//!   duration (`"retryDelay": "30s"`): [`retry_delay_in_body`], used when no header said.
//!
//! Headers are advice, not protocol: a garbage value only leaves its field empty, it never fails
//! the response. Parsing works on the borrowed bytes and never allocates. Huge but well-formed
//! durations are returned as parsed (saturating at `Duration::MAX`); capping them is policy and
//! belongs to the caller.

use std::time::{Duration, UNIX_EPOCH};

const NANOS_PER_SEC: u64 = 1_000_000_000;
const NANOS_PER_MILLI: u64 = 1_000_000;

/// At most this many fractional digits are kept: `10^18` still fits a `u64`, and the longest
/// unit (an hour, 3.6e12 ns) needs only 13 of them to be exact to the nanosecond.
const MAX_FRACTION_DIGITS: usize = 18;

/// The units of a Go duration string, in nanoseconds.
const UNITS: [(&str, u64); 8] = [
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", NANOS_PER_MILLI),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ns", 1),
];

/// The rate-limit facts found in one upstream response; `None` where a header was absent or
/// unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimitHeaders {
    /// `x-ratelimit-limit-requests`: requests allowed per window.
    pub limit_requests: Option<u64>,
    /// `x-ratelimit-remaining-requests`: requests left in the current window.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-reset-requests`: time until the request window refills.
    pub reset_requests: Option<Duration>,
    /// `x-ratelimit-limit-tokens`: tokens allowed per window.
    pub limit_tokens: Option<u64>,
    /// `x-ratelimit-remaining-tokens`: tokens left in the current window.
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-reset-tokens`: time until the token window refills.
    pub reset_tokens: Option<Duration>,
    /// `retry-after-ms` if readable (it is the more precise), else `retry-after`.
    pub retry_after: Option<Duration>,
}

/// The headers this module reads.
#[derive(Clone, Copy)]
enum Header {
    LimitRequests,
    LimitTokens,
    RemainingRequests,
    RemainingTokens,
    ResetRequests,
    ResetTokens,
    RetryAfter,
    RetryAfterMs,
    ResetRequestsAt,
    ResetTokensAt,
}

const HEADERS: [(&str, Header); 14] = [
    ("x-ratelimit-limit-requests", Header::LimitRequests),
    ("x-ratelimit-limit-tokens", Header::LimitTokens),
    ("x-ratelimit-remaining-requests", Header::RemainingRequests),
    ("x-ratelimit-remaining-tokens", Header::RemainingTokens),
    ("x-ratelimit-reset-requests", Header::ResetRequests),
    ("x-ratelimit-reset-tokens", Header::ResetTokens),
    ("retry-after", Header::RetryAfter),
    ("retry-after-ms", Header::RetryAfterMs),
    ("anthropic-ratelimit-requests-limit", Header::LimitRequests),
    (
        "anthropic-ratelimit-requests-remaining",
        Header::RemainingRequests,
    ),
    (
        "anthropic-ratelimit-requests-reset",
        Header::ResetRequestsAt,
    ),
    ("anthropic-ratelimit-tokens-limit", Header::LimitTokens),
    (
        "anthropic-ratelimit-tokens-remaining",
        Header::RemainingTokens,
    ),
    ("anthropic-ratelimit-tokens-reset", Header::ResetTokensAt),
];

impl RateLimitHeaders {
    /// Reads the rate-limit headers among `headers`, (name, raw value) pairs such as the entries
    /// of an `http::HeaderMap`. Names are matched ignoring ASCII case; other headers are ignored.
    /// When a header repeats, its first readable value wins. `unix_now` (time since the Unix
    /// epoch) turns an HTTP-date `Retry-After` into a delay.
    pub fn parse<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        unix_now: Duration,
    ) -> RateLimitHeaders {
        let mut out = RateLimitHeaders::default();
        let mut retry_after_ms = None;
        let mut retry_after = None;
        for (name, raw) in headers {
            let Some(header) = header_named(name) else {
                continue;
            };
            let Ok(value) = std::str::from_utf8(raw) else {
                continue;
            };
            match header {
                Header::LimitRequests => first(&mut out.limit_requests, parse_count(value)),
                Header::LimitTokens => first(&mut out.limit_tokens, parse_count(value)),
                Header::RemainingRequests => {
                    first(&mut out.remaining_requests, parse_count(value));
                }
                Header::RemainingTokens => first(&mut out.remaining_tokens, parse_count(value)),
                Header::ResetRequests => first(&mut out.reset_requests, parse_reset(value)),
                Header::ResetTokens => first(&mut out.reset_tokens, parse_reset(value)),
                Header::RetryAfter => first(&mut retry_after, parse_retry_after(value, unix_now)),
                Header::RetryAfterMs => first(&mut retry_after_ms, parse_retry_after_ms(value)),
                Header::ResetRequestsAt => {
                    first(&mut out.reset_requests, parse_reset_at(value, unix_now));
                }
                Header::ResetTokensAt => {
                    first(&mut out.reset_tokens, parse_reset_at(value, unix_now));
                }
            }
        }
        out.retry_after = retry_after_ms.or(retry_after);
        out
    }

    /// Whether no rate-limit header was found.
    pub fn is_empty(&self) -> bool {
        *self == RateLimitHeaders::default()
    }
}

/// OpenAI's reset durations: a Go duration string (`"1s"`, `"6m0s"`, `"59.6ms"`, `"1h2m3.5s"`,
/// `"0s"`) or a bare number of seconds (`"3"`, `"0.5"`). Units must appear largest first and at
/// most once each; anything else (`"5m5m"`, `"1x"`, `"-1s"`, `""`) is `None`.
pub fn parse_reset(value: &str) -> Option<Duration> {
    let value = value.trim();
    match Decimal::parse(value) {
        Some(seconds) => Some(duration_from_nanos(seconds.nanos(NANOS_PER_SEC))),
        None => parse_go_duration(value),
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delta-seconds (`"30"`, leniently `"1.5"`) or an HTTP-date,
/// turned into a delay from `unix_now`. A date in the past is a delay of zero.
pub fn parse_retry_after(value: &str, unix_now: Duration) -> Option<Duration> {
    let value = value.trim();
    if let Some(seconds) = Decimal::parse(value) {
        return Some(duration_from_nanos(seconds.nanos(NANOS_PER_SEC)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    let since_epoch = date.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Some(since_epoch.saturating_sub(unix_now))
}

/// `retry-after-ms`: milliseconds, possibly fractional (`"1500"`, `"20.5"`).
pub fn parse_retry_after_ms(value: &str) -> Option<Duration> {
    let millis = Decimal::parse(value.trim())?;
    Some(duration_from_nanos(millis.nanos(NANOS_PER_MILLI)))
}

/// Anthropic's reset: an RFC 3339 instant, as a delay from `unix_now` (zero once past).
pub fn parse_reset_at(value: &str, unix_now: Duration) -> Option<Duration> {
    Some(parse_rfc3339(value.trim())?.saturating_sub(unix_now))
}

/// Gemini's delay in a 429 `RESOURCE_EXHAUSTED` error body: the `retryDelay` of its
/// `google.rpc.RetryInfo` detail, a protobuf duration (`"30s"`, `"1.5s"`). `None` for any other
/// body. Scans the bytes rather than parsing JSON: the body is small, its shape varies (Gemini's
/// OpenAI endpoint wraps the error in an array) and kcp-core holds no JSON parser.
pub fn retry_delay_in_body(body: &[u8]) -> Option<Duration> {
    let body = std::str::from_utf8(body).ok()?;
    if !body.contains("RESOURCE_EXHAUSTED") {
        return None;
    }
    let (_, after) = body.split_once("\"retryDelay\"")?;
    let value = after.trim_start().strip_prefix(':')?.trim_start();
    let (delay, _) = value.strip_prefix('"')?.split_once('"')?;
    let seconds = delay.trim().strip_suffix('s')?;
    Some(duration_from_nanos(
        Decimal::parse(seconds)?.nanos(NANOS_PER_SEC),
    ))
}

/// An RFC 3339 date-time (`2025-01-01T00:01:30Z`, `...30.25+02:00`) as time since the Unix
/// epoch; before the epoch, or not a valid date-time, is `None`.
fn parse_rfc3339(value: &str) -> Option<Duration> {
    let b = value.as_bytes();
    let number = |range: std::ops::Range<usize>| number_in(value.get(range)?);
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if b.len() < 20
        || separators.iter().any(|&(i, c)| b[i] != c)
        || !matches!(b[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &value[19..];
    let mut nanos = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let end = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        // Digits past the nanosecond are dropped; at most 9 are kept, so they fit a u32.
        let kept = fraction.get(..end.min(9)).filter(|d| !d.is_empty())?;
        nanos = kept.parse::<u32>().ok()? * 10u32.pow(9 - kept.len() as u32);
        rest = &fraction[end..];
    }
    let offset: i64 = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (hours, minutes) = (number_in(&rest[1..3])?, number_in(&rest[4..6])?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let seconds = (hours * 3600 + minutes * 60) as i64;
            if *sign == b'+' { seconds } else { -seconds }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let local = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    let utc = u64::try_from(local - offset).ok()?;
    Some(Duration::new(utc, nanos))
}

fn number_in(digits: &str) -> Option<u64> {
    is_digits(digits).then(|| digits.parse().ok()).flatten()
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `days_from_civil`,
/// chrono-compatible date algorithms).
fn days_from_civil(year: u64, month: u64, day: u64) -> i64 {
    let year = year as i64 - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month as i64 + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day as i64 - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Stores `value` in `slot` unless the slot already holds one.
fn first<T>(slot: &mut Option<T>, value: Option<T>) {
    if slot.is_none() {
        *slot = value;
    }
}

fn header_named(name: &str) -> Option<Header> {
    HEADERS
        .iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(name))
        .map(|&(_, header)| header)
}

/// A plain non-negative integer such as `"9999"`.
fn parse_count(value: &str) -> Option<u64> {
    let value = value.trim();
    if is_digits(value) {
        value.parse().ok()
    } else {
        None
    }
}

/// A sequence of `<decimal><unit>` parts with strictly decreasing units.
fn parse_go_duration(mut rest: &str) -> Option<Duration> {
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    let mut previous_unit = u64::MAX;
    while !rest.is_empty() {
        let (numeral, after_numeral) = split_numeral(rest);
        let amount = Decimal::parse(numeral)?;
        let (unit, after_unit) = split_unit(after_numeral);
        let unit = unit_nanos(unit)?;
        if unit >= previous_unit {
            return None;
        }
        previous_unit = unit;
        total = total.saturating_add(amount.nanos(unit));
        rest = after_unit;
    }
    Some(duration_from_nanos(total))
}

fn is_numeral_char(c: char) -> bool {
    c.is_ascii_digit() || c == '.'
}

fn split_numeral(s: &str) -> (&str, &str) {
    s.split_at(s.find(|c| !is_numeral_char(c)).unwrap_or(s.len()))
}

fn split_unit(s: &str) -> (&str, &str) {
    s.split_at(s.find(is_numeral_char).unwrap_or(s.len()))
}

fn unit_nanos(unit: &str) -> Option<u64> {
    UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|&(_, nanos)| nanos)
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Converts nanoseconds to a `Duration`, saturating at `Duration::MAX`.
fn duration_from_nanos(nanos: u128) -> Duration {
    let per_sec = u128::from(NANOS_PER_SEC);
    match u64::try_from(nanos / per_sec) {
        // The remainder is below 1e9, so it fits a u32.
        Ok(secs) => Duration::new(secs, (nanos % per_sec) as u32),
        Err(_) => Duration::MAX,
    }
}

/// A non-negative decimal numeral: `int + fraction / scale`.
struct Decimal {
    int: u64,
    fraction: u64,
    scale: u64,
}

impl Decimal {
    /// Parses a whole string of digits with at most one `.` and at least one digit (`"3"`,
    /// `"0.5"`, `".5"`, `"5."`). Signs, exponents and integer parts over `u64::MAX` are `None`;
    /// fractional digits past the 18th are dropped.
    fn parse(s: &str) -> Option<Decimal> {
        let (int, fraction) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() && fraction.is_empty() {
            return None;
        }
        let int = match int {
            "" => 0,
            digits if is_digits(digits) => digits.parse().ok()?,
            _ => return None,
        };
        if !fraction.is_empty() && !is_digits(fraction) {
            return None;
        }
        let kept = fraction.get(..MAX_FRACTION_DIGITS).unwrap_or(fraction);
        Some(Decimal {
            int,
            fraction: kept.parse().unwrap_or(0),
            // `kept` has at most 18 digits, so the power fits a u64.
            scale: 10u64.pow(kept.len() as u32),
        })
    }

    /// This amount of a unit `unit_nanos` nanoseconds long, in nanoseconds (truncated).
    fn nanos(&self, unit_nanos: u64) -> u128 {
        let unit = u128::from(unit_nanos);
        u128::from(self.int) * unit + u128::from(self.fraction) * unit / u128::from(self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    const fn us(micros: u64) -> Duration {
        Duration::from_micros(micros)
    }

    #[test]
    fn reset_formats() {
        let cases = [
            ("1s", Duration::from_secs(1)),
            ("0s", Duration::ZERO),
            ("20ms", ms(20)),
            ("59.6ms", us(59_600)),
            ("6m0s", Duration::from_secs(360)),
            ("2m59.56s", ms(179_560)),
            ("1h2m3.5s", ms(3_723_500)),
            ("1h", Duration::from_secs(3600)),
            ("1.5h", Duration::from_secs(5400)),
            ("7m12s", Duration::from_secs(432)),
            ("250us", us(250)),
            ("250\u{b5}s", us(250)),
            ("250\u{3bc}s", us(250)),
            ("17ns", Duration::from_nanos(17)),
            ("1s500ms", ms(1500)),
            ("3", Duration::from_secs(3)),
            ("0.5", ms(500)),
            (".5", ms(500)),
            ("5.", Duration::from_secs(5)),
            (" 6ms ", ms(6)),
            ("0.0000000001s", Duration::ZERO),
            ("1.0000000001s", Duration::from_secs(1)),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_reset(value), Some(expected), "{value:?}");
        }
    }

    #[test]
    fn reset_garbage_is_none() {
        let cases = [
            "",
            " ",
            ".",
            "abc",
            "1x",
            "5m5m",
            "1s1m",
            "1us1\u{b5}s",
            "-1s",
            "+1s",
            "-3",
            "+3",
            "1e3",
            "NaN",
            "inf",
            "1h3",
            "s",
            "ms",
            "1..5s",
            "1.2.3s",
            "1 s",
            "1m 30s",
            "1S",
            "99999999999999999999s",
            "99999999999999999999",
        ];
        for value in cases {
            assert_eq!(parse_reset(value), None, "{value:?}");
        }
    }

    #[test]
    fn huge_durations_saturate() {
        let max_int = u64::MAX.to_string();
        assert_eq!(parse_reset(&format!("{max_int}h")), Some(Duration::MAX));
        assert_eq!(
            parse_reset(&format!("{max_int}s")),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after_ms(&max_int),
            Some(Duration::from_millis(u64::MAX))
        );
    }

    #[test]
    fn retry_after_ms_formats() {
        assert_eq!(parse_retry_after_ms("1500"), Some(ms(1500)));
        assert_eq!(parse_retry_after_ms("20.5"), Some(us(20_500)));
        assert_eq!(parse_retry_after_ms("0"), Some(Duration::ZERO));
        for garbage in ["", "-5", "abc", "1.5s", "NaN", "1e3"] {
            assert_eq!(parse_retry_after_ms(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn retry_after_formats() {
        let now = Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("1.5", now), Some(ms(1500)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:42 GMT", now),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for garbage in ["", "-1", "soon", "30s", "Wed, 32 Oct 2015 07:28:00 GMT"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count("9999"), Some(9999));
        assert_eq!(parse_count(" 0 "), Some(0));
        for garbage in ["", "-1", "+1", "1.5", "abc", "18446744073709551616"] {
            assert_eq!(parse_count(garbage), None, "{garbage:?}");
        }
    }

    fn parse(headers: &[(&'static str, &'static [u8])]) -> RateLimitHeaders {
        RateLimitHeaders::parse(headers.iter().copied(), Duration::ZERO)
    }

    #[test]
    fn parses_a_realistic_openai_response() {
        let headers = parse(&[
            ("date", b"Tue, 03 Jun 2025 10:00:00 GMT"),
            ("content-type", b"application/json"),
            ("openai-organization", b"org-redacted"),
            ("openai-processing-ms", b"512"),
            ("x-ratelimit-limit-requests", b"10000"),
            ("x-ratelimit-limit-tokens", b"2000000"),
            ("x-ratelimit-remaining-requests", b"9999"),
            ("x-ratelimit-remaining-tokens", b"1999985"),
            ("x-ratelimit-reset-requests", b"6ms"),
            ("x-ratelimit-reset-tokens", b"0s"),
            ("x-request-id", b"req_123"),
        ]);
        assert_eq!(
            headers,
            RateLimitHeaders {
                limit_requests: Some(10_000),
                remaining_requests: Some(9_999),
                reset_requests: Some(ms(6)),
                limit_tokens: Some(2_000_000),
                remaining_tokens: Some(1_999_985),
                reset_tokens: Some(Duration::ZERO),
                retry_after: None,
            }
        );
        assert!(!headers.is_empty());
    }

    #[test]
    fn parses_a_429() {
        let headers = parse(&[
            ("retry-after", b"20"),
            ("x-ratelimit-remaining-requests", b"0"),
            ("x-ratelimit-reset-requests", b"2m59.56s"),
            ("retry-after-ms", b"19876.5"),
        ]);
        assert_eq!(headers.retry_after, Some(us(19_876_500)));
        assert_eq!(headers.remaining_requests, Some(0));
        assert_eq!(headers.reset_requests, Some(ms(179_560)));
    }

    #[test]
    fn retry_after_is_the_fallback_for_a_bad_retry_after_ms() {
        let headers = parse(&[("retry-after-ms", b"soon"), ("retry-after", b"3")]);
        assert_eq!(headers.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn http_date_retry_after_is_relative_to_now() {
        let now = Duration::from_secs(1_700_000_000);
        let date = httpdate::fmt_http_date(UNIX_EPOCH + now + Duration::from_secs(90));
        let headers = RateLimitHeaders::parse([("retry-after", date.as_bytes())], now);
        assert_eq!(headers.retry_after, Some(Duration::from_secs(90)));
    }

    #[test]
    fn garbage_never_fails_the_rest() {
        let headers = parse(&[
            ("x-ratelimit-limit-requests", b"\xff\xfe"),
            ("x-ratelimit-limit-tokens", b"-5"),
            ("x-ratelimit-remaining-requests", b"NaN"),
            ("x-ratelimit-remaining-tokens", b""),
            ("x-ratelimit-reset-requests", b"5m5m"),
            ("x-ratelimit-reset-tokens", b"1x"),
            ("retry-after", b"\xc3\x28"),
            ("retry-after-ms", b"abc"),
            ("X-RateLimit-Limit-Requests", b"60"),
        ]);
        assert_eq!(
            headers,
            RateLimitHeaders {
                limit_requests: Some(60),
                ..RateLimitHeaders::default()
            }
        );
    }

    #[test]
    fn first_readable_value_wins() {
        let headers = parse(&[
            ("x-ratelimit-remaining-tokens", b"oops"),
            ("x-ratelimit-remaining-tokens", b"10"),
            ("x-ratelimit-remaining-tokens", b"20"),
        ]);
        assert_eq!(headers.remaining_tokens, Some(10));
    }

    #[test]
    fn no_rate_limit_headers_is_empty() {
        assert!(parse(&[]).is_empty());
        assert!(parse(&[("content-type", b"text/plain"), ("retry-after-msx", b"1")]).is_empty());
    }

    #[test]
    fn a_date_at_the_epoch_means_now() {
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn anthropic_headers_fill_the_same_fields() {
        let now = Duration::from_secs(1_735_689_600);
        let headers = RateLimitHeaders::parse(
            [
                ("anthropic-ratelimit-requests-limit", &b"50"[..]),
                ("anthropic-ratelimit-requests-remaining", b"49"),
                (
                    "anthropic-ratelimit-requests-reset",
                    b"2025-01-01T00:01:30Z",
                ),
                ("Anthropic-RateLimit-Tokens-Limit", b"40000"),
                ("anthropic-ratelimit-tokens-remaining", b"39000"),
                (
                    "anthropic-ratelimit-tokens-reset",
                    b"2025-01-01T02:00:00.25+02:00",
                ),
                ("retry-after", b"7"),
            ],
            now,
        );
        assert_eq!(
            headers,
            RateLimitHeaders {
                limit_requests: Some(50),
                remaining_requests: Some(49),
                reset_requests: Some(Duration::from_secs(90)),
                limit_tokens: Some(40_000),
                remaining_tokens: Some(39_000),
                reset_tokens: Some(ms(250)),
                retry_after: Some(Duration::from_secs(7)),
            }
        );
    }

    #[test]
    fn rfc3339_instants_and_near_misses() {
        let at = |value: &str| parse_reset_at(value, Duration::ZERO);
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(
            at("2024-02-29T12:00:00.5+02:00"),
            Some(Duration::new(1_709_200_800, 500_000_000))
        );
        assert_eq!(
            at("2025-01-01t00:01:30.123456789123z"),
            Some(Duration::new(1_735_689_690, 123_456_789)),
            "digits past the nanosecond are dropped"
        );
        assert_eq!(
            parse_reset_at("2025-01-01T00:01:30Z", Duration::from_secs(1_800_000_000)),
            Some(Duration::ZERO),
            "a past instant means now"
        );
        for bad in [
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+0200",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:00:00+00:01",
            "2024-1-01T00:00:00Z",
            "30s",
            "",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
    }

    #[test]
    fn gemini_retry_delay_comes_from_a_resource_exhausted_body() {
        let body = br#"[{"error": {"code": 429, "message": "You exceeded your current quota.",
            "status": "RESOURCE_EXHAUSTED", "details": [
              {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
              {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}]"#;
        assert_eq!(retry_delay_in_body(body), Some(Duration::from_secs(30)));
        assert_eq!(
            retry_delay_in_body(
                br#"{"error":{"status":"RESOURCE_EXHAUSTED","details":[{"retryDelay" : "1.5s"}]}}"#
            ),
            Some(ms(1_500))
        );
        for other in [
            &br#"{"error":{"status":"RESOURCE_EXHAUSTED"}}"#[..],
            br#"{"error":{"status":"UNAVAILABLE","details":[{"retryDelay":"30s"}]}}"#,
            br#"{"error":{"status":"RESOURCE_EXHAUSTED","details":[{"retryDelay":"30"}]}}"#,
            br#"{"error":{"status":"RESOURCE_EXHAUSTED","details":[{"retryDelay":30}]}}"#,
            b"\xff RESOURCE_EXHAUSTED",
        ] {
            assert_eq!(
                retry_delay_in_body(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    /// The date-time of `secs` since the epoch, `offset_minutes` east of UTC, in RFC 3339 with
    /// nine fractional digits (Hinnant's `civil_from_days`, the inverse of the parser's).
    fn rfc3339(secs: u64, nanos: u32, offset_minutes: i64) -> String {
        let local = secs as i64 + offset_minutes * 60;
        let (days, time) = (local.div_euclid(86_400), local.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let zone = match offset_minutes {
            0 => "Z".to_owned(),
            m => format!(
                "{}{:02}:{:02}",
                if m > 0 { '+' } else { '-' },
                m.abs() / 60,
                m.abs() % 60
            ),
        };
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}{zone}",
            time / 3600,
            time % 3600 / 60,
            time % 60
        )
    }

    /// Formats `nanos` of seconds like Go: integer part, then the fraction without trailing zeros.
    fn go_seconds(secs: u64, nanos: u32) -> String {
        if nanos == 0 {
            return secs.to_string();
        }
        let fraction = format!("{nanos:09}");
        format!("{secs}.{}", fraction.trim_end_matches('0'))
    }

    proptest! {
        #[test]
        fn parse_reset_never_panics(value in "\\PC*") {
            let _ = parse_reset(&value);
            let _ = parse_retry_after_ms(&value);
            let _ = parse_retry_after(&value, Duration::from_secs(1_700_000_000));
        }

        #[test]
        fn rfc3339_instants_round_trip(
            secs in 86_400u64..4_102_444_800,
            nanos in 0u32..1_000_000_000,
            offset_minutes in -1_439i64..=1_439,
            now in 0u64..4_102_444_800,
        ) {
            let text = rfc3339(secs, nanos, offset_minutes);
            let instant = Duration::new(secs, nanos);
            prop_assert_eq!(parse_reset_at(&text, Duration::ZERO), Some(instant), "{}", text);
            let now = Duration::from_secs(now);
            prop_assert_eq!(
                parse_reset_at(&text, now),
                Some(instant.saturating_sub(now)),
                "{}", text
            );
        }

        #[test]
        fn dialect_parsers_never_panic(value in "\\PC*", bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_reset_at(&value, Duration::from_secs(1_700_000_000));
            let _ = retry_delay_in_body(value.as_bytes());
            let _ = retry_delay_in_body(&bytes);
        }

        #[test]
        fn near_miss_instants_never_panic(value in "[0-9tTzZ:+. -]{0,32}") {
            let _ = parse_reset_at(&value, Duration::ZERO);
        }

        #[test]
        fn gemini_delays_round_trip(secs in 0u64..100_000, millis in prop::option::of(0u64..1_000)) {
            let (delay, expected) = match millis {
                Some(m) => (format!("{secs}.{m:03}s"), Duration::from_secs(secs) + ms(m)),
                None => (format!("{secs}s"), Duration::from_secs(secs)),
            };
            let body = format!(
                r#"{{"error":{{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay}"}}]}}}}"#
            );
            prop_assert_eq!(retry_delay_in_body(body.as_bytes()), Some(expected));
        }

        #[test]
        fn parse_reset_never_panics_on_near_misses(value in "[0-9.hmsuµn ]{0,24}") {
            let _ = parse_reset(&value);
        }

        #[test]
        fn go_durations_round_trip(
            hours in prop::option::of(0u64..1_000),
            minutes in prop::option::of(0u64..60),
            seconds in prop::option::of((0u64..60, 0u32..1_000_000_000)),
        ) {
            prop_assume!(hours.is_some() || minutes.is_some() || seconds.is_some());
            let mut text = String::new();
            let mut expected = Duration::ZERO;
            if let Some(h) = hours {
                text.push_str(&format!("{h}h"));
                expected += Duration::from_secs(h * 3600);
            }
            if let Some(m) = minutes {
                text.push_str(&format!("{m}m"));
                expected += Duration::from_secs(m * 60);
            }
            if let Some((s, nanos)) = seconds {
                text.push_str(&go_seconds(s, nanos));
                text.push('s');
                expected += Duration::new(s, nanos);
            }
            let parsed = parse_reset(&text);
            prop_assert!(parsed.is_some(), "{:?} did not parse", text);
            let parsed = parsed.unwrap_or_default();
            prop_assert!(parsed.abs_diff(expected) <= us(1), "{:?}: {:?} != {:?}", text, parsed, expected);
        }

        #[test]
        fn milliseconds_round_trip(millis in 0u64..1_000_000, tenths in prop::option::of(0u64..10)) {
            let (text, expected) = match tenths {
                Some(t) => (format!("{millis}.{t}ms"), ms(millis) + us(t * 100)),
                None => (format!("{millis}ms"), ms(millis)),
            };
            let parsed = parse_reset(&text);
            prop_assert!(parsed.is_some(), "{:?} did not parse", text);
            prop_assert!(parsed.unwrap_or_default().abs_diff(expected) <= us(1), "{:?}", text);
        }
    }
}
