//! An upstream answer as kcp-core's [`Answer`]: the status, the rate-limit headers, and for
//! the statuses whose meaning depends on it, the JSON error body.
//!
//! Classification itself is kcp-core's ([`kcp_core::classify`]). This module only reads what
//! it needs: a 403, 404 or 429 means different things for the key depending on the body's
//! `error.code`, `type` and `message` (a quota is not a rate limit, a refused model is not a
//! revoked key), so those small bodies are read, bounded in size and time. Every other body
//! is left to stream to the client. A body that was read is passed on from memory, with any
//! API-key fragment the provider quoted masked.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body::Body;
use http_body_util::BodyExt;
use kcp_core::{Answer, ErrorBody, RateLimitHeaders, Reply, retry_delay_in_body};
use kcp_upstream::ResponseBody;

use super::body::ProxyBody;
use crate::clock;

/// Largest error body read to classify an answer; OpenAI's are a few hundred bytes.
const ERROR_BODY_LIMIT: usize = 16 * 1024;

/// How long an error body may take after its headers. It follows them at once in practice;
/// waiting longer would only delay the failover to the next key.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(5);

/// The response header that names the key's organization.
const ORGANIZATION: &str = "openai-organization";

/// An upstream answer, read as far as classifying it needs.
#[derive(Debug)]
pub struct Read {
    parts: http::response::Parts,
    body: Content,
    limits: RateLimitHeaders,
    error: ErrorFields,
}

#[derive(Debug)]
enum Content {
    /// Not read: streams to the client.
    Stream(ResponseBody),
    /// Read whole (an error body within the limit).
    Read(Bytes),
    /// Too large, too slow or broken: nothing to pass on.
    Lost,
}

/// The `error` object of an OpenAI-style error body.
#[derive(Debug, Default)]
struct ErrorFields {
    code: Option<String>,
    kind: Option<String>,
    message: Option<String>,
}

/// Reads an upstream answer: its error body too when the status needs it.
pub async fn read(response: Response<ResponseBody>) -> Read {
    let (parts, body) = response.into_parts();
    let limits = RateLimitHeaders::parse(
        parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes())),
        clock::unix_now(),
    );
    let body = if matches!(parts.status.as_u16(), 403 | 404 | 429) {
        read_small(body).await
    } else {
        Content::Stream(body)
    };
    let error = match &body {
        Content::Read(bytes) => ErrorFields::parse(bytes),
        Content::Stream(_) | Content::Lost => ErrorFields::default(),
    };
    let mut limits = limits;
    if let (429, None, Content::Read(bytes)) = (parts.status.as_u16(), limits.retry_after, &body) {
        // Gemini says how long to wait in the body (`retryDelay`), not in a header.
        limits.retry_after = retry_delay_in_body(bytes);
    }
    Read {
        parts,
        body,
        limits,
        error,
    }
}

async fn read_small(body: ResponseBody) -> Content {
    if body.size_hint().lower() > ERROR_BODY_LIMIT as u64 {
        return Content::Lost;
    }
    let read = http_body_util::Limited::new(body, ERROR_BODY_LIMIT).collect();
    match tokio::time::timeout(ERROR_BODY_WAIT, read).await {
        Ok(Ok(collected)) => Content::Read(collected.to_bytes()),
        _ => Content::Lost,
    }
}

impl ErrorFields {
    fn parse(body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            error: Inner<'a>,
        }
        #[derive(serde::Deserialize)]
        struct Inner<'a> {
            #[serde(borrow, default)]
            code: Option<Cow<'a, str>>,
            #[serde(borrow, default, rename = "type")]
            kind: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            message: Option<Cow<'a, str>>,
        }
        let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(body) else {
            return ErrorFields::default();
        };
        let Inner {
            code,
            kind,
            message,
        } = envelope.error;
        ErrorFields {
            code: code.map(Cow::into_owned),
            kind: kind.map(Cow::into_owned),
            message: message.map(Cow::into_owned),
        }
    }
}

impl Read {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        self.parts.status.as_u16()
    }

    /// The answer for kcp-core; `latency` is the time to the response head.
    pub fn answer(&self, latency: Duration) -> Answer<'_> {
        Answer::Reply(Reply {
            status: self.status(),
            limits: self.limits,
            error: ErrorBody {
                code: self.error.code.as_deref(),
                kind: self.error.kind.as_deref(),
                message: self.error.message.as_deref(),
            },
            organization: self
                .parts
                .headers
                .get(ORGANIZATION)
                .and_then(|v| v.to_str().ok()),
            latency,
        })
    }

    /// The answer as the client gets it (hop-by-hop headers still to strip): streaming, or
    /// from memory with quoted key fragments masked.
    pub fn into_response(self, key: kcp_core::KeyId) -> Response<ProxyBody> {
        let Read {
            mut parts, body, ..
        } = self;
        let body = match body {
            Content::Stream(body) => ProxyBody::upstream(body, key),
            Content::Read(bytes) => {
                let masked = mask_keys(&bytes);
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(masked.len()));
                ProxyBody::from(masked)
            }
            Content::Lost => {
                parts.headers.remove(header::CONTENT_LENGTH);
                ProxyBody::from(Bytes::new())
            }
        };
        Response::from_parts(parts, body)
    }
}

/// The body with every API-key-like token (`sk-` followed by key characters, as OpenAI quotes
/// them: `sk-proj-ab***cd`) replaced by `sk-***`.
pub fn mask_keys(body: &Bytes) -> Bytes {
    const PREFIX: &[u8] = b"sk-";
    let is_key_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'*');
    if !body.windows(PREFIX.len()).any(|w| w == PREFIX) {
        return body.clone();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(PREFIX) {
            let end = body[i + PREFIX.len()..]
                .iter()
                .position(|&b| !is_key_char(b))
                .map_or(body.len(), |n| i + PREFIX.len() + n);
            out.extend_from_slice(b"sk-***");
            i = end;
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields_of_openai_bodies() {
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let f = ErrorFields::parse(quota);
        assert_eq!(f.code.as_deref(), Some("insufficient_quota"));
        assert_eq!(f.kind.as_deref(), Some("insufficient_quota"));
        assert_eq!(
            f.message.as_deref(),
            Some("You exceeded your current quota")
        );
        let escaped = br#"{"error":{"message":"model \"o3\"","code":null}}"#;
        assert_eq!(
            ErrorFields::parse(escaped).message.as_deref(),
            Some("model \"o3\"")
        );
        for junk in [
            &b"<html>Too Many Requests</html>"[..],
            br#"{"error":"slow down"}"#,
            b"",
        ] {
            let f = ErrorFields::parse(junk);
            assert!(f.code.is_none() && f.kind.is_none() && f.message.is_none());
        }
    }

    #[test]
    fn key_fragments_are_masked() {
        let body = Bytes::from_static(
            br#"{"error":{"message":"Incorrect API key provided: sk-proj-ab***********cd. Also sk-live_x."}}"#,
        );
        let masked = mask_keys(&body);
        let text = std::str::from_utf8(&masked).expect("utf-8");
        assert!(!text.contains("ab***"), "{text}");
        assert!(!text.contains("live_x"), "{text}");
        assert_eq!(text.matches("sk-***").count(), 2);
        let clean = Bytes::from_static(b"no keys here");
        assert_eq!(mask_keys(&clean), clean);
    }
}

#[cfg(test)]
#[path = "reply_tests.rs"]
mod read_tests;
