//! The request head's size, checked against `server.max_header_bytes` in the service.
//!
//! hyper enforces a head limit itself, but answers it with a bare 431 and no body. So hyper's
//! limit is set to twice `max_header_bytes` ([`crate::ops::serve`]) and heads between the two
//! reach this check, which answers 431 in OpenAI's error shape. The size is that of the head
//! as HTTP/1.1 sends it (request line, `name: value` lines, blank line), which for h2 is close
//! to the HPACK header list size.

use http::StatusCode;
use http::request::Parts;

use crate::edge::openai_error::OpenAiError;

/// Bytes of `parts` as an HTTP/1.1 head.
pub fn size(parts: &Parts) -> usize {
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path().len(), |pq| pq.as_str().len());
    let request_line = parts.method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    request_line + headers + 2
}

/// 431 in OpenAI's shape when `parts` is larger than `max` bytes.
pub fn check(parts: &Parts, max: usize) -> Result<(), OpenAiError> {
    let size = size(parts);
    if size <= max {
        return Ok(());
    }
    Err(OpenAiError::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "invalid_request_error",
        "request_header_too_large",
        format!("The request head is {size} bytes; this proxy accepts at most {max}."),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(filler: usize) -> Parts {
        let (parts, ()) = http::Request::get("/v1/models?x=1")
            .header("host", "kcp")
            .header("x-filler", "f".repeat(filler))
            .body(())
            .expect("valid request")
            .into_parts();
        parts
    }

    #[test]
    fn size_counts_the_http1_head() {
        // "GET /v1/models?x=1 HTTP/1.1\r\n" + "host: kcp\r\n" + "x-filler: fff\r\n" + "\r\n"
        assert_eq!(size(&parts(3)), 29 + 11 + 15 + 2);
    }

    #[test]
    fn over_the_limit_is_431_in_openai_shape() {
        assert!(check(&parts(100), 1024).is_ok());
        let error = check(&parts(2000), 1024).expect_err("too large");
        assert_eq!(error.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(error.code, "request_header_too_large");
    }
}
