//! A tiny OpenAI-like upstream for whole-proxy benchmarks (`benches/proxy_compare.sh`).
//!
//! Run with `cargo run --release --example mock_openai [PORT] [STREAM_CHUNKS]`. It binds
//! `127.0.0.1:PORT` (0, the default, picks a free port), prints `listening on 127.0.0.1:N` and
//! serves until killed. `POST /v1/chat/completions` answers 200 with a fixed small
//! `chat.completion` and OpenAI's `x-ratelimit-*` headers with limits so large that a proxy
//! reading them never throttles; with `"stream":true` in the body it answers
//! `text/event-stream` with STREAM_CHUNKS (default 16) `chat.completion.chunk` events and
//! `data: [DONE]`, sent as fast as the connection takes them. Anything else is a 404.
//!
//! It does as little work as possible per request, so that a benchmark measures the proxy in
//! front of it rather than the mock: no logging, no state, fixed bodies.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The non-streaming response body.
const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark mock."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}"#;

/// One SSE event of a streamed completion.
const CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"finish_reason\":null}]}\n\n";

/// The last SSE event.
const DONE: &str = "data: [DONE]\n\n";

/// Rate-limit headers as OpenAI sends them, with limits no benchmark comes near.
const RATE_LIMIT_HEADERS: [(&str, &str); 6] = [
    ("x-ratelimit-limit-requests", "100000000"),
    ("x-ratelimit-limit-tokens", "10000000000"),
    ("x-ratelimit-remaining-requests", "99999999"),
    ("x-ratelimit-remaining-tokens", "9999999999"),
    ("x-ratelimit-reset-requests", "1ms"),
    ("x-ratelimit-reset-tokens", "1ms"),
];

type ResponseBody = BoxBody<Bytes, Infallible>;

/// A streamed body: `remaining` copies of [`CHUNK`], then [`DONE`], one frame each.
#[derive(Debug)]
struct Sse {
    remaining: usize,
    done: bool,
}

impl Body for Sse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining > 0 {
            self.remaining -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(CHUNK.as_bytes())))))
        } else if !self.done {
            self.done = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(DONE.as_bytes())))))
        } else {
            Poll::Ready(None)
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

async fn handle(
    request: Request<Incoming>,
    stream_chunks: usize,
) -> Result<Response<ResponseBody>, Infallible> {
    if request.method() != Method::POST || request.uri().path() != "/v1/chat/completions" {
        let mut response = Response::new(Empty::new().boxed());
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    // Read the whole body, as a real upstream does; a broken body is the client's problem.
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let streaming = is_streaming(&body);
    let mut response = if streaming {
        let sse = Sse {
            remaining: stream_chunks,
            done: false,
        };
        let mut response = Response::new(sse.boxed());
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        response
    } else {
        let mut response =
            Response::new(Full::new(Bytes::from_static(COMPLETION.as_bytes())).boxed());
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    };
    let headers = response.headers_mut();
    for (name, value) in RATE_LIMIT_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert("openai-processing-ms", HeaderValue::from_static("1"));
    Ok(response)
}

/// `"stream":true` (with or without a space after the colon) anywhere in the body.
fn is_streaming(body: &[u8]) -> bool {
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    compact.windows(13).any(|w| w == b"\"stream\":true")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = match args.next() {
        Some(arg) => arg.parse().map_err(|e| format!("PORT: {e}"))?,
        None => 0,
    };
    let stream_chunks: usize = match args.next() {
        Some(arg) => arg.parse().map_err(|e| format!("STREAM_CHUNKS: {e}"))?,
        None => 16,
    };
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("accept: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(request, stream_chunks));
            // Errors here are clients going away mid-request; nothing to report.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
