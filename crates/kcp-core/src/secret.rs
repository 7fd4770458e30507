//! Secrets that cannot leak by accident.
//!
//! API keys and client tokens live only inside [`Secret`]. Its `Debug`, `Display` and
//! `Serialize` print a redacted form, so a secret that ends up in a log line, a panic
//! message, an error chain or a config dump shows as `[redacted]`. The one way to read
//! the value is [`Secret::expose`], which the server calls exactly where it writes the
//! `Authorization` header to the key's own upstream.

use std::fmt;

use sha2::{Digest, Sha256};

/// A secret string (an API key or a client token) that never prints itself.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a secret value. Surrounding whitespace is trimmed: keys pasted into env vars
    /// and JSON files often carry a stray newline.
    pub fn new(value: impl AsRef<str>) -> Self {
        Self(value.as_ref().trim().into())
    }

    /// The secret itself. Call it only to hand the value to its own upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty (after trimming).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A short, stable, non-reversible id: `key-` and the first 8 hex digits of SHA-256.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        let mut out = String::with_capacity(12);
        out.push_str("key-");
        for byte in &digest[..4] {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        Ok(Secret::new(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_itself() {
        let secret = Secret::new("sk-live-abcdef123456");
        assert!(!format!("{secret:?}").contains("abcdef"));
        assert!(!format!("{secret}").contains("abcdef"));
        assert!(!format!("{:?}", Some(&secret)).contains("abcdef"));
        assert_eq!(secret.expose(), "sk-live-abcdef123456");
    }

    #[test]
    fn fingerprint_is_stable_and_short() {
        let a = Secret::new("sk-one");
        assert_eq!(a.fingerprint(), Secret::new(" sk-one\n").fingerprint());
        assert_ne!(a.fingerprint(), Secret::new("sk-two").fingerprint());
        assert_eq!(a.fingerprint().len(), 12);
        assert!(!a.fingerprint().contains("sk-one"));
    }

    #[test]
    fn debug_and_display_are_redacted_and_emptiness_is_known() {
        let s = Secret::new("sk-live-value");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(s.to_string(), "[redacted]");
        assert!(!s.is_empty());
        assert!(Secret::new("  ").is_empty(), "trimmed");
    }
}
