//! In-process upstreams for the client tests: hyper servers (plain or TLS) and raw TCP scripts
//! for behaviours hyper would never produce (stalls, truncated bodies).

pub mod time;

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kcp_upstream::{Upstream, UpstreamConfig};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Upper bound on any single wait in a test; generous so a loaded machine does not flake.
pub const BOUND: Duration = Duration::from_secs(5);

pub type TestBody = BoxBody<Bytes, std::io::Error>;

/// Waits for `future`, failing the test if it takes longer than [`BOUND`].
pub async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(BOUND, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    http_body_util::Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn request(uri: &str) -> Request<http_body_util::Full<Bytes>> {
    Request::get(uri)
        .body(http_body_util::Full::default())
        .expect("valid test request")
}

pub fn upstream(config: UpstreamConfig) -> Upstream {
    Upstream::new(&config).expect("upstream client builds")
}

/// A listening test upstream; stops accepting when dropped.
pub struct Server {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Server {
    pub fn url(&self, scheme: &str, path_and_query: &str) -> String {
        format!("{scheme}://{}{path_and_query}", self.addr)
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A hyper server (HTTP/1.1 or HTTP/2, auto-detected) calling `handler` for every request,
/// behind TLS when `tls` is given.
pub async fn serve<F, Fut>(tls: Option<Arc<ServerConfig>>, handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                // Connection errors are what several tests provoke; the client side asserts them.
                let _ = match acceptor {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                        Err(_) => return,
                    },
                    None => builder.serve_connection(TokioIo::new(tcp), service).await,
                };
            });
        }
    });
    Server {
        addr,
        accepts,
        task,
    }
}

/// A TCP listener running `script` on its first connection; the handle yields its result.
pub async fn raw_server<F, Fut, T>(script: F) -> (SocketAddr, JoinHandle<T>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        script(tcp).await
    });
    (addr, task)
}

/// Reads one request head (up to the blank line); the tests send bodiless requests.
pub async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut byte).await.expect("read request head");
        assert_eq!(n, 1, "connection closed inside the request head");
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("request head is UTF-8")
}

pub async fn write(tcp: &mut TcpStream, data: &[u8]) {
    tcp.write_all(data).await.expect("write to client");
}

/// A CA and a leaf certificate for `127.0.0.1` and `localhost`, signed by it.
pub struct Pki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kcp test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("leaf params");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf certificate");
        Self {
            ca_pem: ca.pem(),
            chain: vec![leaf.der().clone()],
            key_der: leaf_key.serialize_der(),
        }
    }

    /// A server config offering exactly the given ALPN protocols.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_no_client_auth()
                .with_single_cert(self.chain.clone(), key)
                .expect("server certificate");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// The CA certificate as a PEM file, deleted when the handle drops.
    pub fn ca_file(&self) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(self.ca_pem.as_bytes())
            .expect("write CA file");
        file
    }
}
