//! What a client may ask for: the request target's path and the method.
//!
//! The path a client sends is joined to a key's base url, so anything that could make the
//! provider (or a proxy in front of it) resolve a different path than the one kcp classified
//! is refused with 400 before any upstream call: dot segments (`.`, `..`, also written
//! `%2e`), empty segments (`/v1//files`, which some servers collapse), and backslashes (raw or
//! `%5C`, which some servers treat as `/`). Percent-encoded unreserved characters (RFC 3986
//! §6.2.2.2: `%66iles` is `files`) are decoded and hex digits of the other escapes
//! uppercased, so routing, stateful-endpoint detection and the upstream all see the one
//! normalized path. A trailing slash is kept: it is the client's to send.
//!
//! Methods: the OpenAI API uses GET, POST, DELETE (and HEAD is GET without a body); PUT and
//! PATCH are passed for compatible providers. OPTIONS belongs to CORS. Anything else (TRACE,
//! CONNECT, custom methods) is refused with 405 and `Allow`.

use http::{HeaderValue, Method, Response, StatusCode, Uri, header};

use crate::edge::openai_error::OpenAiError;

/// The `Allow` header of a 405.
pub const ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Why a request path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `.` or `..` segment, literal or percent-encoded.
    #[error("the path contains a `.` or `..` segment")]
    DotSegment,
    /// `//` inside the path.
    #[error("the path contains an empty segment (`//`)")]
    EmptySegment,
    /// `\` or `%5C`.
    #[error("the path contains a backslash")]
    Backslash,
    /// `%` not followed by two hex digits.
    #[error("the path contains a malformed percent-escape")]
    BadEscape,
    /// The target has no absolute path (`*`, an authority).
    #[error("the request target is not an absolute path")]
    NotAbsolute,
}

impl PathError {
    /// The 400 for the client.
    pub fn into_openai(self) -> OpenAiError {
        OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_path",
            format!("Invalid request path: {self}."),
        )
    }
}

/// A request target whose path passed the rules, in normalized form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    path_and_query: String,
    path_len: usize,
}

impl Target {
    /// The normalized path.
    pub fn path(&self) -> &str {
        &self.path_and_query[..self.path_len]
    }

    /// The normalized path and the client's query, as sent upstream.
    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    /// Whether the path is under the proxied API: `/v1` itself or below `/v1/` (not
    /// `/v1beta`).
    pub fn is_api(&self) -> bool {
        let path = self.path();
        path == "/v1" || path.starts_with("/v1/")
    }
}

/// Checks and normalizes `uri`'s path; the query is kept byte for byte.
pub fn normalize(uri: &Uri) -> Result<Target, PathError> {
    let path = uri.path();
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let normalized = normalize_path(path)?;
    let path_len = normalized.len();
    let mut path_and_query = normalized;
    if let Some(query) = uri.query() {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    Ok(Target {
        path_and_query,
        path_len,
    })
}

/// The rules on a path that starts with `/`.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (index, segment) in segments.into_iter().enumerate() {
        out.push('/');
        if segment.is_empty() {
            // `/` alone and a trailing slash are fine; `//` is not.
            if index == last {
                continue;
            }
            return Err(PathError::EmptySegment);
        }
        let start = out.len();
        decode_segment(segment, &mut out)?;
        if matches!(&out[start..], "." | "..") {
            return Err(PathError::DotSegment);
        }
    }
    Ok(out)
}

/// Appends `segment` to `out` with unreserved escapes decoded and the others uppercased.
fn decode_segment(segment: &str, out: &mut String) -> Result<(), PathError> {
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
                let value = hex_value(hex[0])
                    .zip(hex_value(hex[1]))
                    .map(|(high, low)| high << 4 | low)
                    .ok_or(PathError::BadEscape)?;
                if value == b'\\' {
                    return Err(PathError::Backslash);
                }
                if is_unreserved(value) {
                    out.push(char::from(value));
                } else {
                    out.push('%');
                    out.push(char::from(hex[0].to_ascii_uppercase()));
                    out.push(char::from(hex[1].to_ascii_uppercase()));
                }
                i += 3;
            }
            _ => {
                // `uri.path()` is ASCII (http::Uri rejects anything else), so a byte is a char.
                out.push(char::from(bytes[i]));
                i += 1;
            }
        }
    }
    Ok(())
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// RFC 3986 §2.3: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Whether `method` may be forwarded upstream.
pub fn is_forwarded(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// 405 with `Allow` for a method the proxy does not forward.
pub fn method_not_allowed<B: From<http_body_util::Full<bytes::Bytes>>>(
    method: &Method,
) -> Response<B> {
    let shown: String = method.as_str().chars().take(32).collect();
    let mut response = OpenAiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("Method {shown} is not allowed: this proxy forwards {ALLOW}."),
    )
    .into_response::<B>();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(ALLOW));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str) -> Result<Target, PathError> {
        normalize(&uri.parse::<Uri>().expect("valid uri"))
    }

    #[test]
    fn ordinary_paths_pass_unchanged() {
        for path in [
            "/",
            "/v1",
            "/v1/",
            "/v1/chat/completions",
            "/v1/files/file-abc/content",
            "/v1/models/ft:gpt-4o:org:x:1a2b",
            "/v1/a%2Fb",
            "/health",
        ] {
            assert_eq!(target(path).expect(path).path(), path);
        }
        let with_query = target("/v1/files?limit=2&after=x%2e").expect("query");
        assert_eq!(with_query.path(), "/v1/files");
        assert_eq!(with_query.path_and_query(), "/v1/files?limit=2&after=x%2e");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_uppercased() {
        let t = target("/v1/%66iles/f%2d1%2fx").expect("valid");
        assert_eq!(t.path(), "/v1/files/f-1%2Fx");
        assert!(t.is_api());
        assert_eq!(
            target("/%76%31/models").expect("valid").path(),
            "/v1/models"
        );
    }

    #[test]
    fn dot_empty_and_backslash_segments_are_refused() {
        let cases = [
            ("/v1/../admin", PathError::DotSegment),
            ("/v1/./models", PathError::DotSegment),
            ("/v1/%2e%2E/x", PathError::DotSegment),
            ("/v1/.%2e", PathError::DotSegment),
            ("/v1/%2E", PathError::DotSegment),
            ("/v1//files", PathError::EmptySegment),
            ("//v1/files", PathError::EmptySegment),
            ("/v1/a%5cb", PathError::Backslash),
            ("/v1/a%5Cb", PathError::Backslash),
            ("/v1/a%zz", PathError::BadEscape),
            ("/v1/a%4", PathError::BadEscape),
        ];
        for (path, error) in cases {
            assert_eq!(target(path), Err(error), "{path}");
        }
        assert_eq!(normalize_path("/v1/a\\b"), Err(PathError::Backslash));
        // Dots inside a name are not dot segments.
        assert!(target("/v1/files/a..b/.x").is_ok());
    }

    #[test]
    fn the_v1_prefix_is_a_segment_boundary() {
        assert!(target("/v1").expect("valid").is_api());
        assert!(target("/v1/models").expect("valid").is_api());
        for path in [
            "/v1beta/models",
            "/v10/models",
            "/v",
            "/",
            "/v2/x",
            "/V1/models",
        ] {
            assert!(!target(path).expect(path).is_api(), "{path}");
        }
    }

    #[test]
    fn methods() {
        for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] {
            assert!(is_forwarded(&method.parse().expect("method")), "{method}");
        }
        for method in ["OPTIONS", "TRACE", "CONNECT", "PROPFIND", "BREW"] {
            assert!(!is_forwarded(&method.parse().expect("method")), "{method}");
        }
        let response = method_not_allowed::<http_body_util::Full<bytes::Bytes>>(&Method::TRACE);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], ALLOW);
    }
}
