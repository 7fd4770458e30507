//! Where a request goes: the key's base url joined with the client's path and query.
//!
//! Key urls are written with or without the API version (`https://api.openai.com`,
//! `https://api.openai.com/v1`, `https://host/prefix/v1/`), and the client's path always
//! starts with `/v1`. The original kcp glued them together and sent `/v1/v1/...`; here the
//! url's trailing `/v1` (and slashes) are cut first, so `/v1/X` lands on `<base>/v1/X`. The
//! client's path and query are appended byte for byte.

use http::Uri;
use http::uri::InvalidUri;

/// The key url without trailing slashes and without a trailing `/v1`: the same rule by which
/// kcp-core tells two key urls apart (`KeySpec::same_key`), so two keys it counts as one
/// always reach the same upstream.
pub fn base(url: &str) -> &str {
    let url = url.trim_end_matches('/');
    url.strip_suffix("/v1").unwrap_or(url).trim_end_matches('/')
}

/// The upstream URI for a client request target `path_and_query` (`/v1/...?...`) on a key
/// whose url is `url`. One allocation: the joined string becomes the URI without a copy.
pub fn join(url: &str, path_and_query: &str) -> Result<Uri, InvalidUri> {
    let base = base(url);
    let mut target = String::with_capacity(base.len() + path_and_query.len());
    target.push_str(base);
    target.push_str(path_and_query);
    Uri::try_from(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_doubles_v1() {
        let target = "/v1/chat/completions";
        for url in [
            "https://api.openai.com",
            "https://api.openai.com/",
            "https://api.openai.com/v1",
            "https://api.openai.com/v1/",
        ] {
            assert_eq!(
                join(url, target).expect("valid").to_string(),
                "https://api.openai.com/v1/chat/completions",
                "{url}"
            );
        }
        assert_eq!(
            join("http://127.0.0.1:9/prefix/v1", "/v1/models")
                .expect("valid")
                .to_string(),
            "http://127.0.0.1:9/prefix/v1/models"
        );
        assert_eq!(
            join("http://h/prefix", "/v1/models")
                .expect("valid")
                .to_string(),
            "http://h/prefix/v1/models"
        );
        assert_eq!(
            base("https://h//v1/"),
            "https://h",
            "as kcp-core's key identity"
        );
    }

    #[test]
    fn query_passes_byte_for_byte() {
        let target = "/v1/files/file-1?limit=2&after=a%2Fb&x=&y=%20+z";
        let uri = join("https://h/v1", target).expect("valid");
        assert_eq!(uri.path_and_query().map(|pq| pq.as_str()), Some(target));
    }

    #[test]
    fn a_v1_inside_a_word_is_kept() {
        assert_eq!(base("https://h/apiv1"), "https://h/apiv1");
        assert_eq!(base("https://h/api/v1"), "https://h/api");
    }
}
