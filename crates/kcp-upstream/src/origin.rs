//! The only part of a request URI an error may show.
//!
//! Paths and query strings can carry tokens, and userinfo carries credentials, so errors name
//! the upstream by `scheme://host:port` alone. Cloning the URI parts is a reference-count bump,
//! which keeps this off the allocation path of every request.

use std::fmt;

use http::Uri;
use http::uri::{Authority, Scheme};

/// `scheme://host:port` of a request, printed without userinfo, path or query.
#[derive(Clone)]
pub(crate) struct Origin {
    scheme: Option<Scheme>,
    authority: Option<Authority>,
}

impl Origin {
    pub(crate) fn of(uri: &Uri) -> Self {
        Self {
            scheme: uri.scheme().cloned(),
            authority: uri.authority().cloned(),
        }
    }

    fn port(&self) -> Option<u16> {
        let authority = self.authority.as_ref()?;
        authority.port_u16().or_else(|| match &self.scheme {
            Some(s) if *s == Scheme::HTTPS => Some(443),
            Some(s) if *s == Scheme::HTTP => Some(80),
            _ => None,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(authority) = &self.authority else {
            return f.write_str("(URI without origin)");
        };
        if let Some(scheme) = &self.scheme {
            write!(f, "{scheme}://")?;
        }
        f.write_str(authority.host())?;
        match self.port() {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(uri: &str) -> String {
        Origin::of(&uri.parse().expect("test URI parses")).to_string()
    }

    #[test]
    fn shows_scheme_host_and_port_only() {
        assert_eq!(
            origin("https://api.openai.com/v1/chat?token=abc"),
            "https://api.openai.com:443"
        );
        assert_eq!(origin("http://10.0.0.1/v1"), "http://10.0.0.1:80");
        assert_eq!(origin("http://[::1]:8080/x"), "http://[::1]:8080");
    }

    #[test]
    fn drops_userinfo() {
        let shown = origin("https://user:hunter2@example.com:8443/p");
        assert_eq!(shown, "https://example.com:8443");
    }

    #[test]
    fn relative_uri_has_no_origin() {
        assert_eq!(origin("/v1/models?x=1"), "(URI without origin)");
    }
}
