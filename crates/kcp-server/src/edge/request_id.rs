//! Request ids: one token that ties a client's request to every log line it caused.
//!
//! The id is the client's own `x-request-id` when it sent a sane one (visible ASCII, at most
//! [`MAX_LEN`] bytes), so a caller can look its request up by the id it already logged; anything
//! else is replaced by a fresh `kcp-` + 16 hex digits, drawn from the per-thread generator of
//! [`crate::clock::with_rng`] (no lock, no syscall). Rejecting odd values keeps control
//! characters, multi-kilobyte blobs and non-ASCII out of logs and response headers.
//!
//! The proxy returns the id in its own header, [`HEADER`] (`x-kcp-request-id`), rather than in
//! `x-request-id`: that name belongs to the provider, whose `x-request-id` (the id OpenAI support
//! asks for) passes through to the client unchanged.
//!
//! [`RequestId::span`] makes the `request{id=...}` span that the service instruments each
//! request future with, so every log line of the request carries the id.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

/// Response header carrying the id back to the client.
pub const HEADER: HeaderName = HeaderName::from_static("x-kcp-request-id");

/// Request header whose value is reused as the id when sane.
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client id that is reused.
pub const MAX_LEN: usize = 128;

/// Prefix of generated ids, so they are told apart from client-chosen ones at a glance.
const PREFIX: &str = "kcp-";

/// A request's id: visible ASCII, 1 to [`MAX_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Box<str>);

impl RequestId {
    /// The client's sane `x-request-id`, else a fresh id.
    pub fn from_headers(headers: &HeaderMap) -> RequestId {
        headers
            .get(CLIENT_HEADER)
            .and_then(RequestId::from_client)
            .unwrap_or_else(RequestId::generate)
    }

    /// The value as an id, if it is sane.
    pub fn from_client(value: &HeaderValue) -> Option<RequestId> {
        let bytes = value.as_bytes();
        if !is_sane(bytes) {
            return None;
        }
        std::str::from_utf8(bytes).ok().map(|s| RequestId(s.into()))
    }

    /// A fresh id: `kcp-` and 16 lowercase hex digits.
    pub fn generate() -> RequestId {
        let n = crate::clock::with_rng(|r| r.next_u64());
        RequestId(format!("{PREFIX}{n:016x}").into_boxed_str())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as the value of [`HEADER`].
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.0).expect("a request id is visible ASCII by construction")
    }

    /// The `request{id=...}` span to instrument the request's future with.
    ///
    /// It is an error-level span so that it stays enabled, and tags the request's lines, under
    /// any filter that lets a line through at all.
    pub fn span(&self) -> tracing::Span {
        tracing::error_span!("request", id = %self.0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.0)
    }
}

/// Whether a client id may be reused: 1 to [`MAX_LEN`] bytes of visible ASCII (`!` to `~`).
pub fn is_sane(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_LEN && value.iter().all(u8::is_ascii_graphic)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn headers(value: &[u8]) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(
            CLIENT_HEADER,
            HeaderValue::from_bytes(value).expect("valid header bytes"),
        );
        map
    }

    fn is_generated(id: &RequestId) -> bool {
        let s = id.as_str();
        s.len() == PREFIX.len() + 16
            && s.starts_with(PREFIX)
            && s[PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    #[test]
    fn a_sane_client_id_is_reused() {
        let id = RequestId::from_headers(&headers(b"req_7f3a-42:abc/DEF"));
        assert_eq!(id.as_str(), "req_7f3a-42:abc/DEF");
        assert_eq!(id.header_value(), "req_7f3a-42:abc/DEF");

        let longest = "x".repeat(MAX_LEN);
        assert_eq!(
            RequestId::from_headers(&headers(longest.as_bytes())).as_str(),
            longest
        );
    }

    #[test]
    fn an_insane_client_id_is_replaced() {
        let too_long = "x".repeat(MAX_LEN + 1);
        for bad in [
            too_long.as_bytes(),
            b"",
            b"has space",
            b"tab\there",
            b"caf\xc3\xa9",
            b"\x80\xff",
        ] {
            let id = RequestId::from_headers(&headers(bad));
            assert!(is_generated(&id), "{bad:?} gave {id:?}");
        }
    }

    #[test]
    fn a_missing_client_id_is_generated() {
        let id = RequestId::from_headers(&HeaderMap::new());
        assert!(is_generated(&id), "{id:?}");
        assert_eq!(id.header_value(), id.as_str());
    }

    #[test]
    fn sanity_rules() {
        assert!(is_sane(b"!~0aZ"));
        assert!(!is_sane(b"a\x00b"));
        assert!(!is_sane(b"a\nb"));
        assert!(!is_sane(b"a\rb"));
        assert!(!is_sane(b"del\x7f"));
        assert!(!is_sane(" lead".as_bytes()));
        assert!(!is_sane("ü".as_bytes()));
    }

    #[test]
    fn generated_ids_are_unique() {
        let ids: HashSet<_> = (0..10_000).map(|_| RequestId::generate()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(is_generated));
    }

    #[test]
    fn generated_ids_are_unique_across_threads() {
        let batches: Vec<Vec<RequestId>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..2_500).map(|_| RequestId::generate()).collect()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        let ids: HashSet<_> = batches.into_iter().flatten().collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn header_names() {
        assert_eq!(HEADER.as_str(), "x-kcp-request-id");
        assert_eq!(CLIENT_HEADER.as_str(), "x-request-id");
    }
}

/// The id in `Debug` output (a request's context derives `Debug`).
#[cfg(test)]
mod debug_tests {
    use http::HeaderValue;

    use super::RequestId;

    #[test]
    fn debug_names_the_id() {
        let id = RequestId::from_client(&HeaderValue::from_static("req-1")).expect("sane");
        assert_eq!(format!("{id:?}"), "RequestId(req-1)");
    }
}
