//! The request head's size, checked against `server.max_header_bytes` in the service.
//!
//! hyper enforces a head limit itself, but answers it with a bare 431 and no body. So hyper's
//! limit is set to twice `max_header_bytes` ([`crate::ops::serve`]) and heads between the two
//! reach this check, which answers 431 in OpenAI's error shape. The size is that of the head
//! as HTTP/1.1 sends it (request line, `name: value` lines, blank line), which for h2 is close
//! to the HPACK header list size.

use http::{HeaderMap, Method, StatusCode, Uri};

use crate::edge::openai_error::OpenAiError;

/// Bytes of a request head as HTTP/1.1 sends it.
pub fn size(method: &Method, uri: &Uri, headers: &HeaderMap) -> usize {
    let target = uri
        .path_and_query()
        .map_or(uri.path().len(), |pq| pq.as_str().len());
    let request_line = method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    request_line + headers + 2
}

/// 431 in OpenAI's shape when `request`'s head is larger than `max` bytes.
pub fn check<B>(request: &http::Request<B>, max: usize) -> Result<(), OpenAiError> {
    let size = size(request.method(), request.uri(), request.headers());
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

    fn request(filler: usize) -> http::Request<()> {
        http::Request::get("/v1/models?x=1")
            .header("host", "kcp")
            .header("x-filler", "f".repeat(filler))
            .body(())
            .expect("valid request")
    }

    #[test]
    fn size_counts_the_http1_head() {
        // "GET /v1/models?x=1 HTTP/1.1\r\n" + "host: kcp\r\n" + "x-filler: fff\r\n" + "\r\n"
        let r = request(3);
        assert_eq!(size(r.method(), r.uri(), r.headers()), 29 + 11 + 15 + 2);
    }

    #[test]
    fn over_the_limit_is_431_in_openai_shape() {
        assert!(check(&request(100), 1024).is_ok());
        let error = check(&request(2000), 1024).expect_err("too large");
        assert_eq!(error.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(error.code, "request_header_too_large");
    }
}
