//! Which model a request asks for, and how many tokens it may spend, read from its body.
//!
//! Routing needs the top-level `"model"` of a JSON body and, for token budgets,
//! `max_tokens` / `max_completion_tokens`. Nothing else is deserialized: serde visits the
//! other fields as `IgnoredAny` (validated, never built), and the model name borrows from the
//! body unless it holds escapes. Multipart bodies (audio transcriptions and translations,
//! image edits) carry the model as a form field, found by scanning part headers.
//!
//! Anything odd (not JSON, truncated JSON, non-UTF-8, a non-string model, duplicate fields)
//! yields "no model": the request is still forwarded, to any key, and the upstream judges it.
//! The original kcp rejected requests without a model, which broke model lists and uploads.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use std::sync::Arc;

use http::HeaderValue;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::edge::openai_error::OpenAiError;

/// Longest model name accepted, in bytes; real ones are under 100.
pub const MAX_MODEL_BYTES: usize = 256;

/// A requested model name: a copy of at most [`MAX_MODEL_BYTES`] bytes, so a request's model
/// (kept in its report and log line for the length of a stream) never keeps the whole request
/// body alive.
#[derive(Clone, PartialEq, Eq)]
pub struct ModelName(Arc<str>);

/// The body names a model longer than [`MAX_MODEL_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the model name is {len} bytes long; at most {MAX_MODEL_BYTES} are accepted")]
pub struct ModelTooLong {
    /// Its length.
    pub len: usize,
}

impl ModelTooLong {
    /// The 400 for the client.
    pub fn into_openai(self) -> OpenAiError {
        OpenAiError::new(
            http::StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model_name_too_long",
            format!("Invalid `model`: {self}."),
        )
    }
}

impl ModelName {
    /// A copy of `name`, refused when longer than [`MAX_MODEL_BYTES`].
    pub fn new(name: &str) -> Result<Self, ModelTooLong> {
        if name.len() > MAX_MODEL_BYTES {
            return Err(ModelTooLong { len: name.len() });
        }
        Ok(ModelName(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.as_str();
        let cut = name.char_indices().nth(64).map_or(name.len(), |(i, _)| i);
        write!(f, "ModelName({:?})", &name[..cut])
    }
}

/// What the body says about routing and budgets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequestHead<'a> {
    /// The requested model.
    pub model: Option<Cow<'a, str>>,
    /// `max_tokens`, else `max_completion_tokens`.
    pub max_completion: Option<u64>,
    /// Whether the model came from a JSON body (whose size estimates prompt tokens).
    pub json: bool,
}

/// Reads the model (and completion budget) of a body with the given `Content-Type`.
pub fn inspect<'a>(content_type: Option<&HeaderValue>, body: &'a [u8]) -> RequestHead<'a> {
    let content_type = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(boundary) = multipart_boundary(content_type) {
        return RequestHead {
            model: multipart_field(body, boundary.as_bytes(), b"model").map(Cow::Borrowed),
            ..RequestHead::default()
        };
    }
    if body.trim_ascii_start().first() != Some(&b'{') {
        return RequestHead::default();
    }
    match serde_json::from_slice::<JsonHead<'a>>(body) {
        Ok(head) => RequestHead {
            model: head.model.string(),
            max_completion: head
                .max_tokens
                .count()
                .or(head.max_completion_tokens.count()),
            json: true,
        },
        Err(_) => RequestHead::default(),
    }
}

/// The top-level fields kcp reads; serde skips every other one.
#[derive(serde::Deserialize)]
struct JsonHead<'a> {
    #[serde(borrow, default)]
    model: Scalar<'a>,
    #[serde(borrow, default)]
    max_tokens: Scalar<'a>,
    #[serde(borrow, default)]
    max_completion_tokens: Scalar<'a>,
}

/// A field value that is kept when it is a string or a non-negative integer and skipped
/// (never an error) when it is anything else, so an odd `max_tokens` cannot hide the model.
#[derive(Debug, Default)]
enum Scalar<'a> {
    #[default]
    Other,
    Str(Cow<'a, str>),
    Count(u64),
}

impl<'a> Scalar<'a> {
    fn string(self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    fn count(&self) -> Option<u64> {
        match self {
            Scalar::Count(n) => Some(*n),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor(PhantomData))
    }
}

struct ScalarVisitor<'a>(PhantomData<&'a str>);

impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
    type Value = Scalar<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Count(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).map_or(Scalar::Other, Scalar::Count))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// The `boundary` parameter of a `multipart/form-data` content type.
fn multipart_boundary(content_type: &str) -> Option<&str> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        (!value.is_empty()).then_some(value)
    })
}

/// The value of the form field `name` in a multipart body (RFC 7578), trimmed; `None` if
/// the field is missing, is a file, or is not UTF-8.
fn multipart_field<'a>(body: &'a [u8], boundary: &[u8], name: &[u8]) -> Option<&'a str> {
    let mut rest = body;
    // Each part starts after a delimiter line `--boundary`; the preamble before the first is
    // skipped.
    while let Some(at) = find_delimiter(rest, boundary) {
        rest = &rest[at + 2 + boundary.len()..];
        if rest.starts_with(b"--") {
            return None;
        }
        let headers_start = find(rest, b"\r\n")? + 2;
        rest = &rest[headers_start..];
        let headers_end = find(rest, b"\r\n\r\n")?;
        let (headers, after) = (&rest[..headers_end], &rest[headers_end + 4..]);
        let value_end = find_delimiter(after, boundary)?;
        // The delimiter is preceded by the CRLF that ends the value.
        let value = after[..value_end]
            .strip_suffix(b"\r\n")
            .unwrap_or(&after[..value_end]);
        if is_field(headers, name) {
            return std::str::from_utf8(value).ok().map(str::trim);
        }
        rest = &after[value_end..];
    }
    None
}

/// Position of the next `--boundary` that starts a line.
fn find_delimiter(haystack: &[u8], boundary: &[u8]) -> Option<usize> {
    let mut from = 0;
    loop {
        let at = from + find(&haystack[from..], b"--")?;
        let line_start = at == 0 || haystack[..at].ends_with(b"\r\n");
        if line_start && haystack[at + 2..].starts_with(boundary) {
            return Some(at);
        }
        from = at + 1;
    }
}

/// Whether part headers describe the non-file form field `name`.
fn is_field(headers: &[u8], name: &[u8]) -> bool {
    headers.split(|&b| b == b'\n').any(|line| {
        let line = line.trim_ascii();
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return false;
        };
        let (header, value) = (&line[..colon], &line[colon + 1..]);
        header.eq_ignore_ascii_case(b"content-disposition")
            && value.split(|&b| b == b';').any(|param| {
                let param = param.trim_ascii();
                param.len() > 5
                    && param[..5].eq_ignore_ascii_case(b"name=")
                    && unquote(&param[5..]) == name
            })
            && !value
                .split(|&b| b == b';')
                .any(|p| p.trim_ascii().starts_with(b"filename"))
    })
}

fn unquote(value: &[u8]) -> &[u8] {
    value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value)
}

/// First position of `needle` in `haystack`: a byte scan for the first byte (which the
/// standard library vectorises), then a comparison.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, tail) = needle.split_first()?;
    let mut from = 0;
    while from + needle.len() <= haystack.len() {
        let at = from + haystack[from..].iter().position(|&b| b == first)?;
        if haystack[at + 1..].starts_with(tail) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> RequestHead<'_> {
        inspect(
            Some(&HeaderValue::from_static("application/json")),
            body.as_bytes(),
        )
    }

    #[test]
    fn reads_only_the_top_level_model_and_budget() {
        let head = json(
            r#"{"messages":[{"role":"user","content":"say \"model\": x","model":"inner"}],
                "model":"gpt-4o","stream":true,"max_tokens":100}"#,
        );
        assert_eq!(head.model.as_deref(), Some("gpt-4o"));
        assert!(matches!(head.model, Some(Cow::Borrowed(_))));
        assert_eq!(head.max_completion, Some(100));
        assert!(head.json);
        let head = json(r#"{"model":"o3","max_completion_tokens":7}"#);
        assert_eq!(head.max_completion, Some(7));
    }

    #[test]
    fn model_names_are_short_copies() {
        let name = "x".repeat(MAX_MODEL_BYTES);
        assert_eq!(ModelName::new(&name).expect("at the limit").as_str(), name);
        let long = "y".repeat(MAX_MODEL_BYTES + 1);
        assert_eq!(
            ModelName::new(&long),
            Err(ModelTooLong {
                len: MAX_MODEL_BYTES + 1
            })
        );
        let error = ModelTooLong { len: 100_000 }.into_openai();
        assert_eq!(error.status, http::StatusCode::BAD_REQUEST);
        assert_eq!(error.kind, "invalid_request_error");
        let shown = format!(
            "{:?}",
            ModelName::new(&"z".repeat(200)).expect("short enough")
        );
        assert!(shown.len() < 80, "{shown}");
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let head = json(r#"{"model":"gpt\u002d4o"}"#);
        assert_eq!(head.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn odd_bodies_have_no_model_and_never_panic() {
        for body in [
            "",
            "   ",
            "{",
            r#"{"model":"gpt-4o","messages":["#,
            r#"{"model":42}"#,
            r#"{"model":null}"#,
            r#"{"model":["a"]}"#,
            r#"{"model":{"x":1}}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"["gpt-4o"]"#,
            "not json",
            r#"{"model":"gpt-4o"} trailing"#,
        ] {
            assert_eq!(json(body).model, None, "{body:?}");
        }
        let invalid_utf8 = b"{\"model\":\"gpt-\xff\"}";
        assert_eq!(inspect(None, invalid_utf8).model, None);
    }

    #[test]
    fn odd_budgets_do_not_hide_the_model() {
        let head = json(r#"{"model":"gpt-4o","max_tokens":1.5,"max_completion_tokens":-3}"#);
        assert_eq!(head.model.as_deref(), Some("gpt-4o"));
        assert_eq!(head.max_completion, None);
    }

    #[test]
    fn huge_model_names_are_kept_whole() {
        let name = "m".repeat(10_000);
        let body = format!(r#"{{"model":"{name}"}}"#);
        assert_eq!(json(&body).model.as_deref(), Some(name.as_str()));
    }

    fn form(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, filename, value) in parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            let disposition = match filename {
                Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\""),
                None => format!("form-data; name=\"{name}\""),
            };
            body.extend_from_slice(format!("Content-Disposition: {disposition}\r\n").as_bytes());
            if filename.is_some() {
                body.extend_from_slice(b"Content-Type: audio/mpeg\r\n");
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(value);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        body
    }

    fn multipart(boundary: &str, body: &[u8]) -> Option<String> {
        let content_type =
            HeaderValue::from_str(&format!("multipart/form-data; boundary=\"{boundary}\""))
                .expect("header");
        inspect(Some(&content_type), body)
            .model
            .map(Cow::into_owned)
    }

    #[test]
    fn multipart_model_field_after_a_binary_file() {
        let audio: Vec<u8> = (0..=255u8).cycle().take(5000).chain(*b"\r\n--x").collect();
        let body = form(
            "b0und4ry",
            &[
                ("file", Some("a.mp3"), &audio),
                ("model", None, b"whisper-1"),
                ("language", None, b"en"),
            ],
        );
        assert_eq!(multipart("b0und4ry", &body).as_deref(), Some("whisper-1"));
    }

    #[test]
    fn multipart_without_a_model_or_malformed() {
        let body = form("b", &[("file", Some("model"), b"data")]);
        assert_eq!(multipart("b", &body), None);
        assert_eq!(
            multipart(
                "b",
                b"--b\r\nContent-Disposition: form-data; name=\"model\""
            ),
            None
        );
        assert_eq!(multipart("b", b""), None);
        assert_eq!(multipart("b", b"--b--"), None);
        let plain = HeaderValue::from_static("multipart/form-data");
        assert_eq!(inspect(Some(&plain), b"--b\r\n").model, None);
    }
}
