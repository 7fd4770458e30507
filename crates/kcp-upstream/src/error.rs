//! Errors tagged with where they happened, in the spirit of pingora-error.
//!
//! A proxy decides from an upstream failure whether to penalise the upstream and whether it may
//! retry the request elsewhere: [`ErrorKind`] answers the first,
//! [`UpstreamError::may_have_reached_upstream`] the second. Messages name the upstream origin
//! only: request paths, query strings and headers (where API keys travel) are never stored in an
//! error or in its source chain, which holds only hyper, rustls and I/O errors.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::origin::Origin;

/// Building an [`Upstream`](crate::Upstream) failed; only the TLS trust setup can fail.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The file could not be read (missing, unreadable).
    #[error("cannot read CA file {}", path.display())]
    CaFileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A `CERTIFICATE` section is not valid PEM.
    #[error("CA file {} is not valid PEM", path.display())]
    CaFilePem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The file holds no `CERTIFICATE` section.
    #[error("CA file {} contains no certificate", path.display())]
    CaFileEmpty { path: PathBuf },
    /// A certificate could not be parsed into a trust anchor.
    #[error("CA file {} holds a certificate that is not a usable trust anchor", path.display())]
    CaFileCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// Where an upstream exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No connection could be made (refused, unreachable, DNS, connect timeout). Nothing was sent.
    Connect,
    /// The TLS handshake failed (untrusted certificate, alert). Nothing was sent.
    Tls,
    /// The response headers did not arrive within the request timeout.
    HeadersTimeout,
    /// The response body stalled for longer than the stream idle timeout.
    BodyIdleTimeout,
    /// The exchange failed before the response headers (connection reset, malformed response).
    Protocol,
    /// The response body failed mid-stream.
    Body,
}

impl ErrorKind {
    /// A stable label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Tls => "tls",
            Self::HeadersTimeout => "timeout",
            Self::BodyIdleTimeout => "body_idle_timeout",
            Self::Protocol => "protocol",
            Self::Body => "body",
        }
    }
}

/// A failed upstream exchange: where it failed and which origin it was talking to.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct UpstreamError(Box<Repr>);

#[derive(Debug, thiserror::Error)]
enum Repr {
    #[error("cannot connect to upstream {origin}")]
    Connect {
        origin: Origin,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("TLS handshake with upstream {origin} failed")]
    Tls {
        origin: Origin,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("refusing to contact upstream {origin}: its URL carries credentials")]
    Credentials { origin: Origin },
    #[error("upstream {origin} sent no response headers within {timeout:?}")]
    HeadersTimeout { origin: Origin, timeout: Duration },
    #[error("response body from upstream {origin} stalled for more than {timeout:?}")]
    BodyIdleTimeout { origin: Origin, timeout: Duration },
    #[error("exchange with upstream {origin} failed before the response headers")]
    Protocol {
        origin: Origin,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("response body from upstream {origin} failed mid-stream")]
    Body {
        origin: Origin,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Where the exchange failed.
    pub fn kind(&self) -> ErrorKind {
        match *self.0 {
            Repr::Connect { .. } | Repr::Credentials { .. } => ErrorKind::Connect,
            Repr::Tls { .. } => ErrorKind::Tls,
            Repr::HeadersTimeout { .. } => ErrorKind::HeadersTimeout,
            Repr::BodyIdleTimeout { .. } => ErrorKind::BodyIdleTimeout,
            Repr::Protocol { .. } => ErrorKind::Protocol,
            Repr::Body { .. } => ErrorKind::Body,
        }
    }

    /// Whether any byte of the request may have reached the upstream. `false` means retrying
    /// cannot duplicate the request; `true` is the safe answer whenever that is unknown.
    pub fn may_have_reached_upstream(&self) -> bool {
        !matches!(self.kind(), ErrorKind::Connect | ErrorKind::Tls)
    }

    /// What went wrong, in an operator's words: `DNS failure`, `connection refused`,
    /// `connect timeout`, `TLS error`, `timeout`, ... (no host, no path, no secret).
    pub fn cause(&self) -> &'static str {
        match &*self.0 {
            Repr::Connect { source, .. } => connect_cause(source),
            Repr::Credentials { .. } => "credentials in the URL",
            Repr::Tls { .. } => "TLS error",
            Repr::HeadersTimeout { .. } => "timeout",
            Repr::BodyIdleTimeout { .. } => "body idle timeout",
            Repr::Protocol { .. } => "connection broke",
            Repr::Body { .. } => "body failed",
        }
    }

    /// Classifies a failure of the client before response headers.
    pub(crate) fn from_client(origin: Origin, source: hyper_util::client::legacy::Error) -> Self {
        let repr = if !source.is_connect() {
            Repr::Protocol { origin, source }
        } else if chain_has_rustls_error(&source) {
            Repr::Tls { origin, source }
        } else {
            Repr::Connect { origin, source }
        };
        Self(Box::new(repr))
    }

    /// A URL with `user:password@` is refused before anything (a log line of the HTTP
    /// stack included) can see it: secrets travel in headers, never in URLs.
    pub(crate) fn credentials(origin: Origin) -> Self {
        Self(Box::new(Repr::Credentials { origin }))
    }

    pub(crate) fn headers_timeout(origin: Origin, timeout: Duration) -> Self {
        Self(Box::new(Repr::HeadersTimeout { origin, timeout }))
    }

    pub(crate) fn body_idle_timeout(origin: Origin, timeout: Duration) -> Self {
        Self(Box::new(Repr::BodyIdleTimeout { origin, timeout }))
    }

    pub(crate) fn body(origin: Origin, source: hyper::Error) -> Self {
        Self(Box::new(Repr::Body { origin, source }))
    }
}

/// Why a connect failed, from the error chain: hyper-util's connector names DNS failures in
/// its message, and the operating system's refusal or timeout is an `io::ErrorKind`.
fn connect_cause(error: &(dyn StdError + 'static)) -> &'static str {
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string();
        if text.contains("dns error") || text.contains("failed to lookup address") {
            return "DNS failure";
        }
        if let Some(io) = error.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return "connection refused",
                io::ErrorKind::TimedOut => return "connect timeout",
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                    return "host unreachable";
                }
                _ => {}
            }
        }
        next = error.source();
    }
    "connect failed"
}

/// Whether a `rustls::Error` is anywhere in the chain. `io::Error::source` skips the error it
/// wraps (it returns that error's source), so wrapped errors are reached through `get_ref`.
fn chain_has_rustls_error(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<rustls::Error>() {
            return true;
        }
        next = match error.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => error.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rustls_error_wrapped_in_io_errors() {
        let tls = io::Error::other(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::DecryptError,
        ));
        assert!(chain_has_rustls_error(&tls));
        let plain = io::Error::other(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(!chain_has_rustls_error(&plain));
    }

    #[test]
    fn connect_causes_are_named() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(connect_cause(&refused), "connection refused");
        let dns = io::Error::other("dns error: failed to lookup address information");
        assert_eq!(connect_cause(&dns), "DNS failure");
        let timeout = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(connect_cause(&timeout), "connect timeout");
        assert_eq!(connect_cause(&io::Error::other("x")), "connect failed");
    }

    #[test]
    fn labels_are_distinct() {
        let kinds = [
            ErrorKind::Connect,
            ErrorKind::Tls,
            ErrorKind::HeadersTimeout,
            ErrorKind::BodyIdleTimeout,
            ErrorKind::Protocol,
            ErrorKind::Body,
        ];
        let labels: std::collections::HashSet<_> = kinds.iter().map(ErrorKind::as_str).collect();
        assert_eq!(labels.len(), kinds.len());
    }
}
