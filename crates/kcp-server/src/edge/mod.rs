//! The edge: everything that stands between a client's connection and the proxy pipeline.
//!
//! Each rule here can refuse a request before it costs a key or an upstream call: client
//! authentication ([`auth`]), CORS ([`cors`]), head size ([`head`]), path and method rules
//! ([`path`]), body bounds
//! ([`body_limit`]), the in-flight cap ([`overload`]) and request ids ([`request_id`]). Refusals use OpenAI's error shape
//! ([`openai_error`]) so SDKs show them like the provider's own.
pub mod auth;
pub mod body_limit;
pub mod cors;
pub mod head;
pub mod openai_error;
pub mod overload;
pub mod path;
pub mod request_id;
