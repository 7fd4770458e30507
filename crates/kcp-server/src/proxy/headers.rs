//! Header rewriting between the client and the upstream.
//!
//! A reverse proxy forwards end-to-end headers and consumes hop-by-hop ones (RFC 9110 §7.6.1:
//! `Connection` and every header it lists, plus the classic set `Keep-Alive`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade`, `Proxy-*`). On the way up kcp also removes what would
//! identify or authenticate the client to the provider (`Authorization`, `api-key`,
//! `Forwarded`, `X-Forwarded-*`) and `Host`, and then authenticates as the pool key. The
//! original kcp forwarded the client's `Authorization` and `Host`, overriding the pool key;
//! here the client's credentials never leave the proxy.
//!
//! `OpenAI-Organization` and `OpenAI-Project` choose which organization and project a key's
//! request is billed to, and throttle groups are keyed by the configured organization: they
//! come from the key's config only, never from the client. On the way down the provider's
//! `OpenAI-Organization` and `OpenAI-Project` are removed, since they name the pool key's
//! account.
//!
//! The client's header map is edited in place (no new map), once per request; each attempt
//! clones it and adds its key's headers.

use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, FORWARDED, HOST, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use kcp_core::{KeyKind, KeySpec, Secret};

/// `OpenAI-Organization`, sent when the key's config names one.
pub const OPENAI_ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
/// `OpenAI-Project`, sent when the key's config names one.
pub const OPENAI_PROJECT: HeaderName = HeaderName::from_static("openai-project");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Hop-by-hop headers that never cross the proxy, in either direction.
const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    KEEP_ALIVE,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// End-to-end headers of the client that the upstream must not see. `Content-Length` is
/// recomputed from the buffered body and `Expect` was already answered by the proxy; the
/// organization and project are the key's.
const CLIENT_ONLY: [HeaderName; 8] = [
    AUTHORIZATION,
    API_KEY,
    FORWARDED,
    HOST,
    CONTENT_LENGTH,
    EXPECT,
    OPENAI_ORGANIZATION,
    OPENAI_PROJECT,
];

/// Headers of the provider that name the pool key's account.
const UPSTREAM_ONLY: [HeaderName; 2] = [OPENAI_ORGANIZATION, OPENAI_PROJECT];

/// Turns a client's request headers into what every attempt sends: removes everything the
/// upstream must not receive and asks for an uncompressed answer.
pub fn rewrite_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in CLIENT_ONLY {
        headers.remove(name);
    }
    remove_prefixed(headers, "x-forwarded-");
    // The proxy reads error bodies (a 429's code tells a quota from a rate limit), which it
    // cannot do when they are compressed; and an LLM answer's time goes into generating
    // it, not into moving its bytes, so compression would save little.
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
}

/// Removes hop-by-hop headers and the pool key's account from an upstream response; the
/// rest passes to the client.
pub fn strip_response(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in UPSTREAM_ONLY {
        headers.remove(name);
    }
}

/// Authenticates a request as `spec`'s key: `Authorization: Bearer <key>`, or for an Azure
/// key `api-key: <key>` and no `Authorization` (both marked sensitive, so hyper's HPACK never
/// indexes them), plus the key's organization and project when set.
pub fn add_key(headers: &mut HeaderMap, spec: &KeySpec) -> Result<(), KeyHeaderError> {
    match spec.kind {
        KeyKind::OpenAi => {
            headers.insert(AUTHORIZATION, bearer(&spec.secret)?);
        }
        KeyKind::Azure => {
            headers.remove(AUTHORIZATION);
            headers.insert(API_KEY, azure_key(&spec.secret)?);
        }
    }
    if let Some(organization) = &spec.organization {
        let value =
            HeaderValue::from_str(organization).map_err(|_| KeyHeaderError("organization"))?;
        headers.insert(OPENAI_ORGANIZATION, value);
    }
    if let Some(project) = &spec.project {
        let value = HeaderValue::from_str(project).map_err(|_| KeyHeaderError("project"))?;
        headers.insert(OPENAI_PROJECT, value);
    }
    Ok(())
}

/// Checks that a key's secret, organization and project can be sent as header values;
/// `Err` names the field that cannot.
pub fn check_key(
    secret: &Secret,
    organization: Option<&str>,
    project: Option<&str>,
) -> Result<(), &'static str> {
    bearer(secret).map_err(|e| e.0)?;
    let fits = |value: Option<&str>| value.is_none_or(|v| HeaderValue::from_str(v).is_ok());
    if !fits(organization) {
        return Err("organization");
    }
    if !fits(project) {
        return Err("project");
    }
    Ok(())
}

/// A key field that is not a valid header value (a control character, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the API key's {0} is not a valid HTTP header value")]
pub struct KeyHeaderError(pub &'static str);

/// One of the two places a secret is exposed: Azure's `api-key` header to its own upstream.
fn azure_key(secret: &Secret) -> Result<HeaderValue, KeyHeaderError> {
    let mut value = HeaderValue::try_from(secret.expose()).map_err(|_| KeyHeaderError("key"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// The other place a secret is exposed: the `Authorization` header to its own upstream.
fn bearer(secret: &Secret) -> Result<HeaderValue, KeyHeaderError> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", secret.expose()))
        .map_err(|_| KeyHeaderError("key"))?;
    value.set_sensitive(true);
    Ok(value)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    remove_prefixed(headers, "proxy-");
}

/// Removes every header whose (lower-case) name starts with `prefix`; allocates only when
/// there is one.
fn remove_prefixed(headers: &mut HeaderMap, prefix: &str) {
    let matches = |name: &HeaderName| name.as_str().starts_with(prefix);
    if !headers.keys().any(matches) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| matches(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        headers
    }

    #[test]
    fn an_azure_key_sends_api_key_and_never_authorization() {
        let spec = KeySpec::new(Secret::new("az-secret"), "https://r.openai.azure.com").azure();
        let mut headers = map(&[("authorization", "Bearer stray")]);
        add_key(&mut headers, &spec).expect("valid key");
        assert_eq!(headers.get("authorization"), None);
        let api_key = headers.get("api-key").expect("api-key");
        assert_eq!(api_key, "az-secret");
        assert!(api_key.is_sensitive());
        let openai = KeySpec::new(Secret::new("sk-x"), "https://api.openai.com");
        let mut headers = HeaderMap::new();
        add_key(&mut headers, &openai).expect("valid key");
        assert_eq!(headers.get("authorization").expect("bearer"), "Bearer sk-x");
        assert_eq!(headers.get("api-key"), None);
    }

    #[test]
    fn request_loses_hop_by_hop_and_client_credentials() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("authorization", "Bearer client-token"),
            ("api-key", "client-token"),
            ("host", "kcp.local"),
            ("content-length", "12"),
            ("openai-organization", "org-client"),
            ("openai-project", "proj_client"),
            ("accept-encoding", "gzip, deflate, br"),
            ("openai-beta", "assistants=v2"),
            ("idempotency-key", "abc"),
            ("content-type", "application/json"),
            ("user-agent", "OpenAI/Python 1.0"),
        ]);
        rewrite_request(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "accept-encoding",
                "content-type",
                "idempotency-key",
                "openai-beta",
                "user-agent"
            ]
        );
        assert_eq!(headers[ACCEPT_ENCODING], "identity");
        assert_eq!(headers.get_all(ACCEPT_ENCODING).iter().count(), 1);
    }

    #[test]
    fn response_keeps_end_to_end_headers() {
        let mut headers = map(&[
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("x-request-id", "req_1"),
            ("content-type", "text/event-stream"),
            ("x-ratelimit-remaining-requests", "9"),
            ("openai-organization", "org-pool-key"),
            ("openai-project", "proj_pool_key"),
            ("openai-processing-ms", "120"),
        ]);
        strip_response(&mut headers);
        assert!(headers.get("connection").is_none());
        assert!(headers.get("transfer-encoding").is_none());
        assert!(headers.get(OPENAI_ORGANIZATION).is_none());
        assert!(headers.get(OPENAI_PROJECT).is_none());
        assert_eq!(headers["openai-processing-ms"], "120");
        assert_eq!(headers["x-request-id"], "req_1");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "9");
    }

    #[test]
    fn key_headers_are_set_and_the_secret_is_sensitive() {
        let mut spec = KeySpec::new(Secret::new("sk-test-123"), "https://api.openai.com/v1");
        spec.organization = Some("org-1".into());
        let mut headers = map(&[("openai-organization", "org-client")]);
        add_key(&mut headers, &spec).expect("valid key");
        assert_eq!(headers[AUTHORIZATION], "Bearer sk-test-123");
        assert!(headers[AUTHORIZATION].is_sensitive());
        assert_eq!(headers[OPENAI_ORGANIZATION], "org-1");
        assert!(headers.get(OPENAI_PROJECT).is_none());
    }

    #[test]
    fn keys_that_cannot_be_headers_are_named() {
        let secret = Secret::new("sk-ok");
        assert_eq!(check_key(&secret, None, None), Ok(()));
        assert_eq!(
            check_key(&Secret::new("sk-\u{1}bad"), None, None),
            Err("key")
        );
        assert_eq!(
            check_key(&secret, Some("org\nx"), None),
            Err("organization")
        );
        assert_eq!(check_key(&secret, None, Some("p\u{7f}")), Err("project"));
    }
}
