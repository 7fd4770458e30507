//! Client authentication: who may spend the key pool.
//!
//! Without `[auth] client_keys` anyone who can reach the listener spends the pool's quota, so
//! the proxy can require one of a set of proxy-issued tokens on every `/v1` request. Clients
//! send it where their SDK already puts an API key: `Authorization: Bearer <token>` (OpenAI
//! SDKs) or `api-key: <token>` (Azure OpenAI SDKs). The token is compared in constant time
//! against *every* configured key with no early exit (`subtle::ConstantTimeEq`), so response
//! timing reveals neither which key was close nor how many keys are configured. A rejected
//! request gets OpenAI's 401 shape and never reaches an upstream; an accepted token is never
//! forwarded or logged (the service replaces `Authorization` with the pool key's own).

use std::fmt;
use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, header};
use kcp_core::Secret;
use subtle::{Choice, ConstantTimeEq};

use crate::edge::openai_error::OpenAiError;

/// The header Azure OpenAI SDKs put the API key in.
pub const API_KEY_HEADER: &str = "api-key";

/// The accepted client tokens. An empty set means the proxy is open.
#[derive(Clone, Default)]
pub struct ClientAuth {
    keys: Vec<Secret>,
}

impl ClientAuth {
    /// Accepts the given tokens; with none, every request is let through.
    pub fn new(keys: Vec<Secret>) -> Self {
        Self { keys }
    }

    /// Whether requests must present a token.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Lets the request through when auth is off or it carries a configured token in
    /// `Authorization: Bearer …` or `api-key: …`; otherwise the 401 to answer with.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), OpenAiError> {
        if !self.is_enabled() {
            return Ok(());
        }
        let mut accepted = Choice::from(0);
        for token in presented(headers) {
            accepted |= matches_any(&self.keys, token);
        }
        if bool::from(accepted) {
            Ok(())
        } else {
            Err(OpenAiError::client_unauthorized())
        }
    }
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("client_keys", &self.keys.len())
            .finish()
    }
}

/// The startup warning for an open proxy on a non-loopback address, if that is the case.
pub fn warn_if_open(bind: SocketAddr, auth: &ClientAuth) -> Option<String> {
    let loopback = bind.ip().to_canonical().is_loopback();
    (!auth.is_enabled() && !loopback).then(|| {
        format!("anyone who can reach {bind} can spend the key pool: set [auth] client_keys")
    })
}

/// Every token the request presents: bearer tokens from `Authorization` and `api-key` values.
fn presented(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(bearer_token);
    let api_key = headers
        .get_all(API_KEY_HEADER)
        .iter()
        .map(|value| value.as_bytes().trim_ascii());
    bearer.chain(api_key)
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive, RFC 9110
/// §11.1); `None` for other schemes or a missing token.
pub(crate) fn bearer_token(value: &HeaderValue) -> Option<&[u8]> {
    let value = value.as_bytes().trim_ascii();
    let split = value.iter().position(|b| *b == b' ')?;
    let (scheme, token) = value.split_at(split);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

/// Whether `token` equals one of `keys`, comparing against all of them without early exit.
///
/// `ct_eq` on slices of different lengths returns false at once, which reveals only that
/// lengths differ; the loop itself always visits every key. An empty token never matches,
/// so an empty configured key cannot open the proxy.
pub(crate) fn matches_any(keys: &[Secret], token: &[u8]) -> Choice {
    let mut found = Choice::from(0);
    for key in keys {
        found |= key.expose().as_bytes().ct_eq(token);
    }
    found & Choice::from(u8::from(!token.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "kcp-client-5f0c2a9e";
    const OTHER: &str = "kcp-client-other-77";

    fn auth() -> ClientAuth {
        ClientAuth::new(vec![Secret::new(OTHER), Secret::new(KEY)])
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("valid header"));
        }
        map
    }

    fn accepts(pairs: &[(&'static str, &str)]) -> bool {
        auth().check(&headers(pairs)).is_ok()
    }

    #[test]
    fn accepts_a_bearer_token() {
        assert!(accepts(&[("authorization", &format!("Bearer {KEY}"))]));
        assert!(accepts(&[("authorization", &format!("bearer  {OTHER} "))]));
    }

    #[test]
    fn accepts_an_api_key_header() {
        assert!(accepts(&[("api-key", KEY)]));
    }

    #[test]
    fn accepts_when_any_presented_token_matches() {
        assert!(accepts(&[
            ("authorization", "Bearer sk-upstream-key"),
            ("api-key", KEY),
        ]));
    }

    #[test]
    fn rejects_wrong_and_missing_tokens() {
        assert!(!accepts(&[("authorization", "Bearer kcp-client-wrong")]));
        assert!(!accepts(&[("api-key", "kcp-client-wrong")]));
        assert!(!accepts(&[]));
        assert!(!accepts(&[("x-api-key", KEY)]));
    }

    #[test]
    fn rejects_bearer_without_token_and_other_schemes() {
        assert!(!accepts(&[("authorization", "Bearer")]));
        assert!(!accepts(&[("authorization", "Bearer   ")]));
        assert!(!accepts(&[("authorization", KEY)]));
        assert!(!accepts(&[("authorization", &format!("Basic {KEY}"))]));
        assert!(!accepts(&[("api-key", "")]));
    }

    #[test]
    fn rejects_a_prefix_or_an_extension_of_a_key() {
        assert!(!accepts(&[(
            "authorization",
            &format!("Bearer {}", &KEY[..KEY.len() - 1])
        )]));
        assert!(!accepts(&[("authorization", &format!("Bearer {KEY}x"))]));
        assert!(!accepts(&[("api-key", &format!("{KEY}0"))]));
    }

    #[test]
    fn the_rejection_is_openai_shaped_401() {
        let err = auth().check(&HeaderMap::new()).expect_err("no token");
        assert_eq!(err.status, http::StatusCode::UNAUTHORIZED);
        assert_eq!(err.code, "invalid_api_key");
        assert!(!err.message.contains(KEY));
    }

    #[test]
    fn open_when_no_keys_are_configured() {
        let open = ClientAuth::new(Vec::new());
        assert!(!open.is_enabled());
        assert!(open.check(&HeaderMap::new()).is_ok());
        assert!(auth().is_enabled());
    }

    #[test]
    fn an_empty_configured_key_opens_nothing() {
        let auth = ClientAuth::new(vec![Secret::new("")]);
        assert!(auth.check(&headers(&[("api-key", "")])).is_err());
        assert!(
            auth.check(&headers(&[("authorization", "Bearer ")]))
                .is_err()
        );
    }

    #[test]
    fn debug_shows_no_key() {
        let shown = format!("{:?}", auth());
        assert!(!shown.contains("kcp-client"), "{shown}");
        assert!(shown.contains('2'), "{shown}");
    }

    #[test]
    fn warns_only_for_an_open_non_loopback_bind() {
        let open = ClientAuth::new(Vec::new());
        let any: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let warning = warn_if_open(any, &open).expect("open on every interface");
        assert_eq!(
            warning,
            "anyone who can reach 0.0.0.0:8080 can spend the key pool: set [auth] client_keys"
        );
        for local in ["127.0.0.1:8080", "[::1]:8080", "[::ffff:127.0.0.1]:8080"] {
            let local: SocketAddr = local.parse().expect("addr");
            assert_eq!(warn_if_open(local, &open), None, "{local}");
        }
        let public: SocketAddr = "[::]:8080".parse().expect("addr");
        assert!(warn_if_open(public, &open).is_some());
        assert_eq!(warn_if_open(any, &auth()), None);
    }
}
