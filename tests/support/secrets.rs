//! The leak tests' tools: distinctive secrets and the checks that none reached a place it
//! must never reach (logs, metrics, `/health`, admin answers, client bytes, error texts).

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};

use super::proxy_harness::Reply;

/// A distinctive secret: `prefix-SECRET-tag-<16 random hex digits>`, so that a substring check
/// for it is meaningful.
pub fn secret(prefix: &str, tag: &str) -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write(tag.as_bytes());
    format!("{prefix}-SECRET-{tag}-{:016x}", hasher.finish())
}

/// Fails with the offending line if any of `secrets` is in `text`.
pub fn assert_absent(place: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        if let Some(at) = text.find(secret.as_str()) {
            let from = text[..at].rfind('\n').map_or(0, |n| n + 1);
            let to = text[at..].find('\n').map_or(text.len(), |n| at + n);
            panic!("{place} leak {secret:?}:\n{}", &text[from..to]);
        }
    }
}

/// Appends `reply` (status, headers, body) to `into`.
pub fn record(into: &mut String, reply: &Reply) {
    let _ = writeln!(
        into,
        "{} {:?}\n{}",
        reply.status,
        reply.headers,
        String::from_utf8_lossy(&reply.body)
    );
}

/// An error and its sources, as `main` prints them.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = format!("{error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause} / {cause:?}");
        source = cause.source();
    }
    text
}
