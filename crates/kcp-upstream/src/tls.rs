//! The rustls client configuration: which roots are trusted and which crypto provider runs.
//!
//! Trust is the union of the webpki (Mozilla) roots, the system's native roots and the operator's
//! `ca_file`, so a public provider, a corporate MITM proxy and a private gateway all verify. The
//! ring provider is passed explicitly, so nothing depends on a process-wide default provider.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::error::BuildError;

/// A client configuration without ALPN; the connector builder sets the protocols (the
/// realtime WebSocket client uses it as is: HTTP/1.1 only).
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, BuildError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    add_native_roots(&mut roots);
    if let Some(path) = ca_file {
        add_ca_file(&mut roots, path)?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(config)
}

/// Native roots are a bonus on top of webpki's: a host without them still works.
fn add_native_roots(roots: &mut RootCertStore) {
    let native = rustls_native_certs::load_native_certs();
    if !native.errors.is_empty() {
        let errors = &native.errors;
        tracing::debug!(?errors, "some native root certificates could not be loaded");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "native root certificates");
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), BuildError> {
    let pem = std::fs::read(path).map_err(|source| BuildError::CaFileRead {
        path: path.to_owned(),
        source,
    })?;
    let mut found = false;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| BuildError::CaFilePem {
            path: path.to_owned(),
            source,
        })?;
        roots
            .add(cert)
            .map_err(|source| BuildError::CaFileCertificate {
                path: path.to_owned(),
                source,
            })?;
        found = true;
    }
    if found {
        Ok(())
    } else {
        Err(BuildError::CaFileEmpty {
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn ca_file(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(contents).expect("write temp file");
        file
    }

    fn error_for(contents: &[u8]) -> BuildError {
        let file = ca_file(contents);
        let error = client_config(Some(file.path())).expect_err("CA file must be rejected");
        let shown = error.to_string();
        assert!(
            shown.contains(&file.path().display().to_string()),
            "{shown}"
        );
        error
    }

    #[test]
    fn accepts_a_ca_certificate() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("self-signed CA");
        let file = ca_file(ca.pem().as_bytes());
        assert!(client_config(Some(file.path())).is_ok());
    }

    #[test]
    fn missing_file_names_the_path() {
        let error =
            client_config(Some(Path::new("/nonexistent/kcp-ca.pem"))).expect_err("missing CA file");
        assert!(matches!(error, BuildError::CaFileRead { .. }));
        assert!(error.to_string().contains("/nonexistent/kcp-ca.pem"));
    }

    #[test]
    fn file_without_certificate_is_rejected() {
        let error = error_for(b"just some text\n");
        assert!(matches!(error, BuildError::CaFileEmpty { .. }), "{error:?}");
    }

    #[test]
    fn broken_pem_is_rejected() {
        let error = error_for(
            b"-----BEGIN CERTIFICATE-----\n@@@not base64@@@\n-----END CERTIFICATE-----\n",
        );
        assert!(matches!(error, BuildError::CaFilePem { .. }), "{error:?}");
    }

    #[test]
    fn non_certificate_der_is_rejected() {
        let error = error_for(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        assert!(
            matches!(error, BuildError::CaFileCertificate { .. }),
            "{error:?}"
        );
    }
}
